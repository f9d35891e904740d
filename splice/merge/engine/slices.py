"""Layer slices: stack, cut and repeat layers of several models into one (mergekit ``slices:``).

An output model is a list of *slices*; slice ``k`` takes ``n_k`` consecutive layers from each
of its sources (equal counts), merges source ``i``'s layer ``start_i + j`` into output layer
``offset_k + j``, and the output has ``Σ n_k`` layers (``config.json``'s layer count and a
per-layer ``layer_types`` list are rewritten). A layer taken twice is written once per
occurrence (its own tensors, no shared storage). Tensors outside the layer stack follow
mergekit: embeddings from the first slice's sources, everything else (final norm, head) from
the last slice's, at depth 0.

The engine sees an ordinary :class:`~splice.merge.engine.job.MergeJob`: input ``i`` is a
:class:`SliceWeights` view that maps every output tensor name to the tensor of the slice's
``i``-th source it comes from (so preflight, memory plan, ledger and executor need no
change), and a :class:`SliceResolver` gives each tensor its slice's parameters, with
gradients interpolated *within* the slice (``t = j / (n_k − 1)``, 1 for a one-layer slice).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splice._names import INDEX
from splice.errors import SpliceError
from splice.merge.engine.arch import block_of
from splice.merge.engine.job import Resolver, Source, layer_indices

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["SliceInput", "SliceResolver", "SliceWeights", "layer_count", "stack_slices"]


class SliceWeights(Mapping[str, "Tensor"]):
    """``output name -> (input mapping, name there)``, read on demand (headers via ``info``)."""

    rewrites_config = True
    """Its source's ``config`` was rewritten (layer count): the output writes it."""

    def __init__(self, table: dict[str, tuple[Mapping[str, Tensor], str]], directory: Any) -> None:
        self.table = table
        self.dir = directory

    def __getitem__(self, name: str) -> Tensor:
        mapping, read = self.table[name]
        return mapping[read]

    def info(self, name: str) -> Any:
        mapping, read = self.table[name]
        info = getattr(mapping, "info", None)
        return info(read) if info is not None else mapping[read]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, name: object) -> bool:
        return name in self.table


@dataclass
class SliceInput:
    """One source of one slice, opened: the input and the layers ``[start, stop)`` it gives."""

    source: Source
    layer_range: tuple[int, int]
    where: str
    path: str
    range_where: str = ""


def layer_count(src: Source, where: str) -> int:
    """The number of layers of ``src``'s single layer stack (refused: none, or several)."""
    if src.weights is None:
        raise SpliceError(
            "slices take layers from full checkpoints, not adapters or delta files",
            where=where,
            fix="write the model as `path+adapter_dir`, or merge the adapter first",
        )
    stacks = {
        name[: m.start(1)]: n
        for name, (_, n) in layer_indices(list(src.weights)).items()
        if (m := INDEX.search(name))
    }
    if len(stacks) != 1:
        raise SpliceError(
            f"slices need one layer stack; {src.label} has {len(stacks)} "
            f"({', '.join(s.rstrip('.') for s in stacks) or 'none'})",
            where=where,
            fix="use models: to merge encoder-decoder models layer by layer",
        )
    return next(iter(stacks.values()))


def _renumber(name: str, index: int) -> str:
    m = INDEX.search(name)
    assert m is not None
    return f"{name[: m.start(1)]}{index}{name[m.end(1) :]}"


def _layer_names(src: Source) -> dict[int, list[str]]:
    assert src.weights is not None
    out: dict[int, list[str]] = {}
    for name, (i, _) in layer_indices(list(src.weights)).items():
        out.setdefault(i, []).append(name)
    return out


def _check(slices: list[list[SliceInput]]) -> int:
    """Check ranges and architectures; return the number of inputs per slice."""
    first = slices[0][0]
    want = {k: (first.source.config or {}).get(k) for k in ("model_type", "hidden_size")}
    counts = {len(s) for s in slices}
    if len(counts) != 1:
        raise SpliceError(
            f"slices have different numbers of sources {sorted(counts)}",
            where=slices[0][0].where,
            fix="give every slice the same number of sources (and the same base)",
        )
    for inputs in slices:
        for inp in inputs:
            n = layer_count(inp.source, inp.where)
            lo, hi = inp.layer_range
            if not 0 <= lo < hi <= n:
                raise SpliceError(
                    f"layer_range [{lo}, {hi}] is outside {inp.path}, which has {n} layers",
                    fix=f"use a range within [0, {n}]",
                    where=inp.range_where or inp.where,
                )
            cfg = inp.source.config or {}
            for key, value in want.items():
                if value is not None and cfg.get(key) not in (None, value):
                    raise SpliceError(
                        f"{key} is {cfg.get(key)!r} here but {value!r} in {first.path}",
                        where=inp.where,
                        fix="stack layers of models of one architecture and width",
                    )
    return counts.pop()


def _out_config(ref: Source, slices: list[list[SliceInput]], total: int) -> dict[str, Any] | None:
    if ref.config is None:
        return None
    config = dict(ref.config)
    n_ref = layer_count(ref, ref.label)
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if config.get(key) == n_ref:
            config[key] = total
    if isinstance(config.get("layer_types"), list):
        types = []
        for inputs in slices:
            inp = inputs[0]
            own = (inp.source.config or {}).get("layer_types") or []
            lo, hi = inp.layer_range
            types += [own[i] if i < len(own) else own[-1] for i in range(lo, hi)] if own else []
        config["layer_types"] = types
    return config


def stack_slices(
    slices: list[list[SliceInput]], labels: list[str]
) -> tuple[list[Source], dict[str, tuple[int, float]]]:
    """One :class:`Source` per input position (a :class:`SliceWeights` view across the slices)
    and ``output name -> (slice index, depth in the slice)`` for the resolver.

    ``slices[k][i]`` is slice ``k``'s ``i``-th input (a base first, when the job has one).

    Raises:
        SpliceError: a layer_range outside its model, slices of different source counts,
            sources of another architecture, adapters as sources.
    """
    width = _check(slices)
    tables: list[dict[str, tuple[Mapping[str, Tensor], str]]] = [{} for _ in range(width)]
    place: dict[str, tuple[int, float]] = {}
    names_of = {id(inp.source): _layer_names(inp.source) for s in slices for inp in s}
    offset = 0
    for k, inputs in enumerate(slices):
        n = inputs[0].layer_range[1] - inputs[0].layer_range[0]
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            ref = inputs[0]
            for name in names_of[id(ref.source)][ref.layer_range[0] + j]:
                out = _renumber(name, offset + j)
                place[out] = (k, t)
                for i, inp in enumerate(inputs):
                    assert inp.source.weights is not None
                    read = _renumber(name, inp.layer_range[0] + j)
                    if read in inp.source.weights:
                        tables[i][out] = (inp.source.weights, read)
        offset += n
    ref = slices[0][0].source
    assert ref.weights is not None
    for name in ref.weights:
        if INDEX.search(name) is None:
            k = 0 if block_of(name) == "embed" else len(slices) - 1
            place[name] = (k, 0.0)
            for i, inp in enumerate(slices[k]):
                assert inp.source.weights is not None
                if name in inp.source.weights:
                    tables[i][name] = (inp.source.weights, name)
    config = _out_config(ref, slices, offset)
    out = []
    for i, table in enumerate(tables):
        ckpts = {id(c): c for s in slices for c in s[i].source.checkpoints}
        own = slices[0][i].source
        src = Source(
            labels[i],
            SliceWeights(table, getattr(own.weights, "dir", None)),
            config=config,
            checkpoints=list(ckpts.values()),
        )
        out.append(src)
    return out, place


class SliceResolver:
    """Per-tensor parameters from the tensor's slice (its own :class:`Resolver`), at the
    tensor's depth within that slice; the model level is the first slice's."""

    def __init__(self, resolvers: list[Resolver], place: dict[str, tuple[int, float]]) -> None:
        self.resolvers = resolvers
        self.place = place
        self.uses_depth = any(getattr(r, "uses_depth", False) for r in resolvers)

    def __call__(self, name: str | None, depth: float) -> Any:
        k, t = self.place.get(name, (0, 0.0)) if name is not None else (0, 0.0)
        return self.resolvers[k](name, t)
