"""μP rules as data (other.md §8.3) against microsoft/mup 1.0.0 on shared toy models."""

from __future__ import annotations

import copy

import mup  # microsoft/mup 1.0.0, the reference (dev extra)
import pytest
import torch

from splice.analysis.mup import RULES, make_optimizer, param_groups, wrap
from splice.analysis.mup_models import GPT, MLP
from splice.errors import SpliceError


def _families():
    yield lambda w: MLP(12, w, 5, depth=3), (lambda m: torch.randn(7, 12))
    yield (
        lambda w: GPT(30, w, depth=2, heads=2, context=8),
        lambda m: torch.randint(0, 30, (3, 8)),
    )


def _mup_twin(model):
    """The same model with its readout swapped for mup's MuReadout (same weights)."""
    twin = copy.deepcopy(model)
    old = twin.readout
    new = mup.MuReadout(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    twin.readout = new
    return twin


@pytest.mark.parametrize("family", list(range(2)))
@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_multipliers_and_groups_equal_microsoft_mup(family, opt):
    make, data = list(_families())[family]
    torch.manual_seed(0)
    base, delta = make(8), make(16)
    model = make(32)
    twin = _mup_twin(model)
    mup.set_base_shapes(twin, base, delta=delta)
    info = wrap(model, base, delta)
    assert info.readouts == ["readout"]
    for (name, p), (name2, q) in zip(
        model.named_parameters(), twin.named_parameters(), strict=True
    ):
        assert name == name2
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # the init rescale
    x = data(model)
    torch.testing.assert_close(model(x), twin(x))  # the readout's 1/m multiplier
    ref_cls = {"adam": mup.MuAdam, "adamw": mup.MuAdamW, "sgd": mup.MuSGD}[opt]
    ref = ref_cls(twin.parameters(), lr=0.01, weight_decay=0.1)
    ours = make_optimizer(model, info, opt, lr=0.01, weight_decay=0.1)

    def by_name(m, optim):
        ids = {id(p): n for n, p in m.named_parameters()}
        return {
            ids[id(p)]: (pytest.approx(g["lr"]), pytest.approx(g["weight_decay"]))
            for g in optim.param_groups
            for p in g["params"]
        }

    got, want = by_name(model, ours), by_name(twin, ref)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == want[name], name
    assert type(ours) is type(ref)
    # μP changes something at this width: the hidden LR under Adam is lr / 4
    lrs = {g["lr"] for g in ours.param_groups}
    assert len(lrs) > 1


def test_base_width_is_standard_parametrisation():
    torch.manual_seed(0)
    base, delta = MLP(4, 8, 3), MLP(4, 16, 3)
    model = copy.deepcopy(base)
    info = wrap(model, base, delta)
    for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert {g["lr"] for g in param_groups(model, info, optimizer="adam", lr=0.1)} == {0.1}


def test_classes_and_sp_ntk_rows():
    base, delta = MLP(4, 8, 3), MLP(4, 16, 3)
    model = MLP(4, 64, 3)
    kinds = {n: p.kind for n, p in wrap(copy.deepcopy(model), base, delta).params.items()}
    assert kinds == {
        "embed.weight": "vector", "embed.bias": "vector",
        "layers.0.weight": "hidden", "layers.0.bias": "vector",
        "layers.1.weight": "hidden", "layers.1.bias": "vector",
        "readout.weight": "readout", "readout.bias": "fixed",
    }  # fmt: skip
    sp = wrap(copy.deepcopy(model), base, delta, parametrization="sp")
    assert {g["lr"] for g in param_groups(model, sp, optimizer="sgd", lr=1.0)} == {1.0}
    ntk = wrap(copy.deepcopy(model), base, delta, parametrization="ntk")
    groups = param_groups(model, ntk, optimizer="adam", lr=1.0)
    assert sorted(g["lr"] for g in groups) == [pytest.approx(0.125**0.5), 1.0]
    assert set(RULES) == {"mup", "sp", "ntk"}


def test_bad_shapes_and_names():
    with pytest.raises(SpliceError, match=r"parameter 'embed\.weight'"):
        wrap(MLP(4, 8, 3), {"x": (1,)}, {"x": (2,)})
    with pytest.raises(SpliceError, match="unknown parametrization 'mu'"):
        wrap(MLP(4, 8, 3), MLP(4, 8, 3), MLP(4, 16, 3), parametrization="mu")
