"""Width families built from scratch for μP studies (other.md §8.4): an MLP and a small GPT.

Both keep their blocks in ``layers`` (so :mod:`splice.probe` hooks them) and end in a plain
``readout`` Linear, which :func:`splice.analysis.mup.wrap` recognises. The GPT's attention
scale is ``1/√d_head`` under SP and ``√base_head / d_head`` under μP (the ``1/d_head`` rule,
equal to SP at the base width); ``attn_mult`` multiplies either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GPT", "MLP"]


class MLP(nn.Module):
    """``in → width (ReLU) × depth → out``: an input Linear, ``depth − 1`` hidden blocks."""

    def __init__(self, d_in: int, width: int, d_out: int, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.readout = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.embed(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.readout(h)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, scale: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, scale
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, t, d_head]
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small causal LM: token + position embeddings, pre-norm blocks, an untied readout."""

    def __init__(
        self,
        vocab: int,
        width: int,
        *,
        depth: int = 2,
        heads: int = 4,
        context: int = 64,
        attention: str = "sp",
        base_width: int | None = None,
        attn_mult: float = 1.0,
    ) -> None:
        super().__init__()
        d_head = width // heads
        if attention == "mup":
            base_head = (base_width or width) // heads
            scale = attn_mult * math.sqrt(base_head) / d_head
        else:
            scale = attn_mult / math.sqrt(d_head)
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.layers = nn.ModuleList(_Block(width, heads, scale) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.layers:
            x = block(x)
        return self.readout(self.ln(x))
