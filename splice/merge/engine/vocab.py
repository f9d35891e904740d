"""Vocab policies: what to do when embedding / LM-head rows differ between inputs.

``vocab: base`` keeps the reference's rows (the base, else the first model), ``union`` the
most rows of any input, ``intersect`` the fewest. Rows are matched **by index**: row ``i`` is
taken to be the same token in every input. That holds when the vocabularies share a prefix
and differ only by tokens appended at the end (added special tokens, padding to a multiple
of 64) — the common case of fine-tunes of one base (mergekit #328, #425, fusion_bench #215).
It does not align two different tokenizers; splice never reads tokenizer files to match
tokens by string.

An input with more rows than the output loses its extra rows (*dropped*). An input with
fewer rows gets the missing ones (*padded*) from the base's row, or — where the base lacks
that row too — the mean of the inputs that have it; so under ``union`` a token only one model
knows keeps that model's row (its task vector there is the only one), and a base-relative
method sees a zero task vector for the inputs that lack it. The tokenizer files of the output
come from the input whose row count was chosen; ``vocab_size`` in the written config is the
output's embedding row count.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from splice.merge.engine import MergeJob

__all__ = ["check_tokenizer_supported", "fit_rows", "report"]


def _mean_rows(tensors: list[Tensor], start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` as the mean over the tensors that have them (piecewise)."""
    bounds = sorted({start, stop, *(t.shape[0] for t in tensors if start < t.shape[0] < stop)})
    pieces = []
    for a, b in itertools.pairwise(bounds):
        have = [t[a:b] for t in tensors if t.shape[0] >= b]
        acc = have[0].clone()
        for t in have[1:]:
            acc += t
        pieces.append(acc.div_(len(have)))
    return torch.cat(pieces)


def _fit(t: Tensor, rows: int, fill: Tensor | None, others: list[Tensor]) -> Tensor:
    n = t.shape[0]
    if n == rows:
        return t
    if n > rows:
        return t[:rows]
    pad = fill[n:rows] if fill is not None else _mean_rows(others, n, rows)
    return torch.cat([t, pad])


def fit_rows(
    base: Tensor | None, tensors: list[Tensor], rows: int
) -> tuple[Tensor | None, list[Tensor]]:
    """Fit every input to ``rows`` rows: truncate, or pad as the module docstring says."""
    if base is not None:
        base = _fit(base, rows, None, tensors)
    return base, [_fit(t, rows, base, tensors) for t in tensors]


def report(job: MergeJob, resized: dict[str, tuple[int, list[tuple[str, int]]]]) -> dict[str, Any]:
    """What the policy did, per tensor and in total, and where the tokenizer comes from.

    ``resized``: ``name -> (output rows, [(input label, its rows), …])``, reference first.
    """
    policy = job.vocab
    tensors: dict[str, Any] = {}
    added = dropped = padded = 0
    fill = (
        "the base's row, or the mean of the inputs that have it where the base lacks it"
        if job.base is not None
        else "the mean of the inputs that have it"
    )
    for name, (out_rows, inputs) in resized.items():
        entry: dict[str, Any] = {"rows": out_rows, "inputs": {}}
        for label, n in inputs:
            row: dict[str, Any] = {"rows": n}
            if n > out_rows:
                row["dropped"] = [out_rows, n]
                dropped += n - out_rows
            elif n < out_rows:
                row["padded"] = [n, out_rows]
                padded += out_rows - n
            entry["inputs"][label] = row
        added += max(0, out_rows - inputs[0][1])
        tensors[name] = entry
    first = next(iter(resized.values()))
    out_rows, inputs = first
    source = next(label for label, n in inputs if n == out_rows)
    embed = next(
        (n for n in resized if any(k in n for k in ("embed", "wte", "shared", "word_emb"))),
        next(iter(resized)),
    )
    return {
        "policy": policy,
        "matching": "by row index (no tokenizer alignment)",
        "vocab_size": resized[embed][0],
        "tokenizer_from": source,
        "rows_added": added,
        "rows_dropped": dropped,
        "rows_padded": padded,
        "padding": f"rows an input lacks are filled with {fill}",
        "tensors": tensors,
    }


def check_tokenizer_supported(spec: Any) -> None:
    """Refuse tokenizer surgery beyond ``tokenizer_source: base`` (not implemented yet)."""
    if spec.source != "base" or spec.tokens or spec.pad_to_multiple_of:
        from splice.errors import SpliceError

        raise SpliceError(
            f"tokenizer surgery (tokenizer_source: {spec.source}, tokens, padding) is not "
            "supported yet",
            where=spec.where,
            fix="use tokenizer_source: base, or a splice recipe with `vocab: union` "
            "(embedding rows matched by index; see docs/merging.md)",
        )
