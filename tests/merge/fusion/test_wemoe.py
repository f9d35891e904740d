"""WEMoE: one-hot routing reproduces an expert, init is task arithmetic, save/load, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.fusion.wemoe import cost, load_wemoe, routers, save_wemoe, upcycle
from splice.train.wemoe import train_routers


class _Block(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), _Block(), _Block(), nn.Linear(6, 3)).double()


def _deltas(model, only_mlp: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        t: {n: 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in model.named_parameters() if ".mlp." in n or not only_mlp}
        for t in ("a", "b", "c")
    }  # fmt: skip


def _expert(model, delta):
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n in delta:
                p.add_(delta[n])
    return out


def _route(moe_model, weights):
    with torch.no_grad():
        for m in moe_model.modules():
            if hasattr(m, "router"):
                m.router[2].weight.zero_()
                m.router[2].bias.copy_(torch.tensor(weights, dtype=m.router[2].bias.dtype))


def test_one_hot_router_equals_that_tasks_model():
    base = _model()
    ds = _deltas(base, only_mlp=True)
    moe = upcycle(base, ds)
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    for i, t in enumerate(ds):
        _route(moe, [float(i == j) for j in range(3)])
        torch.testing.assert_close(moe(x), _expert(base, ds[t])(x))


def test_initial_routing_is_task_arithmetic_and_base_is_untouched():
    base = _model()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    ds = _deltas(base, only_mlp=False)
    moe = upcycle(base, ds, init_lambda=0.3)
    ta = {n: 0.3 * sum(d[n] for d in ds.values()) for n in ds["a"]}
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(moe(x), _expert(base, ta)(x))
    for n, v in base.state_dict().items():
        assert torch.equal(v, before[n])
    c = cost(moe)
    assert c["router"] == sum(p.numel() for p in routers(moe)) > 0
    assert c["task_vectors"] == 3 * sum(
        p.numel() for n, p in base.named_parameters() if ".mlp." in n
    )


def test_save_load_round_trip_and_sparse_vectors(tmp_path):
    base = _model()
    moe = upcycle(base, _deltas(base, only_mlp=True), density=0.25)
    _route(moe, [0.7, 0.1, 0.4])
    save_wemoe(moe, tmp_path / "w")
    back = load_wemoe(_model(seed=3), tmp_path / "w")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(back(x), moe(x))
    dense = upcycle(base, _deltas(base, only_mlp=True))
    assert cost(moe)["task_vectors"] < 0.3 * cost(dense)["task_vectors"]


def test_router_training_lowers_the_entropy_and_moves_only_routers():
    base = _model()
    ds = _deltas(base, only_mlp=True)
    moe = upcycle(base, ds)
    frozen = {n: p.clone() for n, p in moe.named_parameters() if "router" not in n}
    heads = {t: nn.Identity() for t in ds}
    data = {t: torch.randn(32, 5, 4, dtype=torch.float64) for t in ds}
    losses = train_routers(
        moe, data, heads, forward=lambda m, x: m(x)[:, 0], steps=12, lr=2e-2, batch_size=4
    )
    assert losses[-1] < losses[0]
    for n, p in moe.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_model_without_mlp_blocks_is_refused():
    plain = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(SpliceError, match="no MLP blocks") as e:
        upcycle(plain, {"a": {"0.weight": torch.zeros(6, 4)}})
    assert "\n" not in str(e.value)
