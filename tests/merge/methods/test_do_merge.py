"""DO-Merging (spec merging.md §7, reconstructed): decoupling and orthogonalization invariants."""

from __future__ import annotations

import pydantic
import pytest
import torch

from splice.errors import SpliceError
from splice.merge.base import MergeContext, NoParams, methods
from splice.merge.methods.do_merge import (
    DOMerge,
    balanced_factors,
    do_merge_matrix,
    orthogonalize,
    overlap,
)
from tests.merge._engine_run import direct_merge, engine_merge


def _lora(num, m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(num, m, r, generator=g, dtype=torch.float64)
    a = torch.randn(num, r, n, generator=g, dtype=torch.float64)
    return b @ a


def _decoupled_reference(deltas):
    """Steps 2–4 without orthogonalization, one row at a time."""
    num, m, n = deltas.shape
    out = torch.zeros(m, n, dtype=deltas.dtype)
    for i in range(m):
        mags = [deltas[t, i].norm() for t in range(num)]
        direction = sum(deltas[t, i] / mags[t] for t in range(num) if mags[t] > 0)
        if isinstance(direction, torch.Tensor) and direction.norm() > 0:
            out[i] = sum(mags) / num * direction / direction.norm()
    return out


def test_decoupled_merge_matches_row_loop_reference():
    deltas = _lora(3, 9, 7, 2, seed=1)
    deltas[1, 4] = 0  # a zero row in one task
    got = do_merge_matrix(deltas, steps=0)
    torch.testing.assert_close(got, _decoupled_reference(deltas))


def test_merged_rows_have_the_mean_task_magnitude():
    deltas = _lora(4, 10, 6, 3, seed=2)
    got = do_merge_matrix(deltas, steps=100, gamma=0.5)
    torch.testing.assert_close(got.norm(dim=1), deltas.norm(dim=2).mean(0))


def test_single_task_and_self_merge_return_the_model():
    """T=1 has no cross-task term, so nothing moves; T identical copies without the descent."""
    deltas = _lora(1, 8, 5, 2, seed=3)
    torch.testing.assert_close(do_merge_matrix(deltas, steps=200), deltas[0])
    copies = deltas.expand(3, 8, 5)
    torch.testing.assert_close(do_merge_matrix(copies, steps=0), deltas[0])


def test_balanced_factors_recover_the_lora_rank_and_product():
    deltas = _lora(1, 12, 9, 3, seed=4)
    b, a = balanced_factors(deltas[0])
    assert b.shape == (12, 3) and a.shape == (3, 9)
    torch.testing.assert_close(b @ a, deltas[0])
    torch.testing.assert_close(b.T @ b, a @ a.T)  # balanced: both Grams equal Σ
    b2, a2 = balanced_factors(deltas[0], rank=1)
    assert b2.shape == (12, 1) and a2.shape == (1, 9)


def test_orthogonalization_lowers_overlap_and_stays_close():
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(1, 20, generator=g, dtype=torch.float64)
    factors = [torch.randn(2, 20, generator=g, dtype=torch.float64) + shared for _ in range(3)]
    out = orthogonalize(factors, steps=300, gamma=1.0)
    assert overlap(out) < 0.5 * overlap(factors)
    for f, o in zip(factors, out, strict=True):
        assert (o - f).norm() / f.norm() < 0.5
    # more proximity weight → smaller perturbation, less decorrelation
    tight = orthogonalize(factors, steps=300, gamma=20.0)
    moved = sum((o - f).norm() for f, o in zip(factors, out, strict=True))
    moved_tight = sum((o - f).norm() for f, o in zip(factors, tight, strict=True))
    assert moved_tight < moved and overlap(tight) > overlap(out)


def test_orthogonalization_reaches_a_stationary_point_of_the_stated_loss():
    """The descent's hand-written gradient agrees with autograd of the spec's objective."""
    g = torch.Generator().manual_seed(6)
    factors = [torch.randn(2, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    gamma = 0.7
    out = orthogonalize(factors, steps=3000, gamma=gamma)
    norms = [f.norm() for f in factors]
    x = torch.cat([o / nrm for o, nrm in zip(out, norms, strict=True)]).requires_grad_()
    x0 = torch.cat([f / nrm for f, nrm in zip(factors, norms, strict=True)])
    loss = overlap(list(x.split(2))) + gamma * (x - x0).square().sum()
    (grad,) = torch.autograd.grad(loss, x)
    x0r = x0.clone().requires_grad_()
    loss0 = overlap(list(x0r.split(2)))
    (grad0,) = torch.autograd.grad(loss0, x0r)
    assert grad.norm() < 1e-6 * grad0.norm()


def test_already_orthogonal_factors_are_unchanged():
    eye = torch.eye(6, dtype=torch.float64)
    factors = [2.0 * eye[0:2], 0.5 * eye[2:4], eye[4:6]]
    out = orthogonalize(factors, steps=50)
    for f, o in zip(factors, out, strict=True):
        torch.testing.assert_close(o, f)


def test_method_applies_lambda_and_handles_vectors_and_convs():
    g = torch.Generator().manual_seed(7)
    shapes = {"w": (6, 4), "b": (6,), "conv": (4, 2, 3, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tuned = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in "ab"
    ]
    method, params = DOMerge(), DOMerge.Params(**{"lambda": 0.8, "steps": 0})
    for k, v in base.items():
        got = method.merge(v, [t[k] for t in tuned], params, [], MergeContext(k))
        assert got.shape == v.shape
        deltas = torch.stack([t[k] - v for t in tuned])
        rows = deltas.reshape(2, 1, -1) if v.ndim == 1 else deltas.reshape(2, v.shape[0], -1)
        expect = v + 0.8 * _decoupled_reference(rows.double()).float().reshape(v.shape)
        torch.testing.assert_close(got, expect)


def test_registered_with_validated_params():
    assert methods.get("do_merge") is DOMerge
    with pytest.raises(pydantic.ValidationError):
        DOMerge.Params(gamma=0.0)
    with pytest.raises(pydantic.ValidationError):
        DOMerge.Params(steps=-1)
    with pytest.raises(pydantic.ValidationError):
        DOMerge.Params(lr=0.1)


def test_engine_on_disk_equals_direct_per_tensor_calls(tmp_path):
    params = {"lambda": 0.9, "steps": 20, "rank": 3}
    base, fts, got = engine_merge(tmp_path, "do_merge", params)
    ref = direct_merge(DOMerge(), base, fts, DOMerge.Params(**params), [NoParams()] * 2)
    assert list(got) == list(base)
    for n in base:
        assert torch.equal(got[n], ref[n]), n


def test_full_rank_deltas_need_an_explicit_rank(monkeypatch):
    monkeypatch.setattr("splice.merge.methods.do_merge.MAX_FACTOR_ROWS", 12)
    deltas = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(8))  # rank 8 each
    with pytest.raises(SpliceError, match="set `rank`"):
        do_merge_matrix(deltas)
    assert do_merge_matrix(deltas, rank=4, steps=5).shape == (10, 8)
    assert do_merge_matrix(deltas, steps=0).shape == (10, 8)
