"""R-AMT's masks step by step on a PEFT-track task: how many flip, where, and why (run by hand).

    python benchmarks/adapters_ramt_flips.py [--task sk_digits] [--profile full]
        [--head-lr 0.03] [--run 5e-3] [--run 5e-3,l2=0] [--run 1e-3,init=0.04,threshold=0.02]
        [--targets _expand_conv]

Each ``--run LR[,option=value...]`` trains one R-AMT run of the PEFT track's protocol
(:meth:`splice.bench.peft_rows.Task.run`: the profile's steps and batch, seed 0, the head at
``--head-lr``, the probe's pick on that task) and prints after every optimizer step the
masked-out count (logits ≤ τ) in total and per masked layer, and the share of the mask
gradient's non-zero elements that gradient-dropout regularity (GDR) dropped in that step;
then the validation accuracy. Before the first step it prints, per model, the share of mask
logits whose loss gradient on the first batch is smaller than the L2 regulariser's pull on
them (λ·m/‖m‖₂ per element): under Adam those move at the full lr towards τ and cross it
together. ``--targets`` replaces the backbone's adapter targets (e.g. only EfficientNet's
expand convolutions). The numbers in docs/adapters.md ("R-AMT on the PEFT track") come from
this script.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _options(spec: str) -> tuple[float, dict[str, float]]:
    lr, *rest = spec.split(",")
    return float(lr), {k: float(v) for k, v in (o.split("=") for o in rest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sk_digits")
    ap.add_argument("--profile", default="full", choices=["quick", "full"])
    ap.add_argument("--head-lr", type=float, default=0.03, help="the linear probe's pick")
    ap.add_argument("--run", action="append", help="LR[,option=value...] (repeatable)")
    ap.add_argument("--targets", help="comma-separated adapter targets (default: the backbone's)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import splice.adapters.ramt as ramt
    import splice.bench.finetune as finetune
    from splice.adapters import adapter_layers
    from splice.bench.peft import PEFT_PROFILES
    from splice.bench.peft_rows import Task
    from splice.bench.runner import load_backbone
    from splice.data.local import resolve_task

    cfg = PEFT_PROFILES[args.profile]
    spec = resolve_task(args.task)
    group = load_backbone(cfg, spec.modality, [spec])
    if args.targets:
        group.encoder.default_targets = tuple(args.targets.split(","))
    task = Task(group, args.task, cfg)

    seen: dict[str, object] = {}
    dropped: list[float] = []
    guide = finetune._guide
    gate = ramt.gdr_gate

    def capture(model):  # the loop's model, where train() asks for R-AMT's GDR
        seen["model"] = model
        return guide(model)

    def counting_gate(g, g_kl, lam, generator):
        out = gate(g, g_kl, lam, generator)
        live = g != 0
        dropped.append(float(((out == 0) & live).sum()) / max(1, int(live.sum())))
        return out

    finetune._guide, ramt.gdr_gate = capture, counting_gate

    def first_batch_shares(model) -> None:
        layers = list(adapter_layers(model).values())
        logits = [la.adapter.logits for la in layers]
        idx = finetune.batch_stream(len(task.train_x), cfg.batch_size, 0)()
        with torch.random.fork_rng():  # the run's own draws (its head's init) stay as they are
            model.eval()
            head = torch.nn.Linear(task.encoder.dim, len(task.data.classes))
            feats = task.encoder.features(task.train_x.batch(idx, "cpu"), module=model)
            loss = F.cross_entropy(head(feats), torch.as_tensor(task.data.train.y[idx]))
            grads = torch.autograd.grad(loss, logits)
        lam = layers[0].adapter.cfg.l2
        below = sum(
            int((g.abs() < lam * m / m.norm()).sum()) for g, m in zip(grads, logits, strict=True)
        )
        zero = sum(int((g == 0).sum()) for g in grads)
        n = sum(m.numel() for m in logits)
        print(f"  first batch: {below / n:.1%} of the mask logits have |∂CE/∂m| below the L2 "
              f"pull λ·m/‖m‖ (λ = {lam:g}); {zero / n:.1%} have ∂CE/∂m = 0")  # fmt: skip

    def on_step(step: int, loss: float) -> None:
        layers = adapter_layers(seen["model"])
        off = {n: int((la.adapter.logits <= la.adapter.cfg.threshold).sum())
               for n, la in layers.items()}  # fmt: skip
        total = sum(la.adapter.logits.numel() for la in layers.values())
        where = ", ".join(f"{n} {c}" for n, c in off.items() if c)
        share = sum(dropped[-len(layers) :]) / len(layers) if dropped else 0.0
        print(f"  step {step:3d} loss {loss:7.3f}  off {sum(off.values()):9,} of {total:,} "
              f"({sum(off.values()) / total:6.2%})  GDR dropped {share:5.1%}"
              + (f"  [{where}]" if where else ""), flush=True)  # fmt: skip

    train = finetune.train

    def traced(*a, **k):
        k["on_step"] = on_step
        return train(*a, **k)

    import splice.bench.peft_rows as rows

    rows.train = traced
    inject = finetune._trainable

    def trainable(model, *a, **k):
        params = inject(model, *a, **k)
        first_batch_shares(model)
        return params

    finetune._trainable = trainable
    for run in args.run or ["1e-3", "5e-3"]:
        lr, options = _options(run)
        dropped.clear()
        print(
            f"== {args.task} ({args.profile}) R-AMT lr {lr:g} {options or 'defaults'}", flush=True
        )
        start = time.perf_counter()
        out = task.run("ramt", lr, args.head_lr, cfg.seeds[0], {"key": "ramt", "options": options})
        val = task.score(out, "val")
        print(f"  validation {val:.1%} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
