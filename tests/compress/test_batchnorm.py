"""BN re-estimation (spec other.md §4.5) restores the FP per-channel output statistics."""

from __future__ import annotations

import copy

import torch

from splice.compress import capture, reestimate_bn, wrap


def _stats(net, name, images):
    _, ys = capture(net, name, images, lambda m, b: m(b), inputs=False)
    y = torch.cat(ys).transpose(0, 1).reshape(ys[0].shape[1], -1)
    return y.mean(1), y.var(1, unbiased=False)


def test_reestimation_restores_the_fp_statistics(tinynet, images):
    fp_mean, fp_var = _stats(tinynet, "bn1", images)
    # the FP BN output on its own calibration data has mean β and variance ≈ γ²
    assert torch.allclose(fp_mean, tinynet.bn1.bias, atol=1e-5)
    assert torch.allclose(
        fp_var, tinynet.bn1.weight**2, rtol=5e-3
    )  # BN keeps unbiased per-batch variances
    q = copy.deepcopy(tinynet)
    wrap(q, "conv1", 2, None)
    shifted_mean, shifted_var = _stats(q, "bn1", images)
    moved = (shifted_mean - fp_mean).abs().max() + (shifted_var / fp_var - 1).abs().max()
    assert moved > 5e-2  # 2-bit weights moved the statistics
    assert reestimate_bn(q, images, lambda m, b: m(b)) == 2
    q_mean, q_var = _stats(q, "bn1", images)
    assert torch.allclose(q_mean, fp_mean, atol=1e-5)
    assert torch.allclose(q_var, fp_var, rtol=5e-3)  # BN keeps unbiased per-batch variances
    assert not q.training and not q.bn1.training and q.bn1.momentum == 0.1


def test_with_a_reference_the_fp_outputs_statistics_return_on_other_data(tinynet, images):
    other = [x * 3 + 1 for x in images]  # not the data the FP statistics were estimated on
    fp_mean, fp_var = _stats(tinynet, "bn2", other)
    q = copy.deepcopy(tinynet)
    wrap(q, "conv1", 2, None)
    wrap(q, "conv2", 2, None)
    assert reestimate_bn(q, other, lambda m, b: m(b), reference=tinynet) == 2
    q_mean, q_var = _stats(q, "bn2", other)
    assert torch.allclose(q_mean, fp_mean, atol=1e-4)
    assert torch.allclose(q_var, fp_var, rtol=1e-3)
    # the plain re-estimation would have moved the statistics to (β, γ²) instead
    assert (fp_mean - tinynet.bn2.bias).abs().max() > 0.1


def test_the_streamed_input_statistics_equal_those_of_all_batches_at_once():
    from splice.compress.batchnorm import _input_stats

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, 4, 4, generator=gen) * 5 + 100 for n in (7, 1, 12)]
    flat = torch.cat(xs).transpose(0, 1).reshape(3, -1).double()
    mean, var = _input_stats(xs)
    assert torch.allclose(mean, flat.mean(1), rtol=1e-12)
    assert torch.allclose(var, flat.var(1, unbiased=False), rtol=1e-10)
