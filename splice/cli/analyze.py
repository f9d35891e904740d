"""``splice analyze geometry|safety|lapt|mup``: studies that read models rather than change them.

Each writes ``report.json``, ``report.md`` and plots into ``--out`` (atomically: a failed
run leaves nothing). Bad input — a layer out of range, a model without a block stack, an
empty prompt file, widths without a shared base — is one line and exit 1, before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import app
from splice.errors import SpliceError

analyze_app = typer.Typer(
    help="Study models: layer-update geometry, latent safety probes, LAPT, μP transfer.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")

Out = Annotated[Path, typer.Option(help="Output folder (report.json, report.md, plots).")]
Model = Annotated[str, typer.Argument(help="'smollm2', 'minilm' or a local model dir.")]
Layers = Annotated[
    str | None, typer.Option(help="Blocks: comma list or start:stop[:step] (default: all).")
]


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """``"1,3,5"`` or ``"0:30:3"`` → a list; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        if ":" in text:
            return list(range(*(int(x) for x in text.split(":"))))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpliceError(
            f"{what} {text!r} is not a comma list or start:stop[:step] of integers",
            fix=f"e.g. --{what} 0,4,8 or --{what} 0:30:3",
        ) from None


@contextmanager
def bars(show: bool) -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """A :data:`splice.analysis.report.Progress` backed by rich bars (on stderr)."""
    if not show:
        yield lambda label, total: lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:

        def start(label: str, total: int) -> Callable[[], None]:
            task = progress.add_task(label, total=total)
            return lambda: progress.advance(task)

        yield start


def _run(out: Path, quiet: bool, study: Callable[..., tuple], *args: Any, **kwargs: Any) -> None:
    """Run ``study(*args, progress=..., **kwargs)`` under progress bars; write its report."""
    from splice.analysis.report import write_report

    with bars(not quiet) as progress:
        data, md, figures = study(*args, progress=progress, **kwargs)
    write_report(out, data, md, figures)
    if not quiet:
        typer.echo(md)
    typer.echo(f"wrote {out}/report.json, report.md" + "".join(f", {f}" for f in figures))


@analyze_app.command()
def geometry(
    model: Model,
    out: Out,
    layers: Layers = None,
    fit: Annotated[str, typer.Option(help="diag, rank or global.")] = "diag",
    k: Annotated[int, typer.Option(help="Neighbours per token (leave-one-out).")] = 64,
    ridge: Annotated[float, typer.Option(help="Ridge, relative to mean ‖x‖².")] = 1e-3,
    rank: Annotated[int, typer.Option(help="Rank of the 'rank' fit.")] = 8,
    target: Annotated[str, typer.Option(help="transition (fit h^{l+1}) or update.")] = "transition",
    center: Annotated[
        bool, typer.Option(help="Fit on mean-centred states (affine map, centred kNN).")
    ] = False,
    texts: Annotated[int, typer.Option(help="Prose paragraphs in the token sample.")] = 32,
    max_len: Annotated[int, typer.Option(help="Tokens per paragraph at most.")] = 64,
    quiet: Annotated[bool, typer.Option(help="Do not print the Markdown report.")] = False,
) -> None:
    """Tokenwise vs residual parts of each layer's update (other.md §6)."""
    from splice.analysis.run_geometry import run_geometry

    _choice("fit", fit, ("diag", "rank", "global"))
    _choice("target", target, ("transition", "update"))
    _run(
        out,
        quiet,
        run_geometry,
        model,
        parse_ints(layers, "layers"),
        fit=fit,
        k=k,
        ridge=ridge,
        rank=rank,
        target=target,
        center=center,
        texts=texts,
        max_len=max_len,
    )


@analyze_app.command()
def safety(
    model: Model,
    out: Out,
    layers: Layers = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompt file: one per line, or JSONL with 'prompt'.")
    ] = None,
    max_prompts: Annotated[int, typer.Option(help="Use the first N prompts.")] = 12,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per response.")] = 32,
    direction: Annotated[str, typer.Option(help="random, grad or mean_diff.")] = "random",
    seed: Annotated[int, typer.Option(help="Seed of the random direction.")] = 42,
    asa: Annotated[bool, typer.Option(help="Run the ASA sweep (else only the NLL probe).")] = True,
    quiet: Annotated[bool, typer.Option(help="Do not print the Markdown report.")] = False,
) -> None:
    """NLL probe and Activation Steering Attack per layer (other.md §7)."""
    from splice.analysis.prompt_set import read_prompts
    from splice.analysis.run_safety import run_safety

    _choice("direction", direction, ("random", "grad", "mean_diff"))
    texts = read_prompts(prompts) if prompts is not None else None
    _run(
        out,
        quiet,
        run_safety,
        model,
        parse_ints(layers, "layers"),
        prompts=texts,
        max_prompts=max_prompts,
        new_tokens=new_tokens,
        direction=direction,
        seed=seed,
        asa=asa,
    )


@analyze_app.command()
def lapt(
    model: Model,
    out: Out,
    layer: Annotated[int, typer.Option(help="Block whose output is perturbed in training.")],
    eval_layers: Annotated[
        str | None, typer.Option(help="Blocks attacked in evaluation (default: --layer).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file (default: ours).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (the code's max_steps).")] = 20,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine, 10 % warm-up).")] = 1e-4,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per response.")] = 32,
    quiet: Annotated[bool, typer.Option(help="Do not print the Markdown report.")] = False,
) -> None:
    """Layer-wise Adversarial Patch Training, with ASA and perplexity before and after (§7.7)."""
    from splice.analysis.prompt_set import read_prompts
    from splice.train.lapt import lapt_study

    texts = read_prompts(prompts) if prompts is not None else None
    _run(
        out,
        quiet,
        lapt_study,
        model,
        layer,
        eval_layers=parse_ints(eval_layers, "eval-layers"),
        prompts=texts,
        steps=steps,
        lr=lr,
        new_tokens=new_tokens,
    )


@analyze_app.command()
def mup(
    out: Out,
    family: Annotated[str, typer.Option(help="mlp (digits) or gpt (character LM).")] = "mlp",
    widths: Annotated[
        str, typer.Option(help="Comma list; smallest = base.")
    ] = "64,128,256,512,1024",
    lr_exponents: Annotated[
        str, typer.Option(help="LR grid as powers of two, start:stop.")
    ] = "-13:-1",
    steps: Annotated[int, typer.Option(help="Optimizer steps per run.")] = 30,
    seeds: Annotated[int, typer.Option(help="Seeds per grid cell.")] = 2,
    parametrizations: Annotated[str, typer.Option(help="Comma list of mup, sp, ntk.")] = "mup,sp",
    quiet: Annotated[bool, typer.Option(help="Do not print the Markdown report.")] = False,
) -> None:
    """Coordinate check and LR-transfer sweep on a from-scratch width family (other.md §8)."""
    from splice.analysis.mup import RULES
    from splice.train.mup_study import FAMILIES, mup_study

    _choice("family", family, FAMILIES)
    params = [p.strip() for p in parametrizations.split(",") if p.strip()]
    for p in params:
        _choice("parametrization", p, tuple(RULES))
    exps = parse_ints(lr_exponents, "lr-exponents")
    if not exps or len(exps) < 3:
        raise SpliceError(
            f"lr-exponents {lr_exponents!r} give fewer than 3 grid points",
            fix="e.g. --lr-exponents -13:-1",
        )
    _run(
        out,
        quiet,
        mup_study,
        family,
        parse_ints(widths, "widths") or [],
        [2.0**e for e in exps],
        steps=steps,
        seeds=tuple(range(seeds)),
        parametrizations=params,
    )


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpliceError(
            f"{what} {value!r} is not one of {', '.join(allowed)}",
            fix=f"pass --{what} {allowed[0]}",
        )
