"""``splice search``: AutoPEFT (:mod:`splice.select.autopeft`) over the LoRA configurations
``splice train`` runs, scored on held-out data; writes the Pareto front.

Each trial is one ``splice train`` run (LoRA of rank 2^k on the chosen module groups of the
chosen layers) in ``STUDY/trials/<config>``; accuracy is on the bench task's ``val`` split
(or the held-out share of a CSV), never on test. The hand configurations LoRA r=8 on q,v and
on every linear layer are the first trials of a new study, so the front is compared with them.
Outputs in the study dir: ``front.md`` (every trial, the front marked), ``front.json``,
``front.png`` (accuracy vs parameter share, the front drawn) and ``front.sh`` (the front as
``splice train`` command lines).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.select.autopeft import Space, TrialResult, lora_space, pareto_front, search

__all__ = ["run_search"]


def _groups(model_dir: Path) -> tuple[dict[str, list[str]], int, int, list[str]]:
    """Module groups (leaf names of the Linear/Conv1D layers in the stack), layers, |θ| of
    the backbone, and the model type's default LoRA targets (q,v for BERT)."""
    import torch
    import transformers

    from splice.select._common import layer_count, matrix_sites
    from splice.train.config import DEFAULT_TARGETS

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):  # shapes only
        model = transformers.AutoModel.from_config(config)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in matrix_sites(model)})
    total = sum(p.numel() for p in model.parameters())
    default = DEFAULT_TARGETS.get(config.model_type, [])
    return {leaf: [leaf] for leaf in leaves}, layer_count(model), total, default


def _train_args(space: Space, config: dict[str, int]) -> dict[str, Any] | None:
    groups, n_layers = space.meta["groups"], space.meta["n_layers"]
    targets = [t for g, ts in groups.items() if config[f"use_{g}"] for t in ts]
    layers = [i for i in range(n_layers) if not config[f"leave_out_{i}"]]
    if not targets or not layers:
        return None
    r = 2 ** config["log2_rank"]
    return {"targets": targets, "layers": layers, "adapter": {"r": r, "alpha": 2 * r}}


def _hand_configs(space: Space, default: list[str]) -> list[dict[str, int]]:
    """LoRA r=8 on every layer: on the default targets (q,v), and on every linear layer."""
    groups, n_layers = space.meta["groups"], space.meta["n_layers"]
    every = {f"leave_out_{i}": 0 for i in range(n_layers)} | {"log2_rank": 3}
    out = []
    if default and all(t in groups for t in default):
        out.append(every | {f"use_{g}": int(g in default) for g in groups})
    out.append(every | {f"use_{g}": 1 for g in groups})
    return out


def run_search(
    model: Path,
    data: str,
    study: Path,
    *,
    trials: int,
    minutes: float | None = None,
    train: dict[str, Any] | None = None,
    seed: int = 0,
    max_log2_rank: int = 5,
) -> dict[str, Any]:
    """Search, then write the report; returns it (every trial, the front, the hand configs)."""
    from splice.train import TrainConfig
    from splice.train import train as fit

    groups, n_layers, total, default = _groups(model)
    space = lora_space(n_layers, groups, max_log2_rank)
    common = dict(train or {}) | {"seed": seed, "progress": False}
    path = Path(data)
    if not (path.suffix.lower() in (".csv", ".jsonl", ".json") or path.exists()):
        common["eval_split"] = "val"  # a bench task: choose on val, never on test

    def evaluate(config: dict[str, int]) -> tuple[float, float] | None:
        args = _train_args(space, config)
        if args is None:
            return None
        out = study / "trials" / "-".join(map(str, space.encode(config)))
        cfg = TrainConfig(model=model, data=data, out=out, method="lora", **args, **common)
        metrics = fit(cfg)
        return metrics["eval"]["accuracy"], 100.0 * metrics["adapter_parameters"] / total

    hand = _hand_configs(space, default)
    results = search(space, evaluate, study, trials=trials, minutes=minutes, seed=seed, first=hand)
    if not results:
        raise SpliceError("no trial finished", fix="raise --trials or --minutes")
    return _write(study, space, results, hand, model, data, common)


def _command(model: Path, data: str, args: dict[str, Any], common: dict[str, Any]) -> str:
    words = ["splice", "train", str(model), data, "--out", "OUT", "--method", "lora"]
    words += [
        "--targets",
        ",".join(args["targets"]),
        "--layers",
        ",".join(map(str, args["layers"])),
    ]
    words += [f"--set=r={args['adapter']['r']}", f"--set=alpha={args['adapter']['alpha']}"]
    for key in ("steps", "batch_size", "lr", "max_length", "seed"):
        if common.get(key) is not None:
            words += [f"--{key.replace('_', '-')}", str(common[key])]
    return shlex.join(words)


def _write(study, space, results, hand, model, data, common) -> dict[str, Any]:
    front = pareto_front(results)
    on_front = {r.number for r in front}
    hand_vectors = [space.encode(h) for h in hand]
    rows = []
    for r in sorted(results, key=lambda r: r.number):
        args = _train_args(space, r.config)
        rows.append({
            "trial": r.number, "accuracy": r.accuracy, "share_percent": r.share,
            "rank": args["adapter"]["r"], "targets": args["targets"], "layers": args["layers"],
            "front": r.number in on_front, "hand": space.encode(r.config) in hand_vectors,
            "command": _command(model, data, args, common),
        })  # fmt: skip
    lines = [
        "| trial | accuracy | param share % | r | targets | layers | front | hand |",
        "|---:|---:|---:|---:|---|---|:-:|:-:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['trial']} | {row['accuracy']:.4f} | {row['share_percent']:.4f} | "
            f"{row['rank']} | {','.join(row['targets'])} | {','.join(map(str, row['layers']))} | "
            f"{'●' if row['front'] else ''} | {'hand' if row['hand'] else ''} |"
        )
    (study / "front.md").write_text("\n".join(lines) + "\n")
    (study / "front.json").write_text(json.dumps(rows, indent=2) + "\n")
    commands = [row["command"] for row in rows if row["front"]]
    (study / "front.sh").write_text("\n".join(commands) + "\n")
    _plot(study / "front.png", results, front, {row["trial"] for row in rows if row["hand"]})
    return {"trials": rows, "front": [row for row in rows if row["front"]]}


def _plot(path: Path, results: list[TrialResult], front: list[TrialResult], hand: set[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.share for r in results], [r.accuracy for r in results], s=14, c="0.6",
               label="trial")  # fmt: skip
    ax.step([r.share for r in front], [r.accuracy for r in front], where="post", c="C0",
            marker="o", label="Pareto front")  # fmt: skip
    for r in results:
        if r.number in hand:
            ax.scatter([r.share], [r.accuracy], marker="x", s=60, c="C3")
    ax.scatter([], [], marker="x", c="C3", label="hand configuration")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the backbone, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
