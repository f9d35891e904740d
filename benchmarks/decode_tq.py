"""Transfer Q* vs ARGS vs plain sampling on SmolLM2-135M-Instruct (CPU), reward vs KL to SFT
(issue #29, spec other.md §3).

    flock /tmp/splice-heavy.lock env PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \\
        python benchmarks/decode_tq.py --prompts 6 --max-new-tokens 20 --plot docs/img/decode-tq.png

Offline setting, all of it ours and small:

* reward ``r`` = the decision value (logit of "fresh") of a TF-IDF + logistic-regression
  sentiment classifier trained here on rt_sentiment (90 %; its accuracy on the other 10 % is
  printed), applied to the response text;
* π_sft = SmolLM2-135M-Instruct; prompts ask for a short review of a (made-up) film;
* ρ_BL, the aligned baseline of TQ* (direct transfer), = the same SmolLM2 prompted by a system
  message to write enthusiastic reviews (a prompted stand-in for the spec's LoRA-tuned
  baseline; no training);
* every guided method samples from ``π(z) ∝ π_sft(z) exp(Q̂(z)/α)`` over the top-k of π_sft
  (RerankTopK mode "sample", T = 1): ARGS with ``Q̂`` = reward of the partial response, TQ*
  with ``Q̂`` = reward of ``[y_<t, z, τ]``, ``τ`` a greedy rollout of ρ_BL of ``--horizon``
  tokens; CD (rollouts of π_sft itself) at the middle α.

KL to SFT per point = ``Σ_t KL(π(·|s_t) ‖ π_sft(·|s_t))`` along the sampled responses (exact
per step, so an unbiased estimate of the sequence KL), mean over prompts; plain sampling has
KL 0 and best-of-N ≤ log N − (N−1)/N.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from splice.data.causal_lm import load_causal_lm
from splice.decode import CachedLM, ModelProposer, RerankTopK, generate
from splice.decode.quality import diversity
from splice.decode.tq import args_scorer, cd_scorer, tq_scorer

FILMS = ["The Last Lighthouse", "Midnight in Lagos", "Paper Moons", "The Iron Orchard",
         "Seven Winters", "A Quiet Harbor", "Glass City", "The Long Road North"]  # fmt: skip
BASELINE_SYSTEM = (
    "You are a film critic who loves every film. Your reviews are warm, enthusiastic and full "
    "of praise."
)


def sentiment_reward():
    """TF-IDF + logistic regression on rt_sentiment; returns (fit, held-out accuracy)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from splice.data.tasks.rt_sentiment import read

    texts, y, _ = read()
    idx = np.random.default_rng(0).permutation(len(texts))
    cut = int(0.9 * len(idx))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform([texts[i] for i in idx[:cut]])
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(xtr, y[idx[:cut]])
    acc = clf.score(vec.transform([texts[i] for i in idx[cut:]]), y[idx[cut:]])
    return lambda text: float(clf.decision_function(vec.transform([text]))[0]), acc


class Recorder:
    """A scorer wrapper keeping each step's (log π_sft of the top-k, scores) for the KL."""

    def __init__(self, inner, weight: float) -> None:
        self.inner, self.weight, self.steps = inner, weight, []
        self.name = inner.name

    @property
    def calls(self) -> int:
        return self.inner.calls

    def score(self, ids, prompt_len, cand):
        s = self.inner.score(ids, prompt_len, cand)
        self.steps.append((cand.logq.float(), s.float()))
        return s

    def kl(self) -> float:
        total = 0.0
        for logq, s in self.steps:
            logpi = torch.log_softmax(logq + self.weight * s, -1)
            total += float((logpi.exp() * (logpi - logq)).sum())
        return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=4)
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 4.0, 16.0], help="1/α")
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--plot", default=None, help="write the reward-vs-KL plot here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    score_text, acc = sentiment_reward()
    model, tok = load_causal_lm("smollm2")
    eos = [tok.eos_token_id]

    def chat(text: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tok.encode(s, add_special_tokens=False))

    def reward(ids, prompt_len):
        return score_text(tok.decode(list(ids[prompt_len:]), skip_special_tokens=True))

    users = [f"Write a two-sentence review of the film '{f}'." for f in FILMS[: args.prompts]]
    prompts = [chat(u) for u in users]
    own = [chat(u, BASELINE_SYSTEM) for u in users]
    n = args.max_new_tokens
    print(f"reward classifier: held-out accuracy {acc:.3f} on rt_sentiment", file=sys.stderr)
    rows = []

    def record(name, w, outs, kls, secs):
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        r = [reward(p + o, len(p)) for p, o in zip(prompts, outs, strict=True)]
        rows.append((name, w, np.mean(r), np.std(r) / len(r) ** 0.5, np.mean(kls),
                     np.mean([diversity(t) for t in texts]), secs, texts[0]))  # fmt: skip
        msg = f"{np.mean(r):+.3f} KL {np.mean(kls):.2f} ({secs:.0f} s, {time.time() - t0:.0f} s)"
        print(f"  {name} 1/α={w}: reward {msg}", file=sys.stderr, flush=True)

    # plain sampling of π_sft, and best-of-N of it
    target, t = CachedLM(model, "sft"), time.time()
    samples = [
        [generate(p, target=target, max_new_tokens=n, eos=eos, seed=42 + 100 * j + i).tokens
         for j in range(args.best_of)] for i, p in enumerate(prompts)
    ]  # fmt: skip
    record("plain sampling", "-", [s[0] for s in samples], [0.0] * len(prompts), time.time() - t)
    pairs = zip(prompts, samples, strict=True)
    best = [max(s, key=lambda o, p=p: reward(p + o, len(p))) for p, s in pairs]
    bon_kl = np.log(args.best_of) - (args.best_of - 1) / args.best_of
    record(f"best-of-{args.best_of} (KL bound)", "-", best, [bon_kl] * len(prompts), 0.0)

    proposer = ModelProposer(model, "sft")
    middle = args.weights[len(args.weights) // 2]
    configs = [("ARGS", w, lambda: args_scorer(reward)) for w in args.weights]
    configs += [("TQ* (ρ_BL rollouts)", w, None) for w in args.weights]
    kw = dict(horizon=args.horizon, eos=eos)
    configs += [("CD (π_sft rollouts)", middle, lambda: cd_scorer(model, reward, **kw))]
    for name, w, make in configs:
        outs, kls, t = [], [], time.time()
        for i, p in enumerate(prompts):
            inner = make() if make else tq_scorer(model, reward, rollout_prompt=own[i], **kw)
            rec = Recorder(inner, w)
            policy = RerankTopK(k=args.k, weight=w, mode="sample", temperature=1.0)
            g = generate(p, proposer=proposer, scorer=rec, policy=policy, max_new_tokens=n,
                         eos=eos, seed=42 + i)  # fmt: skip
            outs.append(g.tokens)
            kls.append(rec.kl())
        record(name, w, outs, kls, time.time() - t)

    print(f"\nSmolLM2-135M-Instruct, {len(prompts)} review prompts × ≤{n} tokens, top-k={args.k}, "
          f"rollout horizon {args.horizon}, reward = TF-IDF+LR sentiment logit "
          f"(held-out acc {acc:.3f}); {time.time() - t0:.0f} s\n")  # fmt: skip
    print("| method | 1/α | avg reward ± s.e. | KL to SFT (nats/response) | diversity | s |")
    print("|---|---|---|---|---|---|")
    for name, w, r, se, kl, div, secs, _ in rows:
        print(f"| {name} | {w} | {r:+.3f} ± {se:.3f} | {kl:.2f} | {div:.3f} | {secs:.0f} |")
    print("\nfirst prompt's response per method:")
    for name, w, *_, text in rows:
        print(f"  {name} {w}: {text!r}")
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in dict.fromkeys(r[0] for r in rows):
        pts = [(r[4], r[2]) for r in rows if r[0] == name]
        ax.plot(*zip(*pts, strict=True), "o-" if len(pts) > 1 else "s", label=name)
    ax.set_xlabel("KL to π_sft (nats per response)")
    ax.set_ylabel("average reward (sentiment logit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
