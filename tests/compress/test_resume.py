"""A run stopped part-way (``should_stop``) and resumed from its checkpoint gives the
uninterrupted run's result (splice.compress.resume): fixed bits (sequential AdaQuant) and a
size sweep."""

from __future__ import annotations

import pytest
import torch

from splice.compress import (
    AdaQuantConfig,
    QuantizeConfig,
    QuantizeStopped,
    quantize,
    quantize_sizes,
)
from splice.errors import SpliceError

CFG = QuantizeConfig(size=0.4, options=(2, 8), adaquant=AdaQuantConfig(iters=2, batch=8),
                     bias_steps=2, ends_bits=None)  # fmt: skip


def run(model, batch):
    return model(batch)


def stop_after(layers: int):
    """A ``should_stop`` that says stop once it has been asked ``layers`` times."""
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= layers

    return should_stop


def test_a_stopped_sweep_resumes_to_the_uninterrupted_result(tinynet, images, steps, tmp_path):
    whole = list(quantize_sizes(tinynet, images, run, steps, CFG, [0.3]))

    with pytest.raises(QuantizeStopped, match="after layer 2/3"):
        next(quantize_sizes(tinynet, images, run, steps, CFG, [0.3],
                            should_stop=stop_after(2), checkpoint=tmp_path))  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["layer-0.pt", "layer-1.pt"]
    said: list[str] = []
    resumed = list(quantize_sizes(tinynet, images, run, steps, CFG, [0.3],
                                  progress=said.append, checkpoint=tmp_path))  # fmt: skip
    assert sum("saved before" in m for m in said) == 2  # conv1, conv2 loaded; fc made
    assert (tmp_path / "table.pt").is_file()
    for (size, q, report), (size2, q2, report2) in zip(whole, resumed, strict=True):
        assert size == size2
        assert [r.bits for r in report.layers] == [r.bits for r in report2.layers]
        assert report.loss == report2.loss
        assert torch.equal(q(images[0]), q2(images[0]))
    assert min(r.bits for r in whole[0][2].layers) < 8  # the program had a choice to get right


def test_a_stopped_sequential_run_resumes_to_the_uninterrupted_result(
    tinynet, images, steps, tmp_path
):
    cfg = QuantizeConfig(bits=4, adaquant=AdaQuantConfig(iters=3, batch=8), bias_steps=2)
    whole, report = quantize(tinynet, images, run, steps, cfg)

    with pytest.raises(QuantizeStopped, match="after layer 1/3"):
        quantize(tinynet, images, run, steps, cfg, should_stop=stop_after(1), checkpoint=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["layer-0.pt"]
    said: list[str] = []
    q, report2 = quantize(tinynet, images, run, steps, cfg, progress=said.append,
                          checkpoint=tmp_path)  # fmt: skip
    assert sum("saved before" in m for m in said) == 1  # conv1 loaded; conv2, fc calibrated
    assert report.loss == report2.loss  # conv2's inputs came through the loaded conv1
    assert [r.mse_after for r in report.layers] == [r.mse_after for r in report2.layers]
    assert torch.equal(whole(images[0]), q(images[0]))


def test_a_checkpoint_of_another_config_is_refused(tinynet, images, steps, tmp_path):
    list(quantize_sizes(tinynet, images, run, steps, CFG, [0.5], checkpoint=tmp_path))
    other = CFG.model_copy(update={"options": (4, 8)})  # another table
    with pytest.raises(SpliceError, match="holds another run"):
        next(quantize_sizes(tinynet, images, run, steps, other, [0.5], checkpoint=tmp_path))
