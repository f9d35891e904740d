"""A recursive Llama: K shared decoder layers looped B = N/K times (spec peft.md §8).

This file is the model's HF modeling code. :func:`splice.convert.save_recursive` copies it
next to the weights (``config.json`` carries an ``auto_map``), so a converted directory loads
with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` where splice is not
installed; inside splice (``import splice.convert``) the classes are registered with the Auto
classes and no remote code is needed. It therefore imports only torch and transformers.

Depth ``ℓ`` (0-based, ``ℓ < N``) runs shared layer ``ℓ mod K`` (CYCLE tying) in loop
``b = ℓ // K``. Every linear of a shared layer is a :class:`LoopLoRALinear`: the shared matrix
``W'`` plus, per loop ``b``, a low-rank residual ``B_b A_b`` (the relaxation; no α/r scale).
Its loop index may be one int for the whole batch or one per row — rows at different loop
depths in one batch (continuous depth-wise batching) gather their own residuals. RMSNorm
weights are private per depth unless ``private_norms`` is off (then tied like the linears).

The forward pass returns the last loop's logits; with ``labels`` the loss adds
``exit_loss_weight`` × the mean loss of the shared head applied after each earlier loop
(the intermediate-exit losses that train early exit). It keeps a KV cache
(``cache``, or ``past_key_values``: a ``transformers`` ``Cache``) with one cache layer per
*depth*, not per shared layer: shared layer ``j`` runs at depths ``j, j+K, …`` on different
inputs, so each loop caches its own keys and values (cache layer ``ℓ`` = depth ``ℓ``, N in
all — ``DynamicCache(config=config)`` sizes itself from ``num_hidden_layers`` = N). With the
cache the model is a ``GenerationMixin``: ``model.generate()`` works, and so does
:class:`splice.decode.lm.CachedLM` (speculative decoding's rollback crops every depth's
layer alike). Early-exit decoding, where tokens leave at different loops, is
:func:`splice.convert.generate_early_exit` (its own per-depth caches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

__all__ = [
    "ATTENTION",
    "MLP",
    "LoopLoRALinear",
    "RecursiveLlamaConfig",
    "RecursiveLlamaForCausalLM",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@strict
class RecursiveLlamaConfig(LlamaConfig):
    """A Llama config plus the tying: ``num_hidden_layers`` is the depth N (loops × K).

    ``lora_rank``: 0 = no relaxation, -1 = full rank (``min(d_in, d_out)`` per linear).
    """

    model_type = "splice_recursive_llama"
    num_shared_layers: int = 1
    lora_rank: int = 0
    private_norms: bool = True
    exit_loss_weight: float = 0.0

    @property
    def num_loops(self) -> int:
        return self.num_hidden_layers // self.num_shared_layers


class LoopLoRALinear(nn.Module):
    """``y = x W'ᵀ + (x A_bᵀ) B_bᵀ`` for loop ``b`` (an int, or a LongTensor with one per row)."""

    def __init__(self, d_in: int, d_out: int, loops: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.rank = min(d_in, d_out) if rank < 0 else rank
        if self.rank:
            self.lora_A = nn.Parameter(torch.zeros(loops, self.rank, d_in))
            self.lora_B = nn.Parameter(torch.zeros(loops, d_out, self.rank))

    def forward(self, x: Tensor, loop: int | Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if not self.rank:
            return y
        if isinstance(loop, int):
            return y + F.linear(F.linear(x, self.lora_A[loop]), self.lora_B[loop])
        low = torch.einsum("bti,bri->btr", x, self.lora_A[loop])  # per-row residuals
        return y + torch.einsum("btr,bor->bto", low, self.lora_B[loop])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm (in fp32); ``weight`` is ``(d,)`` or one row per batch row ``(b, d)``."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    w = weight if weight.dim() == 1 else weight[:, None, :]
    return w * x.to(dtype)


class SharedLayer(nn.Module):
    """One shared Llama decoder layer whose linears carry per-loop residuals."""

    def __init__(self, config: RecursiveLlamaConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        loops, r, ff = config.num_loops, config.lora_rank, config.intermediate_size
        shapes = {
            "q_proj": (d, self.heads * hd),
            "k_proj": (d, self.kv_heads * hd),
            "v_proj": (d, self.kv_heads * hd),
            "o_proj": (self.heads * hd, d),
            "gate_proj": (d, ff),
            "up_proj": (d, ff),
            "down_proj": (ff, d),
        }
        self.self_attn = nn.ModuleDict({n: LoopLoRALinear(*shapes[n], loops, r) for n in ATTENTION})
        self.mlp = nn.ModuleDict({n: LoopLoRALinear(*shapes[n], loops, r) for n in MLP})

    def kv(self, x: Tensor, loop: int | Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (rotated) and values ``(b, kv_heads, t, hd)`` of the normed input ``x``."""
        b, t, _ = x.shape
        k = self.self_attn["k_proj"](x, loop).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.self_attn["v_proj"](x, loop).view(b, t, self.kv_heads, -1).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def attend(
        self,
        x: Tensor,
        loop: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """Attention output of the normed queries ``x`` over ``keys``/``values``; ``mask``
        (bool, True = attend) broadcasts to ``(b, heads, t, T)``."""
        b, t, _ = x.shape
        q = self.self_attn["q_proj"](x, loop).view(b, t, self.heads, -1).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        rep = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.self_attn["o_proj"](out.transpose(1, 2).reshape(b, t, -1), loop)

    def ffn(self, x: Tensor, loop: int | Tensor) -> Tensor:
        mlp = self.mlp
        return mlp["down_proj"](F.silu(mlp["gate_proj"](x, loop)) * mlp["up_proj"](x, loop), loop)


class RecursiveLlamaModel(nn.Module):
    """Embeddings, the K shared layers, the per-depth (or shared) norms and the final norm."""

    def __init__(self, config: RecursiveLlamaConfig) -> None:
        super().__init__()
        self.config = config
        d, n = config.hidden_size, config.num_hidden_layers
        norms = n if config.private_norms else config.num_shared_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, d, config.pad_token_id)
        self.layers = nn.ModuleList(SharedLayer(config) for _ in range(config.num_shared_layers))
        self.input_norms = nn.Parameter(torch.ones(norms, d))
        self.post_norms = nn.Parameter(torch.ones(norms, d))
        self.norm = nn.Parameter(torch.ones(d))
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def norm_index(self, depth: int | Tensor) -> int | Tensor:
        return depth if self.config.private_norms else depth % self.config.num_shared_layers

    def block(
        self,
        h: Tensor,
        depth: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        store: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run depth ``depth`` (per row if a tensor) on ``h``; returns ``(h, keys, values)`` of
        this step. ``store(k, v)``, if given, caches them and returns the keys/values to
        attend over (the cache's)."""
        k_shared = self.config.num_shared_layers
        if isinstance(depth, int):
            layer, loop = self.layers[depth % k_shared], depth // k_shared
        else:  # rows at different depths must share the layer: same depth mod K
            layer, loop = self.layers[int(depth[0]) % k_shared], depth // k_shared
        eps, at = self.config.rms_norm_eps, self.norm_index(depth)
        x = rms_norm(h, self.input_norms[at], eps)
        k, v = layer.kv(x, loop, cos, sin)
        keys, values = (k, v) if store is None else store(k, v)
        h = h + layer.attend(x, loop, cos, sin, keys, values, mask)
        h = h + layer.ffn(rms_norm(h, self.post_norms[at], eps), loop)
        return h, k, v

    def final_norm(self, h: Tensor) -> Tensor:
        return rms_norm(h, self.norm, self.config.rms_norm_eps)


class RecursiveLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    """The recursive causal LM; the head is tied to the embeddings when the config says so."""

    config_class = RecursiveLlamaConfig
    config: RecursiveLlamaConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RecursiveLlamaConfig) -> None:
        super().__init__(config)
        self.model = RecursiveLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, LoopLoRALinear):
            nn.init.normal_(module.weight, std=std)
            if module.rank:
                nn.init.zeros_(module.lora_A)
                nn.init.zeros_(module.lora_B)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RecursiveLlamaModel):
            for p in (module.input_norms, module.post_norms, module.norm):
                nn.init.ones_(p)
        else:  # the rotary embedding's (non-persistent) inverse frequencies
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def hidden_states_per_loop(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        position_ids: Tensor | None = None,
    ) -> list[Tensor]:
        """The (un-normed) hidden states after each loop, last loop last. With ``cache``, the
        tokens follow the ``cache.get_seq_length()`` cached ones, whose keys/values they
        attend to, and their own are appended (depth ``ℓ`` in cache layer ``ℓ``);
        ``attention_mask`` then covers cached + new tokens."""
        m, (b, t) = self.model, input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        h = m.embed_tokens(input_ids)
        dev = h.device
        here = torch.arange(past, past + t, device=dev)
        pos = here[None].expand(b, t) if position_ids is None else position_ids
        cos, sin = m.rotary_emb(h, pos)
        keys = torch.arange(past + t, device=dev)
        mask = (keys[None, :] <= here[:, None])[None, None]  # (1, 1, t, T): causal
        if attention_mask is not None:
            if attention_mask.shape[-1] != past + t:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} tokens; the cache holds "
                    f"{past} and the input {t}: pass the mask of all {past + t}"
                )
            mask = mask & attention_mask.bool()[:, None, None, :]
            mask = mask | (keys[None, :] == here[:, None])  # no all-masked rows
        outs, k_shared = [], self.config.num_shared_layers
        for depth in range(self.config.num_hidden_layers):
            store = None if cache is None else _store(cache, depth)
            h = m.block(h, depth, cos, sin, mask, store)[0]
            if depth % k_shared == k_shared - 1:
                outs.append(h)
        return outs

    def logits_at(self, h: Tensor) -> Tensor:
        """The shared head: final norm, then the LM head."""
        return self.lm_head(self.model.final_norm(h))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        """``cache`` (or ``past_key_values``, its name before transformers 5.x) is extended
        in place and returned as ``.cache``; ``use_cache`` (default: the config's, off in
        training) starts one when none is given. ``logits_to_keep`` > 0: logits of the last
        that many positions only."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", False)) and not self.training
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        states = self.hidden_states_per_loop(input_ids, attention_mask, cache, position_ids)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.logits_at(states[-1][:, keep])
        loss = None
        if labels is not None:
            loss = _lm_loss(logits, labels)
            w = self.config.exit_loss_weight
            if w > 0 and len(states) > 1:
                early = [_lm_loss(self.logits_at(s), labels) for s in states[:-1]]
                loss = loss + w * torch.stack(early).mean()
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def _store(cache: Cache, depth: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Append one depth's keys/values to its own cache layer; the layer's keys/values."""
    return lambda k, v: cache.update(k, v, depth)


def _lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


RecursiveLlamaConfig.register_for_auto_class()
RecursiveLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
