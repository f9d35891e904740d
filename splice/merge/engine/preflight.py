"""Preflight: everything that headers and configs can tell, checked before any tensor is read.

:func:`check` checks input counts, configs, layer counts, tensor names (tied heads, missing
or extra names), shapes (vocab policies), dtypes and every tensor's resolved parameters, and
lists the output tensors (:class:`~splice.merge.engine.job.TensorTask`) in base order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from splice.errors import SpliceError
from splice.io import is_floating, itemsize
from splice.merge.base import MergeContext
from splice.merge.engine.adapter_names import fit_adapter_names
from splice.merge.engine.arch import Architecture, infer_architecture, tie_pairs
from splice.merge.engine.job import (
    Checked,
    Dropped,
    MergeJob,
    Source,
    TensorTask,
    stored_shape_dtype,
)

if TYPE_CHECKING:
    pass

__all__ = ["check", "plan"]


def _check_configs(sources: list[Source]) -> None:
    keys = ("model_type", "architectures", "num_hidden_layers", "hidden_size")
    for s in sources:
        if s.config and s.config.get("quantization_config"):
            method = (s.config["quantization_config"] or {}).get("quant_method", "quantized")
            raise SpliceError(
                f"the checkpoint is {method}-quantized; its integer weights cannot be merged",
                where=s.label,
                fix="merge the fp16/bf16/fp32 checkpoints, then quantize the result",
            )
    first = next((s for s in sources if s.config), None)
    if first is None:
        return
    for s in sources:
        if not s.config or s is first:
            continue
        for key in keys:
            a, b = first.config.get(key), s.config.get(key)
            if a is not None and b is not None and a != b:
                raise SpliceError(
                    f"incompatible architectures: {key} is {b!r} here but {a!r} in {first.label}",
                    where=s.label,
                    fix="merge models of one architecture and size (fine-tunes of one base)",
                )


def _odd_names(odd: list[str], what: str, src: Source, fix: str) -> None:
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise SpliceError(f"tensor {odd[0]!r} {what}{more}", where=src.label, fix=fix)


_MISSING_FIX = (
    "merge checkpoints of one architecture, or pass --allow-missing (allow_missing=True) "
    "to merge what the inputs share (the ledger records what was dropped)"
)


def plan(job: MergeJob) -> list[TensorTask]:
    """Check the job from headers alone and list the output tensors in base order.

    Raises:
        SpliceError: see :func:`check`.
    """
    return check(job).tasks


def check(job: MergeJob) -> Checked:
    """Preflight: check the whole job from headers and configs before any tensor is read.

    Input counts, configs (architecture, size, quantization), layer counts against
    ``config.json``, tensor names (tied heads read their embedding; missing or extra names
    fail unless ``allow_missing``), shapes (embedding rows may differ under a ``vocab``
    policy), dtypes, and every tensor's resolved parameters.

    Raises:
        SpliceError: naming the input, the tensor and the fix.
    """
    method = job.method
    lo, hi = method.num_models
    if not lo <= len(job.models) <= (hi if hi is not None else len(job.models)):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        raise SpliceError(
            f"{method.name} merges {want} model(s) besides the base, got {len(job.models)}",
            fix="fix the models list of the recipe",
        )
    if method.requires_base and job.base is None:
        raise SpliceError(
            f"{method.name} needs a base model",
            fix="add `base:` (mergekit: `base_model:`) with the pretrained checkpoint",
        )
    ref = job.base or job.models[0]
    if ref.weights is None:
        raise SpliceError(
            "adapter or delta inputs need a base model",
            where=ref.label,
            fix="add `base:` with the checkpoint the adapter was trained on",
        )
    for src in job.models:
        if src.weights is None and job.base is None:
            raise SpliceError(
                "adapter or delta input without a base model",
                where=src.label,
                fix="add `base:` with the checkpoint the adapter was trained on",
            )
    _check_configs(job.sources())
    need_layers = bool(job.transforms) or bool(getattr(job.resolve, "uses_depth", False))
    for src in job.sources():
        if src is not ref and src.weights is not None and src.config:
            infer_architecture(src.weights, src.config, where=src.label)
    arch = infer_architecture(ref.weights, ref.config, where=ref.label, need_layers=need_layers)
    return _Checker(job, ref, arch).run()


class _Checker:
    """The name, shape and parameter checks of :func:`check`, one reference at a time."""

    def __init__(self, job: MergeJob, ref: Source, arch: Architecture) -> None:
        self.job, self.ref, self.arch = job, ref, arch
        assert ref.weights is not None
        self.ref_weights = ref.weights
        self.out = Checked([], arch)
        self.names = list(ref.weights)
        self.base_alias: dict[str, str] = {}

    def run(self) -> Checked:
        self._tied_heads()
        reads = self._reads()
        self._adapters()
        tasks = self.out.tasks
        resized: dict[str, tuple[int, list[tuple[str, int]]]] = {}
        for name in self.names:
            task = self._task(name, reads, resized)
            if task is not None:
                tasks.append(task)
        if resized:
            from splice.merge.engine.vocab import report

            self.out.vocab = report(self.job, resized)
        if self.job.tokens is not None:
            self.out.vocab = {**self.job.tokens.summary, "tokenizer_from": self.ref.label}
        return self.out

    def _by_token(self, name: str, shape: tuple[int, ...]) -> bool:
        """An embedding/head tensor with a row per token (re-indexed by the token map)."""
        size = (self.ref.config or {}).get("vocab_size")
        block = self.arch.role(name).block
        return block in ("embed", "head") and len(shape) == 2 and shape[0] == size

    def _token_rows(self, name: str, shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
        ref_label, shape = shapes[0]
        for label, s in shapes[1:]:
            if s[1:] != shape[1:]:
                raise SpliceError(
                    f"shape {s} differs from {shape} in {ref_label} beyond the vocab rows",
                    where=f"{label}: {name}",
                    fix="merge checkpoints of one architecture and size",
                )
        self._refuse_adapters(name, "that tokenizer surgery re-indexes", "")
        return (self.job.tokens.rows, *shape[1:])

    def _refuse_adapters(self, name: str, what: str, fix: str) -> None:
        """No adapter may change a tensor whose rows are re-indexed or resized."""
        if any(name in s.deltas or name in s.overrides for s in self.job.models):
            raise SpliceError(
                f"an adapter changes a tensor {what}",
                where=name,
                fix=f"merge the adapter into its base first{fix}",
            )

    def _tied_heads(self) -> None:
        """A head the reference ties (absent) but another input stores joins the output."""
        for head, emb in tie_pairs(self.ref.config):
            if head in self.ref_weights or emb not in self.ref_weights:
                continue
            stored = [
                s.label for s in self.job.models if s.weights is not None and head in s.weights
            ]
            if stored:
                self.names.append(head)
                self.base_alias[head] = emb
                self.out.untied.append(head)
                self.out.note(
                    head,
                    f"{self.ref.label} ties it to {emb} (read in its place); "
                    f"stored by {', '.join(stored)}",
                )

    def _reads(self) -> list[dict[str, str | None]]:
        """Per model, ``name -> name read`` for every output name it does not store as is."""
        job, name_set = self.job, set(self.names)
        out: list[dict[str, str | None]] = []
        for src in job.models:
            alias: dict[str, str | None] = {}
            out.append(alias)
            if src is self.ref or src.weights is None:
                if src is self.ref:
                    alias.update(self.base_alias)
                continue
            extra = [n for n in src.weights if n not in name_set]
            if extra and not job.allow_missing:
                _odd_names(extra, f"is not in {self.ref.label}", src, _MISSING_FIX)
            for n in extra:
                self.out.dropped.append(
                    Dropped(src.label, n, f"not in {self.ref.label} (--allow-missing)")
                )
            tied = {h: e for h, e in tie_pairs(src.config) if e in src.weights}
            missing = []
            for n in self.names:
                if n in src.weights:
                    continue
                if n in tied:
                    alias[n] = tied[n]
                    self.out.note(n, f"{src.label} ties it to {tied[n]} (read in its place)")
                else:
                    missing.append(n)
                    alias[n] = None
            if missing and not job.allow_missing:
                _odd_names(missing, f"of {self.ref.label} is missing", src, _MISSING_FIX)
        return out

    def _adapters(self) -> None:
        fit_adapter_names(self.job, self.ref, self.names, self.out)

    def _task(
        self,
        name: str,
        reads: list[dict[str, str | None]],
        resized: dict[str, tuple[int, list[tuple[str, int]]]],
    ) -> TensorTask | None:
        job, ref = self.job, self.ref
        base_read = self.base_alias.get(name)
        shape, dtype = stored_shape_dtype(self.ref_weights, base_read or name)
        mergeable = is_floating(dtype)
        per_model: list[str | None] = []
        shapes: list[tuple[str, tuple[int, ...]]] = [(ref.label, shape)]
        for src, alias in zip(job.models, reads, strict=True):
            read = alias.get(name, name)
            per_model.append(read)
            if src is ref or read is None:
                continue
            got = []
            if src.weights is not None:
                got.append(stored_shape_dtype(src.weights, read))
            if name in src.overrides:
                got.append(stored_shape_dtype(src.overrides, name))
            if name in src.deltas:
                got.append((tuple(src.deltas[name].shape), dtype))
            for s, d in got:
                shapes.append((src.label, s))
                if is_floating(d) != mergeable:
                    raise SpliceError(
                        f"dtype torch.{d} here but torch.{dtype} in {ref.label}",
                        where=f"{src.label}: {name}",
                        fix="float weights cannot be merged with integer buffers",
                    )
        vocab = any(s != shape for _, s in shapes)
        if self.job.tokens is not None and self._by_token(name, shape):
            vocab = True
            shape = self._token_rows(name, shapes)
        elif vocab:
            shape = self._vocab_rows(name, shapes, resized)
        role = self.arch.role(base_read or name)
        nbytes = math.prod(shape) * itemsize(dtype)
        missing = [m.label for m, r in zip(job.models, per_model, strict=True) if r is None]
        if missing and job.base is None:
            self.out.note(
                name,
                f"missing in {', '.join(missing)} (--allow-missing): copied from {ref.label}, "
                "not merged",
            )
            return TensorTask(name, False, shape, dtype, nbytes, block=role.block)
        if missing:
            self.out.note(
                name,
                f"missing in {', '.join(missing)} (--allow-missing): the base's value used "
                "in their place (a zero task vector)",
            )
        plain = all(r == name for r in per_model) and base_read is None
        reads_t = None if plain else tuple(per_model)
        if not mergeable:
            return TensorTask(name, False, shape, dtype, nbytes, block=role.block)
        ctx = MergeContext(name, layer=role.layer, num_layers=role.num_layers)
        params, model_params = job.resolve(name, ctx.depth)
        return TensorTask(
            name,
            True,
            shape,
            dtype,
            nbytes,
            role.layer,
            role.num_layers,
            params,
            model_params,
            block=role.block,
            reads=reads_t,
            base_read=base_read,
            vocab=vocab,
        )

    def _vocab_rows(
        self,
        name: str,
        shapes: list[tuple[str, tuple[int, ...]]],
        resized: dict[str, tuple[int, list[tuple[str, int]]]],
    ) -> tuple[int, ...]:
        ref_label, shape = shapes[0]
        for label, s in shapes[1:]:
            if len(s) != len(shape) or s[1:] != shape[1:] or not s:
                raise SpliceError(
                    f"shape {s} differs from {shape} in {ref_label}",
                    where=f"{label}: {name}",
                    fix="merge checkpoints of one architecture and size",
                )
        rows = [s[0] for _, s in shapes]
        policy = self.job.vocab
        if policy is None:
            label, s = next((lab, s) for lab, s in shapes if s != shape)
            raise SpliceError(
                f"{s[0]} rows here but {shape[0]} in {ref_label} (vocab sizes differ)",
                where=f"{label}: {name}",
                fix="add `vocab: base`, `vocab: union` or `vocab: intersect` to the recipe "
                "(rows are matched by index: see docs/merging.md, Vocab policies)",
            )
        if self.arch.role(name).block not in ("embed", "head") and not _is_vocab_size(
            self.job, rows
        ):
            raise SpliceError(
                f"rows differ ({sorted(set(rows))}) in a tensor that is not an embedding or head",
                where=name,
                fix="merge checkpoints of one architecture and size",
            )
        self._refuse_adapters(
            name, "whose rows differ between inputs", ", or use inputs of one vocab size"
        )
        out_rows = {"base": rows[0], "union": max(rows), "intersect": min(rows)}[policy]
        resized[name] = (out_rows, [(label, s[0]) for label, s in shapes])
        return (out_rows, *shape[1:])


def _is_vocab_size(job: MergeJob, rows: list[int]) -> bool:
    sizes = {s.config.get("vocab_size") for s in job.sources() if s.config}
    return bool(sizes & set(rows))
