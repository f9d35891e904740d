"""MoS (spec §2): shard pools, static index maps and the four differentiation strategies."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import adapter_layers, inject, trainable_parameters
from splice.errors import SpliceError

from .conftest import N_LAYERS, make_model, perturb

CONTRACT_CASES = {  # configurations the contract battery (test_contract.py) runs
    "mos": dict(r=4, e=2, p=1, l=2),
    "mos_shared": dict(r=4, e=2, p=0, l=1),
}


def maps(model):
    return [(a.adapter.index_A, a.adapter.index_B) for a in adapter_layers(model).values()]


def test_index_maps_private_shared_and_dissociated():
    r, e, p, l = 4, 2, 1, 2  # noqa: E741
    model, _ = make_model("linear")
    inject(model, "mos", ["proj"], r=r, e=e, p=p, l=l)
    shared_region = (e - p) * N_LAYERS * l
    privates = []
    for index_A, index_B in maps(model):
        assert index_A.shape == index_B.shape == (r * l,)
        assert torch.equal(index_A[(r - p) * l :], index_B[(r - p) * l :])  # same private shards
        assert (index_A[: (r - p) * l] < shared_region).all()
        assert len(set(index_A.tolist())) == r * l  # subset selection without repeats
        privates.append(set(index_A[(r - p) * l :].tolist()))
        assert min(privates[-1]) >= shared_region
    assert all(not (a & b) for i, a in enumerate(privates) for b in privates[i + 1 :])
    assert any(not torch.equal(a[:6], b[:6]) for a, b in maps(model))  # pair dissociation


def test_pools_shared_across_layers_and_count_as_rank_e_lora():
    model, _ = make_model("linear")
    inject(model, "mos", ["proj"], r=4, e=2, p=1, l=2)
    pools = {id(a.adapter.pool) for a in adapter_layers(model).values()}
    assert len(pools) == 1
    assert trainable_parameters(model).trainable == 2 * N_LAYERS * (8 + 12)


def test_index_maps_are_seeded():
    a, _ = make_model("linear")
    b, _ = make_model("linear")
    c, _ = make_model("linear")
    inject(a, "mos", ["proj"], r=4, e=2, l=2, seed=5)
    inject(b, "mos", ["proj"], r=4, e=2, l=2, seed=5)
    inject(c, "mos", ["proj"], r=4, e=2, l=2, seed=6)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(maps(a), maps(b), strict=True))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(maps(a), maps(c), strict=True))


def test_single_layer_all_private_is_lora():
    """L=1, p=e=r, l=1 ≡ LoRA: the pool *is* A and Bᵀ."""
    lora, x = make_model("linear")
    mos, _ = make_model("linear")
    inject(lora, "lora", ["layers.0.proj"], r=3, alpha=6)
    inject(mos, "mos", ["layers.0.proj"], r=3, e=3, p=3, l=1, alpha=6)
    perturb(lora)
    a = lora.layers[0]["proj"].adapter
    pool = mos.layers[0]["proj"].adapter.pool
    with torch.no_grad():
        pool.A.copy_(a.lora_A)
        pool.B.copy_(a.lora_B.t())
        assert torch.allclose(lora(x), mos(x), atol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(r=8, e=2, p=0, l=1), "shared vectors"),
        (dict(r=4, e=2, p=3, l=1), "p=3 must be"),
        (dict(r=4, e=2, p=2, l=1), "needs r = e"),
        (dict(r=2, e=2, p=0, l=5), "divisible by l=5"),
    ],
)
def test_impossible_configurations_fail_early(cfg, message):
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match=message):
        inject(model, "mos", ["proj"], **cfg)


def test_dropout_defaults_to_the_released_scripts_0_1():
    """Every released MoS script trains with dropout 0.1 on the adapter input (Errata §2)."""
    model, x = make_model("linear")
    inject(model, "mos", ["proj"], r=2, e=1, l=2)
    perturb(model)
    layer = model.layers[0]["proj"]
    assert isinstance(layer.adapter.dropout, torch.nn.Dropout) and layer.adapter.dropout.p == 0.1
    B, A = layer.adapter.factors()
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.1, training=True)
    hand = layer.base_layer(x) + layer.adapter.scale * dropped @ A.t() @ B.t()
    assert torch.allclose(y, hand, atol=1e-6)
    assert not torch.allclose(y, layer.eval()(x), atol=1e-4)  # dropout is on in training only
