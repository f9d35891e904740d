"""``splice bench --suite llm``: the LLM suite's command-line glue (docs/bench.md, "LLM suite")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from splice.cli._printers import print_json


def run_llm_suite(
    profile: str,
    *,
    track: str,
    tasks: list[str] | None,
    methods: list[str] | None,
    steps: int | None,
    seed: int | None,
    device: str | None,
    text_model: str | None,
    finetune: str | None,
    out: Path,
    as_json: bool,
    suite: str | None = None,
) -> dict[str, Any]:
    """Run the LLM suite's merge track, print its table (or JSON), write ``llm-results.*``.
    ``text_model`` names a causal-LM dir here (default: the packaged SmolLM2)."""
    from rich.console import Console

    from splice.errors import UsageError

    del suite  # "llm", or None when the full profile runs it after the others
    if track != "merge":
        raise UsageError(
            f"--suite llm runs the merge track, not --track {track}",
            fix="drop --track (the llm PEFT track is not implemented)",
        )
    if finetune not in (None, "lora"):
        raise UsageError("--suite llm fine-tunes with LoRA only", fix="drop --finetune")
    from splice.bench.llm import configure_llm, run_llm
    from splice.bench.llm_report import print_llm_table, write_llm_report

    cfg = configure_llm(profile, tasks=tasks, methods=methods, steps=steps, seed=seed,
                        device=device, model=text_model)  # fmt: skip
    err = Console(stderr=True)
    err.print(
        f"[bold]splice bench --suite llm[/] {profile}: {', '.join(cfg.tasks)}", soft_wrap=True
    )
    results = run_llm(cfg, say=lambda line: err.print(line, soft_wrap=True, highlight=False))
    paths = write_llm_report(results, out)
    if as_json:
        print_json(results)
    else:
        print_llm_table(results, Console() if sys.stdout.isatty() else Console(width=200))
    typer.echo("wrote " + ", ".join(str(p) for p in paths), err=True)
    return results
