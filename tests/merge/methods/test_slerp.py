"""SLERP against the spherical interpolation formula, in float64 scalars."""

from __future__ import annotations

import math

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts
from tests.merge._ckpt import finetune, tiny_llama


def _reference(t, a, b):
    x, y = a.double().flatten().tolist(), b.double().flatten().tolist()
    na, nb = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    dot = sum(p * q for p, q in zip(x, y, strict=True)) / (na * nb)
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        om = math.acos(dot)
        ca, cb = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return torch.tensor([ca * p + cb * q for p, q in zip(x, y, strict=True)]).reshape(a.shape)


@pytest.fixture(scope="module")
def pair():
    base = tiny_llama(0)
    return base, tiny_llama(7)  # unrelated weights: a wide angle


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_matches_the_formula(pair, t):
    base, other = pair
    got = merge_state_dicts("slerp", [other], base=base, params={"t": t})
    for n, b in base.items():
        if b.is_floating_point():
            torch.testing.assert_close(
                got[n], _reference(t, b, other[n]).float(), atol=1e-6, rtol=0
            )


def test_nearly_parallel_tensors_interpolate_linearly(pair):
    base, _ = pair
    close = finetune(base, 0, scale=1e-4)
    got = merge_state_dicts("slerp", [close], base=base, params={"t": 0.25})
    n = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[n], 0.75 * base[n] + 0.25 * close[n], atol=1e-7, rtol=0)


def test_filtered_gradient_t_like_mergekit(pair):
    base, other = pair
    t = [{"filter": "self_attn", "value": {"gradient": [0, 1]}}, {"value": 0.5}]
    got = merge_state_dicts("slerp", [other], base=base, params={"t": t})
    q0, q2 = "model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(got[q0], base[q0])
    torch.testing.assert_close(got[q2], other[q2], atol=1e-6, rtol=0)
    up = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(
        got[up], _reference(0.5, base[up], other[up]).float(), atol=1e-6, rtol=0
    )


def test_needs_exactly_one_other_model(pair):
    base, other = pair
    with pytest.raises(SpliceError, match="exactly 1"):
        merge_state_dicts("slerp", [other, other], base=base)
