"""Read PEFT LoRA adapter dirs: raw factors keyed by the base model's tensor names.

``base_model.model.<module>.lora_A.weight`` + ``lora_B.weight`` become one
:class:`LoraFactors` on ``<module>.weight`` with PEFT's scale parameters (``lora_alpha``,
rsLoRA; per-module ``rank_pattern``/``alpha_pattern`` honoured); :mod:`splice.deltas.peft`
turns them into :class:`~splice.deltas.LowRank` deltas.
Embedding LoRA (``lora_embedding_A/B``) and GPT-2 ``Conv1D`` modules are transposed, decided
per module (:func:`conv1d_modules`): peft saves one ``fan_in_fan_out`` flag per dir but sets it
per module, so the saved value is only the last module's. Conv LoRA keeps the kernel shape.
``modules_to_save`` tensors are full weights, returned apart. Adapters that are not one weight
delta of the original base are refused (aLoRA, ``lora_bias``, base-modifying inits).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from splice.errors import SpliceError
from splice.io.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONV1D_MODULES",
    "PEFT_PREFIX",
    "LoraFactors",
    "conv1d_modules",
    "pattern_value",
    "peft_full_tensors",
    "peft_lora_factors",
    "peft_target_name",
]

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the base model's module names in an adapter's tensor names."""


class LoraFactors(NamedTuple):
    """One LoRA pair as stored: ``ΔW = scale(alpha, r, rslora) · B @ A`` (``r = A.shape[0]``),
    reshaped to ``shape`` (conv kernels; None: 2-D) and transposed if ``transpose`` (None: the
    dir cannot tell whether the module is a GPT-2 ``Conv1D``, see :func:`conv1d_modules`)."""

    B: torch.Tensor
    A: torch.Tensor
    alpha: float
    rslora: bool
    shape: tuple[int, ...] | None
    transpose: bool | None


_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


def _strip(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".weight") if ".lora_" in name else name


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}
"""Per ``model_type``: the module names (last path component) that are ``transformers``'
``Conv1D``, whose weight is stored (in, out). Every other family has none (GPT-BigCode's
``c_attn``/``c_proj`` are ``nn.Linear``)."""

_CONV1D_NAMES = frozenset().union(*CONV1D_MODULES.values())


def conv1d_modules(
    modules: Collection[str], model_type: str | None, saved_flag: bool
) -> set[str] | None:
    """Which of an adapter's LoRA ``modules`` are GPT-2 ``Conv1D`` (their ΔW is transposed).

    With the base's ``model_type``: by module name (:data:`CONV1D_MODULES`). Without it, from
    ``fan_in_fan_out`` as peft saves it (the value its last created module set): True means a
    ``Conv1D`` family, whose GPT-2-named modules (``c_attn``, ``c_proj``, ``c_fc``,
    ``q_attn``) are the ``Conv1D`` ones (every module when none has such a name); False with
    GPT-2 names only is a family where they are ``nn.Linear`` (GPT-BigCode). None: cannot
    tell (False, with GPT-2 names beside other modules: GPT-2 with a Linear head adapted, or
    GPT-BigCode).
    """
    leaf = {m: m.rsplit(".", 1)[-1] for m in modules}
    if model_type is not None and (model_type in CONV1D_MODULES or not saved_flag):
        names = CONV1D_MODULES.get(model_type, frozenset())
        return {m for m, n in leaf.items() if n in names}
    named = {m for m, n in leaf.items() if n in _CONV1D_NAMES}
    if saved_flag:
        return named or set(modules)
    return set() if not named or len(named) == len(leaf) else None


def _base_model_type(cfg: dict[str, Any]) -> str | None:
    """``model_type`` of the base an adapter config names, when that is a local model dir."""
    base = cfg.get("base_model_name_or_path")
    path = Path(base) / "config.json" if isinstance(base, str) and base else None
    try:
        if path is not None and path.is_file():
            model_type = json.loads(path.read_text()).get("model_type")
            return model_type if isinstance(model_type, str) else None
    except (OSError, ValueError):
        return None
    return None


_MODIFIED_BASE_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _check_variants(cfg: dict[str, Any], names: list[str], where: str) -> None:
    """Refuse adapters whose math is not ``W + scale·B@A`` on the original base weight."""
    if cfg.get("alora_invocation_tokens"):
        raise SpliceError(
            "aLoRA adapter (alora_invocation_tokens): peft applies it only to the tokens after "
            "its invocation sequence, so it is not one weight delta",
            where=where,
            fix="serve it with peft; splice loads and merges plain LoRA only",
        )
    if cfg.get("lora_bias") or any(n.endswith(".lora_B.bias") for n in names):
        raise SpliceError(
            "LoRA with lora_bias=True (a trained lora_B.bias) is not loaded by splice",
            where=where,
            fix="merge it into its base with peft (merge_and_unload()) and use the full checkpoint",
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        raise SpliceError(
            f"init_lora_weights={init!r}: this adapter fits a modified base (peft rewrote the "
            "base weights at init), not the original model",
            where=where,
            fix="re-save it with peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) to get a LoRA of the original base, "
            "or merge it with peft into its residual base",
        )


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


def peft_lora_factors(ckpt: Checkpoint, *, model_type: str | None = None) -> dict[str, LoraFactors]:
    """LoRA pairs of a PEFT adapter :class:`Checkpoint` as ``{base_tensor_name: LoraFactors}``.

    ``model_type``: the base's (its ``config.json``), which decides the GPT-2 ``Conv1D``
    modules; default: read from ``base_model_name_or_path`` when that is a local dir.

    Raises:
        SpliceError: not LoRA; DoRA, aLoRA, ``lora_bias`` or a base-modifying init (PiSSA,
            OLoRA, LoftQ, CorDA, LoRA-GA); A without B; rank that disagrees with the config.
    """
    where = str(ckpt.path)
    cfg = _check_config(ckpt.config, where)
    _check_variants(cfg, ckpt.names(), where)
    pairs: dict[str, dict[str, str]] = {}
    for name in ckpt.names():
        m = _LORA.match(_strip(name))
        if m:
            slot = pairs.setdefault(m["mod"], {})
            slot[m["ab"]] = name
            slot["emb"] = "1" if m["emb"] else ""
    dense = [m for m, slot in pairs.items() if not slot["emb"]]
    conv1d = conv1d_modules(
        dense, model_type or _base_model_type(cfg), bool(cfg.get("fan_in_fan_out"))
    )
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
        expected_r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        if r != expected_r:
            raise SpliceError(
                f"LoRA rank of {module!r} is {r} but adapter_config.json says {expected_r}",
                where=where,
                fix="the config does not belong to these weights",
            )
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        target_shape = (b.shape[0], *a.shape[1:]) if a.dim() > 2 else None
        transpose: bool | None = True  # embeddings are stored (in, out) by peft
        if not emb:
            transpose = False if a.dim() > 2 else None if conv1d is None else module in conv1d
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
