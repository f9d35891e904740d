"""The contract every adapter keeps, run over the method table × every layer kind it supports
(spec peft.md §22.6; peft's testing_common idea)."""

from __future__ import annotations

import itertools

import pytest
import torch

from splice.adapters import (
    METHODS,
    adapter_deltas,
    adapter_layers,
    inject,
    load_adapter,
    merge_adapters,
    remove_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from splice.adapters.inject import find_sites
from splice.errors import SpliceError

from .conftest import KINDS, METHOD_CASES, SITE_KIND, make_model, perturb

CASES = [
    (case, kind)
    for case, kind in itertools.product(sorted(METHOD_CASES), sorted(KINDS))
    if SITE_KIND.get(kind, kind) in METHODS.get(METHOD_CASES[case][0]).kinds
]
MERGEABLE = [(c, k) for c, k in CASES if METHODS.get(METHOD_CASES[c][0]).mergeable]
LOWRANK = [(c, k) for c, k in MERGEABLE if METHODS.get(METHOD_CASES[c][0]).lowrank]
ZERO_INIT = [(c, k) for c, k in CASES if METHODS.get(METHOD_CASES[c][0]).zero_init]


def adapted(case: str, kind: str, seed: int = 0):
    method, cfg = METHOD_CASES[case]
    model, x = make_model(kind, seed)
    with torch.no_grad():
        y0 = model(x)
    inject(model, method, ["proj"], **cfg)
    return model, x, y0


@pytest.mark.parametrize(("case", "kind"), ZERO_INIT)
def test_identity_at_init(case, kind):
    model, x, y0 = adapted(case, kind)
    with torch.no_grad():
        assert torch.equal(model(x), y0)


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_parameter_count_equals_spec_formula(case, kind):
    method, cfg = METHOD_CASES[case]
    model, _ = make_model(kind)
    sites = [site for _, _, site in find_sites(model, ["proj"])]
    inject(model, method, ["proj"], **cfg)
    m = METHODS.get(method)
    assert trainable_parameters(model).trainable == m().num_parameters(sites, m.Config(**cfg))


@pytest.mark.parametrize(("case", "kind"), MERGEABLE)
def test_merge_unmerge_delta(case, kind):
    model, x, _ = adapted(case, kind)
    perturb(model)
    layers = adapter_layers(model)
    base = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    deltas = adapter_deltas(model)
    assert all(d.materialize().abs().max() > 0 for d in deltas.values())
    with torch.no_grad():
        y = model(x)
        merge_adapters(model)
        merged = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        for n in layers:  # delta() + base == merged weight, bit for bit
            assert torch.equal(merged[n], base[n] + deltas[f"{n}.weight"].materialize())
        assert torch.allclose(model(x), y, atol=1e-5)  # merged forward == unmerged
        merge_adapters(model)  # idempotent
        for n, layer in layers.items():
            assert torch.equal(layer.weight, merged[n])
        unmerge_adapters(model)
        for n, layer in layers.items():
            assert torch.allclose(layer.weight, base[n], atol=1e-6)
        assert torch.allclose(model(x), y, atol=1e-6)


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_save_load_round_trip(case, kind, tmp_path):
    model, x, _ = adapted(case, kind)
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    fresh, _ = make_model(kind, seed=0)
    torch.manual_seed(123)  # a different adapter init: every value must come from the file
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize(("case", "kind"), LOWRANK)
def test_exported_lora_reproduces_outputs(case, kind, tmp_path):
    """Materialise to plain LoRA (spec P13): the PEFT-format export loads back as splice LoRA."""
    model, x, _ = adapted(case, kind)
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "peft", format="peft")
    fresh, _ = make_model(kind, seed=0)
    load_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(fresh(x), y, atol=1e-5)


@pytest.mark.parametrize(("case", "kind"), MERGEABLE)
def test_remove_adapters_keeps_merged_model(case, kind):
    model, x, _ = adapted(case, kind)
    perturb(model)
    with torch.no_grad():
        y = model(x)
        remove_adapters(model)
        assert not adapter_layers(model)
        assert torch.allclose(model(x), y, atol=1e-5)


@pytest.mark.parametrize(("case", "kind"), [(c, k) for c, k in CASES if c not in dict(MERGEABLE)])
def test_input_dependent_methods_refuse_to_merge(case, kind):
    model, _, _ = adapted(case, kind)
    with pytest.raises(SpliceError, match="no single ΔW"):
        merge_adapters(model)


def test_unsupported_layer_kind_is_an_error():
    model, _ = make_model("embedding")
    with pytest.raises(SpliceError, match="ept does not support embedding"):
        inject(model, "ept", ["proj"])


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_training_steps_reduce_the_loss(case):
    method, cfg = METHOD_CASES[case]
    model, x = make_model("linear")
    target = torch.randn(2, 5, 12)
    inject(model, method, ["proj"], **cfg)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_base_weights_frozen_and_fp32_adapters_on_bf16_base():
    model, x = make_model("linear")
    model.to(torch.bfloat16)
    inject(model, "lora", ["proj"], r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    perturb(model)
    y = model(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model.layers[0]["proj"].adapter.lora_A.grad is not None
