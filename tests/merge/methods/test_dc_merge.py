"""DC-Merge (spec merging.md §8) against a loop-based copy of the authors' code paths."""

from __future__ import annotations

import pydantic
import pytest
import torch

from splice.errors import SpliceError
from splice.merge.base import MergeContext, NoParams, methods
from splice.merge.methods.dc_merge import DCMerge, dc_merge_matrix, smooth_singular_values
from tests.merge._engine_run import direct_merge, engine_merge


def _reference(deltas, rank=None, smoothing="none", rho=5.0, percent=1e-3):
    """DC_utils.dc_merge (rank None) / merging_functions.dc_merge (LoRA rank), element loops."""
    num = len(deltas)
    m, n = deltas[0].shape
    k = min(m, n) // num if rank is None else rank
    sum_u = torch.zeros(m, min(m, n))
    sum_v = torch.zeros(min(m, n), n)
    recon = []
    for i, d in enumerate(deltas):
        u, s, v = torch.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
        energy = s[:k].clone()
        if smoothing == "avg":
            energy = energy.sum() * torch.ones(k) / k
        elif smoothing == "linear":
            ratio = min(rho, float(energy[0] / energy[-1]))
            dist = torch.linspace(ratio, 1.0, k)
            energy = energy.sum() * dist / dist.sum()
        recon.append(u[:, :k] @ torch.diag(energy) @ v[:k, :])
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    cover_u, cover_vt = uu @ vu, uv @ vv
    if rank is not None:
        cover_u, cover_vt = cover_u[:, : num * k], cover_vt[: num * k, :]
    cores = []
    for r in recon:
        core = cover_u.T @ r @ cover_vt.T
        flat = sorted(core.abs().flatten().tolist(), reverse=True)
        threshold = flat[max(1, int(percent * len(flat))) - 1]
        cores.append(torch.where(core.abs() >= threshold, core, torch.zeros(())))
    size = cores[0].shape[0]
    agg = torch.zeros(size, size)
    for a in range(size):
        for b in range(size):
            vals = [c[a, b].item() for c in cores]
            total = sum(vals)
            if total == 0:
                continue
            agree = [x for x in vals if x != 0 and (x > 0) == (total > 0)]
            agg[a, b] = sum(agree) / max(1, len(agree))
    d = size // num
    mask = torch.zeros(size, size)
    for i in range(num):
        mask[i * d : (i + 1) * d, i * d : (i + 1) * d] = 1
    return cover_u @ (agg * mask) @ cover_vt


def _deltas(num, m, n, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(num, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(num, m, rank, generator=g, dtype=torch.float64)
    a = torch.randn(num, rank, n, generator=g, dtype=torch.float64)
    return b @ a


@pytest.mark.parametrize(
    ("num", "m", "n", "keep"),
    [(3, 12, 9, 1e-3), (2, 10, 14, 0.2), (4, 8, 8, 1.0), (3, 11, 10, 0.05)],
)
def test_full_finetune_path_matches_reference(num, m, n, keep):
    deltas = _deltas(num, m, n, seed=num + m)
    got = dc_merge_matrix(deltas, keep=keep)
    ref = _reference([d.float() for d in deltas], percent=keep).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("smoothing", ["avg", "linear", "none"])
def test_lora_path_matches_reference(smoothing):
    deltas = _deltas(3, 16, 12, seed=4, rank=2)
    got = dc_merge_matrix(deltas, rank=2, smoothing=smoothing, rho=3.0, keep=0.1)
    ref = _reference([d.float() for d in deltas], 2, smoothing, 3.0, 0.1).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_single_task_without_sparsification_returns_the_task_vector():
    """Spec §17: T=1, FFT, sparsification off → τ₁ (its top-min(m,n) SVD is itself)."""
    (delta,) = _deltas(1, 7, 5, seed=2)
    got = dc_merge_matrix(delta.unsqueeze(0), keep=1.0)
    torch.testing.assert_close(got, delta)


def test_smoothing_preserves_energy():
    s = torch.tensor([9.0, 4.0, 2.0, 0.5], dtype=torch.float64)
    for mode in ("avg", "linear"):
        out = smooth_singular_values(s, mode, rho=5.0)
        torch.testing.assert_close(out.sum(), s.sum())
        assert out[0] / out[-1] <= 5.0 + 1e-12
    torch.testing.assert_close(smooth_singular_values(s, "avg"), torch.full_like(s, 15.5 / 4))
    flat_ratio = smooth_singular_values(torch.tensor([2.0, 1.0]), "linear", rho=5.0)
    torch.testing.assert_close(flat_ratio, torch.tensor([2.0, 1.0]))


def test_tasks_in_orthogonal_subspaces_are_summed():
    """Directional consistency: when the tasks' singular subspaces are already orthogonal, the
    shared basis is their union, each core is its own spectrum, and the merge is Σ_t τ_t.

    Keep 2 of the 36 core entries per task (its two singular values): without sparsification,
    round-off entries of the other tasks that agree in sign would enter the disjoint mean."""
    g = torch.Generator().manual_seed(0)
    q_left, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(10, 6, generator=g, dtype=torch.float64))
    deltas = torch.stack(
        [
            q_left[:, 2 * t : 2 * t + 2]
            @ torch.diag(torch.tensor([3.0 + t, 1.0 + t], dtype=torch.float64))
            @ q_right[:, 2 * t : 2 * t + 2].T
            for t in range(3)
        ]
    )
    got = dc_merge_matrix(deltas, rank=2, keep=0.06)
    torch.testing.assert_close(got, deltas.sum(0))


def test_method_scales_matrices_and_averages_other_tensors():
    g = torch.Generator().manual_seed(3)
    base_w, base_b = torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
    tuned_w = [base_w + 0.1 * torch.randn(8, 6, generator=g) for _ in range(2)]
    tuned_b = [base_b + 0.1 * torch.randn(6, generator=g) for _ in range(2)]
    method, params = DCMerge(), DCMerge.Params(**{"lambda": 0.5, "keep": 0.3})
    w = method.merge(base_w, tuned_w, params, [], MergeContext("w"))
    b = method.merge(base_b, tuned_b, params, [], MergeContext("b"))
    expect_w = base_w + 0.5 * dc_merge_matrix(torch.stack([t - base_w for t in tuned_w]), keep=0.3)
    torch.testing.assert_close(w, expect_w)
    torch.testing.assert_close(b, base_b + 0.5 * (tuned_b[0] + tuned_b[1] - 2 * base_b) / 2)


def test_pointwise_convolutions_are_merged_as_matrices():
    # A 1×1 conv weight (out, in, 1, 1) is a matrix (spec §8.3: every LoRA-adapted matrix,
    # and LoRA adapts 1×1 convs); a k×k kernel is not, and is averaged like a bias.
    g = torch.Generator().manual_seed(4)
    method, params = DCMerge(), DCMerge.Params(**{"lambda": 0.7, "keep": 0.5})
    base = torch.randn(8, 6, 1, 1, generator=g)
    tuned = [base + 0.1 * torch.randn(8, 6, 1, 1, generator=g) for _ in range(3)]
    merged = method.merge(base, tuned, params, [], MergeContext("conv"))
    flat = torch.stack([(t - base).reshape(8, 6) for t in tuned])
    expect = base + 0.7 * dc_merge_matrix(flat, keep=0.5).reshape(8, 6, 1, 1)
    torch.testing.assert_close(merged, expect)
    assert not torch.allclose(merged, base + 0.7 * torch.stack(tuned).sub(base).mean(0))
    base3 = torch.randn(4, 2, 3, 3, generator=g)
    tuned3 = [base3 + 0.1 * torch.randn(4, 2, 3, 3, generator=g) for _ in range(2)]
    merged3 = method.merge(base3, tuned3, params, [], MergeContext("k3"))
    torch.testing.assert_close(merged3, base3 + 0.7 * torch.stack(tuned3).sub(base3).mean(0))


def test_rank_too_large_is_an_actionable_error_and_params_validate():
    with pytest.raises(SpliceError, match="lower `rank`"):
        dc_merge_matrix(_deltas(3, 6, 5), rank=2)
    assert methods.get("dc_merge") is DCMerge
    with pytest.raises(pydantic.ValidationError):
        DCMerge.Params(keep=0.0)
    with pytest.raises(pydantic.ValidationError):
        DCMerge.Params(smoothing="cubic")
    with pytest.raises(pydantic.ValidationError):
        DCMerge.Params(rank=0)


def test_engine_on_disk_equals_direct_per_tensor_calls(tmp_path):
    params = {"lambda": 0.7, "keep": 0.2}
    base, fts, got = engine_merge(tmp_path, "dc_merge", params)
    ref = direct_merge(DCMerge(), base, fts, DCMerge.Params(**params), [NoParams()] * 2)
    assert list(got) == list(base)
    for n in base:
        assert torch.equal(got[n], ref[n]), n
