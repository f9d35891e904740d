"""``splice convert recursive|prune``: change a causal LM's architecture (splice.convert).

Each writes an HF model directory (atomically: a failed run leaves nothing) with the
tokenizer, and prints what it wrote. Bad input — K not dividing the depth, a rank above
``min(d_in, d_out)``, a model that is not a causal LM — is one line and exit 1, before any
work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import app
from splice.cli._printers import print_json
from splice.errors import SpliceError

convert_app = typer.Typer(
    help="Convert a causal LM: recursive (tied, looped layers + LoRA relaxation), depth-pruned.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")

Model = Annotated[str, typer.Argument(help="'smollm2' (packaged) or a local causal-LM dir.")]
Out = Annotated[Path, typer.Option(help="Output model directory.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def _causal_lm(name: str, check: Callable[[dict[str, Any]], None] = lambda c: None):
    """Load ``name`` after checking its config names a causal LM (one-line error if not) and
    passes ``check`` (the dir's config; the packaged model is checked after loading)."""
    if name != "smollm2":
        config = Path(name) / "config.json"
        if not config.is_file():
            raise SpliceError(
                "not a model dir (no config.json)",
                where=name,
                fix="pass a causal-LM dir, or 'smollm2'",
            )
        archs = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise SpliceError(
                f"not a causal LM (architectures {archs})",
                where=name,
                fix="convert a *ForCausalLM model",
            )
        check(json.loads(config.read_text()))
    from transformers.utils import logging

    from splice.data.causal_lm import load_causal_lm

    logging.disable_progress_bar()  # stderr stays one line on a late error
    model, tokenizer = load_causal_lm(name)
    check(model.config.to_dict())
    return model, tokenizer


def _summary(out: Path, model: Any, source: Any, seconds: float) -> dict[str, Any]:
    count = sum(p.numel() for p in model.parameters())
    before = sum(p.numel() for p in source.parameters())
    return {"out": str(out), "parameters": count, "source_parameters": before, "seconds": seconds}


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    ratio = summary["parameters"] / summary["source_parameters"]
    typer.echo(
        f"wrote {summary['out']}: {summary['parameters']:,} parameters "
        f"({ratio:.2f}× the source) in {summary['seconds']:.1f} s"
    )


@convert_app.command()
def recursive(
    model: Model,
    out: Out,
    shared: Annotated[
        int, typer.Option("--shared", "-k", help="K shared layers (must divide the depth).")
    ],
    init: Annotated[str, typer.Option(help="stepwise, average or lower.")] = "average",
    rank: Annotated[
        str, typer.Option(help="Per-loop LoRA rank: 0 (none), an integer, or 'full' (exact).")
    ] = "0",
    tie_norms: Annotated[
        bool, typer.Option(help="Tie the RMSNorms like the linears (default: private per depth).")
    ] = False,
    exit_loss_weight: Annotated[
        float, typer.Option(help="Weight of the intermediate-loop losses when uptrained.")
    ] = 0.0,
    as_json: AsJson = False,
) -> None:
    """Relaxed Recursive Transformer: K shared layers looped N/K times (CYCLE), per-loop LoRA
    initialised by SVD of the tying residuals; uptrain with `splice train --method full`."""
    from splice.convert import INITS, convert_recursive, save_recursive
    from splice.convert.recursive import check_config

    if init not in INITS:
        raise SpliceError(f"unknown --init {init!r}", fix=f"choose one of {', '.join(INITS)}")
    if rank != "full" and not rank.isdigit():
        raise SpliceError(f"--rank {rank!r} is not a non-negative integer or 'full'")
    start = time.perf_counter()
    rank_value = rank if rank == "full" else int(rank)
    source, tokenizer = _causal_lm(model, lambda c: check_config(c, shared, rank_value))
    converted = convert_recursive(
        source,
        shared,
        init,
        rank_value,
        private_norms=not tie_norms,
        exit_loss_weight=exit_loss_weight,
    )
    save_recursive(converted, out, tokenizer)
    summary = _summary(out, converted, source, time.perf_counter() - start)
    summary |= {"shared_layers": shared, "loops": converted.config.num_loops, "rank": rank}
    _report(summary, as_json)


@convert_app.command()
def prune(
    model: Model,
    out: Out,
    keep: Annotated[int, typer.Option(help="Layers to keep: every N/keep-th from the first.")],
    as_json: AsJson = False,
) -> None:
    """Depth-prune: keep every B-th decoder layer (the equal-size baseline of a recursive model)."""
    from splice.convert import depth_prune, stepwise_layers
    from splice.io.atomic import atomic_dir

    start = time.perf_counter()
    source, tokenizer = _causal_lm(model)
    layers = stepwise_layers(source.config.num_hidden_layers, keep)
    pruned = depth_prune(source, layers)
    with atomic_dir(out) as tmp:
        pruned.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    summary = _summary(out, pruned, source, time.perf_counter() - start)
    _report(summary | {"layers": layers}, as_json)
