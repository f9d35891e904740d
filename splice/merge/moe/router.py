"""Router initialization: one gate vector per expert per layer, from prompts.

- ``hidden``: runs the base model on each expert's prompts and takes, at every layer, the
  hidden state entering that layer at the last real (non-padding) token, averaged over the
  prompts; negative prompts are subtracted; each vector is normalized (mergekit takes the
  last position, padding included — here padding never counts).
- ``cheap_embed``: the normalized sum of the prompts' token embeddings, the same for every
  layer (no forward pass).
- ``random``: N(0, 1) rows (a router to train; mergekit-moe's ``random``), seeded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError

__all__ = ["gate_vectors"]


def _tokenize(tok: Any, prompts: list[str]) -> dict[str, Tensor]:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.bos_token
    return tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def gate_vectors(
    mode: str,
    base_dir: str,
    experts: list[Any],
    num_layers: int,
    hidden: int,
    embed: Tensor | None,
    seed: int = 0,
) -> Tensor:
    """``(num_layers, len(experts), hidden)`` gate weights (see module docstring)."""
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn((num_layers, len(experts), hidden), generator=g)
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    except Exception as e:  # transformers raises many types for a missing tokenizer
        raise SpliceError(
            f"gate_mode {mode} needs the base's tokenizer: {str(e).splitlines()[0][:120]}",
            where=base_dir,
        ) from None
    if mode == "cheap_embed":
        assert embed is not None

        def vec(prompts: list[str]) -> Tensor:
            t = _tokenize(tok, prompts)
            h = embed.float()[t["input_ids"]] * t["attention_mask"].unsqueeze(-1)
            return _unit(h.sum(dim=(0, 1))).expand(num_layers, hidden)

    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.eval()

        def vec(prompts: list[str]) -> Tensor:
            t = _tokenize(tok, prompts)
            with torch.no_grad():
                out = model(**t, output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1])  # (layers, batch, seq, hidden)
            last = t["attention_mask"].sum(1) - 1
            picked = states[:, torch.arange(states.shape[1]), last]  # (layers, batch, hidden)
            return picked.mean(1)

    rows = []
    for e in experts:
        v = vec(e.positive_prompts)
        if e.negative_prompts:
            v = v - vec(e.negative_prompts)
        rows.append(_unit(v))
    return torch.stack(rows, dim=1)
