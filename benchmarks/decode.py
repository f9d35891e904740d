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
α in ``--alphas``) on one of our two probe sets (``--probes``; ours, not the paper's):
``cues`` (``splice.decode.cues``: religion/caste cues, identity masked; CF swaps the cues for
the partner group's) or ``framing`` (``splice.decode.iir``; CF swaps framing words). Printed:
IIR per axis, the change in religion IIR, the share of steps where the re-ranking left the
drafter's top-1, the median α that would flip a step, s/token and the overhead over the
drafter alone on the same forward, plus the one-step cost of 1 / 2 / 3 contexts in one
LeanLM forward. ``--scorers``: ``hf`` (drafter and both branches as three ``transformers``
passes), ``lean`` (drafter pass + both branches in one LeanLM pass), ``joint`` (one LeanLM pass
of three rows). Drafter alone and every AMBEDKAR row run interleaved prompt by prompt.
The cue set is template-major, six religions per template: a ``--probe-stride`` prime to 6
(1, 5, 7) keeps a subsample balanced across the religions (4 gives three of them, 6 one).

    flock /tmp/splice-heavy.lock env PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \
        python benchmarks/decode.py --part ambedkar --probes cues --max-new-tokens 16 \
        --alphas 1 10 30 100 --scorers joint
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
from splice.decode.cues import CUE_PROMPTS, cue_counterfactual
from splice.decode.iir import PROBE_PROMPTS, PROTECTED, iir
from splice.decode.lean import batched_logits

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
        self._record(cand, s)
        return s

    def propose_and_score(self, proposer, ids, prompt_len, k):
        both = self.inner.propose_and_score(proposer, ids, prompt_len, k)
        if both is not None:
            self._record(*both)
        return both

    def _record(self, cand, s) -> None:
        self.steps += 1
        self.changed += int((cand.logq + self.alpha * s).argmax() != cand.logq.argmax())
        top = int(cand.logq.argmax())
        gap, gain = cand.logq[top] - cand.logq, s - s[top]  # log-prob lost, score won
        ratios = (gap / gain)[gain > 0]
        self.flip.append(float(ratios.min()) if len(ratios) else float("inf"))


def _probe_set(name: str):
    """(prompts, counterfactual, label) of one of our two probe sets."""
    if name == "cues":
        return CUE_PROMPTS, cue_counterfactual(), "cue probe set, CF = cue swap (identity_swap)"
    cf = Counterfactual(protected=PROTECTED, mode="framing")
    return PROBE_PROMPTS, cf, "framing probe set, CF = framing-word swap"


def _contexts_ms(packed, ids, contexts: int, reps: int = 9) -> float:
    """Median ms of one cached one-token step of ``contexts`` forks in one batched forward."""
    forks = [packed.fork(f"ctx{i}") for i in range(contexts)]
    batched_logits(forks, [list(ids) for _ in forks])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        batched_logits(forks, [[*ids, 1] for _ in forks])
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[reps // 2]


def ambedkar(args) -> None:
    model, tok = load_causal_lm("smollm2")
    texts, cf, label = _probe_set(args.probes)
    prompts = texts[:: args.probe_stride]
    ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
    eos, n = [tok.eos_token_id], args.max_new_tokens
    packed = LeanLM(model, "drafter")  # one packed copy of the weights; every lean part forks it
    bases = {"hf": CachedLM(model, "drafter"), "lean": packed}
    forwards = sorted({"hf" if s == "hf" else "lean" for s in args.scorers} | {"lean"})
    configs = []
    for alpha in args.alphas:
        for kind in args.scorers:  # hf: 3 transformers passes; lean: drafter + 1 batched pass
            if kind == "hf":  # of both branches; joint: one pass of 3 rows
                sc = CounterfactualDivergenceScorer(model, tok, cf, constitution=CONSTITUTION)
                prop = ModelProposer(model, "drafter")
            else:
                sc = CounterfactualDivergenceScorer(
                    packed, tok, cf, constitution=CONSTITUTION, lean=True
                )
                prop = sc.joint_proposer() if kind == "joint" else ModelProposer(packed.fork("d"))
            configs.append(
                (kind, alpha, _Changed(sc, alpha), prop, RerankTopK(k=args.k, weight=alpha))
            )
    base = {f: ([], [0.0]) for f in forwards}
    runs = [([], [0.0]) for _ in configs]
    t0 = time.time()
    for i, x in enumerate(ids, 1):  # drafter alone and every AMBEDKAR row per prompt: same load
        for f in forwards:
            g = generate(x, target=bases[f], sampling=GREEDY, max_new_tokens=n, eos=eos)
            base[f][0].append(tok.decode(g.tokens, skip_special_tokens=True))
            base[f][1][0] += g.metrics["seconds"] / max(g.metrics["new_tokens"], 1)
        for (_, _, sc, prop, policy), (outs, t) in zip(configs, runs, strict=True):
            a = generate(x, proposer=prop, scorer=sc, policy=policy, max_new_tokens=n, eos=eos)
            outs.append(tok.decode(a.tokens, skip_special_tokens=True))
            t[0] += a.metrics["seconds"] / max(a.metrics["new_tokens"], 1)
        eta = (time.time() - t0) / i * (len(ids) - i)
        print(f"  [{i}/{len(ids)}] ETA {eta:.0f} s", file=sys.stderr, flush=True)
    ms = {c: _contexts_ms(packed, ids[0], c) for c in (1, 2, 3)}
    hf_ms = _step_ms(CachedLM(model), ids[0])
    print(
        f"\nIIR on our {label} ({len(prompts)} prompts, ≤{n} tokens; drafter = verifier model = "
        f"SmolLM2-135M-Instruct, verifier with the constitution preamble; k={args.k}, js_term, "
        f"cf_scope=prompt; torch threads {torch.get_num_threads()}; load average "
        f"{os.getloadavg()[0]:.2f}). One cached one-token step: transformers {hf_ms:.1f} ms; "
        f"LeanLM 1 / 2 / 3 contexts in one batched forward {ms[1]:.1f} / {ms[2]:.1f} / "
        f"{ms[3]:.1f} ms\n"
    )
    print("| decoding | forward | α | IIR religion % | IIR caste % | IIR overall % | Δ religion pp "
          "| steps off top-1 | α to flip (median) | s/token | overhead |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = iir(prompts, base["lean"][0])
    rows = [(f"drafter alone ({f})", f, "-", base[f][0], base[f][1][0], None) for f in forwards]
    names = {"hf": "3 passes", "lean": "drafter + 1 batched pass", "joint": "1 pass, 3 rows"}
    for (kind, alpha, sc, *_), (outs, t) in zip(configs, runs, strict=True):
        rows.append((f"AMBEDKAR ({names[kind]})", "hf" if kind == "hf" else "lean", alpha,
                     outs, t[0], sc))  # fmt: skip
    for name, f, alpha, outs, t, sc in rows:
        r, t_base = iir(prompts, outs), base[f][1][0]
        off = flip = "-"
        if sc is not None:
            off = f"{100 * sc.changed / max(sc.steps, 1):.1f} %"
            fl = torch.tensor(sc.flip)
            flip = f"{fl[fl.isfinite()].median():.3g}" if fl.isfinite().any() else "inf"
        print(
            f"| {name} | {f} | {alpha} | {r['iir_religion']:.1f} | {r['iir_caste']:.1f} | "
            f"{r['iir']:.1f} | {r['iir_religion'] - ref['iir_religion']:+.1f} | {off} | {flip} | "
            f"{t / len(ids):.4f} | {100 * (t / t_base - 1):+.1f} % |"
        )
    for name, _, alpha, outs, *_ in rows:
        groups = {g: round(v, 1) for a in iir(prompts, outs)["per_group"].values()
                  for g, v in a.items() if v}  # fmt: skip
        print(f"\n{name} α={alpha}: groups named (% of prompts) {groups or 'none'}")
        for p, o in zip(prompts, outs, strict=True):
            if iir([p], [o])["iir"] and args.show_hits:
                print(f"  …{p[-45:]!r} -> {o[:60]!r}")


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
    ap.add_argument(
        "--probes",
        choices=["framing", "cues"],
        default="cues",
        help="our probe sets: framing words (old) or identity cues (CF = cue swap)",
    )
    ap.add_argument(
        "--scorers",
        nargs="+",
        choices=["hf", "lean", "joint"],
        default=["joint"],
        help="hf: 3 transformers passes per step; lean: drafter + both branches in "
        "one LeanLM pass; joint: drafter and both branches in one pass",
    )
    ap.add_argument("--show-hits", action="store_true", help="print the outputs that infer")
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
