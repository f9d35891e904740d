"""OFT specifics: the Cayley blocks are orthogonal, the Neumann series approximates them as
peft does, COFT keeps Q in its ball, and the forward rotates the input."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.adapters import inject
from splice.errors import SpliceError

from .conftest import make_model, perturb

CONTRACT_CASES = {  # for test_contract.py
    "oft": dict(block_size=4),
    "oft_exact_shared": dict(block_size=2, neumann=False, block_share=True),
    "coft": dict(block_size=4, constrained=True, eps=1.0),
}


def _adapter(**options):
    model, x = make_model("linear")
    inject(model, "oft", ["proj"], **options)
    perturb(model, std=0.05)
    return model, x, model.layers[0]["proj"]


def test_exact_cayley_is_orthogonal_and_neumann_is_its_series():
    _, _, layer = _adapter(block_size=4, neumann=False)
    r = layer.adapter.rotation().detach()
    eye = torch.eye(4).expand_as(r)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-6)
    q = layer.adapter._skew(layer.adapter.oft_R.detach())
    series = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    layer.adapter.cfg = layer.adapter.cfg.model_copy(update={"neumann": True})
    assert torch.allclose(layer.adapter.rotation().detach(), series, atol=1e-6)


def test_forward_is_the_base_layer_on_the_rotated_input_and_merges_to_w_rt():
    _, x, layer = _adapter(block_size=4)
    r = torch.block_diag(*layer.adapter.rotation().detach())
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base_layer(x @ r), atol=1e-6)
        merged = copy.deepcopy(layer.base_layer)
        merged.weight.copy_(layer.weight @ r.t())
        assert torch.allclose(layer(x), merged(x), atol=1e-6)


def test_coft_projects_q_into_its_ball():
    _, _, layer = _adapter(block_size=4, constrained=True, eps=1e-3, neumann=False)
    r = layer.adapter.rotation().detach()
    eye = torch.eye(4).expand_as(r)
    q = torch.linalg.solve(eye + r, eye - r)  # the Cayley transform is its own inverse
    assert torch.allclose(q.norm(dim=(1, 2)), torch.full((2,), 1e-3 / 2**0.5), rtol=1e-3)


def test_block_size_must_divide_the_input():
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="block_size=3 is not ≥ 2 or does not divide the input"):
        inject(model, "oft", ["proj"], block_size=3)


def test_rotation_backward_matches_einsum_and_keeps_only_x_and_r():
    from splice.adapters.oft import _BlockRotate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_BlockRotate.apply, (x, r))
    # against the definition x_rot[..., k, :] = x[..., k, :] @ R[k] with autograd's backward
    up = torch.randn(3, 5, 12, dtype=torch.float64, generator=g)
    ref = torch.einsum("...rk,rkc->...rc", x.reshape(3, 5, 3, 4), r).reshape(3, 5, 12)
    want = torch.autograd.grad((ref * up).sum(), (x, r))
    got = torch.autograd.grad((_BlockRotate.apply(x, r) * up).sum(), (x, r))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # one shared block expanded over the input (block_share) gets the summed gradient
    one = r[:1].detach().clone().requires_grad_(True)
    (_BlockRotate.apply(x, one.expand(3, -1, -1)) * up).sum().backward()
    ref = torch.einsum("...rk,kc->...rc", x.reshape(3, 5, 3, 4), one[0]).reshape(3, 5, 12)
    torch.testing.assert_close(one.grad[0], torch.autograd.grad((ref * up).sum(), one)[0][0])
    # what the forward keeps: x itself and the blocks, no permuted copy of x
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _BlockRotate.apply(x, r)
    assert len(saved) == 2 and saved[0].data_ptr() == x.data_ptr()


def test_query_and_value_keep_one_copy_of_their_shared_input():
    model, x = make_model("linear")
    inject(model, "oft", ["proj"], block_size=4)
    layer = model.layers[0]["proj"]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x), layer(x)  # two adapted layers reading the same input
    inputs = [t for t in saved if t.shape == x.shape]
    assert {t.data_ptr() for t in inputs} == {x.data_ptr()}


def test_rotated_linear_is_the_layer_on_the_rotated_input_with_its_gradients():
    from splice.adapters.oft import _RotatedLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64, generator=g)
    b = torch.randn(7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x, r: _RotatedLinear.apply(x, r, w, b), (x, r))
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=g)
    rotated = torch.einsum("...rk,rkc->...rc", x.reshape(3, 5, 3, 4), r).reshape(3, 5, 12)
    ref = torch.nn.functional.linear(rotated, w, b)
    got = _RotatedLinear.apply(x, r, w, b)
    torch.testing.assert_close(got, ref)
    want = torch.autograd.grad((ref * up).sum(), (x, r))
    for a, c in zip(torch.autograd.grad((got * up).sum(), (x, r)), want, strict=True):
        torch.testing.assert_close(a, c)
    # an input that needs no gradient (the first adapted layer's) gets none, R's is the same
    only_r = torch.autograd.grad((_RotatedLinear.apply(x.detach(), r, w, b) * up).sum(), r)
    torch.testing.assert_close(only_r[0], want[1])


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
@pytest.mark.parametrize("tokens", [12, 4])  # W rotated from d_out = 12 tokens on, x below
def test_fused_layer_equals_the_rotation_then_the_layer(kind, tokens):
    model, _ = make_model(kind)
    inject(model, "oft", ["proj"], block_size=4)
    perturb(model, std=0.05)
    layer = model.layers[0]["proj"]
    x = torch.randn(2, tokens // 2, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    fused = type(out.grad_fn).__name__.startswith("_RotatedLinear")
    assert fused == (tokens >= 12)
    # either way: x, R and the layer's own weight are kept, no rotated copy of the input
    assert any(t.data_ptr() == layer.base_layer.weight.data_ptr() for t in saved)
    assert [t for t in saved if t.shape == x.shape and t.data_ptr() != x.data_ptr()] == []
    r = torch.block_diag(*layer.adapter.rotation())
    ref = layer.base_layer(x @ r)
    torch.testing.assert_close(out, ref)
    up = torch.randn(out.shape)
    params = (x, layer.adapter.oft_R)
    want = torch.autograd.grad((ref * up).sum(), params)
    for a, c in zip(torch.autograd.grad((out * up).sum(), params), want, strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6])
def test_neumann_blocks_equal_peft_for_every_number_of_terms(terms):
    from peft.tuners.oft.layer import OFTRotationModule

    _, _, layer = _adapter(block_size=4, neumann_terms=terms)
    vec = layer.adapter.oft_R.detach()
    theirs = OFTRotationModule(vec.shape[0], vec.shape[1], 4, 8)._cayley_batch(vec, 4, True, terms)
    torch.testing.assert_close(layer.adapter.rotation().detach(), theirs)
