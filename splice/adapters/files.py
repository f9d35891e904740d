"""Adapter directories in and out: splice's own format and PEFT's.

splice: ``splice_adapter.json`` (method, config, targets, sites) and
``splice_adapter.safetensors`` (trainable tensors, seeds, index maps). PEFT LoRA
(``adapter_config.json`` + ``adapter_model.safetensors``): out, any adapter whose ΔW is
low-rank (LoRA, and the other methods materialised to plain LoRA, spec §22.2 P13) becomes a
LoRA that ``peft.PeftModel.from_pretrained`` loads; in, a PEFT LoRA dir becomes splice LoRA
state, so :func:`load_adapter` injects and fills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.deltas import LowRank
from splice.errors import SpliceError
from splice.io.atomic import atomic_dir
from splice.io.peft import PEFT_PREFIX

from .inject import _matcher, _record, adapter_layers, adapter_state, inject
from .layer import _Record

__all__ = ["load_adapter", "lora_config", "read_peft", "save_adapter"]

FORMAT = "splice.adapter/1"
CONFIG_FILE = "splice_adapter.json"
WEIGHTS_FILE = "splice_adapter.safetensors"


# splice format ---------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    path: str | Path,
    format: Literal["splice", "peft"] = "splice",
    *,
    base_model: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter to a directory, atomically (temp dir, then rename).

    ``splice``: ``splice_adapter.json`` (method, config, targets, sites) and
    ``splice_adapter.safetensors`` (trainable tensors, seeds, index maps). ``peft``:
    ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by
    ``peft.PeftModel.from_pretrained`` (any method whose ΔW is low-rank is exported as LoRA).
    ``base_model`` (a local dir) and ``model_kwargs`` let ``load_adapter(None, path)`` rebuild
    the model.
    """
    from safetensors.torch import save_file

    path = Path(path)
    record, _ = _record(model)
    base = {
        "base_model": str(Path(base_model).resolve()) if base_model else None,
        "model_class": type(model).__name__ if _is_transformers(model) else None,
        "model_kwargs": model_kwargs or {},
    }
    if format == "peft":
        config, tensors = peft_files(model, record, base)
    elif format == "splice":
        config = {"format": FORMAT, **record.to_json(), **base}
        tensors = adapter_state(model)
    else:
        raise SpliceError(f"unknown adapter format {format!r}", fix="use 'splice' or 'peft'")
    weights_file = "adapter_model.safetensors" if format == "peft" else WEIGHTS_FILE
    config_file = "adapter_config.json" if format == "peft" else CONFIG_FILE
    with atomic_dir(path) as tmp:
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / weights_file), metadata={"format": FORMAT})
        (tmp / config_file).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_adapter(model: nn.Module | None, path: str | Path) -> nn.Module:
    """Inject and load a saved adapter (splice or PEFT LoRA dir) into ``model``; returns it.

    With ``model=None`` the base model is loaded from the path recorded in the adapter
    (``base_model``, a local ``transformers`` dir), so the adapter dir alone suffices.

    Raises:
        SpliceError: not an adapter dir, the model lacks a recorded site, or tensors mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        info = json.loads((path / CONFIG_FILE).read_text())
        if info.get("format") != FORMAT:
            raise SpliceError(f"unsupported adapter format {info.get('format')!r}", where=str(path))
        tensors = load_file(str(path / WEIGHTS_FILE))
    elif (path / "adapter_config.json").is_file():
        info, tensors = read_peft(path)
    else:
        raise SpliceError(
            "not an adapter directory",
            where=str(path),
            fix=f"expected {CONFIG_FILE} or a PEFT adapter_config.json",
        )
    if model is None:
        model = _load_base_model(info, path)
    inject(
        model,
        info["method"],
        info["targets"],
        layers=info.get("layers"),
        modules_to_save=info.get("modules_to_save") or (),
        **info["config"],
    )
    sites = set(adapter_layers(model))
    if sites != set(info["sites"]):
        missing = sorted(set(info["sites"]) ^ sites)
        raise SpliceError(
            f"the model's matched layers differ from the adapter's (e.g. {missing[:1]})",
            where=str(path),
            fix="load the adapter into the base model it was trained on",
        )
    _load_state(model, tensors, path)
    return model


def _load_state(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SpliceError(
            f"adapter tensors do not fit the model: missing {missing[:2]}, unexpected {extra[:2]}",
            where=str(path),
            fix="load the adapter into the base model it was trained on",
        )
    for name, layer in adapter_layers(model).items():  # packed adapters read their own keys
        if layer.adapter.saved_tensors() is not None:
            prefix = f"{name}.adapter."
            own = {
                k.removeprefix(prefix): tensors.pop(k)
                for k in list(tensors)
                if k.startswith(prefix)
            }
            layer.adapter.load_saved(own, f"{path}: {name}")
    with torch.no_grad():
        for key, t in tensors.items():
            dst = expected[key]
            if dst.shape != t.shape:
                raise SpliceError(
                    f"shape {tuple(t.shape)} ≠ model's {tuple(dst.shape)}", where=f"{path}:{key}"
                )
            dst.copy_(t)


def _is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _load_base_model(info: dict[str, Any], path: Path) -> nn.Module:
    base, cls_name = info.get("base_model"), info.get("model_class")
    if not base or not cls_name or not Path(base).is_dir():
        raise SpliceError(
            "the adapter records no local base model dir",
            where=str(path),
            fix="pass the base model: load_adapter(model, path)",
        )
    import transformers

    cls = getattr(transformers, cls_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise SpliceError(f"unknown transformers model class {cls_name!r}", where=str(path))
    return cls.from_pretrained(base, local_files_only=True, **info.get("model_kwargs", {}))


# PEFT LoRA format ------------------------------------------------------------------------------


def peft_files(
    model: nn.Module, record: _Record, base: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors for ``model``."""
    tensors: dict[str, Tensor] = {}
    ranks, scales, fan_in_fan_out = set(), set(), False
    for name, layer in adapter_layers(model).items():
        d = layer.delta()
        if not isinstance(d, LowRank):
            raise SpliceError(f"{record.method} has no low-rank ΔW to export as LoRA", where=name)
        ranks.add(d.rank)
        scales.add(d.scale)
        kind = layer.adapter.site.kind
        fan_in_fan_out |= kind == "conv1d_gpt2"
        a, b = (
            ("lora_embedding_A", "lora_embedding_B")
            if kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PEFT_PREFIX}{name}.{a}"] = d.A
        tensors[f"{PEFT_PREFIX}{name}.{b}"] = d.B
    if len(ranks) > 1 or len(scales) > 1:
        raise SpliceError(
            f"sites differ in rank {sorted(ranks)} or scale {sorted(scales)}",
            fix="export to splice format, or use one rank and scale for every site",
        )
    (r,), (scale,) = ranks, scales
    cfg = record.config
    if record.method == "lora":
        alpha, rslora = cfg.alpha, cfg.use_rslora
    else:
        alpha, rslora = scale * r, False
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{mod_name}.{key}"] = t
    config = lora_config(
        r=r,
        alpha=alpha,
        targets=list(adapter_layers(model)),
        use_rslora=rslora,
        dropout=cfg.dropout,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=record.modules_to_save or None,
        base_model=base["base_model"],
        model_class=base["model_class"],
    )
    return config, {k: v.detach() for k, v in tensors.items()}


def lora_config(
    *,
    r: int,
    alpha: float,
    targets: list[str],
    use_rslora: bool = False,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
    modules_to_save: list[str] | None = None,
    base_model: str | None = None,
    model_class: str | None = None,
) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for a plain LoRA (one rank and alpha for every site)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "lora_dropout": dropout,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if model_class:
        config["auto_mapping"] = {"base_model_class": model_class}
    return config


def read_peft(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT LoRA dir as (splice adapter record, splice adapter state), via :mod:`splice.io`.

    Raises:
        SpliceError: not a LoRA (or DoRA, aLoRA, ``lora_bias``, a base-modifying init, pickle
            weights: from the reader), per-module ranks or scales
            (``rank_pattern``/``alpha_pattern``), or trained biases (``bias`` other than none).
    """
    from splice.deltas import lora_scale
    from splice.io import open_checkpoint
    from splice.io.peft import peft_full_tensors, peft_lora_factors

    ckpt = open_checkpoint(path)
    config = ckpt.config or {}
    # the model's own layers decide Conv1D transposes here: the factors are loaded as stored
    factors = peft_lora_factors(ckpt)
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    found = {(f.A.shape[0], lora_scale(f.alpha, f.A.shape[0], f.rslora)) for f in factors.values()}
    if found != {(r, lora_scale(alpha, r, rslora))} or config.get("bias", "none") != "none":
        raise SpliceError(
            "PEFT adapter has per-module ranks/alphas or trained biases, which splice's LoRA "
            "does not load",
            where=str(path),
            fix="re-save it as a plain LoRA (one r and lora_alpha, bias='none')",
        )
    state = peft_full_tensors(ckpt)  # modules_to_save, keyed like splice's own
    sites = sorted(name.removesuffix(".weight") for name in factors)
    for site in sites:
        f = factors[f"{site}.weight"]
        state[f"{site}.adapter.lora_A"] = f.A.reshape(f.A.shape[0], -1)
        state[f"{site}.adapter.lora_B"] = f.B.reshape(-1, f.A.shape[0])
    saved = config.get("modules_to_save") or []  # peft lists heads it may not have saved
    info = {
        "method": "lora",
        "config": {
            "r": r,
            "alpha": alpha,
            "use_rslora": rslora,
            "dropout": config.get("lora_dropout", 0.0),
        },
        "targets": sites,
        "layers": None,
        "modules_to_save": [m for m in saved if any(f".{m}." in f".{k}" for k in state)],
        "sites": sites,
        "base_model": config.get("base_model_name_or_path"),
        "model_class": (config.get("auto_mapping") or {}).get("base_model_class"),
    }
    return info, state
