"""``splice bench``: configure, run with progress, print and write the report."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import app
from splice.cli._printers import print_json


@app.command()
def bench(
    full: Annotated[
        bool,
        typer.Option(
            "--full/--quick",
            help="Profile: --quick (default; 4 text tasks, 4 merge methods, ~2.5 min on the "
            "2-core dev box) or --full (6 text + 4 vision tasks, every method with its λ grid, "
            "longer training, 2 seeds, then the LLM suite).",
        ),
    ] = False,
    suite: Annotated[
        str | None,
        typer.Option(help="Task suite of the profile: text, vision, all, or llm (SmolLM2)."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated task names or paths (CSV/JSONL/image folder)."),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated merge methods, or 'all' (default: the profile's; --full: all)."
        ),
    ] = None,
    finetune: Annotated[
        str | None, typer.Option(help="'lora' (default), 'full', or another adapter name.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per task.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device, e.g. cpu or cuda.")] = None,
    text_model: Annotated[
        str | None,
        typer.Option(help="A local BERT-style model dir for the text tasks (default: MiniLM)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for results.*")] = Path("bench-out"),
    seed: Annotated[int | None, typer.Option(help="First training seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    track: Annotated[
        str,
        typer.Option(
            help="merge (fine-tune, then merge), peft (every adapter method against a linear "
            "probe and full fine-tuning; --methods then names adapter methods or the "
            "selector rows spt, rdp, id3) or continual "
            "(Share, iGSP, sequential LoRA, one LoRA per task, OPCM and continual TA on task "
            "sequences; quick: 4 image tasks)."
        ),
    ] = "merge",
    budget: Annotated[
        int | None,
        typer.Option(help="peft: size every adapter method to about N trainable parameters."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="peft: a method's option, METHOD.KEY=VALUE (JSON), repeatable; "
            "--protocol paper: a task's fine-tune setting, TASK.KEY=VALUE.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="peft: rows trained at once, each in its own process on one torch thread "
            "(default 2, at most the CPU count; the numbers do not depend on it).",
        ),
    ] = None,
    grow: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="peft: a row whose lr pick is on an edge of its grid tries one 1-2-5 step past "
            "that edge, at most N times (default 0; NOLA's pick at 5e-3 wants 1e-2).",
        ),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            help="default, or paper: full fine-tunes per task, λ=0.3 and λ tuned, RegMean, "
            "Fisher, EMR, WEMoE, transductive rows apart (docs/bench.md)."
        ),
    ] = "default",
    estimate: Annotated[
        bool,
        typer.Option("--estimate", help="--protocol paper: print the predicted time, run nothing."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="merge track: go on with the interrupted run whose journal.jsonl is in --out "
            "(same options); its finished rows are read, not evaluated again.",
        ),
    ] = False,
) -> None:
    """Fine-tune tasks from packaged data, merge them (--full: every registered way), report a
    table; an estimate first, then a line per phase with the time left. --track peft compares
    the adapter methods, --track continual the continual-training methods (docs/bench.md,
    docs/continual.md)."""
    profile = "full" if full else "quick"
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads slow
    # EfficientNet's many small ops 10-30x. Only effective before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from splice.errors import UsageError

    common = {"suite": suite, "tasks": _split(tasks), "methods": _split(methods), "steps": steps,
              "seed": seed, "device": device, "text_model": text_model}  # fmt: skip
    if protocol not in ("default", "paper"):
        raise UsageError(f"unknown protocol {protocol!r}", fix="use default or paper")
    if resume and (track != "merge" or suite == "llm" or estimate):
        raise UsageError(
            "--resume belongs to the merge track's runs (text and vision suites)", fix="drop it"
        )
    if protocol == "paper":
        _paper(profile, common, finetune, set_ or [], estimate, track, budget, out, as_json, resume)
        return
    if estimate:
        raise UsageError("--estimate belongs to --protocol paper", fix="add --protocol paper")
    if track == "peft" and finetune is not None:
        raise UsageError("--finetune belongs to --track merge", fix="drop it")
    if track != "peft" and (budget is not None or set_):
        raise UsageError("--budget and --set belong to --track peft", fix="add --track peft")
    for flag, value in (("--workers", workers), ("--grow", grow)):
        if track != "peft" and value is not None:
            raise UsageError(f"{flag} belongs to --track peft", fix="add --track peft")
        if suite == "llm" and value is not None:
            raise UsageError(f"{flag} belongs to the text and vision suites", fix="drop it")
    if suite == "llm":  # the LLM suite (splice/cli/_bench_llm.py)
        from splice.cli._bench_llm import run_llm_suite

        run_llm_suite(profile, track=track, finetune=finetune, out=out, as_json=as_json,
                      budget=budget, options=_options(set_ or []), **common)  # fmt: skip
        return
    if track not in ("merge", "peft", "continual"):
        raise UsageError(f"unknown track {track!r}", fix="use merge, peft or continual")
    if track == "peft":
        from splice.bench.peft import configure_peft

        cfg = configure_peft(profile, budget=budget, options=_options(set_ or []),
                             workers=workers, grow=grow, **common)  # fmt: skip
        from splice.bench.peft import run_peft
        from splice.bench.peft_report import print_peft_table, write_peft_report

        title = f"splice bench --track peft[/] {profile}"
        _run(title, cfg, run_peft, write_peft_report, print_peft_table, out, as_json)
        return

    if track == "continual":
        from rich.console import Console

        from splice.bench.continual_training import (
            configure_track,
            run_track,
            to_table,
            write_track,
        )

        sequence = configure_track(
            full, suite=suite, methods=_split(methods), steps=steps, seed=seed, device=device
        )
        err = Console(stderr=True)
        results = run_track(sequence, say=lambda line: err.print(line, soft_wrap=True))
        paths = write_track(results, out)
        if as_json:
            print_json(results)
        else:
            typer.echo(to_table(results))
        err.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)
        return
    from splice.bench.report import print_table, write_report
    from splice.bench.runner import configure, run_bench

    cfg = configure(profile, finetune=finetune, **common)
    with_llm = full and suite is None and tasks is None  # the full profile includes the LLM suite
    show = None if with_llm and as_json else as_json  # --json: one document for both
    if with_llm:
        from rich.console import Console

        Console(stderr=True).print(
            "then the LLM suite (SmolLM2): its estimate follows once it has loaded", soft_wrap=True
        )
    title = f"splice bench[/] {profile}"
    results = _run(title, cfg, run_bench, write_report, print_table, out, show, resume)
    if with_llm:
        from splice.cli._bench_llm import run_llm_suite

        everything = {**common, "tasks": None, "methods": None, "text_model": None}
        llm = run_llm_suite("full", track=track, finetune=None, out=out, as_json=show, **everything)
        if as_json:
            print_json({"merge": results, "llm": llm})


def _run(
    title: str,
    cfg: Any,
    run: Callable[..., dict[str, Any]],
    write: Callable[[dict[str, Any], Path], list[Path]],
    table: Callable[[dict[str, Any], Any], None],
    out: Path,
    as_json: bool | None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """Run with progress on stderr, write the files, print the table (or JSON; neither for
    ``as_json=None``) on stdout; return the results. ``resume`` (None: the run keeps no
    journal): whether to go on from the journal in ``out`` rather than start it over."""
    from rich.console import Console

    err = Console(stderr=True)
    err.print(f"[bold]{title}: {', '.join(cfg.tasks)}", soft_wrap=True)
    if resume is None:
        results = run(cfg, console=err)
    else:
        from splice.bench.journal import JOURNAL, Journal

        if resume and not (out / JOURNAL).is_file():
            err.print(f"--resume: no {JOURNAL} in {out}; the run starts from the beginning",
                      soft_wrap=True)  # fmt: skip
        journal = Journal(out / JOURNAL, cfg.model_dump(mode="json"), resume)
        try:
            results = run(cfg, console=err, journal=journal)
        except KeyboardInterrupt:
            err.print(
                f"{len(journal.rows)} finished rows are kept in {journal.path}; "
                "the same command with --resume goes on from there",
                soft_wrap=True,
            )
            raise
    paths = write(results, out)
    if as_json:
        print_json(results)
    elif as_json is not None:
        # Piped output (CI logs) gets a wide table rather than rich's 80 columns.
        table(results, Console() if sys.stdout.isatty() else Console(width=200))
    err.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)
    return results


def _paper(
    profile: str,
    common: dict[str, Any],
    finetune: str | None,
    items: list[str],
    estimate: bool,
    track: str,
    budget: int | None,
    out: Path,
    as_json: bool,
    resume: bool,
) -> None:
    """``--protocol paper``: configure, then estimate only or run and report."""
    from splice.errors import UsageError

    if track != "merge" or budget is not None or finetune is not None:
        raise UsageError(
            "--protocol paper fine-tunes all weights on the merge track",
            fix="drop --track, --budget and --finetune",
        )
    from splice.bench.paper import configure_paper, estimate_text
    from splice.bench.paper import estimate as predict

    cfg = configure_paper(profile, per_task=_options(items), **common)
    if estimate:
        seconds, plan = predict(cfg)
        typer.echo(estimate_text(cfg, seconds, plan))
        return
    from splice.bench.paper import run_paper
    from splice.bench.paper_report import print_paper_table, write_paper_report

    title = f"splice bench --protocol paper[/] {profile}"
    _run(title, cfg, run_paper, write_paper_report, print_paper_table, out, as_json, resume)


def _options(items: list[str]) -> dict[str, dict[str, object]]:
    """``["mos.e=1", "nola.k=384"]`` → ``{"mos": {"e": 1}, "nola": {"k": 384}}``."""
    from splice.errors import UsageError

    options: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise UsageError(f"--set {item!r} is not METHOD.KEY=VALUE", fix="e.g. --set mos.e=1")
        try:
            options.setdefault(method, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            options[method][name] = value
    return options


def _split(csv: str | None) -> list[str] | None:
    return [x.strip() for x in csv.split(",") if x.strip()] if csv is not None else None
