"""LoRA extraction: a full fine-tune minus its base, as a PEFT LoRA dir (mergekit-extract-lora).

For every linear weight that changed, ``ΔW = θ_ft − θ_base`` is replaced by its best rank-``r``
approximation ``B·A`` (Eckart–Young): ``r = min(max_rank, k)``, or ``min(max_rank,
#{σ_i > sv_epsilon})`` with a positive ``sv_epsilon`` (in float32 the Gram's eigenvalues
cannot tell a zero ``σ_i`` from one below ``≈ 3e-4·σ_max``: some come out negative, so
``sv_epsilon = 0`` keeps every direction up to the cap instead of dropping those). splice
finds the top singular subspace from the Gram matrix of ΔW's shorter side (``ΔW·ΔWᵀ``,
``k × k`` with ``k = min(out, in)``; ``torch.linalg.eigh``) rather than a full SVD of ΔW
(mergekit's ``torch.linalg.svd``): ``B = U_r·√Σ_r`` and ``A = Σ_r^{-½}·U_rᵀ·ΔW`` (the
singular values split evenly, as mergekit's default ``--distribute-scale``), so
``B·A = U_r·U_rᵀ·ΔW`` — the orthogonal projection of ΔW onto its top-``r`` left singular
vectors, exactly ΔW at full rank. The relative error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` (ideally
``√(Σ_{i>r} σ_i²) / ‖ΔW‖_F``) is measured on the residual and reported per tensor.

Tensors that are not linear weights — embeddings and the LM head (mergekit's default without
``--embed-lora``), norms, any 1-D or >2-D tensor — go to ``modules_to_save`` at full
precision when they changed (the whole module); a head tied to a saved embedding is saved with
it (PEFT would otherwise keep the base's tied head). Changed biases of LoRA-targeted modules
are saved as well (PEFT ``bias: lora_only``, as ``<module>.base_layer.bias``). Unchanged
tensors are left out. Inputs stream one tensor name at a time (peak: one tensor pair plus
its ``k × k`` Gram matrix, plus the output, which is written at the end).
``adapter_config.json`` has ``r`` = the largest rank used, ``lora_alpha = r`` (scale 1) and
``rank_pattern``/``alpha_pattern`` for modules of lower rank.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.io.atomic import atomic_dir
from splice.io.peft import CONV1D_MODULES, PEFT_PREFIX
from splice.merge.engine.arch import block_of, tie_pairs

__all__ = ["ExtractOptions", "extract_lora", "lowrank_factors"]


@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`extract_lora` factors each ΔW (the options of ``splice extract-lora``)."""

    max_rank: int = 128
    sv_epsilon: float = 0.0
    """Singular values at or below this are dropped (mergekit ``--sv-epsilon``)."""
    include: tuple[str, ...] = ()
    """Regexes: only matching module names are extracted (mergekit ``-i``)."""
    exclude: tuple[str, ...] = ()
    """Regexes: matching module names are left out (mergekit ``-e``)."""
    save_modules: tuple[str, ...] = ()
    """Module names saved at full rank even if they are linear (mergekit ``--save-module``)."""
    force: bool = False
    dtype: str | None = None
    """Output dtype (default: the fine-tune's)."""


def lowrank_factors(
    delta: Tensor, max_rank: int, sv_epsilon: float = 0.0
) -> tuple[Tensor, Tensor, float]:
    """``(B, A, relative error)`` with ``B @ A`` the best rank-``r`` approximation of ``delta``
    (see module docstring). Computed in float32 (float64 for float64 input); the error is
    measured on the residual ``ΔW − B·A`` itself, not from the eigenvalues."""
    dt = torch.float64 if delta.dtype == torch.float64 else torch.float32
    d = delta.to(dt)
    wide = d.shape[0] <= d.shape[1]
    m = d if wide else d.T  # k × n with k = min(out, in)
    lam, u = torch.linalg.eigh(m @ m.T)  # ascending
    s = lam.flip(0).clamp_min(0).sqrt()
    r = min(max_rank, int((s > sv_epsilon).sum()) if sv_epsilon > 0 else s.numel())
    ur = u.flip(1)[:, :r].contiguous()
    proj = ur.T @ m  # r × n: rows of norm σ_i
    norm = float(m.double().norm())
    resid = m - ur @ proj
    err = float(resid.double().norm()) / norm if norm > 0 else 0.0
    del resid
    root = proj.norm(dim=1).clamp_min(torch.finfo(dt).tiny).sqrt()
    left, right = ur * root, proj / root[:, None]
    b, a = (left, right) if wide else (right.T, left.T)
    return b.to(delta.dtype).contiguous(), a.to(delta.dtype).contiguous(), err


@dataclass
class _Out:
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)
    saved_modules: set[str] = field(default_factory=set)
    biases: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    unchanged: int = 0


def _match(module: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, module) for p in patterns)


def extract_lora(
    model: str | Path, base: str | Path, out: str | Path, options: ExtractOptions | None = None
) -> dict[str, Any]:
    """Extract ``model − base`` as a PEFT LoRA dir at ``out`` (atomically); return the report
    (rank, per-tensor relative error, what went to ``modules_to_save``, seconds).

    Raises:
        SpliceError: missing inputs, tensors of different shapes, a rank below 1, ``out``
            exists without ``force``.
    """
    opts = options or ExtractOptions()
    if opts.max_rank < 1:
        raise SpliceError(f"max_rank {opts.max_rank} must be >= 1")
    if Path(out).exists() and not opts.force:
        raise SpliceError(
            "destination already exists", where=str(out), fix="pass --force to replace it"
        )
    start = time.perf_counter()
    ft, bs = open_checkpoint(model), open_checkpoint(base)
    config = ft.config or bs.config or {}
    conv1d = CONV1D_MODULES.get(config.get("model_type", ""), frozenset())
    missing = [n for n in ft if n not in bs]
    if missing:
        raise SpliceError(
            f"tensor {missing[0]!r} of the fine-tune is not in the base", where=str(base)
        )
    out_dtype = torch.float32 if opts.dtype is None else getattr(torch, opts.dtype)
    res = _Out()
    names = [n for n in ft if ft.info(n).dtype_name.startswith(("float", "bfloat"))]
    linear = {n.rsplit(".", 1)[0] for n in names if len(ft.info(n).shape) == 2}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if (opts.include and not _match(module, opts.include)) or _match(module, opts.exclude):
            continue
        a_t, b_t = ft[name], bs[name]
        if a_t.shape != b_t.shape:
            if block_of(name) in ("embed", "head"):  # a resized vocab: the module in full
                res.saved_modules.add(module)
                continue
            raise SpliceError(
                f"shape {tuple(a_t.shape)} differs from the base's {tuple(b_t.shape)}",
                where=name,
                fix="extract from a fine-tune of this base",
            )
        delta = a_t.float() - b_t.float()
        if opts.dtype is None:
            out_dtype = a_t.dtype
        del a_t, b_t
        if not bool(delta.any()):
            res.unchanged += 1
            continue
        target = (
            delta.ndim == 2
            and leaf == "weight"
            and block_of(name) not in ("embed", "head")
            and module not in opts.save_modules
            and not _match(module, tuple(f"(^|\\.){re.escape(m)}$" for m in opts.save_modules))
        )
        if target:
            m = delta.T if module.rsplit(".", 1)[-1] in conv1d else delta
            b, a, err = lowrank_factors(m, opts.max_rank, opts.sv_epsilon)
            res.factors[module] = (b.to(out_dtype), a.to(out_dtype))
            res.errors[name] = err
            res.ranks[module] = b.shape[1]
        elif leaf == "bias" and module in linear and module not in res.saved_modules:
            res.biases[module] = delta  # the fine-tune's bias, recovered at load time
        else:
            res.saved_modules.add(module)
    for module in sorted(res.saved_modules):
        for name in ft.names_with_prefix(module + "."):
            if "." not in name[len(module) + 1 :]:
                res.full[name] = ft[name].to(out_dtype)
    for module in [m for m in res.biases if m not in res.saved_modules]:
        # PEFT (bias: lora_only) loads a LoRA module's bias from `<module>.base_layer.bias`
        res.full[f"{module}.base_layer.bias"] = ft[f"{module}.bias"].to(out_dtype)
    for head, emb in tie_pairs(config):  # a tied head follows its embedding's saved copy
        module = emb.removesuffix(".weight")
        if module in res.saved_modules and head not in ft:
            res.saved_modules.add(head.removesuffix(".weight"))
            res.full[head] = res.full[emb].clone()
    return _write(res, out, opts, config, str(Path(base).resolve()), start, bool(conv1d))


def _write(
    res: _Out,
    out: str | Path,
    opts: ExtractOptions,
    config: dict[str, Any],
    base: str,
    start: float,
    conv1d: bool,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    from splice.adapters.files import lora_config

    ranks = {m: r for m, r in res.ranks.items() if r > 0}
    rank = max(ranks.values(), default=1)
    tensors: dict[str, Tensor] = {}
    for module, (b, a) in res.factors.items():
        if module in ranks:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    for name, t in res.full.items():
        tensors[f"{PEFT_PREFIX}{name}"] = t.contiguous()
    cfg = lora_config(
        r=rank,
        alpha=rank,
        targets=sorted(ranks),
        fan_in_fan_out=conv1d,
        modules_to_save=sorted(res.saved_modules) or None,
        base_model=base,
    )
    lower = {m: r for m, r in ranks.items() if r != rank}
    cfg.update(rank_pattern=lower, alpha_pattern=dict(lower), task_type="CAUSAL_LM")
    if any(m not in res.saved_modules for m in res.biases):
        cfg["bias"] = "lora_only"
    sq = list(res.errors.values())
    report = {
        "rank": rank,
        "targets": len(ranks),
        "modules_to_save": sorted(res.saved_modules),
        "unchanged_tensors": res.unchanged,
        "relative_error_max": max(sq, default=0.0),
        "relative_error": dict(sorted(res.errors.items())),
        "seconds": round(time.perf_counter() - start, 3),
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "splice-extract.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
