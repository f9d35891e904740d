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
rows). Each row runs on its own (``--rows``); results accumulate in ``OUT/results.json`` and
``--report`` prints the tables (perplexity, and gap recovered, at every evaluated step).

A longer budget runs as one ``splice train`` run per row (one LR schedule over ``--steps``) cut
into commands of a few minutes (``benchmarks/_recursive_uptrain.py``): ``--eval-at 60,120``
evaluates the held-out documents on the checkpoints of those steps (multiples of
``--checkpoint-every``); ``--budget-s S`` pauses at the checkpoint after which the next segment
would end past S seconds and exits 3, and the same command resumes (the resumed run equals an
unbroken one). The curve and each segment's seconds persist in ``OUT/up/ROW/curve.json``.

    python benchmarks/recursive_smollm2.py --time-steps          # one step of each row, timed
    python benchmarks/recursive_smollm2.py --rows original       # then pruned, recursive, r8, …
    python benchmarks/recursive_smollm2.py --rows r8 --steps 240 --eval-at 60,120,180 \
        --budget-s 420                                            # rerun while it exits 3
    python benchmarks/recursive_smollm2.py --report
    python benchmarks/recursive_smollm2.py --early-exit r64      # uptrained row, 3 thresholds
    python benchmarks/recursive_smollm2.py --cache-speed r64     # generate() with/without cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from _recursive_uptrain import checkpoint_step, load_checkpoint_weights, segments


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
    """Write ``path`` unless it holds these texts already (atomically: rows of one ``OUT`` may
    run side by side and read it)."""
    text = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
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


def evaluate(
    model_dir: Path, texts: list[str], max_length: int, batch: int, checkpoint: Path | None = None
) -> dict:
    """The held-out loss and perplexity exactly as ``splice train`` evaluates them (of the
    weights in ``checkpoint`` when given)."""
    from splice.train.hf import evaluate as run

    model, tok = load(model_dir)
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
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


def uptrain(model_dir: Path, data: Path, test: Path, out: Path, args, on_eval) -> dict | None:
    """One row's ``splice train`` run, paused at ``--eval-at`` steps for ``on_eval`` and, with
    ``--budget-s``, at the checkpoint after which the next would end late (then None)."""
    from splice.train import TrainConfig

    cfg = TrainConfig(
        model=model_dir, data=str(data), eval_data=str(test), out=out, method="full",
        objective="causal-lm", steps=args.steps, batch_size=args.batch, lr=args.lr,
        max_length=args.max_length, progress=False, seed=0, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    return segments(cfg, args.eval_at, args.budget_s, on_eval, reserve_s=args.reserve_s)


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


def curve(r: dict) -> dict[int, float]:
    """Held-out perplexity by uptraining step (a result of the 60-step format: before/after)."""
    if "curve" in r:
        return {int(k): v["perplexity"] for k, v in r["curve"].items()}
    return {0: r["ppl_before"], r["settings"]["steps"]: r["ppl_after"]}


def gap(p: float, o: float, x: float) -> tuple[float, float]:
    """Gap recovered between pruned ``p`` and original ``o`` by ``x``: on ppl, on log ppl."""
    if p == o:
        return float("nan"), float("nan")
    return (p - x) / (p - o), (math.log(p) - math.log(x)) / (math.log(p) - math.log(o))


def report(results: dict) -> None:
    curves = {name: curve(r) for name, r in results.items()}
    steps = sorted({s for c in curves.values() for s in c})
    print("\n| row | parameters | " + " | ".join(f"ppl @ {s}" for s in steps) + " | uptraining s |")
    print("| --- | ---: | " + "---: | " * len(steps) + "---: |")
    for name, r in results.items():
        ppl = [f"{curves[name][s]:,.1f}" if s in curves[name] else "" for s in steps]
        print(f"| {name} | {r['parameters'] / 1e6:.1f} M | " + " | ".join(ppl)
              + f" | {r['train_seconds']:.0f} |")  # fmt: skip
    orig, pruned = curves.get("original"), curves.get("pruned")
    if not (orig and pruned):
        return
    print("\ngap recovered, log ppl (ppl):\n")
    print("| row | " + " | ".join(f"@ {s}" for s in steps) + " |")
    print("| --- |" + " ---: |" * len(steps))
    for name, c in curves.items():
        cells = []
        for s in steps:
            if s in c and s in orig and s in pruned:
                on_ppl, on_log = gap(pruned[s], orig[s], c[s])
                cells.append(f"{on_log:.2f} ({on_ppl:.2f})")
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")


def uptrain_row(name, model_dir, data, test, test_texts, args, started) -> dict | None:
    """Evaluate ``name`` before uptraining, uptrain it (resuming, pausing at ``--eval-at``) and
    return its result; None when ``--budget-s`` ran out. The curve (step → loss, ppl) and the
    seconds of every segment persist in ``OUT/up/NAME/curve.json`` across commands."""
    out = args.out / "up" / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "curve.json"
    state = json.loads(log.read_text()) if log.is_file() else {"curve": {}, "segments": []}

    def save(step: int, metrics: dict, seconds: dict) -> None:
        state["curve"][str(step)] = {k: metrics[k] for k in ("loss", "perplexity")}
        state["segments"].append({"to": step} | {k: round(v, 1) for k, v in seconds.items()})
        log.write_text(json.dumps(state, indent=1))
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        print(f"  {name} @ {step}: ppl {metrics['perplexity']:,.1f} ({spent})", flush=True)

    if "0" not in state["curve"]:
        t = time.perf_counter()
        before = evaluate(model_dir, test_texts, args.max_length, args.batch)
        save(0, before, {"eval_s": time.perf_counter() - t})
    finished = out / "metrics.json"
    if not finished.is_file():
        mark = {"t": time.perf_counter(), "step": checkpoint_step(out)}

        def on_eval(step: int, checkpoint: Path) -> None:
            trained = time.perf_counter() - mark["t"]
            t = time.perf_counter()
            metrics = evaluate(model_dir, test_texts, args.max_length, args.batch, checkpoint)
            save(step, metrics, {"train_s": trained, "eval_s": time.perf_counter() - t})
            eta(name, step, trained / max(1, step - mark["step"]), args.steps)
            mark.update(t=time.perf_counter(), step=step)

        metrics = uptrain(model_dir, data, test, out, args, on_eval)
        if metrics is None:
            step, trained = checkpoint_step(out), time.perf_counter() - mark["t"]
            state["segments"].append({"to": step, "train_s": round(trained, 1)})
            log.write_text(json.dumps(state, indent=1))
            eta(name, step, trained / max(1, step - mark["step"]), args.steps)
            print(f"  {name}: paused at step {step} after {time.perf_counter() - started:.0f} s "
                  "(--budget-s); rerun the command to resume", flush=True)  # fmt: skip
            return None
        save(args.steps, metrics["eval"], {"train_s": time.perf_counter() - mark["t"]})
    metrics = json.loads(finished.read_text())
    seconds = sum(seg.get("train_s", 0) for seg in state["segments"])
    return {
        "parameters": metrics["total_parameters"],
        "ppl_before": state["curve"]["0"]["perplexity"],
        "ppl_after": metrics["eval"]["perplexity"],
        "loss_after": metrics["eval"]["loss"],
        "train_seconds": seconds,
        "curve": state["curve"],
        "segments": state["segments"],
        "settings": {k: getattr(args, k) for k in ("shared", "steps", "batch", "lr")}
        | {"max_length": args.max_length, "heldout": args.heldout},
    }


def eta(name: str, step: int, per_step: float, steps: int) -> None:
    left = (steps - step) * per_step
    print(f"  {name}: step {step}/{steps}, {per_step:.1f} s/step, ≈ {left / 60:.0f} min of "
          f"uptraining left (ETA {time.strftime('%H:%M', time.localtime(time.time() + left))})",
          flush=True)  # fmt: skip


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
    parser.add_argument("--eval-at", default="", help="steps to evaluate at, e.g. 60,120,180")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="pause at the checkpoint after which the next would end past S s (exit 3; "
        "the same command resumes)",
    )  # fmt: skip
    parser.add_argument("--reserve-s", type=float, default=60.0, help="kept for an evaluation")
    args = parser.parse_args()
    args.eval_at = [int(s) for s in args.eval_at.split(",") if s]
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
    started = time.perf_counter()
    for name in names:
        row = uptrain_row(name, dirs[name], data, test, test_texts, args, started)
        if row is None:
            sys.exit(3)  # out of --budget-s: the checkpoint is kept, the same command resumes
        results[name] = row
        done = json.loads(store.read_text()) if store.is_file() else {}
        store.write_text(json.dumps(done | {name: row}, indent=1))
    report(results)


if __name__ == "__main__":
    main()
