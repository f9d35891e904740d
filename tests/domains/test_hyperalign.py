"""HyperAlign and the small DDPM (issue #34)."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.adapters import Rows, adapter_layers, mixed_batch, set_active_adapters
from splice.domains.backbones.ddpm import DDPMConfig, Denoiser, ddpm_loss, sample, timesteps
from splice.domains.backbones.reward import RewardClassifier, reward
from splice.domains.hyperalign import HyperAlign
from splice.errors import SpliceError

CFG = DDPMConfig(dim=32, depth=2, heads=2, T=100)


def _pair(seed: int = 0) -> tuple[Denoiser, HyperAlign]:
    torch.manual_seed(seed)
    base = Denoiser(CFG)
    return base, HyperAlign(copy.deepcopy(base), atoms=3, r=2, perceive=1)


def _plain(model):
    return lambda x, t, c, i: model(x, t, c)


def _sample(eps, base, c, steps=6, seed=3):
    return sample(eps, base.alpha_bar, c, steps, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["step", "piece", "once"])
def test_zero_hypernetwork_output_samples_exactly_as_the_base_model(variant):
    base, ha = _pair()
    ha.variant = variant
    c = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(_sample(ha.eps(), base, c), _sample(_plain(base), base, c))
        assert not torch.equal(
            _sample(_plain(base), base, c, seed=4), _sample(_plain(base), base, c)
        )


def test_each_row_gets_its_own_lora_from_its_code():
    _, ha = _pair()
    torch.nn.init.normal_(ha.hyper.head.weight, std=0.5)
    x, t, c = torch.randn(3, 28, 28), torch.tensor([90, 50, 5]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        code = ha.hyper(x, t, c)
        out = ha.eps()(x, t, c, 0)
        for n in range(3):  # reference: row n alone, the atoms active with weights z_n
            set_active_adapters(ha.denoiser, dict(zip(ha.slots, code[n].tolist(), strict=True)))
            ref = ha.denoiser(x[n : n + 1], t[n : n + 1], c[n : n + 1])
            torch.testing.assert_close(out[n : n + 1], ref, atol=1e-5, rtol=1e-5)
        set_active_adapters(ha.denoiser, [])
        # the same as explicit per-row factors on one target: ΔW_n = Σ_k z_nk·s·B_k·A_k
        layer = adapter_layers(ha.denoiser)["blocks.0.attn.q"]
        h = torch.randn(3, 5, CFG.dim)
        deltas = [layer.get(s).delta().materialize(torch.float32) for s in ha.slots]
        for n in range(3):
            dw = sum(z * d for z, d in zip(code[n], deltas, strict=True))
            expect = torch.nn.functional.linear(
                h[n], layer.base_layer.weight + dw, layer.base_layer.bias
            )
            with mixed_batch(ha.denoiser, Rows(ha.slots, weights=code)):
                torch.testing.assert_close(layer(h)[n], expect, atol=1e-5, rtol=1e-5)
    assert out.shape == (3, 28, 28) and (code != 0).all()


@pytest.mark.parametrize("variant,calls", [("step", 7), ("piece", 3), ("once", 1)])
def test_variants_call_the_hypernetwork_at_their_steps(variant, calls):
    base, ha = _pair()
    ha.variant, ha.every = variant, 3
    seen = []
    ha.hyper.register_forward_hook(lambda m, a, o: seen.append(int(a[1][0])))
    with torch.no_grad():
        _sample(ha.eps(), base, torch.tensor([1, 2]), steps=7)
    ts = timesteps(CFG.T, 7)
    assert seen == [ts[i] for i in range(7) if ha.calls(i)]
    assert len(seen) == calls


def test_reward_gradient_reaches_the_head_and_the_atoms_through_sampling():
    base, ha = _pair()
    clf = RewardClassifier()
    c = torch.tensor([4, 5])
    r = reward(clf, _sample(ha.eps(), base, c, steps=4), c).mean()
    r.backward()
    assert ha.hyper.head.weight.grad.abs().sum() > 0
    trainable = {n for n, p in ha.named_parameters() if p.requires_grad}
    assert not any(n.startswith("hyper.encoder") for n in trainable)
    assert {n for n in trainable if "lora" in n} and all("base_layer" not in n for n in trainable)
    # the perception encoder is a frozen, adapter-free copy of the base's first block
    x, t = torch.randn(2, 28, 28), torch.tensor([10, 20])
    h = base.tokens(x, t, c)
    torch.testing.assert_close(ha.hyper.encoder(x, t, c), base.blocks[0](h))


def test_reward_is_the_class_probability_and_bad_conditions_fail():
    clf = RewardClassifier()
    x = torch.randn(4, 28, 28)
    c = torch.tensor([0, 1, 2, 9])
    torch.testing.assert_close(reward(clf, x, c), clf(x).softmax(-1)[torch.arange(4), c])
    with pytest.raises(SpliceError, match="condition 12 is outside the 10 classes"):
        reward(clf, x, torch.tensor([0, 12, 1, 1]))
    _, ha = _pair()
    with pytest.raises(SpliceError, match="condition -1 is outside the 10 classes"):
        ha.eps()(x, torch.tensor([5, 5, 5, 5]), torch.tensor([0, -1, 1, 1]), 0)
    with pytest.raises(SpliceError, match="unknown HyperAlign variant 'twice'"):
        HyperAlign(Denoiser(CFG), variant="twice")


def test_ddpm_loss_trains_and_the_sampler_is_seeded():
    torch.manual_seed(0)
    model = Denoiser(CFG)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(16, 28, 28)
    x0[:, 8:20, 10:18] = 1.0
    x0 = x0 * 2 - 1
    c = torch.zeros(16, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = ddpm_loss(model, x0, c, g).item()
    for _ in range(40):
        opt.zero_grad()
        ddpm_loss(model, x0, c, g).backward()
        opt.step()
    assert ddpm_loss(model, x0, c, g).item() < 0.5 * first
    with torch.no_grad():
        a = _sample(_plain(model), model, c[:2])
        assert torch.equal(a, _sample(_plain(model), model, c[:2]))
    assert a.shape == (2, 28, 28) and a.abs().max() <= 1.0 + 1e-6
    assert timesteps(1000, 4) == [999, 666, 333, 0]
