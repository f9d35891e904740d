"""Attribution toolkit for cross-scale knowledge transfer (spec other.md §5.3 step A, §5.6).

Scores are log-probability increases of a target token ``w`` under the logit lens
``LL(u) = log_softmax(W_U (g ⊙ u / s))`` (``g``: the final RMSNorm weight, ``s``: the RMS of
the last layer's residual at the last position — the spec's [lib] choice; the released code
divides by the square root of its standard deviation). At the last position of one example:

- layer: attention ``A_i = LL(h_i + attn_i)[w] − LL(h_i)[w]``, FFN
  ``F_i = LL(m_i + ffn_i)[w] − LL(m_i)[w]`` (``h_i`` the layer's input, ``m_i = h_i + attn_i``);
- FFN neuron ``n``: ``LL(m_i + c_n W_down[:, n])[w] − LL(m_i)[w]`` (``c`` = the gated
  activation entering ``down_proj``);
- attention dim ``j`` (head × value dim): ``LL(h_i + z_j W_O[:, j])[w] − LL(h_i)[w]`` (``z`` =
  the heads' weighted values entering ``o_proj``).

:func:`sensitivity` is PostPKT's ``|θ ⊙ ∇_θ L|`` accumulated over examples. Works on
Llama-family HF causal LMs (``model.model.layers[i].self_attn.o_proj`` / ``.mlp.down_proj``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Attribution", "attribute", "sensitivity", "top_layers"]


@dataclass
class Attribution:
    """Per-layer scores: ``attention``/``ffn`` ``(L,)``, ``neurons`` ``(L, d_ff)``,
    ``attention_dims`` ``(L, heads·head_dim)``."""

    attention: Tensor
    ffn: Tensor
    neurons: Tensor
    attention_dims: Tensor


@torch.no_grad()
def attribute(model: nn.Module, ids: Tensor, target: int) -> Attribution:
    """Scores of every layer, FFN neuron and attention dim for predicting ``target`` after
    ``ids`` (a 1-D token tensor)."""
    layers = model.model.layers
    seen: dict[tuple[str, int], Tensor] = {}

    def keep(key: str, i: int, inputs: bool) -> Callable:
        def hook(module, args, out):
            value = args[0] if inputs else (out[0] if isinstance(out, tuple) else out)
            seen[key, i] = value[0, -1].detach().float()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_hook(keep("in", i, True)),
            layer.self_attn.register_forward_hook(keep("attn", i, False)),
            layer.mlp.register_forward_hook(keep("ffn", i, False)),
            layer.mlp.down_proj.register_forward_hook(keep("c", i, True)),
            layer.self_attn.o_proj.register_forward_hook(keep("z", i, True)),
        ]
    try:
        model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    n = len(layers) - 1  # the last layer's output residual (before the final norm)
    lens = logit_lens(model, seen["in", n] + seen["attn", n] + seen["ffn", n])
    att, ffn, neurons, dims = [], [], [], []
    for i, layer in enumerate(layers):
        h, a, f = seen["in", i], seen["attn", i], seen["ffn", i]
        mid = h + a
        base_h, base_mid = lens(h[None])[0, target], lens(mid[None])[0, target]
        att.append(lens(mid[None])[0, target] - base_h)
        ffn.append(lens((mid + f)[None])[0, target] - base_mid)
        w_down = layer.mlp.down_proj.weight.float()  # (d, d_ff)
        neurons.append(lens(mid + seen["c", i][:, None] * w_down.T)[:, target] - base_mid)
        w_o = layer.self_attn.o_proj.weight.float()
        dims.append(lens(h + seen["z", i][:, None] * w_o.T)[:, target] - base_h)
    return Attribution(torch.stack(att), torch.stack(ffn), torch.stack(neurons), torch.stack(dims))


def logit_lens(model: nn.Module, final_residual: Tensor) -> Callable[[Tensor], Tensor]:
    """``u (…, d)`` → log-probabilities ``LL(u)``, normalised by the RMS of ``final_residual``."""
    norm = model.model.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    scale = final_residual.pow(2).mean().add(eps).sqrt()
    w_u, g = model.get_output_embeddings().weight.float(), norm.weight.float()
    return lambda u: torch.log_softmax((g * u / scale) @ w_u.T, dim=-1)


def top_layers(scores: Attribution, n: int) -> list[int]:
    """The ``n`` layers of largest ``attention + ffn`` score, in layer order."""
    total = scores.attention + scores.ffn
    return sorted(total.topk(n).indices.tolist())


def sensitivity(
    model: nn.Module,
    loss: Callable[[nn.Module, object], Tensor],
    examples: Iterable[object],
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """``Σ_examples |θ ⊙ ∇_θ loss(model, example)|`` for the named parameters (default all)."""
    params = dict(model.named_parameters())
    chosen = {n: params[n] for n in (names or params)}
    total = {n: torch.zeros_like(p) for n, p in chosen.items()}
    for example in examples:
        grads = torch.autograd.grad(loss(model, example), list(chosen.values()), allow_unused=True)
        for (n, p), g in zip(chosen.items(), grads, strict=True):
            if g is not None:
                total[n] += (p.detach() * g).abs()
    return total
