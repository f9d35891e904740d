"""Speculative vs plain decoding on SmolLM2-135M-Instruct (CPU), and AMBEDKAR's IIR on the
project's probe set (issue #29).

    flock /tmp/splice-heavy.lock env PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \
        python benchmarks/decode.py --part speculative --lean --prompts 6 --max-new-tokens 48 \
        --drafters ngram@3 int8@3,4,5 int8-own@3 bf16@4,6

``--lean`` runs the target, the plain baseline and the drafters on
:class:`splice.decode.LeanLM` (pre-packed oneDNN matrices, in-place KV cache); its ``int8`` /
``bf16`` / ``self:K`` drafters read the target's exact K/V (``-own`` suffix: their own).

Part ``speculative``: greedy decoding (so equal output is checkable token for token) of chat
prompts, plain and speculative interleaved prompt by prompt (the same CPU load for both), for
each drafter and γ. Drafters: n-gram prompt lookup; the target's first K of 30 blocks with its
own norm and head (``self:K``); an int8 copy of the target's own weights (``int8``) or of its
first K blocks (``int8:K``). There is no smaller same-tokenizer SmolLM2 offline. Printed side
by side: the matrix-weight bytes a drafter step reads and its measured step time, both as a
fraction of the target's (the size ratio), tokens/s of plain and speculative decoding, their
ratio, α (mean β, §1.6), acceptance rate, tokens per target call, and whether every output
equals plain greedy.

Part ``ambedkar``: IIR (spec §2.7) of the drafter alone (SmolLM2 greedy) vs AMBEDKAR
(drafter top-k re-ranked by SmolLM2 with the constitution preamble as verifier, js_term,
α in ``--alphas``) on the probe set of ``splice.decode.iir`` (ours, not the paper's), with the
share of steps where the re-ranking left the drafter's top-1 and the latency overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from splice.data.causal_lm import load_causal_lm
from splice.decode import (
    CachedLM,
    LeanLM,
    ModelProposer,
    NgramProposer,
    RerankTopK,
    Sampling,
    early_exit,
    generate,
    int8_draft,
)
from splice.decode.ambedkar import CONSTITUTION, CounterfactualDivergenceScorer
from splice.decode.counterfactual import Counterfactual
from splice.decode.iir import PROBE_PROMPTS, PROTECTED, iir

PROMPTS = [
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the sum of a list of numbers.",
    "List the days of the week, one per line.",
    "Explain in two sentences why the sky is blue.",
    "What is the capital of France? Answer in one sentence.",
    "Write the numbers from one to twenty in words, separated by commas.",
]
COPY_PROMPTS = [  # answers that copy from the prompt: where prompt lookup pays
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "Correct the spelling and write the sentence out again: 'The comittee will meet on "
    "Wendesday to discus the new budjet for the libary.'",
    "Add a docstring to this function and write the whole function out:\n"
    "def add_numbers(a, b):\n    total = a + b\n    return total",
    "Write this list as a numbered list: apple, banana, cherry, date, elderberry, fig, grape.",
    "Replace every 'cat' with 'dog' and write the text out: 'The cat sat on the mat. The cat "
    "was happy. Later the cat went to sleep on the mat.'",
    "Quote the first sentence of this paragraph exactly: 'Rayleigh scattering makes the sky "
    "look blue during the day. At sunset the light passes through more air.'",
]
GREEDY = Sampling(temperature=0)


def _chat(tok, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(s, add_special_tokens=False))


def _linear_bytes(model, layers: int | None = None) -> int:
    """Bytes of the matrix weights a decoding step reads (fp32 Linear; int8 quantised Linear);
    ``layers``: count only the head and the first ``layers`` blocks (an fp32 model)."""
    if layers is not None:
        per_block = (_linear_bytes(model) - _linear_bytes(model.lm_head)) // len(model.model.layers)
        return _linear_bytes(model.lm_head) + layers * per_block
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif callable(getattr(m, "weight", None)):  # torch.ao dynamic-quantised Linear
            total += m.weight().numel()
    return total


def _step_ms(lm, ids, reps: int = 8, rows: int = 1) -> float:
    """Median time of a cached step of ``lm`` (a CachedLM or LeanLM) over ``rows`` new tokens
    after ``ids`` (``rows = γ + 1`` is the target's verify call)."""
    times = []
    lm.logits(ids, 1)
    for _ in range(reps):
        t = time.perf_counter()
        lm.logits([*ids, *[1] * rows], rows)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[reps // 2]


def _drafter(spec: str, model, target):
    """``ngram`` | ``self:K`` | ``int8`` | ``int8:K`` | ``bf16`` (lean only), ``-own`` suffix:
    no KV sharing (lean only) -> (label, proposer, drafter LM, its matrix bytes)."""
    kind, _, k = spec.partition(":")
    layers = int(k) if k else None
    if kind == "ngram":
        return "n-gram n<=3", NgramProposer(model.config.vocab_size, 3), None, 0
    n_blocks = layers or model.config.num_hidden_layers
    blocks = f"first {n_blocks} blocks"
    if isinstance(target, LeanLM):  # the lean forward; by default on the target's exact K/V
        weights = {"self": "fp32"}.get(kind.removesuffix("-own"), kind.removesuffix("-own"))
        share = None if kind.endswith("-own") else target
        lm = LeanLM(model, spec, weights=weights, layers=layers, kv_from=share)
        label = f"lean {weights}, {blocks}, {'own K/V' if share is None else 'target K/V'}"
        size = _linear_bytes(model, layers) * {"fp32": 4, "bf16": 2, "int8": 1}[weights] // 4
        return label, ModelProposer(lm, spec), LeanLM(model, weights=weights, layers=layers), size
    m = early_exit(model, layers) if kind == "self" else int8_draft(model, layers)
    label = f"{'self' if kind == 'self' else 'int8 self'}, {blocks}"
    return label, ModelProposer(m, spec), CachedLM(m), _linear_bytes(m)


def speculative(args) -> None:
    model, tok = load_causal_lm("smollm2")
    texts = COPY_PROMPTS if args.prompt_set == "copy" else PROMPTS
    prompts = [_chat(tok, p) for p in texts[: args.prompts]]
    eos, n = [tok.eos_token_id], args.max_new_tokens
    target = LeanLM(model, "target") if args.lean else CachedLM(model, "target")
    generate(prompts[0], target=target, sampling=GREEDY, max_new_tokens=4)  # warm-up
    t_step, w_bytes = _step_ms(target, prompts[0]), _linear_bytes(model)
    t_hf = _step_ms(CachedLM(model), prompts[0]) if args.lean else t_step
    rows, t0 = [], time.time()
    configs = []  # "int8@2,3" gives that drafter its own γ list
    for d in args.drafters:
        d, _, gs = d.partition("@")
        configs += [(d, g) for g in ([int(x) for x in gs.split(",")] if gs else args.gammas)]
    for i, (spec, g) in enumerate(configs, 1):
        label, proposer, dm, d_bytes = _drafter(spec, model, target)
        plain_s = spec_s = 0.0
        toks, calls, acc, drafted, betas, same = 0, 0, 0, 0, [], True
        for ids in prompts:  # plain and speculative interleaved per prompt: same CPU load
            ref = generate(ids, target=target, sampling=GREEDY, max_new_tokens=n, eos=eos)
            out = generate(ids, target=target, proposer=proposer, sampling=GREEDY, gamma=g,
                           max_new_tokens=n, eos=eos)  # fmt: skip
            m = out.metrics
            plain_s, spec_s = plain_s + ref.metrics["seconds"], spec_s + m["seconds"]
            toks, calls = toks + m["new_tokens"], calls + m["target_calls"]
            acc, drafted = acc + m["accepted"], drafted + m["drafted"]
            betas += [m["alpha"]] if m["alpha"] is not None else []
            same &= out.tokens == ref.tokens
        c = _step_ms(dm, prompts[0]) / t_step if dm is not None else 0.0
        size = d_bytes / w_bytes
        v = _step_ms(target, prompts[0], rows=g + 1) / t_step
        rows.append((label, g, toks / plain_s, toks / spec_s, betas, acc, drafted,
                     toks / calls, c, size, same, v))  # fmt: skip
        eta = (time.time() - t0) / i * (len(configs) - i)
        print(f"  [{i}/{len(configs)}] {label} γ={g}: {plain_s / spec_s:.2f}× (ETA {eta:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    lean = "lean forward (LeanLM) for target, plain and drafters; " if args.lean else ""
    print(
        f"\nSmolLM2-135M-Instruct, greedy, {len(prompts)} {args.prompt_set} prompts × ≤{n} "
        f"tokens, torch threads {torch.get_num_threads()}; {lean}target step {t_step:.1f} ms "
        f"(transformers forward {t_hf:.1f} ms), {w_bytes / 1e6:.0f} MB of matrix weights; "
        f"plain and speculative interleaved per prompt; load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| drafter | weights read vs target | c = step time vs target | γ | V = verify vs step "
          "| plain tok/s | spec tok/s | × plain | α | acceptance | tokens/target call "
          "| = plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for label, g, tp, ts, betas, acc, drafted, per_call, c, size, same, v in rows:
        alpha = sum(betas) / len(betas) if betas else None
        print(
            f"| {label} | {size:.2f} | {c:.2f} | {g} | {v:.2f} | {tp:.2f} | {ts:.2f} | "
            f"{ts / tp:.2f} | "
            f"{f(alpha)} | {f(acc / drafted if drafted else None)} | {per_call:.2f} | "
            f"{'yes' if same else 'NO'} |"
        )


class _Changed:
    """Scorer wrapper: counts the steps where ``log q + α·score`` moves off the drafter's top-1."""

    def __init__(self, inner, alpha: float) -> None:
        self.inner, self.alpha, self.name = inner, alpha, inner.name
        self.steps = self.changed = 0
        self.flip: list[float] = []  # per step: the least α that would leave the top-1

    @property
    def calls(self) -> int:
        return self.inner.calls

    def score(self, ids, prompt_len, cand):
        s = self.inner.score(ids, prompt_len, cand)
        self.steps += 1
        self.changed += int((cand.logq + self.alpha * s).argmax() != cand.logq.argmax())
        top = int(cand.logq.argmax())
        gap, gain = cand.logq[top] - cand.logq, s - s[top]  # log-prob lost, score won
        ratios = (gap / gain)[gain > 0]
        self.flip.append(float(ratios.min()) if len(ratios) else float("inf"))
        return s


def ambedkar(args) -> None:
    model, tok = load_causal_lm("smollm2")
    prompts = PROBE_PROMPTS[:: args.probe_stride]
    ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
    eos, n = [tok.eos_token_id], args.max_new_tokens
    drafter = ModelProposer(model, "drafter")
    base, t_base = [], 0.0
    for x in ids:
        g = generate(x, target=CachedLM(model), sampling=GREEDY, max_new_tokens=n, eos=eos)
        base.append(tok.decode(g.tokens, skip_special_tokens=True))
        t_base += g.metrics["seconds"] / max(g.metrics["new_tokens"], 1)
    rows = [("drafter alone (greedy)", "-", iir(prompts, base), t_base, None, base)]
    for alpha in args.alphas:
        cf = Counterfactual(protected=PROTECTED, mode="framing")
        scorer = _Changed(
            CounterfactualDivergenceScorer(model, tok, cf, constitution=CONSTITUTION), alpha
        )
        policy, outs, t_amb = RerankTopK(k=args.k, weight=alpha), [], 0.0
        for i, x in enumerate(ids, 1):
            a = generate(
                x, proposer=drafter, scorer=scorer, policy=policy, max_new_tokens=n, eos=eos
            )
            outs.append(tok.decode(a.tokens, skip_special_tokens=True))
            t_amb += a.metrics["seconds"] / max(a.metrics["new_tokens"], 1)
            print(f"  α={alpha} [{i}/{len(ids)}]", file=sys.stderr, flush=True)
        rows.append(
            ("AMBEDKAR", alpha, iir(prompts, outs), t_amb, scorer.changed / scorer.steps, outs)
        )
        f = torch.tensor(scorer.flip)
        finite = f[f.isfinite()]
        print(
            f"α={alpha}: {len(f)} steps; the verifier prefers some candidate to the drafter's "
            f"top-1 at {100 * len(finite) / len(f):.0f} %; α that would flip a step: median "
            f"{finite.median():.3g}, ≤10 at {100 * (f <= 10).float().mean():.0f} %, ≤100 at "
            f"{100 * (f <= 100).float().mean():.0f} % of steps"
            if len(finite)
            else f"α={alpha}: the verifier never prefers another candidate",
            file=sys.stderr,
        )
    print(
        f"\nIIR on our probe set ({len(prompts)} prompts, ≤{n} tokens; drafter = verifier model "
        f"= SmolLM2-135M-Instruct, verifier with the constitution preamble; k={args.k}, "
        f"js_term, cf framing, cf_scope=prompt)\n"
    )
    print("| decoding | α | IIR religion % | IIR caste % | IIR overall % | steps off top-1 | "
          "s/token | overhead |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, alpha, r, t, ch, _ in rows:
        off = "-" if ch is None else f"{100 * ch:.1f} %"
        print(
            f"| {name} | {alpha} | {r['iir_religion']:.1f} | {r['iir_caste']:.1f} | "
            f"{r['iir']:.1f} | {off} | {t / len(ids):.4f} | {100 * (t / t_base - 1):+.0f} % |"
        )
    for name, alpha, r, *_, outs in rows:
        hits = [(p, o) for p, o in zip(prompts, outs, strict=True) if iir([p], [o])["iir"]]
        groups = {g: v for a in r["per_group"].values() for g, v in a.items() if v}
        print(f"\n{name} α={alpha}: groups named {groups or 'none'}")
        for p, o in hits:
            print(f"  {p!r} -> {o!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speculative", "ambedkar", "all"], default="all")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-set", choices=["chat", "copy"], default="chat")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    ap.add_argument(
        "--drafters", nargs="+", default=["ngram", "self:24", "int8", "int8:24"],
        help="ngram | self:K (first K blocks) | int8 (int8 copy) | int8:K; @g,g: own γ list",
    )  # fmt: skip
    ap.add_argument("--probe-stride", type=int, default=1, help="every n-th probe prompt")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--alphas", type=float, nargs="*", default=[1.0, 10.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lean", action="store_true",
                    help="target, plain and drafters through splice.decode.LeanLM")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("speculative", "all"):
        speculative(args)
    if args.part in ("ambedkar", "all"):
        ambedkar(args)


if __name__ == "__main__":
    main()
