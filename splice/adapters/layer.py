"""Adapter injection, target matching, merge/unmerge and save/load for any ``nn.Module``.

``inject(model, "lora", targets=["query", "value"], r=8)`` wraps every matched layer in an
:class:`AdaptedLayer` that holds the frozen base layer and one method :class:`Adapter`. An
adapter describes its change as ΔW = s·B@A (spec peft.md §22.1 with the ``add`` composer);
the layer's :class:`~splice.adapters._sites.Site` maps that onto Linear, Conv, Embedding or
GPT-2 ``Conv1D`` geometry. A method is one file that registers a :class:`Method` in
:data:`METHODS`; nothing here changes when a method is added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import pydantic
import torch
from torch import Tensor, nn

from splice._registry import Registry
from splice.deltas import Delta
from splice.errors import SpliceError
from splice.io.atomic import atomic_dir

from ._sites import Site, make_site

__all__ = [
    "METHODS",
    "AdaptedLayer",
    "Adapter",
    "Method",
    "MethodConfig",
    "ParamCount",
    "adapter_deltas",
    "adapter_layers",
    "aux_loss",
    "find_sites",
    "inject",
    "load_adapter",
    "merge_adapters",
    "remove_adapters",
    "save_adapter",
    "trainable_parameters",
    "unmerge_adapters",
]

FORMAT = "splice.adapter/1"
CONFIG_FILE = "splice_adapter.json"
WEIGHTS_FILE = "splice_adapter.safetensors"

METHODS: Registry[type[Method]] = Registry("adapter method", "splice.adapters")


class MethodConfig(pydantic.BaseModel):
    """Hyperparameters of a method; unknown keys are errors (a misspelled ``alpah`` fails)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")


class Adapter(nn.Module):
    """One site's trainable change ΔW = scale·B@A. Subclasses implement :meth:`factors`."""

    def __init__(self, site: Site, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.site = site
        self.scale = scale
        use_dropout = dropout > 0 and site.takes_dropout
        self.dropout = nn.Dropout(dropout) if use_dropout else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)``: B (d_out, R), A (R, d_in) in the canonical layout."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Add the adapter's contribution to the base output ``y`` of input ``x``."""
        B, A = self.factors()
        return self.site.up_add(y, self.site.down(self.dropout(x), A), B, self.scale)

    def delta(self) -> Delta:
        B, A = self.factors()
        return self.site.lowrank(B.detach(), A.detach(), self.scale)


class Method:
    """A registered PEFT method: a config model, a builder of per-site adapters, a formula.

    Subclasses set ``pretty_name``, ``reference_url``, ``Config`` and implement :meth:`build`
    and :meth:`num_parameters` (the spec's trainable-parameter formula).
    """

    pretty_name: ClassVar[str]
    reference_url: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv1d_gpt2", "embedding", "conv"})
    uses_all_parameters: ClassVar[bool] = True  # False if a forward may skip some (DDP needs it)

    def build(self, sites: list[Site], cfg: Any) -> list[Adapter]:
        raise NotImplementedError

    def num_parameters(self, sites: list[Site], cfg: Any) -> int:
        raise NotImplementedError

    def aux_loss(self, adapters: list[Adapter], cfg: Any) -> Tensor | None:
        """An auxiliary loss from the last forward (router balance, task contrast), or None."""
        return None


@dataclass
class _Record:
    """What one ``inject`` call did; shared by its layers and written next to the weights."""

    method: str
    config: MethodConfig
    targets: list[str] | str
    layers: list[int] | None
    modules_to_save: list[str]
    sites: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "config": self.config.model_dump(),
            "targets": self.targets,
            "layers": self.layers,
            "modules_to_save": self.modules_to_save,
            "sites": self.sites,
        }


class AdaptedLayer(nn.Module):
    """A frozen base layer plus one adapter; ``merge``/``unmerge`` move ΔW in and out of W."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter, record: _Record) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.merged = False
        self._record = record

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y if self.merged else self.adapter(x, y)

    def delta(self) -> Delta:
        """ΔW in the base weight's layout (raises for input-dependent methods such as MoLA)."""
        return self.adapter.delta()

    def merge(self) -> None:
        """W ← W + ΔW; idempotent."""
        if not self.merged:
            self._shift(+1)
            self.merged = True

    def unmerge(self) -> None:
        """W ← W − ΔW; restores the base weight up to floating-point rounding."""
        if self.merged:
            self._shift(-1)
            self.merged = False

    def _shift(self, sign: int) -> None:
        w = self.adapter.site.weight(self.base_layer)
        with torch.no_grad():
            d = self.delta().materialize(torch.float32).to(w.device)
            w.copy_((w.float() + d if sign > 0 else w.float() - d).to(w.dtype))


# Target matching -------------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first numeric component of a dotted module name (``encoder.layer.3.…`` → 3)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _matcher(targets: Sequence[str] | str):
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise SpliceError(f"bad target regex {targets!r}: {e}", fix="fix the pattern") from e
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def find_sites(
    model: nn.Module, targets: Sequence[str] | str, layers: Iterable[int] | None = None
) -> list[tuple[str, nn.Module, Site]]:
    """The adaptable layers matched by ``targets`` (name suffixes or a full-name regex).

    Raises:
        SpliceError: a target matches nothing, a match is not an adaptable layer type, or
            ``layers`` leaves nothing to adapt.
    """
    if not targets:
        raise SpliceError("no targets given", fix="pass targets=[...] (module name suffixes)")
    names = [n for n, _ in model.named_modules() if n]
    for t in [targets] if isinstance(targets, str) else targets:
        if not any(map(_matcher(t if isinstance(targets, str) else [t]), names)):
            import difflib

            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            close = difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3)
            raise SpliceError(
                f"target {t!r} matches no module of {type(model).__name__}",
                fix=f"did you mean {close}?" if close else "print(model) to see module names",
            )
    match = _matcher(targets)
    keep = None if layers is None else set(layers)
    found: list[tuple[str, nn.Module, Site]] = []
    for name, module in model.named_modules():
        if not name or not match(name):
            continue
        idx = layer_index(name)
        if keep is not None and idx not in keep:
            continue
        site = make_site(name, module, idx, name.rsplit(".", 1)[-1])
        if site is None:
            raise SpliceError(
                f"matched module is a {type(module).__name__}, not an adaptable layer",
                where=name,
                fix="target Linear, Conv, Embedding or GPT-2 Conv1D modules by a longer suffix",
            )
        found.append((name, module, site))
    if not found:
        raise SpliceError(
            f"layers={sorted(keep or [])} leaves no module to adapt",
            fix="module names carry their layer index (e.g. 'encoder.layer.3.'); check it",
        )
    return found


# Injection -------------------------------------------------------------------------------------


def _config(method: type[Method], name: str, config: dict[str, Any]) -> MethodConfig:
    try:
        return method.Config(**config)
    except pydantic.ValidationError as e:
        import difflib

        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(method.Config.model_fields), n=1)
            fix = (
                f"did you mean {close[0]!r}?"
                if close
                else f"options: {list(method.Config.model_fields)}"
            )
            raise SpliceError(f"unknown {name} option {key!r}", fix=fix) from None
        raise SpliceError(
            f"{name} option {key!r}: {err['msg']}", fix="see the method's docs"
        ) from None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def inject(
    model: nn.Module,
    method: str,
    targets: Sequence[str] | str,
    *,
    layers: Iterable[int] | None = None,
    modules_to_save: Sequence[str] = (),
    **config: Any,
) -> nn.Module:
    """Wrap the matched layers of ``model`` (in place) with ``method``'s adapters; returns it.

    Base parameters are frozen; adapter parameters and those of ``modules_to_save`` (e.g. a
    new classification head, matched like targets) train and are saved with the adapter.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model needs no special case).
        method: a registered method name (``splice.adapters.METHODS.names()``).
        targets: module-name suffixes (``["query", "value"]``) or one regex on full names.
        layers: keep only modules whose name carries one of these layer indices.
        modules_to_save: modules trained in full and saved alongside (name suffixes).
        **config: the method's hyperparameters (its ``Config`` model; unknown keys fail).

    Raises:
        SpliceError: unknown method/option, a target matching nothing, an unsupported layer,
            or a model that already has adapters.
    """
    if adapter_layers(model):
        raise SpliceError(
            "model already has adapters", fix="remove_adapters(model) before injecting again"
        )
    cls = METHODS.get(method)
    cfg = _config(cls, method, config)
    found = find_sites(model, targets, layers)
    for name, _, site in found:
        if site.kind not in cls.kinds:
            raise SpliceError(
                f"{method} does not support {site.kind} layers",
                where=name,
                fix=f"target {sorted(cls.kinds)} layers only",
            )
    save_names = [n for n, _ in model.named_modules() if n and _matcher(modules_to_save)(n)]
    if modules_to_save and not save_names:
        raise SpliceError(f"modules_to_save {list(modules_to_save)} match no module")
    sites = [site for _, _, site in found]
    adapters = cls().build(sites, cfg)
    record = _Record(
        method,
        cfg,
        targets if isinstance(targets, str) else list(targets),
        None if layers is None else sorted(layers),
        list(modules_to_save),
        [s.name for s in sites],
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for (name, module, _), adapter in zip(found, adapters, strict=True):
        device = module.weight.device
        layer = AdaptedLayer(module, adapter.to(device), record).train(module.training)
        _set_module(model, name, layer)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _record(model: nn.Module) -> tuple[_Record, dict[str, AdaptedLayer]]:
    layers = adapter_layers(model)
    if not layers:
        raise SpliceError("model has no adapters", fix="call splice.adapters.inject first")
    return next(iter(layers.values()))._record, layers


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Unique parameter counts (a pool shared by several layers counts once)."""
    params = list(model.parameters())
    return ParamCount(
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    )


def adapter_deltas(model: nn.Module) -> dict[str, Delta]:
    """ΔW of every adapted layer keyed by the base tensor name (``….query.weight``)."""
    return {f"{name}.weight": layer.delta() for name, layer in adapter_layers(model).items()}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (idempotent); forward then costs nothing extra."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def remove_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (with ΔW merged in if ``merge``, else as they were)."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(model, name, layer.base_layer)
    return model


def aux_loss(model: nn.Module) -> Tensor | None:
    """The method's auxiliary loss from the last training forward (MoLA balance, EPT task
    contrast), already weighted by its coefficient; ``None`` when the method has none."""
    record, layers = _record(model)
    adapters = [layer.adapter for layer in layers.values()]
    return METHODS.get(record.method)().aux_loss(adapters, record.config)


# Save / load -----------------------------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors (shared pools once, seeds and index maps included) + modules_to_save."""
    record, layers = _record(model)
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, layer in layers.items():
        tensors = [*layer.adapter.named_parameters(), *layer.adapter.named_buffers()]
        persistent = set(layer.adapter.state_dict(keep_vars=True))
        for key, t in tensors:
            if id(t) in seen or key not in persistent:
                continue
            seen.add(id(t))
            state[f"{name}.adapter.{key}"] = t.detach()
    for mod_name, module in model.named_modules():
        if mod_name and _matcher(record.modules_to_save)(mod_name):
            for key, t in module.state_dict().items():
                state[f"{mod_name}.{key}"] = t.detach()
    return state


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
        from ._peft import peft_files

        config, tensors = peft_files(model, record, base)
    elif format == "splice":
        config = {**record.to_json(), **base}
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
        from ._peft import read_peft

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
