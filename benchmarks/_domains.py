"""What the tracking and diffusion benchmarks of issue #34 share: options from a bench
dataclass, the JSON record, and a bar-chart figure."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any


def parser(doc: str, defaults: Any) -> argparse.ArgumentParser:
    """An option ``--<field>`` per int/float field of the bench dataclass, plus --out/--plot."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, help="write a figure (PNG) here")
    return p


def settings(args: argparse.Namespace, defaults: Any) -> Any:
    names = {f.name for f in dataclasses.fields(defaults)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(defaults, **given)


def record(result: dict, args: argparse.Namespace, started: float) -> None:
    result["wall_seconds"] = time.perf_counter() - started
    result["threads"] = os.environ.get("OMP_NUM_THREADS")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wall time {result['wall_seconds']:.0f}s")


def bars(path: Path, panels: list[tuple[str, dict[str, float]]], title: str) -> None:
    """One horizontal bar chart per (ylabel, {row: value}) panel, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (label, values) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        names = list(values)
        ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        for i, n in enumerate(names):
            ax.text(values[n], i, f" {values[n]:.3g}", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")
