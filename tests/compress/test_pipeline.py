"""The light and advanced pipelines (spec other.md §4.7) on a tiny BN net, and their errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.compress import (
    AdaQuantConfig,
    QuantizeConfig,
    bias_problem,
    capture,
    kl_to_target,
    mean_shift,
    model_bits,
    quant_layers,
    quantize,
    quantize_sizes,
    wrap,
)
from splice.errors import SpliceError

FAST = AdaQuantConfig(iters=30, batch=8)
FEW = AdaQuantConfig(iters=3, batch=8)


def run(model, batches):
    return model(batches)


def test_fixed_bits_keeps_the_ends_at_8_and_leaves_the_input_model_alone(tinynet, images, steps):
    before = {k: v.clone() for k, v in tinynet.state_dict().items()}
    cfg = QuantizeConfig(bits=4, adaquant=FAST, bias_steps=10)
    q, report = quantize(tinynet, images, run, steps, cfg)
    assert {n: layer.w_bits for n, layer in quant_layers(q)} == {"conv1": 8, "conv2": 4, "fc": 8}
    assert [r.name for r in report.layers] == ["conv1", "conv2", "fc"]
    assert all(r.mse_after is not None for r in report.layers)
    assert set(report.loss) == {"quantized", "bn", "bias"}
    assert all(torch.equal(before[k], v) for k, v in tinynet.state_dict().items())
    assert report.bits == model_bits(q) < report.fp32_bits
    fp_out = tinynet(images[0])
    assert float(kl_to_target(q(images[0]), fp_out)) == pytest.approx(report.loss["bias"], rel=1.0)


def test_a_size_target_is_met_by_the_integer_program(tinynet, images, steps):
    cfg = QuantizeConfig(size=0.3, options=(2, 4, 8), pipeline="light", ends_bits=None)
    q, report = quantize(tinynet, images, run, steps, cfg)
    assert report.fraction <= 0.3
    assert report.loss["base"] >= 0
    bits = {n: layer.w_bits for n, layer in quant_layers(q)}
    assert set(bits.values()) <= {2, 4, 8} and min(bits.values()) < 8
    roomier = quantize(tinynet, images, run, steps, cfg.model_copy(update={"size": 1.0}))[0]
    assert all(layer.w_bits == 8 for _, layer in quant_layers(roomier))  # no loss to trade


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"bits": 9}, "bits 9 is not supported — fix: use an integer from 2 to 8"),
        ({"bits": 1}, "bits 1 is not supported"),
        ({"size": 0.2}, "give exactly one of bits and size"),
        ({"bits": None, "size": 1.5}, "size 1.5 is not a fraction"),
    ],
)
def test_bad_settings_are_one_line_errors(update, message):
    with pytest.raises(SpliceError, match=message):
        QuantizeConfig(**{"bits": 4, **update})


def test_an_unreachable_size_names_the_smallest_reachable(tinynet, images, steps):
    cfg = QuantizeConfig(size=0.01, options=(4, 8), pipeline="light")
    with pytest.raises(SpliceError, match=r"size 0.01 is below the smallest reachable 0\.\d+"):
        quantize(tinynet, images, run, steps, cfg)


def test_a_model_without_quantizable_layers_is_refused(images, steps):
    with pytest.raises(SpliceError, match="no quantizable layer"):
        quantize(nn.Sequential(nn.ReLU()), images, run, steps, QuantizeConfig(bits=4))


def test_calibration_data_of_the_wrong_shape_is_refused(tinynet, steps):
    grey = [torch.rand(4, 1, 8, 8)]
    with pytest.raises(SpliceError, match="calibration data does not fit the model"):
        quantize(tinynet, grey, run, steps, QuantizeConfig(bits=4))


def test_mean_shift_matches_the_fp_channel_means():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [torch.rand(20, 6) + 1 for _ in range(3)]
    q = copy.deepcopy(fp)
    wrap(q, "0", 2, None)
    wrap(q, "2", 2, None)
    assert mean_shift(q, fp, batches, run) == 2
    for name in ("0", "2"):
        _, yq = capture(q, name, batches, run, inputs=False)
        _, yf = capture(fp, name, batches, run, inputs=False)
        assert torch.allclose(torch.cat(yq).mean(0), torch.cat(yf).mean(0), atol=1e-5)


def test_bias_tuning_lowers_the_kl_to_the_fp_logits(tinynet, images, steps):
    q = copy.deepcopy(tinynet)
    wrap(q, "conv1", 8, None)
    wrap(q, "conv2", 2, None)
    layer = wrap(q, "fc", 8, None)
    q.conv1.base.bias = nn.Parameter(torch.zeros(8))  # give the convs a bias to tune
    q.conv2.base.bias = nn.Parameter(torch.zeros(8))
    targets = [tinynet(b).detach() for b in images]

    @torch.no_grad()
    def kl():
        return sum(float(kl_to_target(q(b), t)) for b, t in zip(images, targets, strict=True))

    before, fc_bias = kl(), layer.base.bias.detach().clone()
    loss, opt = bias_problem(q, images, targets, run, exclude=["fc"])
    steps(loss, opt, 40)
    assert kl() < before
    assert torch.equal(layer.base.bias, fc_bias)  # the classifier's bias is left alone


def test_a_bops_budget_counts_macs_times_weight_and_input_bits(tinynet, images, steps):
    cfg = QuantizeConfig(size=0.053, options=(2, 4, 8), pipeline="light", cost="bops")
    q, _ = quantize(tinynet, images, run, steps, cfg)
    # MACs per image: conv1 8·8·8 outputs × 27, conv2 8·8·8 × 8, fc 5 × 8
    macs = {"conv1": 512 * 27, "conv2": 512 * 8, "fc": 40}
    bits = {n: layer.w_bits for n, layer in quant_layers(q)}
    assert bits["conv1"] == bits["fc"] == 8  # the ends
    assert sum(macs[n] * b * 8 for n, b in bits.items()) <= 0.053 * sum(macs.values()) * 32 * 32
    assert bits["conv2"] == 2  # 4 bits would not fit: (13824·8 + 4096·4 + 40·8)·8 > budget


def test_a_size_sweep_equals_one_run_per_size(tinynet, images, steps):
    cfg = QuantizeConfig(size=0.3, options=(2, 4, 8), pipeline="light", ends_bits=None)
    swept = list(quantize_sizes(tinynet, images, run, steps, cfg, [0.25, 0.3, 1.0]))
    assert [size for size, _, _ in swept] == [0.25, 0.3, 1.0]
    for size, q, report in swept:
        alone, single = quantize(tinynet, images, run, steps, cfg.model_copy(update={"size": size}))
        assert report.fraction == single.fraction <= size
        assert [r.bits for r in report.layers] == [r.bits for r in single.layers]
        assert report.loss == pytest.approx(single.loss)
        assert torch.equal(q(images[0]), alone(images[0]))
    assert [r.bits for r in swept[-1][2].layers] == [8, 8, 8]
    with pytest.raises(SpliceError, match=r"size 0\.01 is below the smallest reachable"):
        next(quantize_sizes(tinynet, images, run, steps, cfg, [0.01, 0.3]))


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_sequential_inputs_come_from_the_partly_quantized_model_on_every_batch(
    tinynet, images, steps, monkeypatch, mode
):
    import splice.compress.pipeline as pipeline

    seen = {}

    def spy(layer, xs):  # the inputs AdaQuant fits on
        seen[next(n for n, m in quant_layers(q_model[0]) if m is layer)] = [x.clone() for x in xs]

    q_model = []
    wrap_ = pipeline.wrap
    monkeypatch.setattr(pipeline, "wrap", lambda m, *a: (q_model.append(m), wrap_(m, *a))[1])
    monkeypatch.setattr(pipeline, "init_input_range", spy)
    cfg = QuantizeConfig(bits=4, mode=mode, adaquant=FAST, bias_steps=0, bn=False)
    q, _ = quantize(tinynet, images, run, steps, cfg)
    assert list(seen) == ["conv1", "conv2", "fc"]
    for name, xs in seen.items():
        # sequential: layer k's inputs through the final quantized layers before it
        source = q if mode == "sequential" else tinynet
        expected, _ = capture(source, name, images, run, outputs=False)
        assert len(xs) == len(images)  # every batch, not only the first
        assert all(torch.equal(x, e) for x, e in zip(xs, expected, strict=True))
    if mode == "sequential":  # and not the float inputs
        float_fc, _ = capture(tinynet, "fc", images, run, outputs=False)
        assert not torch.allclose(seen["fc"][0], float_fc[0])


@pytest.mark.parametrize(
    "cfg",
    [
        QuantizeConfig(bits=4, adaquant=FEW, bias_steps=2),
        QuantizeConfig(bits=4, adaquant=FEW, mode="parallel", bias_steps=0),
        QuantizeConfig(size=0.4, options=(2, 8), adaquant=FEW, bias_steps=0, ends_bits=None),
    ],
    ids=["sequential", "parallel", "size"],
)
def test_lockstep_and_spill_give_the_fresh_forwards_result(
    tinynet, images, steps, monkeypatch, cfg
):
    from splice.compress.lockstep import Lockstep
    from splice.compress.spill import Spill

    q, report = quantize(tinynet, images, run, steps, cfg)
    monkeypatch.setattr(Lockstep, "take", lambda self, name: None)  # every layer captured afresh
    monkeypatch.setattr(Spill, "outputs", lambda self, name: [])
    fresh, fresh_report = quantize(tinynet, images, run, steps, cfg)
    assert report.loss == fresh_report.loss
    assert torch.equal(q(images[1]), fresh(images[1]))
