"""Relaxed Recursive SmolLM2: held-out perplexity against parameters, before and after equal
uptraining, and early-exit generation speed (issue #27, spec peft.md §8).

Corpus: Debian ``fortunes`` (8 topic files) + WordNet noun glosses, split by document
(seeded): ``--heldout`` documents are evaluated, uptraining reads ``--steps × --batch``
training documents of at most ``--max-length`` tokens. Rows:

- ``original``: SmolLM2-135M-Instruct (30 layers);
- ``pruned``: every 3rd layer kept (10 layers, the equal-size baseline);
- ``recursive``: 10 shared layers × 3 loops, stepwise init, no relaxation;
- ``recursive+lora r``: average init, per-loop LoRA of rank r from the SVD of the residuals.

Every row is uptrained with ``splice train --method full --objective causal-lm`` (the one
training loop) for the same steps, batch and LR; perplexity is ``splice train``'s
evaluation on the held-out documents. ``gap recovered`` = (ppl_pruned − ppl_row) /
(ppl_pruned − ppl_original) after uptraining (target ≥ 0.5 for the relaxed rows).

Early exit: the uptrained ``recursive+lora`` row with the largest rank decodes
``--gen-tokens`` greedy tokens for 8 held-out prompts in one depth-wise batch at thresholds
∞ (never exits), 0.9 and 0.6, printing tokens/s and the ratio against ∞.

    python benchmarks/recursive_smollm2.py --steps 20 --out /tmp/rrt   # about 25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def corpus(heldout: int, seed: int) -> tuple[list[str], list[str]]:
    from splice.data.tasks import fortune_topic, wordnet_supersense

    fortunes, _, _ = fortune_topic.read()
    glosses, _, _ = wordnet_supersense.read()
    rng = random.Random(seed)
    rng.shuffle(fortunes)
    rng.shuffle(glosses)
    half = heldout // 2
    test = fortunes[:half] + glosses[:half]
    train = [t for pair in zip(fortunes[half:], glosses[half:], strict=False) for t in pair]
    return train, test


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def perplexity(model_dir: Path, texts: list[str], max_length: int, batch: int) -> float:
    """The held-out perplexity exactly as ``splice train`` evaluates it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.train.batches import collate
    from splice.train.hf import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]
    batches = [collate(c, ids, None, pad) for c in chunks]
    return evaluate(model, batches, "causal-lm", lambda: torch.autocast("cpu", enabled=False))[
        "perplexity"
    ]


def build(out: Path, source: str, k: int, ranks: list[int]) -> dict[str, Path]:
    """Convert the source into every row's model dir."""
    from splice.convert import (
        convert_recursive,
        depth_prune,
        save_recursive,
        stepwise_layers,
    )
    from splice.data.causal_lm import _smollm2_dir, load_causal_lm

    model, tok = load_causal_lm(source)
    dirs = {"original": _smollm2_dir() if source == "smollm2" else Path(source)}
    pruned = depth_prune(model, stepwise_layers(model.config.num_hidden_layers, k))
    pruned.save_pretrained(out / "pruned")
    tok.save_pretrained(out / "pruned")
    dirs["pruned"] = out / "pruned"
    rows = [("recursive", "stepwise", 0)] + [(f"recursive+lora r{r}", "average", r) for r in ranks]
    for name, init, rank in rows:
        start = time.perf_counter()
        rec = convert_recursive(model, k, init, rank)
        save_recursive(rec, out / name.replace(" ", "_").replace("+", "_"), tok)
        print(f"  converted {name}: {time.perf_counter() - start:.1f} s", flush=True)
        dirs[name] = out / name.replace(" ", "_").replace("+", "_")
    return dirs


def uptrain(model_dir: Path, data: Path, test: Path, out: Path, args) -> dict:
    from splice.train import TrainConfig, train

    cfg = TrainConfig(
        model=model_dir, data=str(data), eval_data=str(test), out=out, method="full",
        objective="causal-lm", steps=args.steps, batch_size=args.batch, lr=args.lr,
        max_length=args.max_length, progress=False, seed=0,
    )  # fmt: skip
    return train(cfg)


def early_exit(model_dir: Path, prompts: list[str], new_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.convert import generate_early_exit

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"][:8] for p in prompts]
    rows, reference = [], None
    for threshold in (1.1, 0.9, 0.6):
        start = time.perf_counter()
        tokens, stats = generate_early_exit(model, ids, new_tokens, threshold=threshold)
        seconds = time.perf_counter() - start
        reference = reference or tokens
        pairs = zip(reference, tokens, strict=True)
        same = sum(a == b for r, t in pairs for a, b in zip(r, t, strict=False))
        rows.append(
            {
                "threshold": "never" if threshold > 1 else threshold,
                "tokens_per_s": sum(map(len, tokens)) / seconds,
                "mean_loops": stats.mean_loops,
                "exits_per_loop": stats.exits,
                "mixed_depth_ticks": f"{stats.mixed_ticks}/{stats.ticks}",
                "same_tokens_as_full": same / sum(map(len, tokens)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a Llama dir")
    parser.add_argument("--shared", type=int, default=10, help="K shared layers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--ranks", default="8,32,128")
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rrt-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_texts, test_texts = corpus(args.heldout, 0)
    data = write_jsonl(args.out / "train.jsonl", train_texts[: args.steps * args.batch])
    test = write_jsonl(args.out / "heldout.jsonl", test_texts)
    print(
        f"corpus: {len(test_texts)} held-out docs, {args.steps}×{args.batch} training docs, "
        f"≤{args.max_length} tokens each",
        flush=True,
    )
    dirs = build(args.out, args.model, args.shared, [int(r) for r in args.ranks.split(",")])
    results = {}
    for name, model_dir in dirs.items():
        start = time.perf_counter()
        before = perplexity(model_dir, test_texts, args.max_length, args.batch)
        metrics = uptrain(model_dir, data, test, args.out / "up" / name.replace(" ", "_"), args)
        results[name] = {
            "parameters": metrics["total_parameters"],
            "ppl_before": before,
            "ppl_after": metrics["eval"]["perplexity"],
            "train_seconds": metrics["wall_seconds"],
        }
        print(f"  {name}: {results[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
    orig, pruned = results["original"]["ppl_after"], results["pruned"]["ppl_after"]
    print(f"\n| row | parameters | ppl before | ppl after {args.steps} steps | gap recovered |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        gap = (pruned - r["ppl_after"]) / (pruned - orig) if pruned != orig else float("nan")
        r["gap_recovered"] = gap
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['ppl_before']:.1f} | "
            f"{r['ppl_after']:.1f} | {gap:.2f} |"
        )
    largest = max((n for n in dirs if "lora" in n), key=lambda n: int(n.rsplit("r", 1)[1]))
    up_dir = args.out / "up" / largest.replace(" ", "_") / "model"
    exits = early_exit(up_dir, test_texts[:8], args.gen_tokens)
    base = exits[0]["tokens_per_s"]
    print(f"\nearly exit ({largest}, uptrained; 8 prompts × {args.gen_tokens} tokens)")
    print("| threshold | tokens/s | × never | mean loops | exits per loop | same tokens |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for r in exits:
        print(
            f"| {r['threshold']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} | "
            f"{r['mean_loops']:.2f} | {r['exits_per_loop']} | {r['same_tokens_as_full']:.0%} |"
        )
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": results, "exit": exits})
    )


if __name__ == "__main__":
    main()
