"""Prefix tuning (Li & Liang, 2021) in the unified view (He et al., ICLR 2022) — spec peft.md §16.

Every self-attention layer gets ``tokens`` = l learned keys and values ``P_k, P_v`` (l, kv_dim)
that each query also attends to: one head then computes
``(1−λ(x))·Attn(xW_q, CW_k, CW_v) + λ(x)·softmax(xW_q P_kᵀ) P_v`` — a gated adapter with
W_down = W_q P_kᵀ, f = softmax, W_up = P_v (tested numerically). They reach inside attention
through :class:`splice.adapters._attention.InputHook` (the backbone's key/value cache; BERT and
Llama attention); other attention classes are refused by name.

``prefix`` trains them through the MLP re-parametrisation ``Emb(l, kv) → Linear(kv, hidden) →
tanh → Linear(hidden, 2·L·kv)`` (one MLP for all L layers; peft's ``prefix_projection``);
saving materialises the prefixes and drops the MLP, so a saved ``prefix`` loads as
``prefix_nomlp``, which learns ``P_k, P_v`` directly. peft ``PREFIX_TUNING`` dirs load and are
written (``prompt_embeddings`` (l, 2·L·kv): per token, layer 0's key, value, layer 1's …);
as in peft, real tokens' positions start at l.
Trainable parameters: ``prefix_nomlp`` 2·l·kv per layer; ``prefix`` l·kv + kv·h + h + h·2Lkv +
2Lkv.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._attention import (
    AttentionSite,
    HookedAdapter,
    InputHook,
    attention_modules,
    attention_site,
    backbone_of,
)
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["PrefixAdapter", "PrefixConfig", "PrefixMLP", "load_peft_prefix"]


class PrefixConfig(MethodConfig):
    tokens: int = pydantic.Field(16, gt=0, description="prefix length l per layer")
    reparam: bool = pydantic.Field(True, description="train through the MLP (prefix)")
    hidden: int = pydantic.Field(800, gt=0, description="the MLP's hidden width")


class PrefixMLP(nn.Module):
    """``Emb(l, kv) → Linear(kv, h) → tanh → Linear(h, 2·L·kv)``: every layer's prefixes."""

    def __init__(self, tokens: int, kv_dim: int, layers: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(tokens, kv_dim))
        self.mlp = nn.Sequential(
            nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * layers * kv_dim)
        )

    def forward(self) -> Tensor:
        return self.mlp(self.embedding)


class PrefixAdapter(HookedAdapter):
    """One attention layer's prefix: its own ``keys``/``values``, or slice ``index`` of a
    shared :class:`PrefixMLP`'s output."""

    def __init__(self, site: AttentionSite, cfg: PrefixConfig, mlp: PrefixMLP | None, index: int):
        super().__init__(site)
        self.index = index
        if mlp is None:
            self.keys = nn.Parameter(torch.randn(cfg.tokens, site.kv_dim))
            self.values = nn.Parameter(torch.randn(cfg.tokens, site.kv_dim))
        else:
            self.mlp = mlp

    def kv(self, full: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """This layer's ``(P_k, P_v)``, each (l, kv_dim); ``full``: the MLP's output."""
        if not hasattr(self, "mlp"):
            return self.keys, self.values
        full = self.mlp() if full is None else full
        kv = self.site.kv_dim
        start = 2 * self.index * kv
        return full[:, start : start + kv], full[:, start + kv : start + 2 * kv]


def _heads(kv: Tensor, site: AttentionSite, batch: int, dtype: torch.dtype) -> Tensor:
    """(l, kv_dim) → (batch, heads, l, head_dim), the cache layout."""
    t = kv.to(dtype).view(kv.shape[0], site.heads, site.head_dim).transpose(0, 1)
    return t.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


class PrefixTuning(Method):
    """Prefix sites are the attention modules near the targets, grouped by backbone."""

    shares_model = False

    pretty_name = "Prefix tuning (MLP re-parametrised)"
    reference_url = "https://arxiv.org/abs/2101.00190"
    family = "additive"
    Config = PrefixConfig
    kinds = frozenset({"attention"})
    mergeable = False
    lowrank = False
    identity_at_init = False

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}  # site → backbone name

    def find(self, model: nn.Module, targets, layers, cfg) -> list[tuple[str, nn.Module, Any]]:
        from .parallel import _matched

        names = [n for n, _, _ in _matched(model, targets)]
        found = []
        for name, module in attention_modules(model, names):
            found.append((name, module, attention_site(name, module)))
        by_backbone: dict[str, list[AttentionSite]] = defaultdict(list)
        for name, _, site in found:
            backbone, _ = backbone_of(model, [name])
            by_backbone[backbone].append(site)
            self.groups[name] = backbone
        for backbone, sites in by_backbone.items():
            want = list(range(int(model.get_submodule(backbone).config.num_hidden_layers)))
            if sorted(s.layer for s in sites) != want or layers is not None:
                raise SpliceError(
                    f"prefix tuning covers every attention layer ({len(want)}); "
                    f"the targets give layers {sorted(s.layer for s in sites)}",
                    where=backbone or type(model).__name__,
                    fix="target all attention layers and leave out layers=",
                )
        return found

    def build(self, sites: list[AttentionSite], cfg: PrefixConfig) -> list[Adapter]:
        mlps: dict[str, PrefixMLP] = {}
        out: list[Adapter] = []
        for site in sites:
            group = self.groups.get(site.name, "")
            if cfg.reparam and group not in mlps:
                n = sum(self.groups.get(s.name, "") == group for s in sites)
                mlps[group] = PrefixMLP(cfg.tokens, site.kv_dim, n, cfg.hidden)
            out.append(PrefixAdapter(site, cfg, mlps.get(group), site.layer))
        return out

    def attached(self, model: nn.Module, adapters: list[Adapter], cfg: PrefixConfig) -> None:
        by_backbone: dict[str, list[PrefixAdapter]] = defaultdict(list)
        for a in adapters:
            if isinstance(a, PrefixAdapter):
                by_backbone[self.groups.get(a.site.name, "")].append(a)
        for name, group in by_backbone.items():
            backbone = model.get_submodule(name)
            group.sort(key=lambda a: a.site.layer)
            hook = InputHook(backbone, cfg.tokens, prefix=_prefix_fn(backbone, group))
            for a in group:
                a.hook = hook

    def num_parameters(self, sites: list[AttentionSite], cfg: PrefixConfig) -> int:
        if not cfg.reparam:
            return sum(2 * cfg.tokens * s.kv_dim for s in sites)
        groups: dict[str, list[AttentionSite]] = defaultdict(list)
        for s in sites:
            groups[self.groups.get(s.name, "")].append(s)
        total = 0
        for g in groups.values():
            kv, h, out = g[0].kv_dim, cfg.hidden, 2 * len(g) * g[0].kv_dim
            total += cfg.tokens * kv + kv * h + h + h * out + out
        return total

    def export(self, model, config, tensors):
        return materialise(model, config, tensors)

    def peft_files(self, model, base):
        return peft_prefix_files(model, base)


def _prefix_fn(backbone: nn.Module, group: list[PrefixAdapter]):
    dtype = next(backbone.parameters()).dtype

    def prefix(batch: int) -> list[tuple[Tensor, Tensor]]:
        mlp = getattr(group[0], "mlp", None)
        full = mlp() if mlp is not None else None
        out = []
        for a in group:
            k, v = a.kv(full)
            out.append((_heads(k, a.site, batch, dtype), _heads(v, a.site, batch, dtype)))
        return out

    return prefix


def _prefix_adapters(model: nn.Module) -> dict[str, PrefixAdapter]:
    from .inject import adapter_layers

    return {n: lay.adapter for n, lay in adapter_layers(model).items()
            if isinstance(lay.adapter, PrefixAdapter)}  # fmt: skip


def materialise(
    model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The saved form: every layer's ``keys``/``values`` computed, the MLP dropped."""
    if not config["config"].get("reparam"):
        return config, tensors
    tensors = {k: v for k, v in tensors.items() if ".adapter.mlp." not in k}
    with torch.no_grad():
        for name, adapter in _prefix_adapters(model).items():
            k, v = adapter.kv()
            tensors[f"{name}.adapter.keys"] = k.detach().float()
            tensors[f"{name}.adapter.values"] = v.detach().float()
    config = {**config, "config": {**config["config"], "reparam": False}}
    if config["method"] == "prefix":
        config["method"] = "prefix_nomlp"
    return config, tensors


@METHODS.register("prefix")
class Prefix(PrefixTuning):
    pass


# PEFT PREFIX_TUNING dirs -----------------------------------------------------------------------


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def peft_prefix_files(model: nn.Module, base: dict[str, Any]) -> tuple[dict, dict[str, Tensor]]:
    """``adapter_config.json`` and ``{"prompt_embeddings": (l, 2·L·kv)}`` of a prefix model."""
    adapters = sorted(_prefix_adapters(model).values(), key=lambda a: a.site.layer)
    groups = {a.hook.backbone for a in adapters if a.hook is not None}
    if len(groups) != 1:
        raise SpliceError("peft prefix dirs hold one transformers model's prefixes")
    with torch.no_grad():
        parts = [t.detach().float() for a in adapters for t in a.kv()]
    site = adapters[0].site
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": _task_type(model),
        "base_model_name_or_path": base.get("base_model"),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": parts[0].shape[0],
        "token_dim": site.kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": site.heads,
        "num_layers": len(adapters),
        "encoder_hidden_size": site.kv_dim,
        "prefix_projection": False,
    }
    if base.get("model_class"):
        config["auto_mapping"] = {"base_model_class": base["model_class"]}
    return config, {"prompt_embeddings": torch.cat(parts, dim=1).contiguous()}


def load_peft_prefix(model: nn.Module, path: Path) -> nn.Module:
    """Inject ``prefix_nomlp`` into ``model`` and fill it from a peft ``PREFIX_TUNING`` dir.

    Raises:
        SpliceError: an encoder-decoder dir, or sizes that differ from the model's layers.
    """
    from safetensors.torch import load_file

    from .inject import inject

    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise SpliceError(
            "num_transformer_submodules 2 (encoder-decoder prefixes) is not supported",
            where=str(path),
            fix="use a decoder-only or encoder-only model's prefix",
        )
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise SpliceError("no adapter_model.safetensors", where=str(path))
    emb = load_file(str(weights))["prompt_embeddings"]
    inject(model, "prefix_nomlp", ".*", tokens=int(cfg["num_virtual_tokens"]))
    adapters = sorted(_prefix_adapters(model).values(), key=lambda a: a.site.layer)
    site = adapters[0].site
    got = (cfg.get("num_layers"), cfg.get("token_dim"), cfg.get("num_attention_heads"))
    want = (len(adapters), site.kv_dim, site.heads)
    if got != want or emb.shape != (cfg["num_virtual_tokens"], 2 * len(adapters) * site.kv_dim):
        raise SpliceError(
            f"peft prefix (num_layers, token_dim, num_attention_heads) = {got} ≠ the model's "
            f"{want}",
            where=str(path),
            fix="load it into the base model it was trained on",
        )
    kv = site.kv_dim
    with torch.no_grad():
        for a in adapters:
            start = 2 * a.site.layer * kv
            a.keys.copy_(emb[:, start : start + kv])
            a.values.copy_(emb[:, start + kv : start + 2 * kv])
    return model
