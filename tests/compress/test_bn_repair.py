"""Batch-norm repair of a merged network (splice.compress.batchnorm: bn_targets, pool_targets,
match_bn): the merged model's normalised BN outputs take the pooled statistics of the
fine-tunes, each on its own data."""

from __future__ import annotations

import copy

import torch

from splice.compress import bn_targets, capture, match_bn, pool_targets, reestimate_bn

from .conftest import calibrated_tinynet


def forward(m, b):
    return m(b)


def _z(net, name, batches):
    """The normalised BN output ``(y − β)/γ`` of every position, one row per channel."""
    bn = net.get_submodule(name)
    _, ys = capture(net, name, batches, forward, inputs=False)
    y = torch.cat(ys).double().transpose(0, 1).reshape(ys[0].shape[1], -1)
    return (y - bn.bias.double()[:, None]) / bn.weight.double()[:, None]


def _fine_tune(net, seed):
    tuned = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    for conv in (tuned.conv1, tuned.conv2):
        conv.weight.data += 0.3 * torch.randn(conv.weight.shape, generator=g)
    return tuned


def _data(seed, shift):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(16, 3, 8, 8, generator=g) * 2 + shift for _ in range(3)]


def test_a_model_matched_to_itself_keeps_its_statistics(images):
    net = calibrated_tinynet(images)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    other = _data(5, 0.7)  # data other than the running statistics'
    assert match_bn(net, other, forward, bn_targets(copy.deepcopy(net), other, forward)) == 2
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)


def test_one_target_is_the_reference_reestimation(images):
    net = calibrated_tinynet(images)
    ref, q = _fine_tune(net, 1), _fine_tune(net, 2)
    other = _data(6, 0.2)
    want = copy.deepcopy(q)
    reestimate_bn(want, other, forward, reference=ref)
    targets = bn_targets(ref, other, forward)
    assert pool_targets([targets], [3.0]).keys() == targets.keys()
    match_bn(q, other, forward, pool_targets([targets], [3.0]))
    for k, v in q.state_dict().items():
        torch.testing.assert_close(v, want.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_the_merge_takes_the_pooled_statistics_of_the_fine_tunes(images):
    """Two fine-tunes, each on its own data; their weight average, repaired on the union,
    has per channel the mean and variance of the two fine-tunes' z values put together."""
    net = calibrated_tinynet(images)
    a, b = _fine_tune(net, 1), _fine_tune(net, 2)
    data_a, data_b = _data(3, 0.0), _data(4, 1.0)
    merged = copy.deepcopy(net)
    for p, pa, pb in zip(merged.parameters(), a.parameters(), b.parameters(), strict=True):
        p.data = (pa.data + pb.data) / 2
    targets = pool_targets([bn_targets(a, data_a, forward), bn_targets(b, data_b, forward)], [1, 1])
    # before the repair the merge is off the fine-tunes' statistics
    z = _z(merged, "bn1", data_a + data_b)
    want = torch.cat([_z(a, "bn1", data_a), _z(b, "bn1", data_b)], 1)
    assert (z.mean(1) - want.mean(1)).abs().max() > 0.05
    assert match_bn(merged, data_a + data_b, forward, targets) == 2
    for name in ("bn1", "bn2"):
        z = _z(merged, name, data_a + data_b)
        want = torch.cat([_z(a, name, data_a), _z(b, name, data_b)], 1)
        torch.testing.assert_close(z.mean(1), want.mean(1), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            z.var(1, unbiased=False), want.var(1, unbiased=False), rtol=1e-3, atol=1e-5
        )
