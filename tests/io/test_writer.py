"""Atomic sharded writer: round trips, HF compatibility, sharded-dir validation, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from splice.errors import SpliceError
from splice.io import CheckpointWriter, atomic_dir, open_checkpoint, parse_size
from splice.io.atomic import clean_stale_temps


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.weight": torch.randn(32, 16, generator=g) for i in range(6)}
    sd["bf16"] = torch.randn(3, 7, generator=g).to(torch.bfloat16)
    sd["half"] = torch.randn(5, generator=g).half()
    sd["ids"] = torch.arange(9)
    sd["flag"] = torch.tensor([True, False])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    return sd


def _write(dest: Path, sd: dict[str, torch.Tensor], **kw) -> None:
    with CheckpointWriter(dest, **kw) as w:
        for k, v in sd.items():
            w.write(k, v)


def test_sharded_round_trip_is_bit_identical(tmp_path: Path) -> None:
    sd = _state()
    _write(tmp_path / "out", sd, max_shard_size="5KB", metadata={"seed": "7"})
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.format == "hf" and list(ckpt) == list(sd)
    for k, v in sd.items():
        got = ckpt[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert ckpt.metadata == {"format": "pt", "seed": "7"}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == ckpt.total_bytes
    assert set(index["weight_map"].values()) == set(shards)


def test_single_shard_is_model_safetensors_readable_by_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = _state()
    _write(tmp_path / "out", sd)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_output_loads_in_transformers_from_pretrained(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertModel(cfg).eval()
    src = tmp_path / "src"
    cfg.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    with CheckpointWriter(tmp_path / "out", max_shard_size="20KB", copy_files_from=src) as w:
        for k, v in model.state_dict().items():
            w.write(k, v)
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    reloaded = BertModel.from_pretrained(out).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, reloaded(ids).last_hidden_state)


def test_existing_destination_needs_force_and_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write(dest, {"a": torch.ones(2)})
    with pytest.raises(SpliceError, match="--force"):
        CheckpointWriter(dest)
    _write(dest, {"b": torch.zeros(3)}, force=True)
    assert list(open_checkpoint(dest)) == ["b"]


def test_exception_mid_write_leaves_destination_untouched(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write(dest, {"a": torch.ones(2)})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(RuntimeError), CheckpointWriter(dest, force=True, max_shard_size=8) as w:
        w.write("x", torch.ones(4))
        w.write("y", torch.ones(4))
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fresh_destination_absent_after_failure(tmp_path: Path) -> None:
    with pytest.raises(SpliceError, match="written twice"), CheckpointWriter(tmp_path / "o") as w:
        w.write("a", torch.ones(1))
        w.write("a", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dirs_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / ".out.splice-tmp-999999999-abcd1234"
    stale.mkdir()
    (stale / "part").write_bytes(b"x")
    live = tmp_path / ".out.splice-tmp-1-abcd1234"  # pid 1 is alive
    live.mkdir()
    clean_stale_temps(tmp_path / "out")
    assert not stale.exists() and live.exists()


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    with pytest.raises(KeyboardInterrupt), atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp left behind
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    with atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]  # replaced, not merged


@pytest.mark.parametrize("layout", [False, True])
def test_shard_files_name_and_hash_the_published_shards(tmp_path: Path, layout: bool) -> None:
    import hashlib

    sd = {k: v for k, v in _state().items() if v.numel()}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()] if layout else None
    with CheckpointWriter(tmp_path / "o", max_shard_size="2KB", layout=plan) as w:
        for k, v in sd.items():
            w.write(k, v)
        staged = {final: hashlib.sha256(p.read_bytes()).hexdigest() for p, final in w.shard_files()}
    published = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "o").glob("*.safetensors")
    }
    assert len(staged) > 1 and staged == published


@pytest.mark.parametrize(
    ("layout", "checksums", "reverse", "streamed"),
    [
        (True, True, False, True),  # hashed from the written bytes, never read back
        (True, True, True, False),  # out of file order: read back
        (True, False, False, False),
        (False, True, False, False),  # spill mode: read back
    ],
)
def test_shard_digests_equal_the_published_files(
    tmp_path: Path, monkeypatch, layout: bool, checksums: bool, reverse: bool, streamed: bool
) -> None:
    import hashlib

    import splice.io.writer as writer_module
    from tests.conftest import spy_hashed_files

    read_back = spy_hashed_files(monkeypatch, writer_module)
    sd = _state()
    plan = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()] if layout else None
    items = list(sd.items())[::-1] if reverse else list(sd.items())
    with CheckpointWriter(
        tmp_path / "o", max_shard_size="2KB", layout=plan, checksums=checksums
    ) as w:
        for k, v in items:
            w.write(k, v)
        digests = w.shard_digests()
    published = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "o").glob("*.safetensors")
    }
    assert len(published) > 1 and digests == published
    assert (not read_back) == streamed


def test_added_files_and_names_are_checked(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "o") as w:
        w.write("a", torch.ones(1))
        w.add_file("ledger.json", "{}")
        with pytest.raises(SpliceError, match="directories"):
            w.add_file("../evil", "x")
        with pytest.raises(SpliceError, match="invalid tensor name"):
            w.write("/etc/x", torch.ones(1))
    assert (tmp_path / "o" / "ledger.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("text", "value"),
    [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)), ("10", 10), (7, 7)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "2XB", "-1GB", "0", 0])
def test_parse_size_rejects(bad: str | int) -> None:
    with pytest.raises(SpliceError):
        parse_size(bad)


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(2)}, d / "s1.safetensors")
    save_file({"b": torch.ones(3)}, d / "s2.safetensors")
    return d


def _index(d: Path, weight_map: dict[str, str]) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"a": "s1.safetensors", "b": "missing.safetensors"}, "does not exist"),
        ({"a": "s1.safetensors", "b": "../s2.safetensors"}, "not a plain file name"),
        ({"a": "s1.safetensors", "b": "/tmp/s2.safetensors"}, "not a plain file name"),
        ({"a": "s2.safetensors", "b": "s1.safetensors"}, "puts it in"),
        ({"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}, "absent"),
        ({}, "no weight_map"),
    ],
)
def test_broken_index_is_refused(tmp_path: Path, weight_map: dict[str, str], message: str) -> None:
    d = _sharded(tmp_path)
    _index(d, weight_map)
    with pytest.raises(SpliceError, match=message):
        open_checkpoint(d)


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, d / "s2.safetensors")
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(SpliceError, match="in both"):
        open_checkpoint(d)


def test_tensor_missing_from_index_is_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    save_file({"b": torch.ones(3), "z": torch.ones(1)}, d / "s2.safetensors")
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(SpliceError, match="does not list it"):
        open_checkpoint(d)


def test_valid_index_reads_lazily(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    ckpt = open_checkpoint(d)
    assert sorted(ckpt) == ["a", "b"] and len(ckpt.files) == 2
    assert torch.equal(ckpt["b"], torch.ones(3))


def test_check_unchanged_detects_rewritten_input(tmp_path: Path) -> None:
    import os

    d = _sharded(tmp_path)
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    ckpt = open_checkpoint(d)
    ckpt.check_unchanged()
    save_file({"b": torch.zeros(3)}, d / "s2.safetensors")
    os.utime(d / "s2.safetensors", ns=(1, 1))
    with pytest.raises(SpliceError, match="changed while splice was reading"):
        ckpt.check_unchanged()


@pytest.mark.parametrize("dest", ["in", "in/sub", ".", "in/../in"])
def test_output_may_not_overlap_an_input(tmp_path: Path, dest: str) -> None:
    inp = tmp_path / "in"
    _write(inp, {"a": torch.ones(2)})
    before = (inp / "model.safetensors").read_bytes()
    with pytest.raises(SpliceError, match="overlaps the input"):
        CheckpointWriter(tmp_path / dest, force=True, protect=[inp])
    assert (inp / "model.safetensors").read_bytes() == before
    CheckpointWriter(tmp_path / "elsewhere", protect=[inp])


def _layout(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def test_planned_layout_writes_the_same_bytes_in_any_order(tmp_path: Path) -> None:
    sd = _state()
    _write(tmp_path / "spill", sd, max_shard_size="5KB")
    with CheckpointWriter(tmp_path / "planned", max_shard_size="5KB", layout=_layout(sd)) as w:
        for k in reversed(list(sd)):
            w.write(k, sd[k])
    spill, planned = tmp_path / "spill", tmp_path / "planned"
    names = sorted(p.name for p in spill.iterdir())
    assert names == sorted(p.name for p in planned.iterdir()) and len(names) > 2
    for n in names:
        assert (spill / n).read_bytes() == (planned / n).read_bytes(), n


@pytest.mark.parametrize(
    ("bad", "message"),
    [("missing", "never written"), ("shape", "planned as"), ("unplanned", "not in the planned")],
)
def test_planned_layout_mismatches_are_errors(tmp_path: Path, bad: str, message: str) -> None:
    sd = _state()
    with (
        pytest.raises(SpliceError, match=message),
        CheckpointWriter(tmp_path / "o", layout=_layout(sd)) as w,
    ):
        for k, v in sd.items():
            if bad == "missing" and k == "half":
                continue
            w.write(k, v[:1] if bad == "shape" and k == "half" else v)
        if bad == "unplanned":
            w.write("extra", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    weight_map=st.dictionaries(
        st.sampled_from(["a", "b", "c", "", "../x", "a/b"]),
        st.sampled_from(
            [
                "s1.safetensors",
                "s2.safetensors",
                "s3.safetensors",
                "../s1.safetensors",
                "/etc/passwd",
                "",
                ".",
                "s1.safetensors/",
            ]
        ),
        max_size=4,
    ),
    raw=st.one_of(st.none(), st.text(max_size=40)),
)
def test_fuzzed_index_raises_only_splice_error(
    tmp_path_factory: pytest.TempPathFactory, weight_map: dict[str, str], raw: str | None
) -> None:
    d = _sharded(tmp_path_factory.mktemp("fz"))
    _index(d, raw if raw is not None else {"weight_map": weight_map})
    try:
        ckpt = open_checkpoint(d)
        assert set(ckpt) <= {"a", "b"} and all(ckpt[n].numel() for n in ckpt)
    except SpliceError as e:
        assert "\n" not in str(e)
