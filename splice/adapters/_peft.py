"""PEFT adapter dirs of the methods beyond LoRA, both ways (DoRA, IA³, LoHa, LoKr, VeRA, …).

Each method declares its PEFT name, tensor names and config fields on its :class:`Method`
(``peft_type``, ``peft_names``, ``to_peft``/``from_peft``, ``peft_shape``); this module does
the rest once: ``adapter_config.json`` with the generic fields (``target_modules``,
``modules_to_save``, ``layers_to_transform``, ``fan_in_fan_out``) and
``adapter_model.safetensors`` keyed ``base_model.model.<module>.<tensor>`` in peft's shapes.
Reading refuses any config field that would change the math and that splice does not
implement (naming it), and a ``peft_type`` splice lacks (listing those it has).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from splice.errors import SpliceError
from splice.io.peft import PEFT_PREFIX, _check_variants, peft_target_name

from .inject import _matcher, _record
from .layer import METHODS, Method, _Record

__all__ = ["peft_methods", "peft_record", "read_peft_method", "write_peft"]

# Fields that describe the dir, not the math; and those that only set the initial values.
_META = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "auto_mapping", "target_modules", "modules_to_save", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "megatron_core",
    "qalora_group_size", "init_lora_weights", "init_weights", "init_ia3_weights",
}  # fmt: skip


def peft_methods() -> dict[str, str]:
    """PEFT type → splice method, for every registered method peft also has (and LoRA)."""
    out = {"LORA": "lora"}
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.peft_type:
            out[cls.peft_type] = name
    return out


def _inert(value: Any) -> bool:
    return value in (None, False, {}, [], "none") or value == {}


def write_peft(
    model: nn.Module, record: _Record, base: dict[str, Any], adapter_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``adapter_config.json`` dict and tensors of a method PEFT has natively (adapter
    ``adapter_name``, default the first loaded)."""
    method = METHODS.get(record.method)()
    _, layers = _record(model, adapter_name)
    adapters = {n: layer.get(adapter_name or layer._bank.names[0]) for n, layer in layers.items()}
    sites = [adapter.site for adapter in adapters.values()]
    tensors: dict[str, Tensor] = {}
    for name, adapter in adapters.items():
        for key, t in adapter.state_dict().items():
            shape = method.peft_shape(adapter, key) or t.shape
            tensors[f"{PEFT_PREFIX}{name}.{method.peft_names.get(key, key)}"] = t.reshape(shape)
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                tensors[f"{PEFT_PREFIX}{mod_name}.{key}"] = t
    config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": base["base_model"],
        "target_modules": list(layers),
        "modules_to_save": record.modules_to_save or None,
        "layers_to_transform": record.layers,
        "inference_mode": True,
        "fan_in_fan_out": any(s.kind == "conv1d_gpt2" for s in sites),
        **method.to_peft(record.config, sites),
    }
    if base["model_class"]:
        config["auto_mapping"] = {"base_model_class": base["model_class"]}
    return config, {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def _method_of(cfg: dict[str, Any], where: str) -> tuple[str, Method]:
    kind = str(cfg.get("peft_type"))
    if kind == "LORA" and cfg.get("use_dora"):
        kind = "DORA"
    known = peft_methods()
    if kind not in known:
        raise SpliceError(
            f"PEFT adapter type {kind!r} is not a method splice has",
            where=where,
            fix=f"splice loads PEFT {', '.join(sorted(known))} adapters",
        )
    return known[kind], METHODS.get(known[kind])()


def read_peft_method(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A PEFT dir of a method other than plain LoRA as (splice record, splice state).

    Raises:
        SpliceError: a ``peft_type`` splice lacks; a config field that changes the math and
            that splice does not implement; tensors of no known adapter.
    """
    from safetensors.torch import load_file

    where = str(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    name, method = _method_of(cfg, where)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise SpliceError("no adapter_model.safetensors", where=where, fix="re-save with peft")
    stored = load_file(str(weights))
    if method.peft_type == "DORA":
        _check_variants(cfg, list(stored), where)
    to_splice = {v: k for k, v in method.peft_names.items()}
    own = "|".join(re.escape(n) for n in sorted({*to_splice, *method.peft_tensors}))
    pattern = re.compile(rf"^{re.escape(PEFT_PREFIX)}(?P<mod>.+)\.(?P<name>{own})$")
    state: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    sites: set[str] = set()
    for key, t in stored.items():
        m = pattern.match(key)
        if m:
            sites.add(m["mod"])
            state[f"{m['mod']}.adapter.{to_splice.get(m['name'], m['name'])}"] = t
        elif not key.startswith(PEFT_PREFIX):
            extras[key.rsplit(".", 1)[-1]] = t  # shared tensors (VeRA's projections)
        else:
            state[peft_target_name(key)[0]] = t  # modules_to_save
    fields = {k: v for k, v in cfg.items() if k not in _META}
    options = method.from_peft(fields, extras)
    method.peft_state(state, cfg)
    for key, value in fields.items():
        if not _inert(value):
            raise SpliceError(
                f"PEFT {method.peft_type} config field {key}={value!r} changes the adapter's "
                "math and splice does not implement it",
                where=where,
                fix=f"re-train without {key}, or serve this adapter with peft",
            )
    if not sites:
        raise SpliceError(f"PEFT {method.peft_type} dir holds no adapter tensors", where=where)
    return peft_record(name, options, sorted(sites), state, cfg), state


def peft_record(
    method: str,
    options: dict[str, Any],
    sites: list[str],
    state: dict[str, Tensor],
    cfg: dict[str, Any],
) -> dict[str, Any]:
    """The splice adapter record of a PEFT dir: its sites by full name, the heads it saved."""
    saved = cfg.get("modules_to_save") or []  # peft lists heads it may not have saved
    return {
        "method": method,
        "config": options,
        "targets": sites,
        "layers": None,
        "modules_to_save": [m for m in saved if any(f".{m}." in f".{k}" for k in state)],
        "sites": sites,
        "base_model": cfg.get("base_model_name_or_path"),
        "model_class": (cfg.get("auto_mapping") or {}).get("base_model_class"),
    }
