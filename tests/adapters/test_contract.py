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
from splice.train.loop import TrainStep

from .conftest import KINDS, METHOD_CASES, SITE_KIND, make_model, perturb

CASES = [
    (case, kind)
    for case, kind in itertools.product(sorted(METHOD_CASES), sorted(KINDS))
    if SITE_KIND.get(kind, kind) in METHODS.get(METHOD_CASES[case][0]).kinds
]
MERGEABLE = [(c, k) for c, k in CASES if METHODS.get(METHOD_CASES[c][0]).mergeable]
LOWRANK = [(c, k) for c, k in MERGEABLE if METHODS.get(METHOD_CASES[c][0]).lowrank]


def adapted(case: str, kind: str, seed: int = 0):
    method, cfg = METHOD_CASES[case]
    model, x = make_model(kind, seed)
    with torch.no_grad():
        y0 = model(x)
    inject(model, method, ["proj"], **cfg)
    return model, x, y0


IDENTITY = [(c, k) for c, k in CASES if METHODS.get(METHOD_CASES[c][0]).identity_at_init]


@pytest.mark.parametrize(("case", "kind"), IDENTITY)
def test_identity_at_init(case, kind):
    model, x, y0 = adapted(case, kind)
    with torch.no_grad():
        assert torch.equal(model(x), y0)


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_parameter_count_equals_spec_formula(case, kind):
    method, cfg = METHOD_CASES[case]
    model, _ = make_model(kind)
    m = METHODS.get(method)
    impl, config = m(), m.Config(**cfg)
    found = impl.find(model, ["proj"], None, config) or find_sites(model, ["proj"])
    inject(model, method, ["proj"], **cfg)
    count = impl.num_parameters([site for _, _, site in found], config)
    assert trainable_parameters(model).trainable == count


@pytest.mark.parametrize(("case", "kind"), MERGEABLE)
def test_merge_unmerge_delta(case, kind):
    model, x, _ = adapted(case, kind)
    perturb(model)
    layers = adapter_layers(model)
    base = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    deltas = adapter_deltas(model)
    assert all(d.materialize().abs().max() > 0 for k, d in deltas.items() if k.endswith("weight"))
    biases = {n: layer.base_layer.bias.detach().clone() for n, layer in layers.items()
              if f"{n}.bias" in deltas}  # fmt: skip
    with torch.no_grad():
        y = model(x)
        merge_adapters(model)
        merged = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        for n in layers:  # delta() + base == merged weight, bit for bit
            assert torch.equal(merged[n], base[n] + deltas[f"{n}.weight"].materialize())
        for n, b in biases.items():  # and Δb where the method changes the bias (IA³)
            merged_b = layers[n].base_layer.bias
            assert torch.equal(merged_b, b + deltas[f"{n}.bias"].materialize())
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
    kind = next(k for k in KINDS if SITE_KIND.get(k, k) in METHODS.get(method).kinds)
    model, x = make_model(kind)
    inject(model, method, ["proj"], **cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    perturb(model, std=0.5)  # a target the adapter can reach: its own output elsewhere
    with torch.no_grad():
        target = model(x)
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
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


def _grads(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, loop: bool):
    """The trainable parameters' gradients of a fixed random readout of the output (Σ of a
    LayerNorm's output has gradient 0: BERT sites), the forward under autocast to ``dtype``
    (None: fp32) as the training loop enters it (:meth:`TrainStep.autocast`, bf16) and the
    backward inside it (``loop``, as the loop runs it) or after it (PyTorch's recommended
    pattern, HF Trainer's: no autocast in the backward, so a fused backward that mixes its
    forward's bf16 with fp32 saved tensors raises)."""
    params = [p for p in model.parameters() if p.requires_grad]
    precision = "fp32" if dtype is None else "bf16"
    step = TrainStep(loss=None, optimizer=None, precision=precision)  # type: ignore[arg-type]
    with torch.autocast("cpu", dtype=dtype) if dtype == torch.float16 else step.autocast():
        out = model(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        loss = (out.float() * w).sum()
        if loop:
            return out, params, torch.autograd.grad(loss, params, allow_unused=True)
    return out, params, torch.autograd.grad(loss, params, allow_unused=True)


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads if g is not None])


@pytest.mark.parametrize(("case", "kind"), CASES)
def test_autocast_gradients_match_fp32(case, kind):
    """Under autocast (``--precision bf16``; fp16 too), the backward inside it or after it,
    the input in fp32 or in the autocast dtype, every method runs forward and backward, its
    output is finite, and each trainable parameter gets a gradient in its own dtype (fp32)
    where the fp32 run has one, close to that one; after an optimizer step on those gradients
    a merge keeps the base dtype.

    How close: bf16's 8-bit mantissa flips P-tuning's ReLU whose input is 7e-4 (its encoder's
    gradients then differ by 70 %, the model's by 12 % in norm), so bf16 is held to 25 % of
    the gradients' norm (a missing scale, a wrong sign or a dropped term is out by more).
    fp16 (11 bits, the same code paths) flips none: there each tensor is held to 5 % of its
    own largest gradient (an exact 0, top-1 routing's renormalised weight, to round-off: 1e-6
    of the model's largest)."""
    model, x, _ = adapted(case, kind)
    perturb(model)  # off the init: every factor's gradient ≠ 0 (LoRA's A at B = 0 has none)
    x = torch.cat([x, x.flip(0)], 1) if x.dim() == 3 else x  # 20 tokens ≥ d_out: OFT fuses
    _, params, want = _grads(model, x, None, loop=False)
    flat = _flat(want)
    # the backward inside autocast or after it; after it, the input also in the autocast dtype,
    # as an earlier autocast layer hands its activations on (another branch: x's dtype ≠ W's)
    modes = [(True, False), (False, False), (False, x.is_floating_point())]
    for dtype, (loop, cast) in itertools.product((torch.bfloat16, torch.float16), modes):
        out, _, got = _grads(model, x.to(dtype) if cast else x, dtype, loop)
        assert torch.isfinite(out).all()
        assert [a is None for a in got] == [b is None for b in want]
        assert all(a.dtype == p.dtype == torch.float32 for p, a in zip(params, got, strict=True)
                   if a is not None)  # fmt: skip
        if dtype == torch.bfloat16:
            assert (_flat(got) - flat).norm() <= 0.25 * flat.norm()
            continue
        for a, b in zip(got, want, strict=True):
            if a is not None:
                atol = max(0.05 * b.abs().max().item(), 1e-6 * flat.abs().max().item())
                torch.testing.assert_close(a, b, rtol=0.05, atol=atol)
    if (case, kind) in MERGEABLE:
        layers = adapter_layers(model)
        dtypes = {n: layer.weight.dtype for n, layer in layers.items()}
        with torch.no_grad():
            for p, a in zip(params, got, strict=True):  # a step on the autocast gradients
                if a is not None:
                    p.sub_(a, alpha=0.1)
        merge_adapters(model)
        assert {n: layer.weight.dtype for n, layer in layers.items()} == dtypes


@pytest.mark.parametrize(("case", "kind"), MERGEABLE)
def test_autocast_training_on_a_bf16_base_merges_into_bf16(case, kind):
    """A bf16 base (an LLM loaded in bf16) with fp32 adapters trained under bf16 autocast:
    fp32 gradients, and the merge folds ΔW (and IA³'s Δb) into the bf16 weights in fp32,
    rounding once."""
    method, cfg = METHOD_CASES[case]
    model, x = make_model(kind)
    model.to(torch.bfloat16)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    inject(model, method, ["proj"], **cfg)
    perturb(model)
    _, params, grads = _grads(model, x, torch.bfloat16, loop=False)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            assert g is None or (g.dtype == p.dtype == torch.float32 and g.isfinite().all())
            if g is not None:
                p.sub_(g, alpha=0.1)
    layers = adapter_layers(model)
    base = {f"{n}.{k}": t.detach().float() for n, layer in layers.items()
            for k, t in layer.base_layer.named_parameters()}  # fmt: skip
    deltas = adapter_deltas(model)
    merge_adapters(model)
    for name, delta in deltas.items():  # W + ΔW summed in fp32, rounded to bf16 once
        layer, tensor = name.rsplit(".", 1)
        merged = getattr(layers[layer].base_layer, tensor)
        want = (base[name] + delta.materialize(torch.float32)).to(torch.bfloat16)
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, want)
