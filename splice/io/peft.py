"""Read PEFT LoRA adapter dirs: raw factors keyed by the base model's tensor names.

``base_model.model.<module>.lora_A.weight`` + ``lora_B.weight`` become one
:class:`LoraFactors` on ``<module>.weight`` with PEFT's scale parameters (``lora_alpha``,
rsLoRA; per-module ``rank_pattern``/``alpha_pattern`` honoured); :mod:`splice.deltas.peft`
turns them into :class:`~splice.deltas.LowRank` deltas.
Embedding LoRA (``lora_embedding_A/B``) and GPT-2 ``Conv1D`` (``fan_in_fan_out``) are transposed;
conv LoRA keeps the kernel shape. ``modules_to_save`` tensors are full weights, returned apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

from splice.errors import SpliceError
from splice.io.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = [
    "PEFT_PREFIX",
    "LoraFactors",
    "peft_full_tensors",
    "peft_lora_factors",
    "peft_target_name",
]

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the base model's module names in an adapter's tensor names."""


class LoraFactors(NamedTuple):
    """One LoRA pair as stored: ``ΔW = scale(alpha, r, rslora) · B @ A`` (``r = A.shape[0]``),
    reshaped to ``shape`` (conv kernels; None: 2-D) and transposed if ``transpose``."""

    B: torch.Tensor
    A: torch.Tensor
    alpha: float
    rslora: bool
    shape: tuple[int, ...] | None
    transpose: bool


_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


def _strip(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".weight") if ".lora_" in name else name


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(cfg: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if cfg is None:
        raise SpliceError("missing adapter_config.json", where=where)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SpliceError(
            f"adapter type {cfg.get('peft_type')!r} is not LoRA",
            where=where,
            fix="splice reads PEFT LoRA adapters as deltas; merge other types with peft first",
        )
    if cfg.get("use_dora"):
        raise SpliceError(
            "DoRA adapters are not a low-rank delta (they rescale weight columns)",
            where=where,
            fix="merge the DoRA adapter into its base with peft, then use the full checkpoint",
        )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise SpliceError(
            f"adapter_config.json needs a positive integer r and a numeric lora_alpha "
            f"(got r={r!r}, lora_alpha={alpha!r})",
            where=where,
        )
    return cfg


def peft_lora_factors(ckpt: Checkpoint) -> dict[str, LoraFactors]:
    """LoRA pairs of a PEFT adapter :class:`Checkpoint` as ``{base_tensor_name: LoraFactors}``.

    Raises:
        SpliceError: not LoRA/DoRA, A without B, rank that disagrees with the config.
    """
    where = str(ckpt.path)
    cfg = _check_config(ckpt.config, where)
    pairs: dict[str, dict[str, str]] = {}
    for name in ckpt.names():
        m = _LORA.match(_strip(name))
        if m:
            slot = pairs.setdefault(m["mod"], {})
            slot[m["ab"]] = name
            slot["emb"] = "1" if m["emb"] else ""
    out: dict[str, LoraFactors] = {}
    for module, slot in pairs.items():
        if "A" not in slot or "B" not in slot:
            raise SpliceError(
                f"LoRA module {module!r} has lora_{'A' if 'A' in slot else 'B'} only",
                where=where,
                fix="the adapter file is incomplete; re-save it",
            )
        a, b = ckpt[slot["A"]], ckpt[slot["B"]]
        emb = bool(slot["emb"])
        r = a.shape[0]
        if b.shape[1] != r:
            raise SpliceError(
                f"LoRA rank mismatch on {module!r}: A has rank {r}, B has {b.shape[1]}",
                where=where,
            )
        expected_r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        if r != expected_r:
            raise SpliceError(
                f"LoRA rank of {module!r} is {r} but adapter_config.json says {expected_r}",
                where=where,
                fix="the config does not belong to these weights",
            )
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        target_shape = (b.shape[0], *a.shape[1:]) if a.dim() > 2 else None
        transpose = emb or bool(cfg.get("fan_in_fan_out"))
        rslora = bool(cfg.get("use_rslora"))
        out[f"{module}.weight"] = LoraFactors(b, a, alpha, rslora, target_shape, transpose)
    if not out:
        raise SpliceError("adapter holds no LoRA weights", where=where)
    return out


def peft_target_name(name: str) -> tuple[str, bool]:
    """The base tensor a stored adapter tensor belongs to, and whether it is a LoRA factor.

    ``…q_proj.lora_A.weight`` → (``…q_proj.weight``, True); a ``modules_to_save`` tensor or a
    saved ``base_layer`` (``save_embedding_layers``) → (its base name, False).
    """
    m = _LORA.match(_strip(name))
    if m:
        return f"{m['mod']}.weight", True
    base = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".")
    return base.replace(".base_layer.", "."), False


def peft_full_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Non-LoRA tensors of an adapter (``modules_to_save``), keyed by base tensor name."""
    out = {}
    for name in ckpt.names():
        target, is_lora = peft_target_name(name)
        if not is_lora:
            out[target] = ckpt[name]
    return out
