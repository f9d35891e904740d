"""Attribution toolkit (splice.convert.attribution) against brute-force ablations."""

from __future__ import annotations

import torch
from torch import nn

from splice.convert.attribution import attribute, logit_lens, sensitivity, top_layers
from tests.convert.test_recursive import tiny_llama


def residual_after(model, ids, layer, edit=None):
    """The residual after ``layer`` (last position), with ``edit`` hooks installed."""
    handles = [] if edit is None else edit()
    seen = {}

    def grab(m, a, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0, -1]

    h = model.model.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=ids[None])
    finally:
        h.remove()
        for x in handles:
            x.remove()
    return seen["h"]


def zero_output(module):
    return lambda: [module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))]


def only_input(module, index):
    """Keep one coordinate of the module's input at the last position (others zeroed)."""

    def pre(m, args):
        x = torch.zeros_like(args[0])
        x[0, -1, index] = args[0][0, -1, index]
        return (x,)

    return lambda: [module.register_forward_pre_hook(pre)]


def test_scores_match_brute_force_ablation():
    model = tiny_llama(3, seed=4)
    ids, w = torch.tensor([3, 9, 27, 5, 11]), 7
    scores = attribute(model, ids, w)
    final = residual_after(model, ids, 2)
    lens = logit_lens(model, final)

    def ll(u):
        return lens(u[None])[0, w]

    for i, layer in enumerate(model.model.layers):
        full = residual_after(model, ids, i)
        no_ffn = residual_after(model, ids, i, zero_output(layer.mlp))  # = h_i + attn_i
        torch.testing.assert_close(scores.ffn[i], ll(full) - ll(no_ffn), atol=1e-5, rtol=1e-4)
        for n in (0, 17, 47):
            one = residual_after(model, ids, i, only_input(layer.mlp.down_proj, n))
            want = ll(one) - ll(no_ffn)
            torch.testing.assert_close(scores.neurons[i, n], want, atol=1e-5, rtol=1e-4)
        # attention: the residual before layer i is layer i-1's output (or the embedding)
        before = (
            residual_after(model, ids, i - 1) if i else model.model.embed_tokens(ids)[-1].detach()
        )
        torch.testing.assert_close(
            scores.attention[i], ll(no_ffn) - ll(before), atol=1e-5, rtol=1e-4
        )
        for j in (0, 5, 31):
            only = residual_after(
                model, ids, i,
                lambda j=j, layer=layer: zero_output(layer.mlp)()
                + only_input(layer.self_attn.o_proj, j)(),
            )  # fmt: skip
            want = ll(only) - ll(before)
            torch.testing.assert_close(scores.attention_dims[i, j], want, atol=1e-5, rtol=1e-4)
    assert scores.neurons.shape == (3, 48) and scores.attention_dims.shape == (3, 32)
    kept = top_layers(scores, 2)
    total = scores.attention + scores.ffn
    assert kept == sorted(kept) and min(total[kept]) >= max(
        total[[i for i in range(3) if i not in kept]]
    )


def test_sensitivity_equals_ablation_of_a_linear_loss():
    """For a loss linear in θ, zeroing θ_k changes it by exactly θ_k ∂L/∂θ_k."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    xs = [torch.randn(4) for _ in range(3)]

    def loss(model, x):
        return model(x).sum()

    scores = sensitivity(lin, loss, xs)["weight"]
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        brute = 0.0
        for x in xs:
            ablated = nn.Linear(4, 3, bias=False)
            with torch.no_grad():
                ablated.weight.copy_(lin.weight)
                ablated.weight[r, c] = 0
                brute += abs((loss(lin, x) - loss(ablated, x)).item())
        assert abs(scores[r, c].item() - brute) < 1e-5
