"""The strict safetensors reader: every rejection class, and fuzzed headers never crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from splice.errors import SpliceError
from splice.io import open_checkpoint


def _raw(header: dict, data: bytes = b"") -> bytes:
    return _with_header(json.dumps(header).encode(), data)


_DUP_HEADER = (
    b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    b'"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
)


def _with_header(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _write(tmp_path: Path, content: bytes, name: str = "m.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.safetensors"
    save_file(
        {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, p
    )
    return p


def test_reads_safetensors_written_by_the_reference_library(good: Path) -> None:
    ckpt = open_checkpoint(good)
    assert ckpt.format == "safetensors"
    assert set(ckpt) == {"a.weight", "b"}
    assert ckpt.info("a.weight").shape == (2, 3)
    assert ckpt.info("b").dtype == torch.int64
    assert torch.equal(ckpt["a.weight"], torch.arange(6.0).reshape(2, 3))
    assert ckpt.num_params == 10 and ckpt.total_bytes == 6 * 4 + 4 * 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (struct.pack("<Q", 10_000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "not UTF-8"),
        (struct.pack("<Q", 5) + b"{bad}", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            _raw({"t": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            "unsupported dtype",
        ),
        (
            _raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "needs 8 bytes",
        ),
        (
            _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),
            "data section",
        ),
        (
            _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6),
            "data section",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
                },
                b"\0" * 8,
            ),
            "overlaps",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                b"\0" * 12,
            ),
            "leaves a gap",
        ),
        (_raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "needs 4"),
        (
            _raw({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "bad shape",
        ),
        (_raw({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype"),
        (_raw({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "invalid"),
        (
            _raw(
                {"../../etc/passwd": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4,
            ),
            "invalid tensor name",
        ),
        (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
        (_with_header(_DUP_HEADER, b"\0" * 4), "duplicate key"),
    ],
)
def test_malformed_file_is_refused_with_one_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    p = _write(tmp_path, content)
    with pytest.raises(SpliceError, match=message) as info:
        open_checkpoint(p)
    assert "\n" not in str(info.value)
    assert str(p) in str(info.value)


def test_file_truncated_after_open_errors_cleanly(good: Path) -> None:
    ckpt = open_checkpoint(good)
    size = good.stat().st_size
    with open(good, "r+b") as f:
        f.truncate(size - 8)
    last = max(ckpt.infos(), key=lambda i: i.offset).name
    with pytest.raises(SpliceError, match="truncated"):
        ckpt[last]


def test_pickle_refused_without_opt_in_and_weights_only_with_it(tmp_path: Path) -> None:
    p = tmp_path / "w.bin"
    torch.save({"x": torch.ones(2)}, p)
    with pytest.raises(SpliceError, match="allow-pickle"):
        open_checkpoint(p)
    ckpt = open_checkpoint(p, allow_pickle=True)
    assert ckpt.format == "pickle" and torch.equal(ckpt["x"], torch.ones(2))


def test_malicious_pickle_never_executes(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):  # runs os.system on unpickle with weights_only=False
            import os

            return (os.system, (f"touch {canary}",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(SpliceError, match="refused or unreadable pickle"):
        open_checkpoint(p, allow_pickle=True)
    assert not canary.exists()


def test_directory_without_checkpoint_is_explained(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SpliceError, match="not a checkpoint directory"):
        open_checkpoint(tmp_path)
    with pytest.raises(SpliceError, match="never downloads"):
        open_checkpoint(tmp_path / "org" / "model")


def test_unknown_file_type(tmp_path: Path) -> None:
    p = tmp_path / "weights.npz"
    p.write_bytes(b"abc")
    with pytest.raises(SpliceError, match="unrecognised checkpoint file type"):
        open_checkpoint(p)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_bytes_raise_only_splice_error(tmp_path: Path, data: st.DataObject) -> None:
    base = bytearray(
        _raw(
            {
                "__metadata__": {"format": "pt"},
                "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
            },
            bytes(range(24)),
        )
    )
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(base) - 1)))
        if op == "flip" and base:
            base[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del base[pos : pos + data.draw(st.integers(1, 8))]
        else:
            base[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(base))
    try:
        ckpt = open_checkpoint(p)
        for name in ckpt:
            t = ckpt[name]
            assert tuple(t.shape) == ckpt.info(name).shape
    except SpliceError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("shape", [(0, 3), (), (3,), (2_500_000,)])  # the last: 10 MB, huge pages
def test_large_and_empty_tensors_read_exactly(tmp_path: Path, shape: tuple[int, ...]) -> None:
    t = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float32)[
        : torch.Size(shape).numel()
    ]
    save_file({"t": t.reshape(shape)}, tmp_path / "m.safetensors")
    got = open_checkpoint(tmp_path / "m.safetensors")["t"]
    assert got.shape == torch.Size(shape) and torch.equal(got, t.reshape(shape))
    got += 1  # a private, writable buffer
    assert torch.equal(open_checkpoint(tmp_path / "m.safetensors")["t"], t.reshape(shape))
