"""``splice convert recursive|prune|transfer``: change a causal LM's architecture, or move
parametric knowledge into a smaller one (splice.convert, splice.train.transfer).

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
from splice.errors import SpliceError, UsageError

convert_app = typer.Typer(
    help="Convert a causal LM: recursive (tied, looped layers + LoRA relaxation), depth-pruned;"
    " or transfer a teacher's knowledge into a smaller one.",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")

Model = Annotated[str, typer.Argument(help="'smollm2' (packaged) or a local causal-LM dir.")]
Out = Annotated[Path, typer.Option(help="Output model directory.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
RECURSIVE = "splice_recursive_llama"  # the converted model's model_type


def _causal_lm(name: str, check: Callable[[dict[str, Any]], None] = lambda c: None):
    """Load ``name`` after checking its config names a causal LM (one-line error if not) and
    passes ``check`` (the dir's config; the packaged model is checked after loading)."""
    if name != "smollm2":
        check(_causal_lm_config(name))
    from transformers.utils import logging

    from splice.data.causal_lm import load_causal_lm

    logging.disable_progress_bar()  # stderr stays one line on a late error
    model, tokenizer = load_causal_lm(name)
    check(model.config.to_dict())
    return model, tokenizer


def _causal_lm_config(name: str) -> dict[str, Any]:
    """The config of the model dir ``name``; a one-line error unless it is a causal LM."""
    config = Path(name) / "config.json"
    if not config.is_file():
        raise SpliceError(
            "not a model dir (no config.json)", where=name, fix="pass a causal-LM dir, or 'smollm2'"
        )
    loaded = json.loads(config.read_text())
    archs = loaded.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise SpliceError(
            f"not a causal LM (architectures {archs})",
            where=name,
            fix="convert a *ForCausalLM model",
        )
    return loaded


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


@convert_app.command()
def transfer(
    teacher: Model,
    student: Annotated[str, typer.Argument(help="A smaller causal-LM dir of the same family.")],
    out: Out,
    method: Annotated[str, typer.Option(help="laten or postpkt.")] = "laten",
    data: Annotated[
        str, typer.Option(help="'glosses' (WordNet noun glosses) or a .jsonl/.csv text file.")
    ] = "glosses",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 16,
    extract: Annotated[int, typer.Option(help="Documents that locate the knowledge.")] = 8,
    align: Annotated[int, typer.Option(help="Documents the transfer trains on.")] = 16,
    heldout: Annotated[int, typer.Option(help="Documents perplexity is measured on.")] = 64,
    lr: Annotated[float | None, typer.Option(help="Default: laten 3e-4, postpkt 1e-4.")] = None,
    rate: Annotated[float, typer.Option(help="LaTen: share of neurons/dims moved.")] = 0.1,
    rank: Annotated[int, typer.Option(help="PostPKT: LoRA rank.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per document.")] = 48,
    force: Annotated[bool, typer.Option(help="Replace an existing output dir.")] = False,
    as_json: AsJson = False,
) -> None:
    """Cross-scale knowledge transfer (LaTen or PostPKT) from TEACHER into STUDENT; saves the
    student with the transfer merged, and held-out perplexity before/after."""
    import pydantic

    from splice.train.transfer import TransferConfig
    from splice.train.transfer import transfer as run

    if method not in ("laten", "postpkt"):
        raise SpliceError(f"unknown --method {method!r}", fix="choose laten or postpkt")
    for name in (teacher, student):
        if name != "smollm2" and _causal_lm_config(name).get("model_type") == RECURSIVE:
            raise SpliceError(
                "a recursive model cannot be a transfer teacher or student (attribution and "
                "the injectors read one plain Llama layer per depth)",
                where=name,
                fix="use a depth-pruned student: splice convert prune",
            )
    try:
        cfg = TransferConfig(teacher=teacher, student=student, out=out, method=method, data=data,
                             steps=steps, extract=extract, align=align, heldout=heldout, lr=lr,
                             rate=rate, rank=rank, max_length=max_length, force=force)  # fmt: skip
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag} {err['input']!r}: {err['msg']}") from None
    from transformers.utils import logging

    logging.disable_progress_bar()
    metrics = run(cfg, log=(lambda s: None) if as_json else typer.echo)
    summary = {"out": str(out), "method": method} | {
        k: metrics[k] for k in ("before_perplexity", "after_perplexity", "seconds")
    }
    summary["teacher_perplexity"] = metrics.get("teacher_perplexity")
    if as_json:
        print_json(summary)
        return
    typer.echo(
        f"wrote {out}: held-out perplexity {summary['before_perplexity']:.2f} → "
        f"{summary['after_perplexity']:.2f} (teacher {summary['teacher_perplexity']:.2f}) "
        f"in {summary['seconds']:.1f} s"
    )
