"""``splice search``: AutoPEFT (:mod:`splice.select.autopeft`) scored on held-out data; writes
the Pareto front.

Two spaces (``space``): ``"sappa"`` (default, the paper's: serial/parallel/prefix sizes and a
leave-out bit per layer, each trial a ``splice train --method sappa`` run) and ``"lora"`` (one
LoRA rank 2^k on chosen module groups of chosen layers). Each trial trains in
``STUDY/trials/<config>``; accuracy is on the bench task's ``val`` split (or the held-out share
of a CSV), never on test. The hand configurations LoRA r=8 on q,v and on every linear layer are
the first trials of a new study: inside the LoRA space they are points of the space (the front
dominates or contains them); in a SAPPA study they train through the LoRA path, are kept in
``hand.json`` (resumable, counted in the trial budget) and are compared with the front of the
SAPPA trials, which is computed without them. A SAPPA configuration with no module (every size
0, or every layer left out) trains the classification head alone (``--method head``, share 0:
the front's anchor); the ``sappa`` adapter itself refuses it. Outputs in the study dir:
``front.md`` (every trial, the front marked), ``front.json``, ``front.png`` (accuracy vs
parameter share, the front drawn) and ``front.sh`` (the front as ``splice train`` command
lines).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.select.autopeft import (
    Space,
    TrialResult,
    lora_space,
    open_study_dir,
    pareto_front,
    sappa,
    sappa_options,
    search,
)

__all__ = ["SPACES", "run_search"]

SPACES = ("sappa", "lora")
HAND_FILE = "hand.json"


def _model_facts(model_dir: Path) -> dict[str, Any]:
    """Module groups (leaf names of the Linear/Conv1D layers in the stack), layers, width d,
    |θ| of the backbone, and the model type's default targets (q,v for BERT)."""
    import torch
    import transformers

    from splice.select._common import layer_count, matrix_sites
    from splice.train.config import DEFAULT_TARGETS

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):  # shapes only
        model = transformers.AutoModel.from_config(config)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in matrix_sites(model)})
    return {
        "groups": {leaf: [leaf] for leaf in leaves},
        "n_layers": layer_count(model),
        "d": int(config.hidden_size),
        "total": sum(p.numel() for p in model.parameters()),
        "default": DEFAULT_TARGETS.get(config.model_type, []),
    }


def _train_args(space: Space, config: dict[str, int], targets: list[str]) -> dict[str, Any] | None:
    """``splice train`` options of a configuration (None: it adapts nothing)."""
    if space.name == "sappa":
        sizes, layers = sappa_options(space, config)
        if not any(sizes.values()) or not layers:  # no module: the head alone trains
            return {"method": "head", "targets": [], "layers": [], "adapter": {}}
        return {"method": "sappa", "targets": targets, "layers": layers, "adapter": sizes}
    groups, n_layers = space.meta["groups"], space.meta["n_layers"]
    chosen = [t for g, ts in groups.items() if config[f"use_{g}"] for t in ts]
    layers = [i for i in range(n_layers) if not config[f"leave_out_{i}"]]
    if not chosen or not layers:
        return None
    r = 2 ** config["log2_rank"]
    return {"method": "lora", "targets": chosen, "layers": layers,
            "adapter": {"r": r, "alpha": 2 * r}}  # fmt: skip


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
    space: str = "sappa",
) -> dict[str, Any]:
    """Search, then write the report; returns it (every trial, the front, the hand configs).

    Raises:
        SpliceError: an unknown space, a SAPPA budget below the hand configurations + 1, a
            study dir of another space, or no finished trial.
    """
    from splice.train import TrainConfig
    from splice.train import train as fit

    if space not in SPACES:
        raise SpliceError(f"unknown search space {space!r}", fix=f"use one of {', '.join(SPACES)}")
    start = time.monotonic()
    facts = _model_facts(model)
    lora = lora_space(facts["n_layers"], facts["groups"], max_log2_rank)
    searched = lora if space == "lora" else sappa(facts["n_layers"], facts["d"])
    hand = _hand_configs(lora, facts["default"])
    if space == "sappa" and trials <= len(hand):
        raise SpliceError(
            f"--trials {trials} leaves no SAPPA trial after the {len(hand)} hand configurations",
            fix=f"use --trials ≥ {len(hand) + 1}",
        )
    open_study_dir(study, searched)  # before anything trains
    common = dict(train or {}) | {"seed": seed, "progress": False}
    path = Path(data)
    if not (path.suffix.lower() in (".csv", ".jsonl", ".json") or path.exists()):
        common["eval_split"] = "val"  # a bench task: choose on val, never on test
    targets = facts["default"] or [".*"]

    def evaluate(config: dict[str, int], where: Space = searched) -> tuple[float, float] | None:
        args = _train_args(where, config, targets)
        if args is None:
            return None
        tag = "hand-" if where is not searched else ""
        out = study / "trials" / (tag + "-".join(map(str, where.encode(config))))
        if args["method"] == "head":
            args = {"method": "head"}
        metrics = fit(TrainConfig(model=model, data=data, out=out, **args, **common))
        adapted = metrics["adapter_parameters"] or 0  # None: the linear probe
        return metrics["eval"]["accuracy"], 100.0 * adapted / facts["total"]

    if space == "lora":
        results = search(searched, evaluate, study, trials=trials, minutes=minutes, seed=seed,
                         first=hand)  # fmt: skip
        hand_results = []
    else:
        hand_results = _hand_trials(study, lora, hand, lambda c: evaluate(c, lora))
        left = None if minutes is None else max(minutes - (time.monotonic() - start) / 60, 0.01)
        results = search(searched, evaluate, study, trials=trials - len(hand), minutes=left,
                         seed=seed)  # fmt: skip
        results = [TrialResult(r.number + len(hand), r.config, r.accuracy, r.share)
                   for r in results]  # fmt: skip
    if not results:
        raise SpliceError("no trial finished", fix="raise --trials or --minutes")
    spaces = {"searched": searched, "lora": lora, "targets": targets}
    return _write(study, spaces, results, hand_results, hand, model, data, common)


def _hand_trials(study: Path, lora: Space, hand: list[dict[str, int]], evaluate) -> list:
    """The hand configurations as trials 0, 1, …: trained once, kept in ``hand.json``."""
    path = study / HAND_FILE
    done = json.loads(path.read_text()) if path.is_file() else []
    for config in hand[len(done) :]:
        accuracy, share = evaluate(config)
        done.append({"config": config, "accuracy": accuracy, "share": share})
        path.write_text(json.dumps(done, indent=2) + "\n")
    return [TrialResult(i, h["config"], h["accuracy"], h["share"]) for i, h in enumerate(done)]


def _command(model: Path, data: str, args: dict[str, Any], common: dict[str, Any]) -> str:
    words = ["splice", "train", str(model), data, "--out", "OUT", "--method", args["method"]]
    if args["targets"]:
        words += [
            "--targets",
            ",".join(args["targets"]),
            "--layers",
            ",".join(map(str, args["layers"])),
        ]
    words += [f"--set={k}={v}" for k, v in args["adapter"].items()]
    for key in ("steps", "batch_size", "lr", "max_length", "seed"):
        if common.get(key) is not None:
            words += [f"--{key.replace('_', '-')}", str(common[key])]
    return shlex.join(words)


def _describe(args: dict[str, Any]) -> str:
    if args["method"] == "head":
        return "no module (linear probe)"
    if args["method"] == "lora":
        return f"LoRA r={args['adapter']['r']} on {','.join(args['targets'])}"
    return ", ".join(f"{k} {v}" for k, v in args["adapter"].items())


def _row(r: TrialResult, space: Space, targets, on_front, hand, model, data, common) -> dict:
    args = _train_args(space, r.config, targets)
    row = {"trial": r.number, "accuracy": r.accuracy, "share_percent": r.share,
           "method": args["method"], "layers": args["layers"], "front": r.number in on_front,
           "hand": hand, "configuration": _describe(args)}  # fmt: skip
    if args["method"] == "lora":
        row |= {"rank": args["adapter"]["r"], "targets": args["targets"]}
    else:
        row |= {"serial": 0, "parallel": 0, "prefix": 0} | args["adapter"]
    return row | {"command": _command(model, data, args, common)}


def _write(study, spaces, results, hand_results, hand, model, data, common) -> dict[str, Any]:
    searched, targets = spaces["searched"], spaces["targets"]
    front = pareto_front(results)
    on_front = {r.number for r in front}
    hand_vectors = [searched.encode(h) for h in hand] if searched.name == "lora" else []
    rows = [_row(r, spaces["lora"], targets, set(), True, model, data, common)
            for r in hand_results]  # fmt: skip
    for r in sorted(results, key=lambda r: r.number):
        is_hand = searched.encode(r.config) in hand_vectors
        rows.append(_row(r, searched, targets, on_front, is_hand, model, data, common))
    for row in rows:  # which front trials dominate each hand configuration
        if row["hand"]:
            row["dominated_by"] = [f.number for f in front if f.number != row["trial"] and
                                   _dominates(f, row)]  # fmt: skip
    lines = [
        f"| trial | accuracy | param share % | configuration ({searched.name} search) | layers "
        "| front | hand |",
        "|---:|---:|---:|---|---|:-:|:-:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['trial']} | {row['accuracy']:.4f} | {row['share_percent']:.4f} | "
            f"{row['configuration']} | {','.join(map(str, row['layers']))} | "
            f"{'●' if row['front'] else ''} | {'hand' if row['hand'] else ''} |"
        )
    (study / "front.md").write_text("\n".join(lines) + "\n")
    (study / "front.json").write_text(json.dumps(rows, indent=2) + "\n")
    commands = [row["command"] for row in rows if row["front"]]
    (study / "front.sh").write_text("\n".join(commands) + "\n")
    hand_points = [TrialResult(row["trial"], {}, row["accuracy"], row["share_percent"])
                   for row in rows if row["hand"]]  # fmt: skip
    _plot(study / "front.png", results, front, hand_points)
    return {
        "space": searched.name,
        "trials": rows,
        "front": [row for row in rows if row["front"]],
        "hand": [row for row in rows if row["hand"]],
    }


def _dominates(a: TrialResult, row: dict[str, Any]) -> bool:
    acc, share = row["accuracy"], row["share_percent"]
    return a.accuracy >= acc and a.share <= share and (a.accuracy > acc or a.share < share)


def _plot(path: Path, results: list[TrialResult], front: list[TrialResult], hand: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r.share for r in results], [r.accuracy for r in results], s=14, c="0.6",
               label="trial")  # fmt: skip
    ax.step([r.share for r in front], [r.accuracy for r in front], where="post", c="C0",
            marker="o", label="Pareto front")  # fmt: skip
    ax.scatter([r.share for r in hand], [r.accuracy for r in hand], marker="x", s=60, c="C3",
               label="hand configuration (LoRA r=8)")  # fmt: skip
    positive = [r.share for r in results if r.share > 0]
    if len(positive) == len(results):
        ax.set_xscale("log")
    elif positive:  # a head-only trial sits at 0: linear up to the smallest other share
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("trainable parameters (% of the backbone, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
