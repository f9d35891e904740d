"""Relaxed Recursive SmolLM2: held-out perplexity against parameters, before and after equal
uptraining, early-exit generation speed, and generation with the KV cache against without
(issue #27, spec peft.md §8).

Corpus: Debian ``fortunes`` (8 topic files) + WordNet noun glosses, split by document
(seeded): ``--heldout`` documents are evaluated, uptraining reads ``--steps × --batch``
training documents of at most ``--max-length`` tokens. Rows (K = ``--shared``, B = 30 / K):

- ``original``: SmolLM2-135M-Instruct (30 layers);
- ``pruned``: K layers kept, every B-th (the equal-size baseline: same parameters as ``recursive``);
- ``recursive``: K shared layers × B loops, stepwise init, no relaxation;
- ``r<rank>``: average init, per-loop LoRA of that rank from the SVD of the residuals;
  ``r<rank>-stepwise``: the same from the stepwise init.

Every row is uptrained with ``splice train --method full --objective causal-lm`` (the one
training loop: AdamW, linear warmup then decay) for the same steps, batch, documents and LR;
perplexity is ``splice train``'s evaluation on the held-out documents. Gap recovered, on
perplexity and on log perplexity (the mean token loss):
``(x_pruned − x_row) / (x_pruned − x_original)`` after uptraining (target ≥ 0.5 for the relaxed
rows). Each row runs on its own (``--rows``) so no run is longer than one row's uptraining;
results accumulate in ``OUT/results.json`` and ``--report`` prints the table.

    python benchmarks/recursive_smollm2.py --time-steps          # one step of each row, timed
    python benchmarks/recursive_smollm2.py --rows original       # then pruned, recursive, r8, …
    python benchmarks/recursive_smollm2.py --report
    python benchmarks/recursive_smollm2.py --early-exit r64      # uptrained row, 3 thresholds
    python benchmarks/recursive_smollm2.py --cache-speed r64     # generate() with/without cache
"""

from __future__ import annotations

import argparse
import json
import math
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


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import splice.convert  # noqa: F401  (registers the recursive model class)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def batches(tok, texts: list[str], max_length: int, batch: int) -> list[dict]:
    from splice.train.batches import collate

    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]
    return [collate(c, ids, None, pad) for c in chunks]


def evaluate(model_dir: Path, texts: list[str], max_length: int, batch: int) -> dict:
    """The held-out loss and perplexity exactly as ``splice train`` evaluates them."""
    from splice.train.hf import evaluate as run

    model, tok = load(model_dir)
    with torch.no_grad():
        return run(
            model, batches(tok, texts, max_length, batch), "causal-lm",
            lambda: torch.autocast("cpu", enabled=False),
        )  # fmt: skip


def row_names(ranks: list[int]) -> list[str]:
    return ["original", "pruned", "recursive", *(f"r{r}" for r in ranks)]


def _lora_row(name: str) -> tuple[str, int]:
    """``r8`` → average init, rank 8; ``r8-stepwise`` → stepwise init, rank 8."""
    rank, _, init = name[1:].partition("-")
    return init or "average", int(rank)


def build(out: Path, source: str, k: int, names: list[str]) -> dict[str, Path]:
    """Each row's model dir; converts (from one load of the source) only the missing ones."""
    from splice.data.causal_lm import _smollm2_dir

    dirs = {"original": _smollm2_dir() if source == "smollm2" else Path(source)}
    dirs |= {n: out / "models" / n for n in names if n != "original"}
    missing = [n for n in names if n != "original" and not (dirs[n] / "config.json").is_file()]
    if not missing:
        return dirs
    from splice.convert import convert_recursive, depth_prune, save_recursive, stepwise_layers
    from splice.data.causal_lm import load_causal_lm

    model, tok = load_causal_lm(source)
    for name in missing:
        start = time.perf_counter()
        if name == "pruned":
            pruned = depth_prune(model, stepwise_layers(model.config.num_hidden_layers, k))
            pruned.save_pretrained(dirs[name])
            tok.save_pretrained(dirs[name])
        else:
            init, rank = ("stepwise", 0) if name == "recursive" else _lora_row(name)
            save_recursive(convert_recursive(model, k, init, rank), dirs[name], tok)
        print(f"  built {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return dirs


def time_steps(model_dir: Path, texts: list[str], args) -> float:
    """Seconds of one AdamW step (forward, backward, update) on one ``--batch`` of
    training documents: the median of 3 after a warm-up step."""
    model, tok = load(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(tok, texts[: 4 * args.batch], args.max_length, args.batch)
    times = []
    for b in data:
        start = time.perf_counter()
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[1]


def uptrain(model_dir: Path, data: Path, test: Path, out: Path, args) -> dict:
    from splice.train import TrainConfig, train

    cfg = TrainConfig(
        model=model_dir, data=str(data), eval_data=str(test), out=out, method="full",
        objective="causal-lm", steps=args.steps, batch_size=args.batch, lr=args.lr,
        max_length=args.max_length, progress=False, seed=0,
    )  # fmt: skip
    return train(cfg)


def early_exit(model_dir: Path, prompts: list[str], new_tokens: int) -> list[dict]:
    from splice.convert import generate_early_exit

    model, tok = load(model_dir)
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


def cache_speed(model_dir: Path, prompts: list[str], new_tokens: int) -> list[dict]:
    """Greedy ``generate()`` of ``new_tokens`` per prompt (one at a time) with the KV cache
    and without; the tokens must agree."""
    model, tok = load(model_dir)
    ids = [torch.tensor([tok(p)["input_ids"][:16]]) for p in prompts]
    rows, reference = [], None
    for use_cache in (False, True):
        start, outs = time.perf_counter(), []
        with torch.no_grad():
            for x in ids:
                kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                outs.append(model.generate(x, use_cache=use_cache, pad_token_id=0, **kw))
        seconds = time.perf_counter() - start
        reference = reference or outs
        same = all(torch.equal(a, b) for a, b in zip(reference, outs, strict=True))
        made = sum(o.shape[1] - x.shape[1] for o, x in zip(outs, ids, strict=True))
        rows.append({"cache": use_cache, "tokens_per_s": made / seconds, "same_tokens": same})
    return rows


def report(results: dict) -> None:
    orig, pruned = results.get("original"), results.get("pruned")
    steps = "/".join(sorted({str(r["settings"]["steps"]) for r in results.values()}))
    print(f"\n| row | parameters | ppl before | ppl after {steps} steps | gap recovered (ppl) "
          "| (log ppl) | uptraining s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        gap = log_gap = float("nan")
        if orig and pruned and pruned["ppl_after"] != orig["ppl_after"]:
            p, o, x = pruned["ppl_after"], orig["ppl_after"], r["ppl_after"]
            gap = (p - x) / (p - o)
            log_gap = (math.log(p) - math.log(x)) / (math.log(p) - math.log(o))
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['ppl_before']:,.1f} | "
            f"{r['ppl_after']:,.1f} | {gap:.2f} | {log_gap:.2f} | {r['train_seconds']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a Llama dir")
    parser.add_argument("--shared", type=int, default=15, help="K shared layers (B = N / K)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--rows", default=None, help="rows to uptrain (default: all)")
    parser.add_argument("--time-steps", action="store_true", help="time one step of each row")
    parser.add_argument("--report", action="store_true", help="print the table of results.json")
    parser.add_argument("--early-exit", metavar="ROW", help="early-exit table of an uptrained row")
    parser.add_argument("--cache-speed", metavar="ROW", help="generate() with vs without cache")
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rrt-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    if args.report:
        report(results)
        return
    train_texts, test_texts = corpus(args.heldout, 0)
    generation = [(early_exit, args.early_exit), (cache_speed, args.cache_speed)]
    for run, row in generation:
        if row:
            rows = run(args.out / "up" / row / "model", test_texts[:8], args.gen_tokens)
            print(f"{run.__name__} ({row}, uptrained; 8 prompts × {args.gen_tokens} tokens)")
            for r in rows:
                print(r, flush=True)
            (args.out / f"{run.__name__}-{row}.json").write_text(json.dumps(rows))
    if args.early_exit or args.cache_speed:
        return
    names = args.rows.split(",") if args.rows else row_names(map(int, args.ranks.split(",")))
    dirs = build(args.out, args.model, args.shared, names)
    if args.time_steps:
        for name in names:
            sec = time_steps(dirs[name], train_texts, args)
            print(f"  {name}: {sec:.2f} s/step → {args.steps} steps ≈ {sec * args.steps / 60:.1f} "
                  "min", flush=True)  # fmt: skip
        return
    data = write_jsonl(args.out / "train.jsonl", train_texts[: args.steps * args.batch])
    test = write_jsonl(args.out / "heldout.jsonl", test_texts)
    print(
        f"corpus: {len(test_texts)} held-out docs, {args.steps}×{args.batch} training docs, "
        f"≤{args.max_length} tokens each; lr {args.lr}",
        flush=True,
    )
    for name in names:
        start = time.perf_counter()
        before = evaluate(dirs[name], test_texts, args.max_length, args.batch)
        metrics = uptrain(dirs[name], data, test, args.out / "up" / name, args)
        results[name] = {
            "parameters": metrics["total_parameters"],
            "ppl_before": before["perplexity"],
            "ppl_after": metrics["eval"]["perplexity"],
            "loss_after": metrics["eval"]["loss"],
            "train_seconds": metrics["wall_seconds"],
            "settings": {k: getattr(args, k) for k in ("shared", "steps", "batch", "lr")}
            | {"max_length": args.max_length, "heldout": args.heldout},
        }
        print(f"  {name}: {results[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
        done = json.loads(store.read_text()) if store.is_file() else {}
        store.write_text(json.dumps(done | {name: results[name]}, indent=1))
    report(results)


if __name__ == "__main__":
    main()
