"""Exact adapter-space merging: several PEFT LoRA dirs in, one PEFT LoRA dir out.

``output: adapter`` in a recipe (or ``--output adapter``) runs any merge method on the full
``ΔW_i = s_i·B_i·A_i`` of every targeted tensor — never on ``A`` and ``B`` separately, which is
how peft's ``add_weighted_adapter(combination_type="linear")`` ends up 127 % off ``Σ w_i ΔW_i``
(USERS.md Part A row 2) — and re-factors the merged ``ΔW`` as one LoRA:

- ``rank: N`` — truncated SVD to rank ``N``: ``B = U_N·√S_N``, ``A = √S_N·V_Nᵀ`` (scale 1,
  ``lora_alpha = r = N``). For a linear method the merged ΔW is the product of the stacked
  factors, so its SVD comes exactly from two thin QRs and a ``K×K`` SVD (``K = Σ r_i``); other
  methods (TIES, DARE, …) give a dense ΔW, factored by ``torch.linalg.svd`` (randomized
  ``svd_lowrank`` with 6 power iterations when both sides exceed 2048 and ``N`` is small).
- ``rank: exact`` (the default for linear methods, :attr:`~splice.merge.base.MergeMethod.linear`:
  ``task_arithmetic``, ``linear``) — no approximation: the factors are concatenated,
  ``B = [c_1 s_1 B_1 … c_k s_k B_k]``, ``A = [A_1; …; A_k]`` with the method's per-tensor
  coefficients ``c_i`` (:meth:`~splice.merge.base.MergeMethod.coefficients`), zero-padded to
  one rank for every module.

The relative error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` is computed against the merged ΔW for every
tensor and in total, and written to the ledger. Without ``base:`` the merge runs in ΔW space
(a zero base), exact for methods that depend only on the task vectors θ_i − θ₀
(:attr:`~splice.merge.base.MergeMethod.delta_only`); other methods (slerp) need ``base:``.
With a base (≤ 1 GiB) the ledger also reports the largest logit difference between
base + exact ΔW and base + the written LoRA on random inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.io import TensorInfo, dtype_name
from splice.io.peft import PEFT_PREFIX
from splice.merge.base import methods
from splice.merge.engine import (
    Checked,
    Dropped,
    MergeJob,
    MergeOptions,
    Source,
    TensorTask,
    check,
    execute,
)
from splice.merge.engine.memory import check_budget, estimate
from splice.merge.recipe import Recipe

__all__ = ["merge_adapters", "plan_adapter", "refactor"]

_RANDOMIZED_ABOVE = 2048


class _ZeroBase(Mapping[str, Tensor]):
    """The base of ΔW space: zeros of each target's shape (headers answered, nothing read)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        self.shapes, self.dtype = dict(shapes), dtype

    def __getitem__(self, name: str) -> Tensor:
        return torch.zeros(self.shapes[name], dtype=self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def info(self, name: str) -> TensorInfo:
        shape = self.shapes[name]
        nbytes = math.prod(shape) * self.dtype.itemsize
        return TensorInfo(name, shape, dtype_name(self.dtype), nbytes, Path())


def _prepare(recipe: Recipe, job: MergeJob) -> tuple[MergeJob, Checked, bool]:
    """The engine job (fresh from :func:`~splice.merge.api.build_job`) restricted to the
    adapters' targets, its checked tasks, and whether the base is the zero base of ΔW space."""
    for src in job.models:
        fmt = src.checkpoints[0].format if src.checkpoints else None
        if fmt != "peft" or src.weights is not None:
            raise SpliceError(
                "output: adapter merges PEFT LoRA adapter dirs, and this input is not one",
                where=src.label,
                fix="list only LoRA adapter dirs under models (the base goes under base:)",
            )
        for name, d in src.deltas.items():
            if getattr(d, "target_shape", None) is not None:
                raise SpliceError(
                    "convolution LoRA cannot be written as a merged LoRA yet",
                    where=f"{src.label}: {name}",
                    fix="use output: model to merge it into the base",
                )
    zero = job.base is None
    if zero:
        name = recipe.method
        if not job.method.delta_only:
            raise SpliceError(
                f"{name} depends on the base weights, not only on the adapters' ΔW",
                fix="add `base:` (the model the adapters were trained on)",
            )
        full = [n for s in job.models for n in s.overrides]
        if full:
            raise SpliceError(
                f"the adapters store full tensors (modules_to_save, e.g. {full[0]!r}), which "
                "cannot be merged in ΔW space",
                fix="add `base:` (the model the adapters were trained on)",
            )
        shapes: dict[str, tuple[int, ...]] = {}
        for src in job.models:
            for n, d in src.deltas.items():
                shapes.setdefault(n, tuple(d.shape))
        job.base = Source("ΔW space (no base)", _ZeroBase(shapes, torch.float32))
    checked = check(job)  # keys the adapters by the base's names (a wrapper prefix mapped)
    keep = {n for s in job.models for n in (*s.deltas, *s.overrides)}
    checked.tasks = [t for t in checked.tasks if t.name in keep]
    assert job.base is not None and job.base.weights is not None
    for n in job.base.weights:
        if n not in keep and not zero:
            checked.dropped.append(
                Dropped(job.base.label, n, "no adapter changes it (an adapter stores ΔW only)")
            )
    linear = job.method.linear
    if recipe.rank is None and not linear:
        raise SpliceError(
            f"{recipe.method} gives a dense ΔW: the output adapter needs a rank",
            fix="add `rank: 16` (any N) to the recipe, or --rank N",
        )
    if recipe.rank == "exact" and not linear:
        names = ", ".join(n for n, cls in methods.items() if cls.linear)
        raise SpliceError(
            f"rank: exact concatenates factors, which only linear methods allow ({recipe.method} "
            "is not)",
            fix=f"use rank: N (truncated SVD), or a linear method: {names}",
        )
    if not zero:
        for t in checked.tasks:
            if t.params is not None:
                job.method.check_adapter_output(t.params, t.model_params or [], t.name)
    return job, checked, zero


def _stacked(job: MergeJob, task: TensorTask, coeffs: list[float]) -> tuple[Tensor, Tensor]:
    """``(B_cat, A_cat)`` in LoRA layout with ``B_cat @ A_cat = Σ c_i s_i B_i A_i``."""
    bs, as_ = [], []
    for src, c in zip(job.models, coeffs, strict=True):
        d = src.deltas.get(task.name)
        if d is None:
            continue
        bs.append(d.B.reshape(d.B.shape[0], -1).double() * (c * d.scale))
        as_.append(d.A.reshape(d.rank, -1).double())
    return torch.cat(bs, 1), torch.cat(as_, 0)


def refactor(
    m: Tensor,
    rank: int,
    factors: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, str]:
    """Rank-``rank`` factors ``(B, A)`` of ``m`` (m ≈ B @ A) by truncated SVD; how it was done.

    With ``factors`` (``m = B_cat @ A_cat`` exactly) the SVD comes from two thin QRs and a
    small SVD; otherwise from ``m`` itself (randomized above 2048×2048 for small ranks).
    """
    rows, cols = m.shape
    if factors is not None:
        qb, rb = torch.linalg.qr(factors[0])
        qa, ra = torch.linalg.qr(factors[1].T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh, how = qb @ u, (qa @ vh.T).T, "exact SVD of the stacked factors"
    elif min(rows, cols) > _RANDOMIZED_ABOVE and rank * 4 < min(rows, cols):
        u, s, v = torch.svd_lowrank(m, q=min(rank + 16, min(rows, cols)), niter=6)
        vh, how = v.T, "randomized SVD (svd_lowrank, 6 power iterations)"
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        how = "full SVD"
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(rows, rank, dtype=m.dtype)
    a = torch.zeros(rank, cols, dtype=m.dtype)
    b[:, :k] = (u[:, :k] * root).to(m.dtype)
    a[:k] = (root[:, None] * vh[:k]).to(m.dtype)
    return b, a, how


def _residual(m: Tensor, b: Tensor, a: Tensor) -> float:
    """‖m − b @ a‖²_F in float64, 1024 rows at a time."""
    total = 0.0
    for start in range(0, m.shape[0], 1024):
        r = m[start : start + 1024].double() - b[start : start + 1024].double() @ a.double()
        total += float((r * r).sum())
    return total


class _AdapterSink:
    """Receives each merged tensor from the engine and turns ΔW into LoRA factors."""

    def __init__(self, job: MergeJob, tasks: list[TensorTask], rank: int | str | None) -> None:
        self.job = job
        self.tasks = {t.name: t for t in tasks}
        self.exact = rank in (None, "exact")
        if self.exact:
            self.rank = max(
                sum(s.deltas[t.name].rank for s in job.models if t.name in s.deltas)
                for t in tasks
                if any(t.name in s.deltas for s in job.models)
            )
        else:
            self.rank = int(rank)  # type: ignore[arg-type]
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.full: dict[str, Tensor] = {}
        self.errors: dict[str, float] = {}
        self.how: set[str] = set()
        self.sq_res = self.sq_all = 0.0
        self.dense: dict[str, Tensor] | None = None

    def _layout(self, name: str) -> tuple[bool, bool]:
        """(transposed in the base's layout, is an embedding LoRA) for a target."""
        for src in self.job.models:
            d = src.deltas.get(name)
            if d is not None:
                raw = (src.raw or {}).get(name, [])
                return d.transpose, any("lora_embedding_" in r for r in raw)
        raise KeyError(name)

    def write(self, name: str, merged: Tensor) -> None:
        task = self.tasks[name]
        if any(name in s.overrides for s in self.job.models):
            self.full[name] = merged.clone()
            return
        assert self.job.base is not None and self.job.base.weights is not None
        base = self.job.base.weights[task.base_read or name]
        delta = merged.double() - base.double()
        transpose, _ = self._layout(name)
        m = (delta.T if transpose else delta).reshape(delta.shape[1 if transpose else 0], -1)
        if self.dense is not None:
            self.dense[name] = delta.float()
        coeffs = None
        if self.job.method.linear:
            assert task.params is not None and task.model_params is not None
            coeffs = self.job.method.coefficients(task.params, task.model_params)
        stacked = _stacked(self.job, task, coeffs) if coeffs is not None else None
        if self.exact:
            assert stacked is not None
            b, a = stacked
            pad = self.rank - b.shape[1]
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
            self.how.add("exact (concatenated factors)")
        else:
            b, a, how = refactor(m, self.rank, stacked)
            self.how.add(how)
        res, norm = _residual(m, b, a), float((m * m).sum())
        self.errors[name] = math.sqrt(res / norm) if norm > 0 else 0.0
        self.sq_res += res
        self.sq_all += norm
        self.factors[name] = (b.float(), a.float())

    def report(self) -> dict[str, Any]:
        total = math.sqrt(self.sq_res / self.sq_all) if self.sq_all > 0 else 0.0
        worst = max(self.errors, key=self.errors.__getitem__) if self.errors else None
        return {
            "rank": self.rank,
            "factorization": sorted(self.how),
            "relative_error_total": total,
            "relative_error_max": {"tensor": worst, "value": self.errors[worst]} if worst else None,
            "relative_error": dict(sorted(self.errors.items())),
        }

    def files(self, recipe: Recipe, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``adapter_config.json`` and ``adapter_model.safetensors`` of the merged adapter."""
        from splice.adapters.files import lora_config

        tensors: dict[str, Tensor] = {}
        conv1d = False
        for name, (b, a) in self.factors.items():
            module = name.removesuffix(".weight")
            transpose, embedding = self._layout(name)
            conv1d |= transpose and not embedding
            if embedding:
                tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = a.to(dtype).contiguous()
                tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = b.to(dtype).contiguous()
            else:
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
        for name, t in self.full.items():
            tensors[f"{PEFT_PREFIX}{name}"] = t.to(dtype).contiguous()
        first = self.job.models[0].config or {}
        saved = sorted({n.rsplit(".", 1)[0] for n in self.full})
        config = lora_config(
            r=self.rank,
            alpha=self.rank,
            targets=sorted(n.removesuffix(".weight") for n in self.factors),
            fan_in_fan_out=conv1d,
            modules_to_save=saved or None,
            base_model=str(Path(recipe.base).resolve())
            if recipe.base
            else first.get("base_model_name_or_path"),
            model_class=(first.get("auto_mapping") or {}).get("base_model_class"),
        )
        config["task_type"] = first.get("task_type")
        return config, tensors


def _adapter_dtype(job: MergeJob) -> torch.dtype:
    for src in job.models:
        for d in src.deltas.values():
            return d.A.dtype
    return torch.float32


def plan_adapter(recipe: Recipe, job: MergeJob) -> dict[str, Any]:
    """The preflight and memory plan of an adapter merge (``plan_merge`` for adapters) of
    ``job``, fresh from :func:`~splice.merge.api.build_job`."""
    job, checked, zero = _prepare(recipe, job)
    sink_rank = recipe.rank if recipe.rank not in (None, "exact") else None
    out_bytes = 0
    largest = 0
    for t in checked.tasks:
        rows, cols = t.shape[0], math.prod(t.shape[1:])
        r = sink_rank or sum(s.deltas[t.name].rank for s in job.models if t.name in s.deltas)
        out_bytes += (rows + cols) * r * _adapter_dtype(job).itemsize
        largest = max(largest, math.prod(t.shape) * 8)
    mem = estimate(job, checked.tasks, output_bytes=out_bytes)
    mem.peak_ram += 4 * largest  # float64 ΔW, U and V of the largest target during the SVD
    mem.shards = 1
    return {
        "output": "adapter",
        "method": recipe.method,
        "rank": recipe.rank or "exact",
        "base": "none: merged in ΔW space" if zero else recipe.base,
        "plan": mem.to_json(),
        "tensors": {"merged": len(checked.tasks), "copied": 0, "dropped": 0},
        "architecture": checked.arch.summary(),
    }


def merge_adapters(
    recipe: Recipe, out: str | Path, opts: MergeOptions, build: Callable[[], MergeJob]
) -> Path:
    """Merge the recipe's LoRA adapter dirs into one LoRA adapter dir at ``out`` (module doc).

    ``build`` makes a fresh job of the recipe (:func:`~splice.merge.api.build_job`); the
    options that apply are ``force``, ``progress``, ``max_memory`` and ``checksums``.

    Raises:
        SpliceError: an input that is not a PEFT LoRA, a method that needs the base without
            ``base:``, ``rank: exact`` with a non-linear method, ``out`` exists without
            ``force``, a plan above ``max_memory``.
    """
    import hashlib

    from safetensors.torch import save_file

    from splice.io.atomic import atomic_dir
    from splice.io.writer import check_no_overlap
    from splice.merge.output.fidelity import OutputCheck, logit_gap
    from splice.merge.output.ledger import (
        LEDGER_NAME,
        build_ledger,
        hash_in_background,
        input_files,
        unhashed,
    )

    out, force, checksums = Path(out), opts.force, opts.checksums
    if opts.max_memory is not None:
        check_budget(plan_adapter(recipe, build())["plan"], opts.max_memory)
    job, checked, zero = _prepare(recipe, build())
    check_no_overlap(out, [p for p in (recipe.base, *(m.path for m in recipe.models)) if p])
    if out.exists() and not force:
        raise SpliceError(
            "destination already exists",
            where=str(out),
            fix="choose another output path or pass --force to replace it",
        )
    sink = _AdapterSink(job, checked.tasks, recipe.rank)
    base_ckpt = None if zero else job.base.checkpoints[0] if job.base else None  # type: ignore[union-attr]
    small = base_ckpt is not None and base_ckpt.total_bytes <= (1 << 30) and base_ckpt.config
    if small:
        sink.dense = {}
    output_check = OutputCheck()

    def on_output(task: TensorTask, base: Tensor | None, merged: Tensor) -> None:
        output_check(task, None if zero else base, merged)

    hashing = hash_in_background(
        {s.label: input_files(s) for s in job.sources() if s.checkpoints and checksums}
    )
    stats = execute(job, checked.tasks, sink, progress=bool(opts.progress), on_output=on_output)
    config, tensors = sink.files(recipe, _adapter_dtype(job))
    fidelity = output_check.summary()
    if small:
        assert base_ckpt is not None and sink.dense is not None
        weights = {n: base_ckpt[n] for n in base_ckpt}
        lowrank = {}
        for name, (b, a) in sink.factors.items():
            transpose, _ = sink._layout(name)
            m = b @ a
            lowrank[name] = (m.T if transpose else m).reshape(sink.dense[name].shape)
        fidelity["logits"] = logit_gap(base_ckpt.dir, weights, (sink.dense, lowrank))
    else:
        fidelity["logits"] = {
            "skipped": "no base model given" if zero else "base above 1 GiB or without config"
        }
    report = sink.report()
    job.check_unchanged()
    digests = hashing.result()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        outputs = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() if checksums else None
            for p in sorted(tmp.iterdir())
        }
        ledger = build_ledger(
            job=job,
            checked=checked,
            recipe=recipe.source,
            method=recipe.method,
            stats=stats,
            digests={
                s.label: digests.get(s.label) or unhashed(input_files(s))
                for s in job.sources()
                if s.checkpoints
            },
            outputs=outputs,
            fidelity=fidelity,
            extra={"output": "adapter", "adapter": report},
        )
        (tmp / LEDGER_NAME).write_text(json.dumps(ledger, indent=1) + "\n")
    return out
