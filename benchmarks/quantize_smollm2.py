"""SmolLM2-135M held-out perplexity at W8 / W4 / mixed precision (issue #28).

    python benchmarks/quantize_smollm2.py [--rows fp32,rtn-w8,rtn-w4,ip] [--sizes 0.16,0.19,0.22]
        [--calib 16] [--heldout 128] [--max-length 64] [--iters 100] [--budget-s 0]
        [--store bench-out/quantize_smollm2.json] [--checkpoints bench-out/quantize-checkpoints]

The packaged SmolLM2-135M-Instruct (fp32), quantized whole with ``splice.compress.quantize``,
weights only (inputs float: an LLM's activation outliers are another study), per output
channel. The tied LM head is the quantized embedding (the model computes its logits with the
embedding's quantized weight). Corpus as in ``benchmarks/recursive_smollm2.py``: fortunes
and WordNet glosses shuffled with seed 0; ``--heldout`` documents (half each) are scored,
calibration reads the first ``--calib`` of the rest. Rows:

* ``fp32``; ``rtn-w8`` / ``rtn-w4``: every layer (embedding included) at 8 / 4 bits, min/max;
* ``ip``: the integer program over 4/8 bits at each ``--sizes`` target (light pipeline,
  sensitivity = the increase of the last hidden state's MSE to FP32 on one batch of 8
  calibration documents when a layer goes from 8 to 4 bits; one shared profile);
* ``rtn-w4-e8``: ``rtn-w4`` with the first and last layer at 8 bits (the embedding, which is
  also the head, and the last MLP projection);
* ``advanced-w4``: sequential AdaQuant (``--iters`` steps per layer) at 4 bits, 8-bit ends
  (the bits of ``rtn-w4-e8``).

Perplexity = exp(mean next-token loss over the held-out tokens). Each finished row goes into
``--store`` (JSON) at once and is skipped on the next run. The quantizing rows keep each
calibrated layer (``ip``: its variants and the sensitivity table) in ``--checkpoints``; with
``--budget-s`` a row stops after the first layer past the budget (exit 3) and the same
command goes on from there, with the same result (its ``calibration_s`` counts every piece).
``benchmarks/quantize_accuracy.py --report`` prints the table and adds a panel to the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from _quantize import Progress, Store
from recursive_smollm2 import corpus
from torch import nn

from splice.compress import (
    AdaQuantConfig,
    QuantizeConfig,
    QuantizeStopped,
    quantize,
    quantize_sizes,
)
from splice.compress.qlayer import QuantLayer
from splice.data.causal_lm import load_causal_lm
from splice.train.loop import minimise


def batches(tok, texts: list[str], max_length: int, size: int = 8) -> list[dict]:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(texts), size):
        enc = tok(texts[i : i + size], truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt")  # fmt: skip
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    return model.model(**batch).last_hidden_state


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


@torch.no_grad()
def perplexity(model: nn.Module, test: list[dict]) -> float:
    """exp(mean next-token NLL); the logits use the (quantized) embedding as the tied head."""
    emb = model.model.embed_tokens
    weight = emb.quant_weight() if isinstance(emb, QuantLayer) else emb.weight
    total, count = 0.0, 0
    for b in test:
        logits = hidden(model, b)[:, :-1] @ weight.T
        labels = b["input_ids"][:, 1:]
        mask = b["attention_mask"][:, 1:].bool()
        nll = nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        total, count = total + float(nll), count + int(mask.sum())
    return math.exp(total / count)


LABELS = {"rtn-w8": "RTN W8", "rtn-w4": "RTN W4", "rtn-w4-e8": "RTN W4, 8-bit ends",
          "advanced-w4": "AdaQuant W4, 8-bit ends"}  # fmt: skip


def configs(args) -> dict[str, QuantizeConfig]:
    weights_only = {"a_bits": None, "ends_bits": None, "bn": False, "pipeline": "light"}
    return {
        "rtn-w8": QuantizeConfig(bits=8, **weights_only),
        "rtn-w4": QuantizeConfig(bits=4, **weights_only),
        "rtn-w4-e8": QuantizeConfig(bits=4, **{**weights_only, "ends_bits": 8}),
        "ip": QuantizeConfig(size=1.0, options=(4, 8), profile_batches=1, **weights_only),
        "advanced-w4": QuantizeConfig(
            bits=4, a_bits=None, bn=False, bias_steps=0, adaquant=AdaQuantConfig(iters=args.iters)
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="fp32,rtn-w8,rtn-w4,ip")
    p.add_argument("--sizes", default="0.16,0.19,0.22")
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=0, help="stop a row after this (exit 3)")
    p.add_argument("--store", type=Path, default=Path("bench-out/quantize_smollm2.json"))
    p.add_argument("--checkpoints", type=Path, default=Path("bench-out/quantize-checkpoints"),
                   help="where quantizing rows keep each calibrated layer (resumable)")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = Store(args.store)
    tail = f"|c{args.calib}|h{args.heldout}|l{args.max_length}"
    model, tok = load_causal_lm("smollm2")
    model.requires_grad_(False)
    train, held = corpus(args.heldout, 0)
    calib, test = batches(tok, train[: args.calib], args.max_length), batches(tok, held, 64)
    print(f"{len(calib)} calibration / {len(test)} held-out batches", flush=True)
    cfgs, start = configs(args), time.perf_counter()

    def put(row: str, label: str, q: nn.Module, fraction: float, seconds: float) -> None:
        ppl = perplexity(q, test)
        store.put(row + tail, {"row": row, "label": label, "fraction": fraction,
                               "perplexity": ppl, "calibration_s": round(seconds, 1),
                               "calib": args.calib, "heldout": args.heldout})  # fmt: skip
        print(f"{label:28s} size {fraction:.4f} ppl {ppl:.3f} ({seconds:.0f} s calibration, "
              f"{time.perf_counter() - start:.0f} s elapsed)", flush=True)  # fmt: skip

    budget = Progress(0, args.budget_s)
    say = lambda msg: print("  " + msg, flush=True)  # noqa: E731

    def resume(row: str) -> dict:
        where = args.checkpoints / f"smollm2-{row}{tail}-i{args.iters}".replace("|", "-")
        return {"checkpoint": where, "progress": say, "should_stop": budget.over_budget}

    try:
        rows(args, store, tail, cfgs, model, calib, put, resume)
    except QuantizeStopped as e:
        print(f"{e}; budget of {args.budget_s:.0f} s spent: run the same command to go on")
        sys.exit(3)
    print(json.dumps({k: v["perplexity"] for k, v in store.rows.items()}, indent=1))


def rows(args, store: Store, tail: str, cfgs: dict, model, calib, put, resume) -> None:
    """Runs the rows of ``--rows`` that ``store`` lacks."""
    for row in args.rows.split(","):
        if row == "ip":
            sizes = [float(c) for c in args.sizes.split(",") if f"ip-{c}{tail}" not in store]
            if sizes:
                gen = quantize_sizes(model, calib, hidden, minimise, cfgs["ip"], sizes,
                                     loss_fn=mse, **resume("ip"))  # fmt: skip
                for size, q, rep in gen:
                    bits = [layer.bits for layer in rep.layers]
                    put(f"ip-{size}", f"mixed 4/8 at {size} ({bits.count(4)}/{len(bits)} W4)",
                        q, rep.fraction, rep.seconds)  # fmt: skip
            continue
        if row + tail in store:
            continue
        if row == "fp32":
            put(row, "FP32", model, 1.0, 0.0)
            continue
        q, rep = quantize(model, calib, hidden, minimise, cfgs[row], loss_fn=mse, **resume(row))
        steps = f" ({args.iters} steps)" if row == "advanced-w4" else ""
        put(row, LABELS[row] + steps, q, rep.fraction, rep.seconds)


if __name__ == "__main__":
    main()
