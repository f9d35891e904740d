"""R-AMT mask tuning (spec peft.md §13, §22.6)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, aux_loss, guide, inject, load_adapter, save_adapter
from splice.adapters.ramt import gdr_gate
from splice.errors import SpliceError

from .conftest import make_model

CONTRACT_CASES = {"ramt": {}}
PAPER = {"init": 0.01, "threshold": 0.005}  # the released code's values (at its lr 8e-5)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, x, labels, steps: int = 20, gdr: bool = False) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    g = guide(model) if gdr else None
    for _ in range(steps):
        logits = model(x)
        aux = aux_loss(model)
        loss = F.cross_entropy(logits, labels) + (0 if aux is None else aux)
        if g is not None:
            with g.teacher():
                teacher = model(x)
            g(logits, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_masked_out_weights_stay_exactly_zero_and_forward_is_the_masked_model():
    model = _mlp()
    base = [m.weight.detach().clone() for m in (model[0], model[2])]
    x, labels = torch.randn(32, 10), torch.randint(0, 3, (32,))
    inject(model, "ramt", ["0", "2"], l2=0.0, **PAPER)
    _train(model, x, labels, gdr=True)
    layers = list(adapter_layers(model).values())
    assert any((la.adapter.logits <= 0.005).any() for la in layers), "training masked nothing"
    with torch.no_grad():
        h = F.linear(x, layers[0].adapter.masked_weight(), model[0].base_layer.bias).tanh()
        ref = F.linear(h, layers[1].adapter.masked_weight(), model[2].base_layer.bias)
        assert torch.allclose(model(x), ref, atol=1e-5)
        for layer, w0 in zip(layers, base, strict=True):
            off = layer.adapter.logits <= 0.005
            assert torch.equal(layer.adapter.masked_weight()[off], torch.zeros(int(off.sum())))
            layer.merge()
            assert torch.equal(layer.weight[off], torch.zeros(int(off.sum())))
            assert torch.equal(layer.weight[~off], w0[~off])  # the kept weights untouched


def test_teacher_is_the_unmasked_base_and_l2_is_the_norm():
    model = _mlp()
    x = torch.randn(4, 10)
    with torch.no_grad():
        y0 = model(x)
    inject(model, "ramt", ["0", "2"], **PAPER)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.adapter.logits.uniform_(-0.02, 0.02)
    g = guide(model)
    with g.teacher():
        assert torch.equal(model(x), y0)
    assert not torch.allclose(model(x), y0)
    norms = sum(layer.adapter.logits.norm() for layer in adapter_layers(model).values())
    assert torch.allclose(aux_loss(model), 1e-4 * norms)


def test_gdr_gate_hand_example():
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g_kl = torch.tensor([1.0, -1.0, -3.0, -0.5])  # agree, agree, cancel, cancel
    gated = gdr_gate(g, g_kl, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(gated[:2], g[:2])  # P = 1: always kept
    # g + g_kl = 0: P = ½, kept with probability ½ — check the rate on a large draw
    big = gdr_gate(torch.ones(20000), -torch.ones(20000), 1.0, torch.Generator().manual_seed(1))
    assert abs(big.mean().item() - 0.5) < 0.02
    assert torch.equal(gdr_gate(g, g_kl, 0.0, None), g)  # λ_g = 0: the plain gradient


def test_gdr_gates_only_the_mask_gradient_once():
    model = _mlp()
    x, labels = torch.randn(8, 10), torch.randint(0, 3, (8,))
    inject(model, "ramt", ["0", "2"], l2=0.0, **PAPER)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.adapter.logits.uniform_(-0.02, 0.03)
    params = [layer.adapter.logits for layer in adapter_layers(model).values()]
    plain = torch.autograd.grad(F.cross_entropy(model(x), labels), params)
    g = guide(model)
    logits = model(x)
    with g.teacher():
        teacher = model(x)
    g(logits, teacher)
    F.cross_entropy(logits, labels).backward()
    for p, ref in zip(params, plain, strict=True):
        kept = p.grad != 0
        assert torch.allclose(p.grad[kept], ref[kept])  # kept elements are the plain gradient
        assert 0 < kept.sum() < (ref != 0).sum()  # and some are dropped
    for p in params:
        p.grad = None
    F.cross_entropy(model(x), labels).backward()  # the hooks fired once and are gone
    for p, ref in zip(params, plain, strict=True):
        assert torch.allclose(p.grad, ref)


def test_mask_file_holds_one_bit_per_weight(tmp_path):
    model, _ = make_model("linear")  # three 8→12 linears
    inject(model, "ramt", ["proj"])
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "splice_adapter.safetensors"))
    masks = [t for k, t in tensors.items() if k.endswith(".mask")]
    assert len(masks) == 3 and all(t.dtype == torch.uint8 for t in masks)
    assert sum(t.numel() for t in masks) == 3 * math.ceil(8 * 12 / 8)


def test_mask_bits_not_matching_the_weight_is_an_error(tmp_path):
    model, _ = make_model("linear")
    inject(model, "ramt", ["proj"])
    save_adapter(model, tmp_path / "a")
    info = json.loads((tmp_path / "a" / "splice_adapter.json").read_text())
    info["sites"] = list(info.pop("shapes"))  # no base shapes: the mask's own check speaks
    (tmp_path / "a" / "splice_adapter.json").write_text(json.dumps(info))
    wide = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
        torch.nn.ModuleDict({"proj": torch.nn.Linear(9, 12)}) for _ in range(3))})  # fmt: skip
    assert info["sites"] == ["layers.0.proj", "layers.1.proj", "layers.2.proj"]
    with pytest.raises(
        SpliceError,
        match=r"layers\.0\.proj: mask file holds 96 bits \(saved for a \(12, 8\) weight\); "
        r"the model's \(12, 9\) weight needs 108",
    ):
        load_adapter(wide, tmp_path / "a")


def test_runs_on_pointwise_convolutions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 1))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y0 = model(x)
    inject(model, "ramt", ["0", "2"])
    with torch.no_grad():
        assert torch.equal(model(x), y0)
        layer = adapter_layers(model)["0"]
        layer.adapter.logits[0].fill_(0.0)  # drop every input of output channel 0
        h = model[0](x)
        bias = model[0].base_layer.bias[0]
        assert torch.allclose(h[:, 0], torch.full_like(h[:, 0], bias.item()), atol=1e-6)


def _flips(init: float, threshold: float, lr: float, steps: int = 24) -> list[torch.Tensor]:
    """The masks after each Adam step of a small R-AMT run (L2 and GDR on)."""
    model = _mlp()
    torch.manual_seed(1)
    x, labels = torch.randn(32, 10), torch.randint(0, 3, (32,))
    inject(model, "ramt", ["0", "2"], init=init, threshold=threshold)
    layers = list(adapter_layers(model).values())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, eps=1e-12)  # eps far below every gradient
    g = guide(model)
    masks = []
    for _ in range(steps):
        logits = model(x)
        with g.teacher():
            teacher = model(x)
        g(logits, teacher)
        opt.zero_grad()
        (F.cross_entropy(logits, labels) + aux_loss(model)).backward()
        opt.step()
        masks.append(torch.cat([(la.adapter.logits > threshold).flatten() for la in layers]))
    return masks


def test_init_threshold_and_lr_scaled_together_train_the_same_masks():
    # under Adam only K = (init − τ)/lr matters (the docstring's scale argument): the
    # released (0.01, 0.005) and the defaults (0.0625, 0.03125) at lrs 6.25x apart flip the
    # same masks at the same steps (here K = 0.625: from the first step on)
    base = _flips(0.01, 0.005, 8e-3)
    scaled = _flips(0.0625, 0.03125, 5e-2)
    assert all(torch.equal(a, b) for a, b in zip(base, scaled, strict=True))
    assert not base[0].all() and not base[-1].all()
    # and no mask flips before step K: the defaults at lr 5e-3 (K = 6.25)
    slow = _flips(0.0625, 0.03125, 5e-3, steps=8)
    assert all(m.all() for m in slow[:6]) and not slow[7].all()
