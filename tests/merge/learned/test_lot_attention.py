"""LOT on ``nn.MultiheadAttention`` (issue #21 item 4): the packed q/k/v in-projection and
``out_proj`` are solved by the closed form on their own inputs, never averaged silently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.learned.lot import lot

from ._toys import TASKS, deltas

E, HEADS = 8, 2


class _SelfAttention(nn.Module):
    """OpenCLIP-style: a batch-first self-attention block, then a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.fc = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(h)


class _CrossAttention(nn.Module):
    """Sequence-first cross-attention with other key/value widths (separate q/k/v weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=5, vdim=6)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v)[0]


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _lstsq(design: list[torch.Tensor], taus: list[torch.Tensor]) -> torch.Tensor:
    """argmin_τ Σ_t ‖X̃_t(τ − τ_t)ᵀ‖² by least squares on the stacked rows (bias augmented)."""
    x = torch.cat([_ones(d) for d in design])
    y = torch.cat([_ones(d) @ tau.T for d, tau in zip(design, taus, strict=True)])
    return torch.linalg.lstsq(x, y).solution.T


def _heads_output(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Self-attention output before ``out_proj`` by hand: (B, L, E) → (B·L, E)."""
    q, k, v = (x @ w[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E] for i in range(3))
    d = E // HEADS
    split = [t.reshape(*t.shape[:2], HEADS, d).transpose(1, 2) for t in (q, k, v)]  # (B, H, L, d)
    att = (split[0] @ split[1].transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (att @ split[2]).transpose(1, 2).reshape(-1, E)


def test_packed_in_proj_and_out_proj_are_solved_by_least_squares():
    torch.manual_seed(0)
    module = _SelfAttention().double().eval()
    ds = deltas(module, scale=0.3)
    g = torch.Generator().manual_seed(2)
    x = {t: torch.randn(6, 5, E, generator=g, dtype=torch.float64) for t in TASKS}
    out = lot(module, ds, x)
    base = module.state_dict()
    merged = {n: out.weights[n] - base[n] for n in base}

    rows = [x[t].reshape(-1, E) for t in TASKS]  # q, k and v all read the same tokens
    aug = [torch.cat([ds[t]["attn.in_proj_weight"], ds[t]["attn.in_proj_bias"][:, None]], 1)
           for t in TASKS]  # fmt: skip
    sol = _lstsq(rows, aug)
    torch.testing.assert_close(merged["attn.in_proj_weight"], sol[:, :E])
    torch.testing.assert_close(merged["attn.in_proj_bias"], sol[:, E])

    pre = []  # out_proj's input in each expert, computed without the module
    for t in TASKS:
        w = base["attn.in_proj_weight"] + ds[t]["attn.in_proj_weight"]
        b = base["attn.in_proj_bias"] + ds[t]["attn.in_proj_bias"]
        pre.append(_heads_output(x[t], w, b))
    aug = [torch.cat([ds[t]["attn.out_proj.weight"], ds[t]["attn.out_proj.bias"][:, None]], 1)
           for t in TASKS]  # fmt: skip
    sol = _lstsq(pre, aug)
    torch.testing.assert_close(merged["attn.out_proj.weight"], sol[:, :E])
    torch.testing.assert_close(merged["attn.out_proj.bias"], sol[:, E])

    # and the closed form is not the average the old code fell back to
    mean = sum(ds[t]["attn.in_proj_weight"] for t in TASKS) / 3
    assert (merged["attn.in_proj_weight"] - mean).abs().max() > 1e-3
    assert out.info["solved"]["linear"] == 6 and out.info["solved"]["mean"] == 0
    assert out.info["averaged"] == {}


def test_cross_attention_solves_q_k_v_on_their_own_inputs():
    torch.manual_seed(0)
    module = _CrossAttention().double().eval()
    ds = deltas(module, scale=0.3, seed=3)
    g = torch.Generator().manual_seed(4)
    data = {  # sequence-first: (L, B, dim)
        t: {
            "q": torch.randn(4, 7, E, generator=g, dtype=torch.float64),
            "k": torch.randn(6, 7, 5, generator=g, dtype=torch.float64),
            "v": torch.randn(6, 7, 6, generator=g, dtype=torch.float64),
        }
        for t in TASKS
    }

    class Split:  # a prepared split: batch(idx) slices the batch dimension (dim 1)
        def __init__(self, d):
            self.d = d

        def __len__(self):
            return 7

        def batch(self, idx, device):
            return {k: v[:, torch.as_tensor(idx)] for k, v in self.d.items()}

    out = lot(module, ds, {t: Split(d) for t, d in data.items()}, batch_size=3)
    base = module.state_dict()
    for i, (src, name) in enumerate([("q", "q_proj_weight"), ("k", "k_proj_weight"),
                                     ("v", "v_proj_weight")]):  # fmt: skip
        part = slice(i * E, (i + 1) * E)
        rows = [data[t][src].reshape(-1, data[t][src].shape[-1]) for t in TASKS]
        aug = [torch.cat([ds[t][f"attn.{name}"], ds[t]["attn.in_proj_bias"][part, None]], 1)
               for t in TASKS]  # fmt: skip
        sol = _lstsq(rows, aug)
        torch.testing.assert_close(out.weights[f"attn.{name}"] - base[f"attn.{name}"], sol[:, :-1])
        got = out.weights["attn.in_proj_bias"][part] - base["attn.in_proj_bias"][part]
        torch.testing.assert_close(got, sol[:, -1])
    assert out.info["averaged"] == {}


class _WithToken(nn.Module):
    """A learned class token and an embedding: no closed form for either."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.cls = nn.Parameter(torch.zeros(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) + self.cls)


def test_tensors_without_a_closed_form_are_reported_or_refused():
    torch.manual_seed(0)
    module = _WithToken().double()
    ds = deltas(module, scale=0.3, seed=5)
    ids = {t: torch.randint(10, (12,)) for t in TASKS}
    with pytest.warns(UserWarning, match=r"LOT: 2 tensors averaged .*cls.*emb\.weight"):
        out = lot(module, ds, ids)
    assert set(out.info["averaged"]) == {"cls", "emb.weight"}
    assert all("no closed form" in why for why in out.info["averaged"].values())
    assert out.info["solved"] == {"linear": 2, "norm": 0, "shift": 0, "mean": 2}
    for n in ("cls", "emb.weight"):
        mean = sum(ds[t][n] for t in TASKS) / 3
        torch.testing.assert_close(out.weights[n] - module.state_dict()[n], mean)
    with pytest.raises(SpliceError, match=r"2 tensors have no LOT closed form.*cls"):
        lot(module, ds, ids, unsolved="error")


def test_a_layer_whose_forward_never_runs_is_reported():
    torch.manual_seed(0)

    class Functional(nn.Module):  # uses its Linear's weight through F.linear: hooks never fire
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.fc.weight, self.fc.bias)

    module = Functional().double()
    ds = deltas(module, scale=0.3, seed=6)
    x = {t: torch.randn(5, 4, dtype=torch.float64) for t in TASKS}
    with pytest.warns(UserWarning, match="LOT: 2 tensors averaged"):
        out = lot(module, ds, x)
    assert set(out.info["averaged"]) == {"fc.weight", "fc.bias"}
    assert all("never ran" in why for why in out.info["averaged"].values())
