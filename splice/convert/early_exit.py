"""Greedy generation from a recursive model with continuous depth-wise batching and early
exit (spec peft.md §8, "Continuous depth-wise batching + early exit").

Every tick runs the K shared layers once on all unfinished rows, each row in its own loop:
row ``i`` at loop ``b_i`` runs depths ``b_i·K … b_i·K+K−1`` with its loop's LoRA residuals
(per-row adapter indices, :class:`splice.convert.LoopLoRALinear`) and its depths' norms. After
a loop the shared head reads the row's state; the row emits its token when it finished the
last loop, or earlier when the head's top probability reaches ``threshold``. An exited token
still needs keys and values at the deeper depths for later tokens to attend to: they are
computed from its exit state by each deeper depth's normed k/v projections (state
propagation, as in CALM; the spec leaves this open — [recon]). The emitting row starts its
next token at loop 0 in the next tick, beside rows still deep in theirs.

Each row keeps one KV cache per depth (prefilled by a full-depth pass over its prompt).
With ``threshold > 1`` nothing exits early and the tokens equal plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from splice.convert.modeling_recursive import RecursiveLlamaForCausalLM, rms_norm

__all__ = ["ExitStats", "generate_early_exit"]


@dataclass
class ExitStats:
    """Tokens emitted after each loop (index = loop; prompt-prefill tokens count as the last
    loop's), the ticks (shared-block runs) taken, and the ticks whose rows sat at different
    loops."""

    exits: list[int] = field(default_factory=list)
    ticks: int = 0
    mixed_ticks: int = 0

    @property
    def mean_loops(self) -> float:
        n = sum(self.exits)
        return sum((b + 1) * c for b, c in enumerate(self.exits)) / n if n else 0.0


@torch.inference_mode()
def generate_early_exit(
    model: RecursiveLlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    threshold: float = 1.1,
    eos: int | None = None,
) -> tuple[list[list[int]], ExitStats]:
    """Greedy continuations (new tokens only) of each prompt, and the exit statistics."""
    m, cfg = model.model, model.config
    k, loops, n = cfg.num_shared_layers, cfg.num_loops, cfg.num_hidden_layers
    rows = len(prompts)
    longest = max(len(p) for p in prompts) + max_new_tokens
    dev = m.embed_tokens.weight.device
    shape = (n, rows, cfg.num_key_value_heads, longest, cfg.head_dim)
    keys = torch.zeros(shape, device=dev, dtype=m.embed_tokens.weight.dtype)
    values = torch.zeros_like(keys)
    stats = ExitStats(exits=[0] * loops)
    out: list[list[int]] = [[] for _ in range(rows)]
    for i, prompt in enumerate(prompts):  # prefill: every depth, no early exit
        tok = _prefill(model, list(prompt), i, keys, values)
        out[i].append(tok)
        stats.exits[-1] += 1
    pos = torch.tensor([len(p) for p in prompts], device=dev)  # position of the token in flight
    loop = torch.zeros(rows, dtype=torch.long, device=dev)
    h = m.embed_tokens(torch.tensor([o[-1] for o in out], device=dev))[:, None]
    live = torch.tensor([not _done(o, max_new_tokens, eos) for o in out], device=dev)
    steps = torch.arange(longest, device=dev)
    while bool(live.any()):
        idx = live.nonzero()[:, 0]
        x, p, b = h[idx], pos[idx], loop[idx]
        cos, sin = m.rotary_emb(x, p[:, None])
        mask = (steps[None, :] <= p[:, None])[:, None, None, :]
        for j in range(k):
            depth = b * k + j
            x = _tick_depth(m, x, depth, idx, p, cos, sin, mask, keys, values)
        stats.ticks += 1
        stats.mixed_ticks += int(bool((b != b[0]).any()))
        logits = model.logits_at(x)[:, 0].float()
        conf = logits.softmax(-1).amax(-1)
        emit = (b == loops - 1) | (conf >= threshold)
        h[idx] = x
        loop[idx] = b + 1
        if bool(emit.any()):
            e = idx[emit]
            _propagate(m, x[emit], b[emit], e, pos[e], keys, values)
            toks = logits[emit].argmax(-1)
            for row, tok, depth in zip(e.tolist(), toks.tolist(), b[emit].tolist(), strict=True):
                out[row].append(tok)
                stats.exits[depth] += 1
                live[row] = not _done(out[row], max_new_tokens, eos)
            h[e] = m.embed_tokens(toks)[:, None]
            pos[e] += 1
            loop[e] = 0
    return out, stats


def _done(tokens: list[int], max_new: int, eos: int | None) -> bool:
    return len(tokens) >= max_new or (eos is not None and tokens[-1] == eos)


def _prefill(
    model: RecursiveLlamaForCausalLM, prompt: list[int], row: int, keys: Tensor, values: Tensor
) -> int:
    """Run the prompt through every depth, filling row ``row``'s caches; the first new token."""
    m, t = model.model, len(prompt)
    h = m.embed_tokens(torch.tensor([prompt], device=keys.device))
    cos, sin = m.rotary_emb(h, torch.arange(t, device=h.device)[None])
    mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None, None]
    for depth in range(model.config.num_hidden_layers):
        h, k, v = m.block(h, depth, cos, sin, mask)
        keys[depth, row, :, :t], values[depth, row, :, :t] = k[0], v[0]
    return int(model.logits_at(h[:, -1]).argmax(-1))


def _tick_depth(m, x, depth, rows, pos, cos, sin, mask, keys, values) -> Tensor:
    """One depth per row (all ≡ j mod K): cache this token's k/v, attend over the row's."""

    def store(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys[depth, rows, :, pos] = k[:, :, 0]
        values[depth, rows, :, pos] = v[:, :, 0]
        return keys[depth, rows], values[depth, rows]

    return m.block(x, depth, cos, sin, mask, store)[0]


def _propagate(m, x: Tensor, done: Tensor, rows: Tensor, pos: Tensor, keys, values) -> None:
    """Fill the deeper depths' k/v of exited tokens from their exit states ``x``."""
    k_shared = m.config.num_shared_layers
    first = (done + 1) * k_shared  # first depth each exited row skipped
    cos, sin = m.rotary_emb(x, pos[:, None])
    for depth in range(int(first.min()), m.config.num_hidden_layers):
        need = first <= depth
        if not bool(need.any()):
            continue
        sel = need.nonzero()[:, 0]
        layer, loop = m.layers[depth % k_shared], depth // k_shared
        normed = rms_norm(x[sel], m.input_norms[m.norm_index(depth)], m.config.rms_norm_eps)
        k, v = layer.kv(normed, loop, cos[sel], sin[sel])
        keys[depth, rows[sel], :, pos[sel]] = k[:, :, 0]
        values[depth, rows[sel], :, pos[sel]] = v[:, :, 0]
