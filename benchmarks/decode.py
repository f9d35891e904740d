"""Speculative vs plain decoding on SmolLM2-135M-Instruct (CPU), and AMBEDKAR's IIR on the
project's probe set (issue #29).

    flock /tmp/splice-heavy.lock env PYTHONPATH=$PWD HF_HUB_OFFLINE=1 \
        python benchmarks/decode.py --part speculative --prompts 4 --max-new-tokens 48

Part ``speculative``: greedy decoding (so equal output is checkable token for token) of chat
prompts with plain decoding, self-speculation (the target's first K of 30 blocks with its own
head) and n-gram prompt lookup, for several γ. Printed side by side: tokens/s, the ratio to
plain decoding timed in the same process, α (mean β, §1.6), acceptance rate, tokens per
target call, and whether every output equals plain greedy. There is no smaller same-tokenizer
SmolLM2 offline; the drafters are the target's own early blocks (size ratio 30/K in blocks,
less in compute: the 49,152 × 576 head is shared) and the n-gram proposer.

Part ``ambedkar``: IIR (spec §2.7) of the drafter alone (SmolLM2 greedy) vs AMBEDKAR
(drafter top-k re-ranked by SmolLM2 with the constitution preamble as verifier, js_term,
α = ``--alpha``) on the probe set of ``splice.decode.iir`` (ours, not the paper's), with the
latency overhead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from splice.data.causal_lm import load_causal_lm
from splice.decode import (
    CachedLM,
    ModelProposer,
    NgramProposer,
    RerankTopK,
    Sampling,
    early_exit,
    generate,
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
GREEDY = Sampling(temperature=0)


def _chat(tok, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(s, add_special_tokens=False))


def _run(prompts, n, eos, target, proposer=None, gamma=4):
    outs, toks, secs, calls, acc, drafted, betas = [], 0, 0.0, 0, 0, 0, []
    for ids in prompts:
        g = generate(
            ids,
            target=target,
            proposer=proposer,
            sampling=GREEDY,
            gamma=gamma,
            max_new_tokens=n,
            eos=eos,
        )
        m = g.metrics
        outs.append(g.tokens)
        toks += m["new_tokens"]
        secs += m["seconds"]
        calls += m["target_calls"]
        acc += m["accepted"]
        drafted += m["drafted"]
        if m["alpha"] is not None:
            betas.append(m["alpha"])
    return outs, {
        "tok_s": toks / secs,
        "alpha": sum(betas) / len(betas) if betas else None,
        "acc": acc / drafted if drafted else None,
        "per_call": toks / calls,
        "tokens": toks,
    }


def speculative(args) -> None:
    model, tok = load_causal_lm("smollm2")
    prompts = [_chat(tok, p) for p in PROMPTS[: args.prompts]]
    eos = [tok.eos_token_id]
    target = CachedLM(model, "target")
    _run(prompts[:1], 4, eos, target)  # warm-up
    rows = []
    t0 = time.time()
    ref, base = _run(prompts, args.max_new_tokens, eos, target)
    rows.append(("plain", "-", base, True))
    configs = [("ngram n<=3", NgramProposer(model.config.vocab_size, 3), g) for g in args.gammas]
    for k in args.self_k:
        proposer = ModelProposer(early_exit(model, k), "self")
        configs += [(f"self K={k}", proposer, g) for g in args.gammas]
    for i, (name, proposer, g) in enumerate(configs, 1):
        outs, r = _run(prompts, args.max_new_tokens, eos, target, proposer, g)
        rows.append((name, g, r, outs == ref))
        eta = (time.time() - t0) / (i + 1) * (len(configs) - i)
        print(
            f"  [{i}/{len(configs)}] {name} γ={g}: {r['tok_s']:.2f} tok/s (ETA {eta:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\nSmolLM2-135M-Instruct, greedy, {len(prompts)} prompts × ≤{args.max_new_tokens} "
        f"tokens, torch threads {torch.get_num_threads()}\n"
    )
    print("| drafter | γ | tokens/s | × plain | α | acceptance | tokens/target call | = plain |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for name, g, r, same in rows:
        ratio = r["tok_s"] / base["tok_s"]
        print(
            f"| {name} | {g} | {r['tok_s']:.2f} | {ratio:.2f} | {f(r['alpha'])} | "
            f"{f(r['acc'])} | {r['per_call']:.2f} | {'yes' if same else 'NO'} |"
        )


def ambedkar(args) -> None:
    model, tok = load_causal_lm("smollm2")
    prompts = PROBE_PROMPTS[: args.probe]
    ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
    eos = [tok.eos_token_id]
    drafter = ModelProposer(model, "drafter")
    scorer = CounterfactualDivergenceScorer(
        model, tok, Counterfactual(protected=PROTECTED, mode="framing"), constitution=CONSTITUTION
    )
    policy = RerankTopK(k=args.k, weight=args.alpha)
    base, amb, t_base, t_amb = [], [], 0.0, 0.0
    for i, x in enumerate(ids, 1):
        g = generate(
            x, target=CachedLM(model), sampling=GREEDY, max_new_tokens=args.max_new_tokens, eos=eos
        )
        a = generate(
            x,
            proposer=drafter,
            scorer=scorer,
            policy=policy,
            max_new_tokens=args.max_new_tokens,
            eos=eos,
        )
        base.append(tok.decode(g.tokens, skip_special_tokens=True))
        amb.append(tok.decode(a.tokens, skip_special_tokens=True))
        t_base += g.metrics["seconds"] / max(g.metrics["new_tokens"], 1)
        t_amb += a.metrics["seconds"] / max(a.metrics["new_tokens"], 1)
        print(f"  [{i}/{len(ids)}]", file=sys.stderr, flush=True)
    rb, ra = iir(prompts, base), iir(prompts, amb)
    print(
        f"\nIIR on our probe set ({len(prompts)} prompts, ≤{args.max_new_tokens} tokens; "
        f"drafter = verifier model = SmolLM2-135M-Instruct, verifier with the constitution "
        f"preamble; k={args.k}, α={args.alpha}, js_term, cf_scope=prompt)\n"
    )
    print("| decoding | IIR religion % | IIR caste % | IIR overall % | s/token |")
    print("|---|---|---|---|---|")
    for name, r, t in (("drafter alone (greedy)", rb, t_base), ("AMBEDKAR", ra, t_amb)):
        print(
            f"| {name} | {r['iir_religion']:.1f} | {r['iir_caste']:.1f} | {r['iir']:.1f} | "
            f"{t / len(ids):.4f} |"
        )
    print(f"\nlatency overhead: {100 * (t_amb / t_base - 1):.0f} % per token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speculative", "ambedkar", "all"], default="all")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--self-k", type=int, nargs="+", default=[8, 16, 24])
    ap.add_argument("--probe", type=int, default=40, help="probe prompts for IIR")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("speculative", "all"):
        speculative(args)
    if args.part in ("ambedkar", "all"):
        ambedkar(args)


if __name__ == "__main__":
    main()
