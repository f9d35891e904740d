"""The saved quantized model: outputs equal the fake-quant model's; load → save is
byte-identical; the plain dequantising loader gives the quantized weights; packing."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.compress import quant_layers, wrap
from splice.compress.files import WEIGHTS, apply_quantized, dequantize, pack, save_quantized, unpack
from splice.errors import SpliceError

from .conftest import TinyNet


def _quantized(tinynet):
    q = copy.deepcopy(tinynet)
    for name, bits in (("conv1", 8), ("conv2", 3), ("fc", 4)):
        layer = wrap(q, name, bits, 8)
        layer.aq.init_minmax(torch.tensor(-2.0), torch.tensor(3.0))
    return q


def test_saved_outputs_equal_the_fake_quant_outputs(tinynet, images, tmp_path):
    q = _quantized(tinynet)
    expected = q(images[0])
    save_quantized(copy.deepcopy(q), tmp_path / "out")
    loaded = apply_quantized(TinyNet(), tmp_path / "out").eval()
    assert torch.equal(loaded(images[0]), expected)
    assert {n: layer.w_bits for n, layer in quant_layers(loaded)} == {
        "conv1": 8,
        "conv2": 3,
        "fc": 4,
    }


def test_load_then_save_is_byte_identical(tinynet, tmp_path):
    save_quantized(_quantized(tinynet), tmp_path / "a", files={"report.json": "{}"})
    save_quantized(apply_quantized(TinyNet(), tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()


def test_dequantize_needs_only_the_file_and_gives_the_quantized_weights(tinynet, tmp_path):
    q = _quantized(tinynet)
    weights = {n: layer.quant_weight().detach().clone() for n, layer in quant_layers(q)}
    save_quantized(q, tmp_path / "out")
    state = dequantize(tmp_path / "out")
    plain = TinyNet()
    plain.load_state_dict(state)  # strict: every tensor has its float name
    for name, w in weights.items():
        assert torch.equal(plain.get_submodule(name).weight, w)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_round_trips_and_shrinks(bits):
    q = torch.randint(0, 2**bits, (101,), dtype=torch.uint8)
    packed = pack(q, bits)
    assert torch.equal(unpack(packed, bits, 101), q)
    assert packed.numel() == {2: 26, 3: 51, 4: 51, 5: 101, 8: 101}[bits]


def test_a_plain_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / WEIGHTS))
    with pytest.raises(SpliceError, match="not a splice-quantized file"):
        apply_quantized(TinyNet(), tmp_path)
