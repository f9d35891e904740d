"""Fidelity check after a merge: NaN/Inf scan and per-tensor relative change, on the fly.

:class:`OutputCheck` sees every output tensor as the engine writes it (``on_output``) and
keeps three sums per tensor in float64, chunk by chunk (no full-size temporary): ‖θ‖²,
‖θ − θ₀‖² and ‖θ₀‖², with θ₀ the base. A non-finite output fails the merge before anything is
committed (the inputs were checked finite, so it is an overflow — e.g. a float16 ``out_dtype``
— or a method bug). Without a base only the norm is reported. :func:`logit_gap` compares two
weight sets through a model built from ``config.json`` on a few random inputs (adapter
merges: the exact merged ΔW against its low-rank refactoring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.engine.stats import CHUNK

if TYPE_CHECKING:
    from splice.merge.engine import TensorTask

__all__ = ["OutputCheck", "logit_gap"]


def _sums(out: Tensor, base: Tensor | None) -> tuple[bool, float, float]:
    """(finite, ‖out − base‖², ‖base‖²), chunk by chunk through one float32/64 scratch, so a
    half-precision output is widened a chunk at a time, never as a whole copy."""
    o = out.reshape(-1)
    wide = o.dtype if o.dtype in (torch.float32, torch.float64) else torch.float32
    b = None if base is None else base.reshape(-1)
    n = o.numel()
    scratch = torch.empty(min(CHUNK, n), dtype=wide, device=o.device)
    finite, sq_diff, sq_base = True, 0.0, 0.0
    for start in range(0, n, CHUNK):
        chunk = o[start : start + CHUNK]
        d = scratch[: chunk.numel()]
        if b is None:
            d = chunk if chunk.dtype == wide else d.copy_(chunk)  # only half precision widens
            probe = float(d.sum())
        else:
            bc = b[start : start + CHUNK].to(wide)
            sq_base += float(torch.dot(bc, bc))
            probe = float(torch.dot(torch.sub(chunk, bc, out=d), d))
            sq_diff += probe
        # a finite chunk's sum may overflow: only then is the exact (slower) check needed
        finite = finite and (math.isfinite(probe) or bool(torch.isfinite(d).all()))
    return finite, sq_diff, sq_base


class OutputCheck:
    """Per-tensor NaN/Inf scan and ‖θ − θ₀‖/‖θ₀‖ of the merged output (module docstring)."""

    def __init__(self) -> None:
        self.rel_change: dict[str, float] = {}
        self.blocks: dict[str, str] = {}
        self.sq_diff = self.sq_base = 0.0
        self.tensors = 0

    def __call__(self, task: TensorTask, base: Tensor | None, out: Tensor) -> None:
        if not out.dtype.is_floating_point:
            return
        finite, sq_diff, sq_base = _sums(out, base)
        if not finite and not bool(torch.isfinite(out).all()):
            raise SpliceError(
                "the merged tensor has NaN or Inf values (the inputs were finite)",
                where=task.name,
                fix="a float16 out_dtype overflows: use bfloat16/float32, or lower the "
                "method's scale (lambda, weights)",
            )
        self.tensors += 1
        if base is not None:
            self.rel_change[task.name] = math.sqrt(sq_diff / sq_base) if sq_base > 0 else 0.0
            self.blocks[task.name] = task.block
            self.sq_diff += sq_diff
            self.sq_base += sq_base

    def summary(self) -> dict[str, Any]:
        """NaN/Inf count (0, or the merge failed), overall and per-block relative change."""
        out: dict[str, Any] = {"tensors_checked": self.tensors, "nonfinite": 0}
        if not self.rel_change:
            out["relative_change"] = None
            out["note"] = "no base: relative change vs the base is not defined"
            return out
        by_block: dict[str, list[float]] = {}
        for name, v in self.rel_change.items():
            by_block.setdefault(self.blocks[name], []).append(v)
        worst = max(self.rel_change, key=self.rel_change.__getitem__)
        out["relative_change"] = math.sqrt(self.sq_diff / self.sq_base) if self.sq_base else 0.0
        out["max"] = {"tensor": worst, "value": self.rel_change[worst]}
        out["by_block"] = {b: sum(v) / len(v) for b, v in sorted(by_block.items())}
        unchanged = [n for n, v in self.rel_change.items() if v == 0.0]
        out["unchanged_tensors"] = len(unchanged)
        return out


def logit_gap(
    model_dir: str | Path,
    weights: Mapping[str, Tensor],
    variants: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    *,
    max_bytes: int = 1 << 30,
    batch: int = 2,
    length: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Largest |logit difference| between ``weights + variants[0]`` and ``+ variants[1]``.

    The model class comes from ``model_dir/config.json`` through ``transformers`` (no remote
    code); inputs are random token ids (or pixel values for vision models). Returns
    ``{"skipped": reason}`` when no model can be built or it is larger than ``max_bytes``.
    """
    size = sum(t.numel() * t.element_size() for t in weights.values())
    if size > max_bytes:
        return {"skipped": f"base is {size >> 20} MiB, above the {max_bytes >> 20} MiB limit"}
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {"skipped": "transformers is not installed"}
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            return {"skipped": f"no transformers class for {arch!r}"}
        model = cls(config).eval()
    except Exception as e:  # a config transformers cannot build: report, do not fail
        return {"skipped": f"cannot build the model from config.json ({type(e).__name__})"}
    g = torch.Generator().manual_seed(seed)
    if getattr(config, "model_type", "") == "vit":
        n = config.image_size
        inputs = {"pixel_values": torch.randn(batch, config.num_channels, n, n, generator=g)}
    else:
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
    logits = []
    for delta in variants:
        state = {k: (v + delta[k].to(v.dtype)) if k in delta else v for k, v in weights.items()}
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            return {"skipped": f"weights do not fit {arch} (e.g. {unexpected[0]!r})"}
        with torch.no_grad():
            logits.append(model(**inputs).logits.double())
    diff = (logits[0] - logits[1]).abs().max().item()
    scale = logits[0].abs().max().item()
    return {
        "model": arch,
        "inputs": f"{batch}×{length} random tokens" if "input_ids" in inputs else "random images",
        "max_abs_logit_diff": diff,
        "relative": diff / scale if scale else 0.0,
    }
