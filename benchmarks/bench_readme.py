"""Write the README's quick-benchmark table and plot from a `splice bench` run (by hand).

    ./run.sh bench --out bench-out                  # the quick profile (fresh cache: everything)
    python benchmarks/bench_readme.py bench-out     # README.md + docs/img/bench-quick.png

Replaces the README text between the ``bench-quick`` markers with the run's settings and
timings (``splice.bench.report.timing``) and its table (``markdown_table``), and copies its
``results.png`` to ``docs/img/bench-quick.png``. Nothing else is edited: the prose around the
markers is written by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from splice.bench.report import markdown_table, timing

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-quick:start -->", "<!-- bench-quick:end -->"


def section(results: dict) -> str:
    cfg = results["config"]
    train = cfg["train"]
    intro = (
        f"Quick profile, produced by `./run.sh bench` (= `splice bench`, results in "
        f"`bench-out/`; this table by `python benchmarks/bench_readme.py bench-out`): "
        f"{len(results['tasks'])} text tasks, {train['finetune']} r={train['r']} for "
        f"{train['steps']} steps per task, seeds {list(cfg['seeds'])}, test caps of "
        f"{cfg['caps'][2]} examples; each merge method at its defaults. {timing(results['meta'])}"
    )
    return "\n".join([START, intro, "", *markdown_table(results), END])


def main(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + section(results) + tail)
    shutil.copyfile(out / "results.png", ROOT / "docs" / "img" / "bench-quick.png")
    print(f"updated {readme} and docs/img/bench-quick.png from {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out"))
