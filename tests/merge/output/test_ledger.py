"""The tensor ledger: every input tensor merged, copied or dropped; hashes; determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.deltas import Dense, save_deltas
from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.merge import merge
from tests.merge._ckpt import finetune, lora_adapter, save, tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"]


def assert_full_coverage(out: Path, inputs: dict[str, Path]) -> dict:
    """Every tensor stored in every input appears in the ledger exactly as stored (merged,
    copied or dropped), and the ledger's outputs are the output checkpoint's tensors."""
    ledger = json.loads((out / "splice-ledger.json").read_text())
    for label, path in inputs.items():
        stored = set(open_checkpoint(path).names())
        seen: set[str] = set()
        for entry in ledger["tensors"]:
            names = entry["inputs"].get(label)
            seen |= {names} if isinstance(names, str) else set(names or [])
        seen |= {d["name"] for d in ledger["dropped"] if d["input"] == label}
        assert seen == stored, (label, sorted(stored ^ seen)[:5])
        counts = ledger["coverage"][label]
        assert counts["tensors"] == len(stored)
        assert counts["merged"] + counts["copied"] + counts["dropped"] == len(stored)
    return ledger


def _hash(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger")
    base = tiny_llama(0)
    save(base, root / "base", shard=2000)
    save(finetune(base, 1), root / "ft1", shard=3000)
    save(finetune(base, 2), root / "ft2")
    for i in range(2):
        lora_adapter(root / f"lora{i}", base, TARGETS, seed=i)
    # an adapter with a full tensor (modules_to_save) besides its LoRA pairs
    tensors = load_file(str(root / "lora1" / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = base["lm_head.weight"] + 1
    save_file(tensors, str(root / "lora1" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    save_deltas({name: Dense(torch.ones_like(base[name]))}, root / "delta.safetensors")
    return root, base


def _run(root: Path, tmp_path: Path, models: list[str], **kw) -> tuple[Path, dict[str, Path]]:
    recipe = {
        "method": kw.pop("method", "ties"),
        "base": str(root / "base"),
        "models": [str(root / m) for m in models],
        "params": kw.pop("params", {"density": 0.5}),
        "seed": 7,
    }
    out = merge(recipe, tmp_path / "out", **kw)
    inputs = {str(root / "base"): root / "base", **{str(root / m): root / m for m in models}}
    return out, inputs


@pytest.mark.parametrize(
    "models",
    [["ft1", "ft2"], ["lora0", "lora1"], ["ft1", "delta.safetensors"], ["lora0", "ft2"]],
    ids=["checkpoints", "adapters", "delta_file", "mixed"],
)
def test_every_input_tensor_is_accounted_for(disk, tmp_path, models):
    root, _ = disk
    out, inputs = _run(root, tmp_path, models)
    ledger = assert_full_coverage(out, inputs)
    written = set(open_checkpoint(out).names())
    assert {e["name"] for e in ledger["tensors"]} == written
    assert ledger["method"] == "ties" and ledger["seed"] == 7
    assert ledger["recipe"]["models"] == [str(root / m) for m in models]
    assert ledger["splice_version"] and ledger["format"] == "splice.ledger/1"
    merged = [e for e in ledger["tensors"] if e["action"] == "merged"]
    sets = ledger["param_sets"]
    assert all(sets[e["param_set"]]["model_params"][0]["density"] == 0.5 for e in merged)
    copied = next(e for e in ledger["tensors"] if e["name"] == "model.steps")
    assert copied["action"] == "copied" and copied["from"] == str(root / "base")


def test_adapter_inputs_list_their_stored_names(disk, tmp_path):
    root, _ = disk
    out, inputs = _run(root, tmp_path, ["lora0", "lora1"])
    ledger = assert_full_coverage(out, inputs)
    by_name = {e["name"]: e for e in ledger["tensors"]}
    q = by_name[TARGETS[0]]["inputs"][str(root / "lora0")]
    assert sorted(q) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    assert by_name["lm_head.weight"]["inputs"][str(root / "lora1")] == (
        "base_model.model.lm_head.weight"
    )
    assert by_name["lm_head.weight"]["inputs"][str(root / "lora0")] is None  # base value


def test_input_and_output_hashes_are_the_files_sha256(disk, tmp_path):
    root, _ = disk
    out, _ = _run(root, tmp_path, ["ft1", "ft2"], max_shard_size=2500)
    ledger = json.loads((out / "splice-ledger.json").read_text())
    for entry in ledger["inputs"]:
        folder = Path(entry["path"])
        on_disk = {p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json")}
        on_disk.discard("model.safetensors.index.json")
        assert set(entry["files"]) == on_disk
        assert all(_hash(folder / f) == h for f, h in entry["files"].items())
    files = {p.name for p in out.iterdir()} - {"splice-ledger.json", "model.safetensors.index.json"}
    assert set(ledger["outputs"]) == files and len(files) > 2
    assert all(_hash(out / f) == h for f, h in ledger["outputs"].items())


def test_the_ledger_is_deterministic(disk, tmp_path):
    root, _ = disk
    recipe = {
        "method": "dare",
        "base": str(root / "base"),
        "models": [str(root / "ft1"), str(root / "lora0")],
        "params": {"p": 0.5},
        "seed": 3,
    }
    a = merge(recipe, tmp_path / "a")
    b = merge(recipe, tmp_path / "b")
    assert (a / "splice-ledger.json").read_bytes() == (b / "splice-ledger.json").read_bytes()


def test_missing_and_extra_tensors_fail_unless_allow_missing(disk, tmp_path):
    root, base = disk
    gone = "model.layers.1.self_attn.v_proj.weight"
    ft = finetune(base, 5)
    partial = {k: v for k, v in ft.items() if k != gone}
    partial["model.extra.weight"] = torch.ones(3)
    save(partial, root / "partial")
    with pytest.raises(SpliceError, match="--allow-missing") as e:
        _run(root, tmp_path, ["ft1", "partial"], method="task_arithmetic", params={})
    assert str(root / "partial") in str(e.value)
    out, inputs = _run(
        root, tmp_path, ["ft1", "partial"], method="task_arithmetic", params={}, allow_missing=True
    )
    ledger = assert_full_coverage(out, inputs)
    assert ledger["options"]["allow_missing"] is True
    assert ledger["dropped"] == [
        {
            "input": str(root / "partial"),
            "name": "model.extra.weight",
            "reason": f"not in {root / 'base'} (--allow-missing)",
        }
    ]
    entry = next(e for e in ledger["tensors"] if e["name"] == gone)
    assert entry["inputs"][str(root / "partial")] is None and "missing in" in entry["notes"][0]
    ft1 = open_checkpoint(root / "ft1")
    got = open_checkpoint(out)[gone]
    torch.testing.assert_close(got, ft1[gone])  # base + τ_ft1 + 0 (the missing one's τ)


def test_inputs_are_hashed_from_the_merge_reads_not_read_twice(tmp_path, monkeypatch):
    import splice.merge.output.ledger as ledger_module
    from tests.conftest import spy_hashed_files

    base = {k: v for k, v in tiny_llama(0).items() if k != "model.steps"}
    save(base, tmp_path / "base", shard=2000)
    save(finetune(base, 1), tmp_path / "ft", shard=2000)
    from_disk = spy_hashed_files(monkeypatch, ledger_module)
    recipe = {"method": "ties", "base": str(tmp_path / "base"), "models": [str(tmp_path / "ft")]}
    out = merge(recipe, tmp_path / "out")
    inputs = [p for p in from_disk if p.parent.name in ("base", "ft")]
    assert inputs and all(p.suffix == ".json" for p in inputs)  # configs only
    for entry in json.loads((out / "splice-ledger.json").read_text())["inputs"]:
        folder = Path(entry["path"])
        assert len(entry["files"]) > 3
        assert all(_hash(folder / f) == h for f, h in entry["files"].items())


def test_checksums_can_be_turned_off(disk, tmp_path):
    root, _ = disk
    out, inputs = _run(root, tmp_path, ["ft1", "lora0"], checksums=False)
    ledger = assert_full_coverage(out, inputs)
    assert ledger["checksums"] is None
    assert set(ledger["outputs"]) >= {"model.safetensors", "config.json"}
    assert not any(ledger["outputs"].values())
    assert not any(v for i in ledger["inputs"] for v in i["files"].values())


def test_digest_cache_skips_unchanged_inputs_and_rehashes_changed_ones(tmp_path, monkeypatch):
    import splice.io._hash as hash_module
    import splice.merge.output.ledger as ledger_module
    from tests.conftest import spy_hashed_files

    monkeypatch.setenv("SPLICE_DIGEST_CACHE", str(tmp_path / "sha.json"))
    monkeypatch.setattr(hash_module, "_QUIET_NS", 0)  # the fixtures were written just now
    base = {k: v for k, v in tiny_llama(0).items() if k != "model.steps"}
    save(base, tmp_path / "base", shard=2000)
    save(finetune(base, 1), tmp_path / "ft", shard=2000)
    recipe = {"method": "ties", "base": str(tmp_path / "base"), "models": [str(tmp_path / "ft")]}
    cold = merge(recipe, tmp_path / "cold")
    tracked: list[Path] = []
    track = hash_module.FollowHasher.track
    monkeypatch.setattr(
        hash_module.FollowHasher, "track", lambda s, p, ready=0: tracked.append(p) or track(s, p)
    )
    from_disk = spy_hashed_files(monkeypatch, ledger_module)
    warm = merge(recipe, tmp_path / "warm")
    assert not tracked and not from_disk  # every input digest came from the cache
    ledger = (warm / "splice-ledger.json").read_bytes()
    assert ledger == (cold / "splice-ledger.json").read_bytes()
    shard = sorted((tmp_path / "ft").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes())  # the same bytes, a new ctime: not trusted any more
    again = merge(recipe, tmp_path / "again")
    assert tracked == [shard]
    assert (again / "splice-ledger.json").read_bytes() == ledger
    for entry in json.loads(ledger)["inputs"]:
        folder = Path(entry["path"])
        assert all(_hash(folder / f) == h for f, h in entry["files"].items())
