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

**Matching by token** (mergekit's tokenizer surgery, a recipe's ``tokenizer_source:`` or
``tokenizer:`` block, :class:`TokenMap`) reads every input's tokenizer and re-indexes each
embedding / head row to the output vocabulary by token string before the merge: the output
vocabulary is the base's (``base``), a model's (``<path>``) or the union (``union``: the
base's, then every other input's tokens appended as added tokens), plus any token the block
names. An input that has the token (below its ``vocab_size``) gives its own row; one that
lacks it — or any input, for a token with ``force: true`` — gets the token's *default* row:
its configured source (a model's row for that token or for another ``token``/``token_id``,
or ``zero``), else the only input that has it, else the base's row, else the mean of the
inputs that have it, else zero (mergekit's order). Rows added by ``pad_to_multiple_of`` are
each input's mean row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from splice.merge.engine import MergeJob

__all__ = ["TokenMap", "fit_rows", "report", "token_map"]


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


@dataclass
class TokenMap:
    """Per input (:meth:`MergeJob.sources` order), output row → its row (-1: lacks the
    token); per token that needs one, its default row as ``[(input, row), …]`` to average
    (``[]``: zero). Built by :func:`splice.merge.engine.tokens.token_map`."""

    rows: int
    """Output rows, ``pad_to_multiple_of`` included."""
    vocab_size: int
    """Tokens of the output tokenizer (rows past it are padding)."""
    index: list[Tensor]
    defaults: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    forced: set[int] = field(default_factory=set)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def apply(
        self, base: Tensor | None, tensors: list[Tensor]
    ) -> tuple[Tensor | None, list[Tensor]]:
        """Every input re-indexed to the output vocabulary (see module docstring)."""
        inputs = ([base] if base is not None else []) + tensors
        width, dtype = inputs[0].shape[1:], inputs[0].dtype
        default = {}
        for tok, srcs in self.defaults.items():
            acc = torch.zeros(width, dtype=dtype, device=inputs[0].device)
            for i, r in srcs:
                acc += inputs[i][r]
            default[tok] = acc / max(len(srcs), 1)
        out = []
        forced = torch.tensor(sorted(self.forced), dtype=torch.long)
        for t, idx in zip(inputs, self.index, strict=True):
            new = t.new_zeros((self.rows, *width))
            have = idx >= 0
            if len(forced):
                have[forced] = False
            pos = have.nonzero().squeeze(1)
            new[pos] = t[idx[pos]]
            for tok, row in default.items():
                if not have[tok]:
                    new[tok] = row
            if self.rows > self.vocab_size:
                new[self.vocab_size :] = new[: self.vocab_size].mean(0)
            out.append(new)
        if base is not None:
            return out[0], out[1:]
        return None, out


def _tokenizer(path: str | Path | None, where: str) -> Any:
    from splice.errors import SpliceError

    if path is None or not Path(path).is_dir():
        raise SpliceError(
            "no tokenizer: the input is not a model dir",
            where=where,
            fix="tokenizer surgery needs every input's tokenizer files",
        )
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise SpliceError(
            f"cannot read the tokenizer: {str(e).splitlines()[0][:160]}", where=str(path)
        ) from None


def _rows_of(tok: Any, config: dict[str, Any] | None) -> dict[str, int]:
    """``token -> row`` for the tokens an input has rows for (ids below its vocab_size)."""
    size = (config or {}).get("vocab_size") or len(tok)
    return {t: i for t, i in tok.get_vocab().items() if i < size}


def token_map(
    spec: Any, labels: list[str], dirs: list[Any], configs: list[Any], has_base: bool
) -> TokenMap:
    """The :class:`TokenMap` of a recipe's tokenizer ``spec`` over the inputs (base first),
    from their tokenizers alone.

    Raises:
        SpliceError: an input without tokenizer files, a tokenizer source or token source
            model that is not an input, a source token it does not have.
    """
    from splice.errors import SpliceError

    if spec.source not in ("base", "union") and not Path(spec.source).is_dir():
        raise SpliceError(
            f"tokenizer source {spec.source!r} is not base, union or a model dir",
            where=spec.where,
        )
    toks = [_tokenizer(d, lab) for d, lab in zip(dirs, labels, strict=True)]
    vocabs = [_rows_of(t, c) for t, c in zip(toks, configs, strict=True)]
    paths = {str(Path(d).resolve()): i for i, d in enumerate(dirs) if d is not None}

    def input_of(model: str, where: str) -> int:
        i = paths.get(str(Path(model).resolve()))
        if i is None:
            raise SpliceError(
                f"token source model {model!r} is not an input of the merge",
                where=where,
                fix="name the base or one of the models",
            )
        return i

    if spec.source == "base" or spec.source == "union":
        out = toks[0]
    else:
        out = _tokenizer(spec.source, spec.where)
    import copy

    out = copy.deepcopy(out)
    have = set(out.get_vocab())
    extra = []
    if spec.source == "union":
        for v in vocabs[1:]:
            extra += [t for t in sorted(v, key=v.__getitem__) if t not in have]
            have.update(v)
    extra += [t for t in spec.tokens if t not in have and t not in extra]
    if extra:
        out.add_tokens(list(dict.fromkeys(extra)))
    vocab = out.get_vocab()
    size = max(vocab.values()) + 1
    rows = size
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    index = []
    for v in vocabs:
        idx = torch.full((rows,), -1, dtype=torch.long)
        for t, j in vocab.items():
            if t in v:
                idx[j] = v[t]
        index.append(idx)
    tmap = TokenMap(rows, size, index)
    for t, j in vocab.items():
        cfg = spec.tokens.get(t)
        holders = [i for i, idx in enumerate(index) if idx[j] >= 0]
        if cfg is not None and cfg.force:
            tmap.forced.add(j)
        if cfg is not None and cfg.kind == "zero":
            tmap.defaults[j] = []
        elif cfg is not None and cfg.kind == "model_token":
            i = input_of(cfg.model, cfg.where)
            row = cfg.token_id if cfg.token is None else vocabs[i].get(cfg.token)
            if row is None or not 0 <= row < len(vocabs[i]):
                what = cfg.token if cfg.token is not None else cfg.token_id
                raise SpliceError(
                    f"token {what!r} is not in {cfg.model}'s vocabulary", where=cfg.where
                )
            tmap.defaults[j] = [(i, row)]
        elif len(holders) == len(index) and j not in tmap.forced:
            continue  # every input has it: no default needed
        elif not holders:
            tmap.defaults[j] = []
        elif len(holders) == 1 or (has_base and holders[0] == 0):
            tmap.defaults[j] = [(holders[0], int(index[holders[0]][j]))]
        else:
            tmap.defaults[j] = [(i, int(index[i][j])) for i in holders]
    tmap.tokenizer_files = _saved(out)
    tmap.summary = {
        "policy": f"tokenizer: {spec.source}",
        "matching": "by token string (each input's tokenizer)",
        "vocab_size": rows,
        "tokens": size,
        "tokens_added": len(extra),
        "tokens_with_defaults": len(tmap.defaults),
        "padding": "rows past the tokens are each input's mean row" if rows > size else "none",
    }
    return tmap


def _saved(tok: Any) -> dict[str, bytes]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
