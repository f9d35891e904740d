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
