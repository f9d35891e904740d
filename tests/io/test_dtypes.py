"""Dtypes as plain data (``splice.io._dtypes``): the table agrees with safetensors and torch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import _TYPES as SAFETENSORS_TORCH

from splice.io import dtype_name, is_floating, itemsize, open_checkpoint, to_torch
from splice.io._dtypes import ITEMSIZE, SAFETENSORS, safetensors_code


def test_table_matches_safetensors_and_torch():
    for code, name in SAFETENSORS.items():
        want = SAFETENSORS_TORCH[code]
        assert to_torch(name) is want and dtype_name(want) == name
        assert itemsize(name) == want.itemsize and is_floating(name) == want.is_floating_point
        assert safetensors_code(want) == code
    assert set(ITEMSIZE) == set(SAFETENSORS.values())


def test_dtypes_outside_the_table_ask_torch():
    assert dtype_name(torch.complex64) == "complex64" and itemsize(torch.complex64) == 8
    assert not is_floating("complex64") and safetensors_code(torch.complex64) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_info_keeps_the_name_and_gives_the_torch_dtype(tmp_path, dtype):
    from safetensors.torch import save_file

    t = torch.zeros(3, 5, dtype=dtype)
    save_file({"x": t}, str(tmp_path / "m.safetensors"))
    info = open_checkpoint(tmp_path / "m.safetensors").info("x")
    assert info.dtype_name == str(dtype).removeprefix("torch.") and info.dtype is dtype
    assert info.itemsize == t.element_size() and info.nbytes == 15 * t.element_size()
    assert info.is_floating_point == dtype.is_floating_point
