"""OPCM (merging.md §10) and the continual task-arithmetic baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.learned._continual import linear_weights
from splice.merge.learned.continual_task_arithmetic import continual_task_arithmetic
from splice.merge.learned.opcm import opcm, project

from ._toys import TASKS, deltas, mlp


def test_one_task_gives_that_task_model():
    module = mlp()
    ds = deltas(module)
    (step,) = list(opcm(module, {"a": ds["a"]}))
    for n, p in module.state_dict().items():
        torch.testing.assert_close(step.weights[n], p + ds["a"][n], rtol=0, atol=1e-15)
    assert step.task == "a" and step.index == 0 and step.info["scale"] == 1.0


def _svd_split(delta: torch.Tensor, alpha: float):
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    r = int(torch.nonzero(s.cumsum(0) / s.sum() > alpha)[0])
    return u, vh.T, r


def test_projection_removes_the_top_block_and_the_diagonal_of_the_merged_basis():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 4, generator=g, dtype=torch.float64)
    tau = torch.randn(6, 4, generator=g, dtype=torch.float64)
    for alpha in (0.2, 0.5, 0.8):
        out = project(delta, tau, alpha)
        u, v, r = _svd_split(delta, alpha)
        p = u.T @ out @ v
        assert p.diagonal().abs().max() < 1e-12
        assert float(p[:r, :r].abs().sum()) < 1e-12
        # everything else of τ passes unchanged
        keep = torch.ones_like(p, dtype=torch.bool)
        keep[:r, :r] = False
        keep.fill_diagonal_(False)
        torch.testing.assert_close(p[keep], (u.T @ tau @ v)[keep])
        # so the new task vector is orthogonal to Δ's top-r singular directions
        top = sum(torch.outer(u[:, i], v[:, i]) for i in range(max(r, 1)))
        assert abs(float((out * top).sum())) < 1e-10
    assert torch.equal(project(torch.zeros(6, 4, dtype=torch.float64), tau, 0.5), tau)


def test_vector_outside_the_top_block_and_off_diagonal_passes_unchanged():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(5, 5, generator=g, dtype=torch.float64)
    u, v, r = _svd_split(delta, 0.5)
    p = torch.zeros(5, 5, dtype=torch.float64)
    p[r + 1 :, 0] = 1.0  # off-diagonal, outside the [:r, :r] block
    p[0, 4] = -2.0
    tau = u @ p @ v.T
    torch.testing.assert_close(project(delta, tau, 0.5), tau)


def _orthogonal_sequence(k: int = 4, grow: bool = False):
    """Task vectors on disjoint supports (mutually orthogonal), norms 1 (or 1, 2, 3, ...)."""
    g = torch.Generator().manual_seed(2)
    seq = []
    for i in range(k):
        w = torch.zeros(8, 8, dtype=torch.float64)
        w[2 * i : 2 * i + 2, :] = torch.randn(2, 8, generator=g, dtype=torch.float64)
        w *= (i + 1 if grow else 1) / w.norm()
        seq.append((f"t{i}", {"w": w, "b": torch.zeros(8, dtype=torch.float64)}))
    return seq


def test_running_scale_is_sqrt_t_for_orthogonal_vectors_and_norm_is_the_mean():
    base = {"w": torch.zeros(8, 8, dtype=torch.float64), "b": torch.zeros(8, dtype=torch.float64)}
    for step in opcm(base, _orthogonal_sequence(), projected=()):  # scaling alone
        t = step.index + 1
        assert step.info["scale"] == pytest.approx(t**0.5, rel=1e-12)
    for step in opcm(base, _orthogonal_sequence(grow=True), alpha=0.5, projected={"w"}):
        t = step.index + 1
        delta = torch.cat([step.weights["w"].reshape(-1), step.weights["b"]])
        assert float(delta.norm()) == pytest.approx((t + 1) / 2)  # mean of norms 1..t
        assert step.info["mean_norm"] == pytest.approx((t + 1) / 2)


def test_only_linear_weights_of_a_module_are_projected():
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).double()
    ds = deltas(module, seed=3)
    steps = list(opcm(module, ds))
    assert [s.task for s in steps] == list(TASKS)
    # the LayerNorm weight is a plain running sum, rescaled: parallel to Σ τ up to the scale
    last = steps[-1]
    base = module.state_dict()
    ln = last.weights["1.weight"] - base["1.weight"]
    plain = sum(ds[t]["1.weight"] for t in TASKS) / last.info["scale"]
    torch.testing.assert_close(ln, plain)
    w = last.weights["0.weight"] - base["0.weight"]
    assert not torch.allclose(w, sum(ds[t]["0.weight"] for t in TASKS) / last.info["scale"])


def test_continual_task_arithmetic_is_the_scaled_running_sum():
    module = mlp()
    ds = deltas(module)
    base = module.state_dict()
    for step in continual_task_arithmetic(module, ds, scale=0.3):
        seen = list(TASKS)[: step.index + 1]
        for n in base:
            torch.testing.assert_close(step.weights[n], base[n] + 0.3 * sum(ds[t][n] for t in seen))


def test_bad_sequence_is_refused():
    with pytest.raises(SpliceError, match="not in the base"):
        list(opcm({"w": torch.zeros(2, 2)}, {"a": {"v": torch.zeros(2, 2)}}))


class _Tiny(nn.Module):
    """An embedding, a positional table, an attention and a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(12, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(6, 4))
        self.attn = nn.MultiheadAttention(4, 2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)


def test_plain_state_dict_projects_linear_weights_only_as_the_module_would():
    module = _Tiny().double()
    state = module.state_dict()
    # the documented name/shape rule picks the nn.Linear weights, like the module-type rule
    want = {"attn.out_proj.weight", "fc.weight"}
    assert linear_weights(module) == want == linear_weights(state)
    hf = {n: torch.zeros(3, 3) for n in ("bert.embeddings.word_embeddings.weight", "wte.weight",
          "shared.weight", "model.embed_tokens.weight", "visual.proj", "lm_head.weight",
          "layer.0.attention.self.query.weight")}  # fmt: skip
    assert linear_weights(hf) == {"lm_head.weight", "layer.0.attention.self.query.weight"}

    ds = deltas(module, seed=4)
    base = {n: t for n, t in state.items() if t.is_floating_point()}
    last = list(opcm(base, ds))[-1]
    scale = last.info["scale"]
    for n in ("token_embedding.weight", "positional_embedding", "attn.in_proj_weight"):
        plain = sum(ds[t][n] for t in TASKS) / scale  # averaged in: the rescaled running sum
        torch.testing.assert_close(last.weights[n] - base[n], plain)
    projected = last.weights["fc.weight"] - base["fc.weight"]
    assert not torch.allclose(projected, sum(ds[t]["fc.weight"] for t in TASKS) / scale)
