"""Adapter directories in and out: splice's own format and PEFT's.

splice: ``splice_adapter.json`` (method, config, targets, sites and their shapes) and
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

from .inject import (
    _matcher,
    _record,
    adapter_state,
    add_adapter,
    inject,
    remove_adapters,
)
from .layer import METHODS, AdaptedLayer, Adapter, _Record

__all__ = ["load_adapter", "lora_config", "read_adapter", "read_peft", "save_adapter"]

FORMAT = "splice.adapter/1"
# PEFT types whose dirs a method file reads itself (module, function(model, path))
PEFT_LOADERS = {
    "PREFIX_TUNING": ("prefix", "load_peft_prefix"),
    "PROMPT_TUNING": ("prompt", "load_peft_prompt"),
    "P_TUNING": ("prompt", "load_peft_prompt"),
}
CONFIG_FILE = "splice_adapter.json"
WEIGHTS_FILE = "splice_adapter.safetensors"


# splice format ---------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    path: str | Path,
    format: Literal["splice", "peft", "peft-lora"] = "splice",
    *,
    rank: int | None = None,
    base_model: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Write the adapter to a directory, atomically (temp dir, then rename).

    ``splice``: ``splice_adapter.json`` (method, config, targets, sites and their shapes;
    compact) and ``splice_adapter.safetensors`` (trainable tensors, seeds, index maps). ``peft``:
    ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by
    ``peft.PeftModel.from_pretrained``: a method peft has natively (DoRA, IA³, LoHa, LoKr,
    VeRA, …) in its own format, any other whose ΔW is low-rank as LoRA. ``peft-lora``: always as
    a PEFT LoRA (LoHa and VeRA are exact low-rank, of rank r² and r); with ``rank`` a method
    whose ΔW is not low-rank (DoRA, LoKr, OFT, IA³ without biases) is written as its rank-N
    truncated SVD, and each tensor's relative error ‖ΔW − BA‖_F/‖ΔW‖_F goes to
    ``lora_export.json`` beside it.
    ``base_model`` (a local dir) and ``model_kwargs`` let ``load_adapter(None, path)`` rebuild
    the model. ``adapter_name`` picks one of several adapters (default: the first loaded).
    """
    from safetensors.torch import save_file

    path = Path(path)
    record, _ = _record(model, adapter_name)
    base = {
        "base_model": str(Path(base_model).resolve()) if base_model else None,
        "model_class": type(model).__name__ if _is_transformers(model) else None,
        "model_kwargs": model_kwargs or {},
    }
    from ._peft import write_peft

    errors: dict[str, float] = {}
    method = METHODS.get(record.method)() if _registered(record) else None
    if format == "peft" and method is not None and adapter_name is None:
        own = method.peft_files(model, base)
    else:
        own = None
    if own is not None:
        config, tensors = own
    elif format == "peft" and method is not None and method.peft_type:
        config, tensors = write_peft(model, record, base, adapter_name)
    elif format in ("peft", "peft-lora"):
        config, tensors = peft_files(model, record, base, adapter_name, rank, errors)
    elif format == "splice":
        config = {"format": FORMAT, **record.to_json(), **base}
        tensors = adapter_state(model, adapter_name)
        if method is not None:
            config, tensors = method.export(model, config, tensors)
    else:
        raise SpliceError(
            f"unknown adapter format {format!r}", fix="use 'splice', 'peft' or 'peft-lora'"
        )
    peft = format != "splice"
    weights_file = "adapter_model.safetensors" if peft else WEIGHTS_FILE
    config_file = "adapter_config.json" if peft else CONFIG_FILE
    with atomic_dir(path) as tmp:
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / weights_file), metadata={"format": FORMAT})
        text = json.dumps(config, indent=2) if peft else json.dumps(config, separators=(",", ":"))
        (tmp / config_file).write_text(text + "\n")
        if errors:
            worst = max(errors.values())
            report = {"rank": rank, "relative_error_max": worst, "relative_error": errors}
            (tmp / "lora_export.json").write_text(json.dumps(report, indent=2) + "\n")
    return path


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An adapter dir (splice or PEFT LoRA) as (splice record, splice adapter state)."""
    from safetensors.torch import load_file

    if (path / CONFIG_FILE).is_file():
        info = json.loads((path / CONFIG_FILE).read_text())
        if info.get("format") != FORMAT:
            raise SpliceError(f"unsupported adapter format {info.get('format')!r}", where=str(path))
        info.setdefault("sites", list(info.get("shapes") or {}))  # compact: shapes' keys
        return info, load_file(str(path / WEIGHTS_FILE))
    if (path / "adapter_config.json").is_file():
        return read_peft(path)
    raise SpliceError(
        "not an adapter directory",
        where=str(path),
        fix=f"expected {CONFIG_FILE} or a PEFT adapter_config.json",
    )


def load_adapter(
    model: nn.Module | None, path: str | Path, *, adapter_name: str | None = None
) -> nn.Module:
    """Inject and load a saved adapter (splice or PEFT LoRA dir) into ``model``; returns it.

    With ``model=None`` the base model is loaded from the path recorded in the adapter
    (``base_model``, a local ``transformers`` dir), so the adapter dir alone suffices.
    ``adapter_name`` adds it under that name next to the adapters ``model`` already holds
    (:func:`~splice.adapters.add_adapter`); without it the model must have none.

    Raises:
        SpliceError: not an adapter dir, the model lacks a recorded site, the adapter was
            trained on a base of other shapes, or tensors mismatch (nothing is left loaded).
    """
    path = Path(path)
    peft_config = path / "adapter_config.json"
    if not (path / CONFIG_FILE).is_file() and peft_config.is_file():
        raw = json.loads(peft_config.read_text())
        if (own := PEFT_LOADERS.get(raw.get("peft_type"))) is not None:
            if adapter_name is not None:
                raise SpliceError(
                    f"a PEFT {raw['peft_type']} dir loads as the model's only adapter",
                    where=str(path),
                    fix="load it without adapter_name",
                )
            import importlib

            base_info = {
                "base_model": raw.get("base_model_name_or_path"),
                "model_class": (raw.get("auto_mapping") or {}).get("base_model_class"),
            }
            load = getattr(importlib.import_module(f".{own[0]}", __package__), own[1])
            return load(model or _load_base_model(base_info, path), path)
    info, tensors = read_adapter(path)
    if model is None:
        model = _load_base_model(info, path)
    kwargs = dict(layers=info.get("layers"), modules_to_save=info.get("modules_to_save") or ())
    if adapter_name is None:
        inject(model, info["method"], info["targets"], **kwargs, **info["config"])
    else:
        add_adapter(
            model, adapter_name, info["method"], info["targets"], **kwargs, **info["config"]
        )
    try:
        _check_fit(model, info, path, adapter_name)
        _load_state(model, tensors, path, adapter_name)
    except SpliceError:
        if adapter_name is None:
            remove_adapters(model, merge=False)
        else:
            from ._multi import delete_adapter

            delete_adapter(model, adapter_name)
        raise
    return model


def _check_fit(model: nn.Module, info: dict[str, Any], path: Path, name: str | None) -> None:
    """The model's matched layers and their shapes are those the adapter was trained on."""
    _, layers = _record(model, name)
    if set(layers) != set(info["sites"]):
        missing = sorted(set(info["sites"]) ^ set(layers))
        raise SpliceError(
            f"the model's matched layers differ from the adapter's (e.g. {missing[:1]})",
            where=str(path),
            fix="load the adapter into the base model it was trained on",
        )
    for site, shape in (info.get("shapes") or {}).items():
        have = tuple(layers[site].weight.shape)
        if have != tuple(shape):
            raise SpliceError(
                f"the adapter was trained on a base whose {site} weight is {tuple(shape)}, "
                f"this model's is {have}",
                where=str(path),
                fix="load adapters trained on this base model (same architecture and size)",
            )


def _load_state(
    model: nn.Module, tensors: dict[str, Tensor], path: Path, name: str | None = None
) -> None:
    expected = adapter_state(model, name)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SpliceError(
            f"adapter tensors do not fit the model: missing {missing[:2]}, unexpected {extra[:2]}",
            where=str(path),
            fix="load the adapter into the base model it was trained on",
        )
    for site, layer in _record(model, name)[1].items():  # packed adapters read their own keys
        adapter = layer.get(name or layer._bank.names[0])
        if adapter.saved_tensors() is not None:
            prefix = f"{site}.adapter."
            own = {
                k.removeprefix(prefix): tensors.pop(k)
                for k in list(tensors)
                if k.startswith(prefix)
            }
            adapter.load_saved(own, f"{path}: {site}")
    with torch.no_grad():
        for key, t in tensors.items():
            dst = expected[key]
            if dst.numel() == t.numel():  # PEFT's layout of the same values (IA³'s (d, 1))
                t = t.reshape(dst.shape)
            if dst.shape != t.shape:
                raise SpliceError(
                    f"shape {tuple(t.shape)} ≠ model's {tuple(dst.shape)}", where=f"{path}:{key}"
                )
            dst.copy_(t)


def _registered(record: _Record) -> bool:
    return record.method in METHODS.names()


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


def _lowrank(
    name: str, layer: AdaptedLayer, adapter: Adapter, rank: int | None, errors: dict[str, float]
) -> LowRank:
    """The adapter's ΔW as LoRA factors: itself when low-rank, else its rank-``rank`` SVD."""
    d = layer.own_delta(adapter)
    if isinstance(d, LowRank):
        return d
    method = layer._record.method
    if rank is None:
        raise SpliceError(
            f"{method}'s ΔW is not low-rank, so it has no exact LoRA form",
            where=name,
            fix="save_adapter(..., format='peft-lora', rank=N) writes its rank-N truncated "
            "SVD and reports the error; format='peft' writes peft's own format",
        )
    if layer.bias_delta(adapter) is not None:
        raise SpliceError(f"{method} changes the bias too, which a LoRA cannot carry", where=name)
    site = adapter.site
    m = site.canonical(d.materialize(torch.float32)).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    b = torch.nn.functional.pad(u[:, :k] * s[:k].sqrt(), (0, rank - k))
    a = torch.nn.functional.pad(s[:k].sqrt()[:, None] * vh[:k], (0, 0, 0, rank - k))
    errors[name] = float(torch.linalg.matrix_norm(m - b @ a) / torch.linalg.matrix_norm(m))
    return site.lowrank(b.float(), a.float(), 1.0)


def peft_files(
    model: nn.Module,
    record: _Record,
    base: dict[str, Any],
    adapter_name: str | None = None,
    rank: int | None = None,
    errors: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors for ``model``
    (its adapter ``adapter_name``, default the first loaded) as a PEFT LoRA (``rank``: truncate
    ΔW that is not low-rank; errors into ``errors``)."""

    if _registered(record) and not METHODS.get(record.method).mergeable:
        raise SpliceError(
            f"{record.method} has no PEFT adapter format (PEFT LoRA needs a fixed ΔW)",
            fix="save it in splice format",
        )
    tensors: dict[str, Tensor] = {}
    ranks, scales, fan_in_fan_out = set(), set(), False
    _, layers = _record(model, adapter_name)
    for name, layer in layers.items():
        adapter = layer.get(adapter_name or layer._bank.names[0])
        d = _lowrank(name, layer, adapter, rank, {} if errors is None else errors)
        ranks.add(d.rank)
        scales.add(d.scale)
        kind = adapter.site.kind
        fan_in_fan_out |= kind == "conv1d_gpt2"
        a, b = (
            ("lora_embedding_A", "lora_embedding_B")
            if kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PEFT_PREFIX}{name}.{a}"] = d.A
        tensors[f"{PEFT_PREFIX}{name}.{b}"] = d.B
    cfg = record.config
    patterned = record.method == "lora" and bool(cfg.rank_pattern or cfg.alpha_pattern)
    if (len(ranks) > 1 or len(scales) > 1) and not patterned:
        raise SpliceError(
            f"sites differ in rank {sorted(ranks)} or scale {sorted(scales)}",
            fix="export to splice format, or use one rank and scale for every site",
        )
    if record.method == "lora":
        r, alpha, rslora = cfg.r, cfg.alpha, cfg.use_rslora
    else:
        (r,), (scale,) = ranks, scales
        alpha, rslora = scale * r, False
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{mod_name}.{key}"] = t
    config = lora_config(
        r=r,
        alpha=alpha,
        targets=list(layers),
        use_rslora=rslora,
        dropout=cfg.dropout,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=record.modules_to_save or None,
        base_model=base["base_model"],
        model_class=base["model_class"],
    )
    if patterned:
        config |= {"rank_pattern": cfg.rank_pattern, "alpha_pattern": cfg.alpha_pattern}
    return config, {k: v.detach().clone() for k, v in tensors.items()}  # no shared views


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
            weights: from the reader), or trained biases (``bias`` other than none).
            Per-module ranks and scales (``rank_pattern``/``alpha_pattern``) load.
    """
    from splice.io import open_checkpoint
    from splice.io.peft import peft_full_tensors, peft_lora_factors

    from ._peft import peft_record, read_peft_method

    raw = json.loads((path / "adapter_config.json").read_text())
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora"):
        return read_peft_method(path)
    ckpt = open_checkpoint(path)
    config = ckpt.config or {}
    # the model's own layers decide Conv1D transposes here: the factors are loaded as stored
    factors = peft_lora_factors(ckpt)
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    if config.get("bias", "none") != "none":
        raise SpliceError(
            f"PEFT adapter has trained biases (bias={config['bias']!r}), which splice's LoRA "
            "does not load",
            where=str(path),
            fix="re-save it with bias='none'",
        )
    state = peft_full_tensors(ckpt)  # modules_to_save, keyed like splice's own
    sites = sorted(name.removesuffix(".weight") for name in factors)
    for site in sites:
        f = factors[f"{site}.weight"]
        state[f"{site}.adapter.lora_A"] = f.A.reshape(f.A.shape[0], -1)
        state[f"{site}.adapter.lora_B"] = f.B.reshape(-1, f.A.shape[0])
    options = {
        "r": r,
        "alpha": alpha,
        "use_rslora": rslora,
        "dropout": config.get("lora_dropout", 0.0),
        "rank_pattern": config.get("rank_pattern") or {},  # checked against the factors
        "alpha_pattern": config.get("alpha_pattern") or {},
    }
    return peft_record("lora", options, sites, state, config), state
