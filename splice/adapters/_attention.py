"""Where the unified-view methods (spec peft.md §16) reach into a transformer.

Two things live here, shared by every method that needs them:

* **Sublayer layouts** — for each known transformer block class, the modules whose input is a
  sublayer's input and whose output is its output (before the residual add): BERT's
  ``attention.self.query`` → ``attention.output.dense`` and ``intermediate.dense`` →
  ``output.dense``; Llama's ``self_attn.q_proj`` → ``self_attn.o_proj`` and ``mlp.gate_proj`` →
  ``mlp.down_proj``. A parallel adapter adds at the out module from the input captured at the
  in module (:class:`InputTap`); a serial adapter adds at the out module from its output.
* **The input hook** (:class:`InputHook`) — one forward pre-hook on the ``transformers``
  backbone (``BertModel``, ``LlamaModel``) that adds ``n`` virtual positions in front of every
  sequence: it prepends ``n`` ones to the 2-D ``attention_mask`` and either passes per-layer
  prefix keys/values as the backbone's key/value cache (prefix tuning: the attention classes
  of :data:`PREFIX_ATTENTION` concatenate a cache's keys/values in front of their own, exactly
  what peft's ``PREFIX_TUNING`` relies on) or prepends prompt embeddings to the token
  embeddings (prompt tuning, P-tuning). Real tokens keep their order; their positions start at
  ``n`` as in peft. Any other attention class is refused with an error naming the module:
  a class that ignores the cache would silently drop the prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.deltas import Delta
from splice.errors import SpliceError

from .layer import Adapter

__all__ = [
    "BLOCKS",
    "PREFIX_ATTENTION",
    "AttentionSite",
    "HookedAdapter",
    "InputHook",
    "InputTap",
    "attention_modules",
    "backbone_of",
    "backbones_near",
    "sublayer_modules",
]

# block class → sublayer → (in module, out module), relative to the block
BLOCKS: dict[str, dict[str, tuple[str, str]]] = {
    "BertLayer": {
        "attn": ("attention.self.query", "attention.output.dense"),
        "ffn": ("intermediate.dense", "output.dense"),
    },
    "LlamaDecoderLayer": {
        "attn": ("self_attn.q_proj", "self_attn.o_proj"),
        "ffn": ("mlp.gate_proj", "mlp.down_proj"),
    },
}
# attention classes whose forward prepends a passed cache's keys/values to its own
PREFIX_ATTENTION = ("BertSelfAttention", "LlamaAttention")


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module as a prefix site: its key/value width and layer."""

    kind = "attention"
    takes_dropout = False

    name: str
    layer: int
    heads: int  # key/value heads (GQA: fewer than query heads)
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.heads * self.head_dim

    def weight(self, module: nn.Module) -> nn.Parameter:
        raise SpliceError(
            "an attention (prefix) site has no single ΔW to merge",
            where=self.name,
            fix="keep it unmerged (remove_adapters(model, merge=False) drops it)",
        )


def _related(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Modules at, above or under any of ``names`` (each once, in model order)."""
    names = list(names)

    def near(n: str) -> bool:
        return any(n == m or m.startswith(n + ".") or n.startswith(m + ".") for m in names)

    return [(n, m) for n, m in model.named_modules() if n and near(n)]


def _attention_like(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def attention_modules(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The self-attention modules at, above or under the matched ``names``.

    Raises:
        SpliceError: none is found, or one is of a class without the prefix hook (naming it).
    """
    found = [(n, m) for n, m in _related(model, names) if _attention_like(m)]
    innermost = [
        (n, m)
        for n, m in found
        if type(m).__name__ in PREFIX_ATTENTION or not any(o.startswith(n + ".") for o, _ in found)
    ]
    for n, m in innermost:
        if type(m).__name__ not in PREFIX_ATTENTION:
            raise SpliceError(
                f"{type(m).__name__} has no splice prefix hook",
                where=n,
                fix=f"prefix methods reach inside {', '.join(PREFIX_ATTENTION)} only",
            )
    hits = [(n, m) for n, m in innermost if type(m).__name__ in PREFIX_ATTENTION]
    if not hits:
        raise SpliceError(
            "no attention module at, above or under the targets",
            fix=f"target modules inside {', '.join(PREFIX_ATTENTION)} (e.g. 'query', 'q_proj')",
        )
    return hits


def attention_site(name: str, module: nn.Module) -> AttentionSite:
    cfg = module.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(module, "head_dim", None) or module.attention_head_size
    return AttentionSite(name, int(module.layer_idx or 0), int(heads), int(head_dim))


def sublayer_modules(
    model: nn.Module, names: Iterable[str], sublayer: str
) -> list[tuple[str, str]]:
    """``(in module, out module)`` names of ``sublayer`` ("attn"/"ffn") in every transformer
    block at, above or under the matched ``names``.

    Raises:
        SpliceError: no block of a known layout (:data:`BLOCKS`) is near the targets.
    """
    out = []
    for n, m in _related(model, names):
        layout = BLOCKS.get(type(m).__name__)
        if layout is not None:
            src, dst = layout[sublayer]
            out.append((f"{n}.{src}", f"{n}.{dst}"))
    if not out:
        classes = sorted({type(m).__name__ for _, m in _related(model, names)})[:4]
        raise SpliceError(
            f"no transformer block of a known layout near the targets (found {classes})",
            fix=f"sublayer='site' adapts the matched layers themselves; known: {sorted(BLOCKS)}",
        )
    return out


def backbone_of(model: nn.Module, inner: list[str]) -> tuple[str, nn.Module]:
    """The innermost ``transformers`` model holding every module of ``inner`` whose forward
    takes a key/value cache (``BertModel``, ``LlamaModel``), by name."""
    from transformers import PreTrainedModel

    best: tuple[str, nn.Module] | None = None
    for n, m in model.named_modules():
        if not isinstance(m, PreTrainedModel) or _cache_arg(m) is None:
            continue
        if all(n == "" or i.startswith(n + ".") for i in inner):
            best = (n, m)
    if best is None:
        raise SpliceError(
            "the attention modules sit in no transformers model that takes a key/value cache",
            where=inner[0],
            fix="inject into the transformers model (e.g. BertModel, LlamaForCausalLM)",
        )
    return best


def backbones_near(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The innermost ``transformers`` models taking a key/value cache at, above or under the
    matched ``names`` (a causal LM gives its ``LlamaModel``)."""
    from transformers import PreTrainedModel

    found = [(n, m) for n, m in _related(model, names) if isinstance(m, PreTrainedModel)]
    if isinstance(model, PreTrainedModel):
        found.insert(0, ("", model))
    found = [(n, m) for n, m in found if _cache_arg(m) is not None]

    def holds_another(n: str) -> bool:
        return any(o != n and (n == "" or o.startswith(n + ".")) for o, _ in found)

    inner = [(n, m) for n, m in found if not holds_another(n)]
    if not inner:
        raise SpliceError(
            "no transformers model that takes a key/value cache near the targets",
            fix="inject into a transformers model (e.g. BertModel, LlamaForCausalLM)",
        )
    return inner


def _cache_arg(module: nn.Module) -> str | None:
    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _given_cache(kw: dict[str, Any], arg: str | None) -> Any:
    """The key/value cache passed in (under its current or its deprecated name), or None."""
    return next((kw[k] for k in (arg, "past_key_values", "cache") if k and kw.get(k) is not None),
                None)  # fmt: skip


def _cached(kw: dict[str, Any], arg: str | None) -> bool:
    given = _given_cache(kw, arg)
    return given is not None and given.get_seq_length() > 0


class InputTap:
    """Keeps the last input of a module (a forward pre-hook) for a parallel adapter to read."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def take(self, name: str) -> Tensor:
        x, self.value = self.value, None
        if x is None:
            raise SpliceError(
                "the parallel adapter's input module did not run before it", where=name
            )
        return x


class InputHook:
    """``n`` virtual positions in front of every sequence of a ``transformers`` backbone.

    ``prefix(batch)`` returns every layer's ``(keys, values)``, each (batch, heads, n,
    head_dim), given as the backbone's cache; ``prompt(batch)`` returns (batch, n, hidden)
    embeddings put before the token embeddings. With ``strip``, outputs drop the virtual
    positions again (``last_hidden_state``/``logits`` line up with the input tokens).
    """

    def __init__(
        self,
        backbone: nn.Module,
        n: int,
        prefix: Callable[[int], list[tuple[Tensor, Tensor]]] | None = None,
        prompt: Callable[[int], Tensor] | None = None,
        strip: bool = False,
    ) -> None:
        self.n, self.prefix, self.prompt, self.strip = n, prefix, prompt, strip
        self.added = False  # this call put virtual positions in front (the output drops them)
        self.backbone = backbone
        self.signature = inspect.signature(backbone.forward)
        self.cache_arg = _cache_arg(backbone)
        self.handles = [backbone.register_forward_pre_hook(self._before, with_kwargs=True)]
        if strip:
            self.handles.append(backbone.register_forward_hook(self._after, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw: dict[str, Any] = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        kw.update(kw.pop("kwargs", {}))
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise SpliceError("a virtual-token adapter needs input_ids or inputs_embeds")
        batch, n = ref.shape[0], self.n
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise SpliceError(
                    f"a {mask.dim()}-D attention_mask cannot take virtual positions",
                    fix="pass the 2-D (batch, length) padding mask",
                )
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if self.prefix is not None:
            self._add_prefix(kw, batch)
        self.added = False
        if self.prompt is not None:
            self._add_prompt(module, kw, batch, ids, embeds)
        return (), kw

    def _add_prompt(self, module: nn.Module, kw: dict, batch: int, ids, embeds) -> None:
        n, pos = self.n, kw.get("position_ids")
        if _cached(kw, self.cache_arg):  # generation: the cache holds the prompt already
            if pos is not None:
                kw["position_ids"] = pos + n
            return
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)
        prompts = self.prompt(batch).to(embeds.dtype)
        kw["inputs_embeds"], kw["input_ids"] = torch.cat([prompts, embeds], dim=1), None
        self.added = True
        if kw.get("token_type_ids") is not None:
            tt = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
        if pos is not None:
            first = torch.arange(n, device=pos.device).expand(pos.shape[0], -1)
            kw["position_ids"] = torch.cat([first, pos + n], dim=1)
        if kw.get("cache_position") is not None:
            cp = kw["cache_position"]
            kw["cache_position"] = torch.arange(cp.numel() + n, device=cp.device)

    def _add_prefix(self, kw: dict[str, Any], batch: int) -> None:
        from transformers import DynamicCache

        given = _given_cache(kw, self.cache_arg)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + self.n
        if given is not None and given.get_seq_length() > 0:
            return  # generation: the cache already holds the prefix (and earlier tokens)
        kv = self.prefix(batch)
        if given is None:
            kw[self.cache_arg] = DynamicCache(kv)
            return
        for i, (k, v) in enumerate(kv):
            given.update(k, v, i)
        if kw.get("cache_position") is not None:  # generate's counter: shift it for good
            kw["cache_position"] += self.n

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not self.added:  # a generation step after the first: no virtual positions
            return out
        n = self.n
        for field in ("last_hidden_state", "logits"):
            value = getattr(out, field, None)
            if isinstance(value, Tensor):
                out[field] = value[:, n:]
        return out


class HookedAdapter(Adapter):
    """An adapter whose change enters through an :class:`InputHook` (prefix, prompt): the
    wrapped layer's output passes unchanged; nothing merges; ``detach`` removes the hook."""

    changes = "prefix tuning changes attention"  # why there is no ΔW, for the error

    def __init__(self, site: Any) -> None:
        super().__init__(site, 1.0)
        self.hook: InputHook | None = None

    def forward(self, x: Tensor, y: Any) -> Any:
        return y

    def delta(self) -> Delta:
        raise SpliceError(
            f"{self.changes}, so it has no single ΔW to merge",
            where=self.site.name,
            fix="keep it unmerged (remove_adapters(model, merge=False) drops it)",
        )

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
