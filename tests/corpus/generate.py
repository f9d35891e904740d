"""Malformed-input corpus: every input splice must refuse, paired with the error it must give.

``build_corpus(root)`` writes each input under ``root`` and returns the cases: the CLI
arguments to run and a regex the one-line error must match. Run as a script to write the corpus
and print a manifest: ``python tests/corpus/generate.py OUT_DIR``.

The inputs cover every safetensors rejection class, accepted-but-dangerous cases (duplicate
keys, path-like names), sharded dirs, PEFT adapter dirs and hostile pickles (their payload
touches a canary file, which must never appear).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CANARY = "CANARY_EXECUTED"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str


def _raw(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _entry(dtype: object = "F32", shape: object = (1,), offsets: object = (0, 4)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def _safetensors_cases() -> list[tuple[str, bytes, str]]:
    four = b"\0" * 4
    cases: list[tuple[str, bytes, str]] = [
        ("empty", b"", "too short"),
        *[(f"short_{n}", b"\x01" * n, "too short") for n in (1, 4, 7)],
        ("len_past_end", _raw({}, length=1000), "runs past the end"),
        ("len_huge", _raw({}, length=2**63), "runs past the end"),
        ("len_all_ff", b"\xff" * 16, "runs past the end"),
        ("len_plus_one", _raw({"t": _entry()}, four)[:-5], "runs past the end|data section"),
    ]
    for i, blob in enumerate([b"\xff\xfe", b"{\x80}", b'{"\xc3\x28":1}']):
        cases.append((f"non_utf8_{i}", _raw(blob), "not UTF-8"))
    for i, blob in enumerate([b"{", b'{"a":', b"{}x", b"{'a':1}", b"{,}", b"\x00\x00"]):
        cases.append((f"bad_json_{i}", _raw(blob), "not valid JSON"))
    for i, blob in enumerate([b"[]", b"null", b"42", b'"s"', b"true"]):
        cases.append((f"not_object_{i}", _raw(blob), "not a JSON object"))
    cases.append(("deep_nesting", _raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON|object"))
    for i, dt in enumerate(["Q8", "F128", "f32", "", 5, None, ["F32"]]):
        cases.append((f"bad_dtype_{i}", _raw({"t": _entry(dtype=dt)}, four), "unsupported dtype"))
    for i, (shape, offs, data) in enumerate(
        [
            ((2,), (0, 4), four),
            ((1,), (0, 8), b"\0" * 8),
            ((2, 2), (0, 12), b"\0" * 12),
            ((0,), (0, 4), four),
            ((3,), (0, 4), four),
        ]
    ):
        cases.append(
            (
                f"shape_bytes_{i}",
                _raw({"t": _entry(shape=shape, offsets=offs)}, data),
                "needs \\d+ bytes",
            )
        )
    for i, shape in enumerate([[-1], [1.5], ["1"], [[1]], [True], "1", None, {"a": 1}, [2**63]]):
        cases.append((f"bad_shape_{i}", _raw({"t": _entry(shape=shape)}, four), "bad shape"))
    for i, offs in enumerate([[0], [0, 4, 8], [-4, 0], ["0", "4"], None, [0.0, 4.0], [True, 4]]):
        cases.append(
            (f"bad_offsets_{i}", _raw({"t": _entry(offsets=offs)}, four), "bad data_offsets")
        )
    cases += [
        ("reversed_offsets", _raw({"t": _entry(offsets=(4, 0))}, four), "needs 4 bytes"),
        ("short_data", _raw({"t": _entry()}, b"\0" * 2), "data section"),
        ("trailing_data", _raw({"t": _entry()}, b"\0" * 9), "data section"),
        ("offsets_beyond", _raw({"t": _entry(offsets=(8, 12))}, four), "leaves a gap"),
        ("overlap", _raw({"a": _entry(), "b": _entry(offsets=(2, 6))}, b"\0" * 8), "overlaps"),
        ("same_range", _raw({"a": _entry(), "b": _entry()}, four), "overlaps"),
        ("gap", _raw({"a": _entry(), "b": _entry(offsets=(8, 12))}, b"\0" * 12), "leaves a gap"),
        ("missing_field", _raw({"t": {"dtype": "F32", "shape": [1]}}, four), "exactly dtype"),
        ("extra_field", _raw({"t": {**_entry(), "x": 1}}, four), "exactly dtype"),
        ("entry_not_object", _raw({"t": [1, 2]}, four), "exactly dtype"),
        ("entry_string", _raw({"t": "F32"}, four), "exactly dtype"),
        ("metadata_int_value", _raw({"__metadata__": {"a": 1}}), "__metadata__"),
        ("metadata_list", _raw({"__metadata__": ["a"]}), "__metadata__"),
        ("metadata_nested", _raw({"__metadata__": {"a": {"b": "c"}}}), "__metadata__"),
        (
            "duplicate_key",
            _raw(
                b'{"t":'
                + json.dumps(_entry()).encode()
                + b',"t":'
                + json.dumps(_entry()).encode()
                + b"}",
                four,
            ),
            "duplicate key",
        ),
    ]
    for i, name in enumerate(
        ["", "../../etc/passwd", "/etc/passwd", "a\x00b", "a\\b", "..", "x/../../y", "a\nb"]
    ):
        cases.append((f"bad_name_{i}", _raw({name: _entry()}, four), "invalid tensor name"))
    return cases


def _shards(root: Path, name: str, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for shard, sd in tensors.items():
        save_file(sd, d / shard)
    return d


def _index(d: Path, content: object) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (d / "model.safetensors.index.json").write_text(text)


def _sharded_cases(root: Path) -> list[tuple[str, Path, str]]:
    one, two = {"a": torch.ones(2)}, {"b": torch.ones(3)}
    specs: list[tuple[str, dict, object, str]] = [
        (
            "missing_shard",
            {"s1.safetensors": one},
            {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
            "does not exist",
        ),
        (
            "dotdot_shard",
            {"s1.safetensors": one},
            {"weight_map": {"a": "../s1.safetensors"}},
            "not a plain file name",
        ),
        (
            "absolute_shard",
            {"s1.safetensors": one},
            {"weight_map": {"a": "/etc/passwd"}},
            "not a plain file name",
        ),
        (
            "subdir_shard",
            {"s1.safetensors": one},
            {"weight_map": {"a": "sub/s1.safetensors"}},
            "not a plain file name",
        ),
        (
            "shard_is_dot",
            {"s1.safetensors": one},
            {"weight_map": {"a": ".."}},
            "not a plain file name",
        ),
        (
            "tensor_in_two_shards",
            {"s1.safetensors": one, "s2.safetensors": {**one, **two}},
            {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}},
            "in both",
        ),
        (
            "tensor_not_in_index",
            {"s1.safetensors": {**one, **two}},
            {"weight_map": {"a": "s1.safetensors"}},
            "does not list it",
        ),
        (
            "index_wrong_shard",
            {"s1.safetensors": one, "s2.safetensors": two},
            {"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}},
            "puts it in",
        ),
        (
            "index_lists_absent",
            {"s1.safetensors": one},
            {"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}},
            "absent",
        ),
        ("index_bad_json", {"s1.safetensors": one}, "{oops", "invalid JSON"),
        ("index_not_object", {"s1.safetensors": one}, [1, 2], "no weight_map"),
        ("index_no_map", {"s1.safetensors": one}, {"metadata": {}}, "no weight_map"),
        ("index_empty_map", {"s1.safetensors": one}, {"weight_map": {}}, "no weight_map"),
        ("index_map_list", {"s1.safetensors": one}, {"weight_map": ["a"]}, "no weight_map"),
        (
            "index_shard_int",
            {"s1.safetensors": one},
            {"weight_map": {"a": 3}},
            "not a plain file name",
        ),
    ]
    out = []
    for name, shards, index, expect in specs:
        d = _shards(root, f"sharded_{name}", shards)
        _index(d, index)
        out.append((f"sharded_{name}", d, expect))
    d = _shards(root, "sharded_corrupt_shard", {"s1.safetensors": one})
    (d / "s2.safetensors").write_bytes(b"\x05\x00")
    _index(d, {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    out.append(("sharded_corrupt_shard", d, "too short"))
    d = root / "not_a_checkpoint"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    out.append(("dir_not_checkpoint", d, "not a checkpoint directory"))
    d = root / "dir_unindexed_shards"
    _shards(root, "dir_unindexed_shards", {"a.safetensors": one, "b.safetensors": two})
    out.append(("dir_unindexed_shards", d, "no model.safetensors.index.json"))
    return out


_A = "base_model.model.lin.lora_A.weight"
_B = "base_model.model.lin.lora_B.weight"


def _peft_cases(root: Path) -> list[tuple[str, Path, str]]:
    ok_tensors = {_A: torch.ones(2, 4), _B: torch.ones(3, 2)}
    specs: list[tuple[str, object, dict[str, torch.Tensor] | None, str]] = [
        ("config_bad_json", "{nope", ok_tensors, "invalid JSON"),
        ("config_not_object", "[1]", ok_tensors, "not a JSON object"),
        ("config_no_r", {"lora_alpha": 2}, ok_tensors, "positive integer r"),
        ("config_r_zero", {"r": 0, "lora_alpha": 2}, ok_tensors, "positive integer r"),
        ("config_r_string", {"r": "2", "lora_alpha": 2}, ok_tensors, "positive integer r"),
        ("config_no_alpha", {"r": 2}, ok_tensors, "numeric lora_alpha"),
        ("config_ia3", {"r": 2, "lora_alpha": 2, "peft_type": "IA3"}, ok_tensors, "not LoRA"),
        ("config_dora", {"r": 2, "lora_alpha": 2, "use_dora": True}, ok_tensors, "DoRA"),
        ("a_without_b", {"r": 2, "lora_alpha": 2}, {_A: torch.ones(2, 4)}, "lora_A only"),
        ("b_without_a", {"r": 2, "lora_alpha": 2}, {_B: torch.ones(3, 2)}, "lora_B only"),
        (
            "rank_ab_mismatch",
            {"r": 2, "lora_alpha": 2},
            {_A: torch.ones(2, 4), _B: torch.ones(3, 3)},
            "rank mismatch",
        ),
        ("rank_vs_config", {"r": 8, "lora_alpha": 2}, ok_tensors, "says 8"),
        (
            "no_lora_weights",
            {"r": 2, "lora_alpha": 2},
            {"x.weight": torch.ones(1)},
            "no LoRA weights",
        ),
        ("no_weights_file", {"r": 2, "lora_alpha": 2}, None, "no adapter_model.safetensors"),
    ]
    out = []
    for name, cfg, tensors, expect in specs:
        d = root / f"peft_{name}"
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, d / "adapter_model.safetensors")
        out.append((f"peft_{name}", d, expect))
    d = root / "peft_corrupt_weights"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    out.append(("peft_corrupt_weights", d, "too short"))
    return out


class _Reduce:
    """Pickles as a call to ``fn(*args)``: what a hostile checkpoint does."""

    def __init__(self, fn: Callable, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _pickle_payloads(canary: Path) -> dict[str, object]:
    import builtins
    import os
    import subprocess

    touch = f"touch {canary}"
    return {
        "os_system": {"w": _Reduce(os.system, touch)},
        "subprocess_popen": {"w": _Reduce(subprocess.Popen, ["touch", str(canary)])},
        "builtins_eval": {"w": _Reduce(builtins.eval, f"open({str(canary)!r}, 'w')")},
        "builtins_exec": {"w": _Reduce(builtins.exec, f"open({str(canary)!r}, 'w')")},
        "builtins_open": {"w": _Reduce(builtins.open, str(canary), "w")},
        "import_gadget": {"w": _Reduce(builtins.__import__, "os")},
    }


def _pickle_cases(root: Path, canary: Path) -> list[tuple[str, Path, str]]:
    out = []
    for name, obj in _pickle_payloads(canary).items():
        zipped = root / f"pickle_{name}.pt"
        torch.save(obj, zipped)
        out.append((f"pickle_zip_{name}", zipped, "refused or unreadable pickle"))
        raw = root / f"pickle_raw_{name}.bin"
        raw.write_bytes(pickle.dumps(obj, protocol=2))
        out.append((f"pickle_raw_{name}", raw, "refused or unreadable pickle"))
    good = io.BytesIO()
    torch.save({"w": torch.ones(3)}, good)
    blob = good.getvalue()
    for i, cut in enumerate([10, len(blob) // 2, len(blob) - 30]):
        p = root / f"pickle_truncated_{i}.pt"
        p.write_bytes(blob[:cut])
        out.append((f"pickle_truncated_{i}", p, "refused or unreadable pickle"))
    p = root / "pickle_random.bin"
    p.write_bytes(bytes(range(256)) * 4)
    out.append(("pickle_random", p, "refused or unreadable pickle"))
    p = root / "pickle_empty_zip.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/other.txt", "x")
    out.append(("pickle_empty_zip", p, "refused or unreadable pickle"))
    for name, obj in {
        "not_dict": [torch.ones(1)],
        "str_values": {"w": "x"},
        "int_keys": {1: torch.ones(1)},
    }.items():
        p = root / f"pickle_{name}.pt"
        torch.save(obj, p)
        out.append((f"pickle_{name}", p, "state dict"))
    p = root / "pickle_bad_name.pt"
    torch.save({"../../x": torch.ones(1)}, p)
    out.append(("pickle_bad_name", p, "invalid tensor name"))
    return out


def _models(root: Path) -> dict[str, Path]:
    """Small checkpoints for recipe cases: base, two fine-tunes, and broken variants."""
    g = torch.Generator().manual_seed(0)

    def sd(**over: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"model.layers.0.w": torch.randn(4, 4, generator=g), "ids": torch.arange(3)}
        out.update(over)
        return out

    specs = {
        "base": sd(),
        "a": sd(),
        "b": sd(),
        "wide": sd(**{"model.layers.0.w": torch.randn(4, 5, generator=g)}),
        "extra": sd(**{"model.layers.0.extra": torch.ones(2)}),
        "nan": sd(**{"model.layers.0.w": torch.full((4, 4), float("nan"))}),
        "inf": sd(**{"model.layers.0.w": torch.full((4, 4), float("inf"))}),
    }
    out = {}
    for name, tensors in specs.items():
        d = root / "models" / name
        d.mkdir(parents=True)
        save_file(tensors, d / "model.safetensors")
        out[name] = d
    return out


def _bomb(key: str) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    return "\n".join(lines) + f"\n{key}: *i\n"


def _recipe_cases(root: Path) -> list[tuple[str, str, str]]:
    m = _models(root)
    head = f"base: {m['base']}\n"
    two = f"models: [{m['a']}, {m['b']}]\n"
    return [
        ("unknown_method", "method: tie\n" + head + two, "did you mean 'ties'"),
        ("misspelled_top", "method: ties\nmodles: []\n" + head + two, "modles"),
        ("misspelled_param", "method: ties\nparams: {densty: 0.2}\n" + head + two, "densty"),
        (
            "misspelled_model_param",
            f"method: ties\n{head}models:\n  - path: {m['a']}\n    params: {{wieght: 1}}\n",
            "wieght",
        ),
        ("density_above_1", "method: ties\nparams: {density: 1.5}\n" + head + two, "density"),
        ("density_negative", "method: ties\nparams: {density: -0.1}\n" + head + two, "density"),
        ("dare_p_above_1", "method: dare\nparams: {p: 1.5}\n" + head + two, "p"),
        ("weight_string", "method: linear\nparams: {weight: heavy}\n" + head + two, "weight"),
        (
            "lambda_list_of_str",
            "method: task_arithmetic\nparams: {lambda: [a, b]}\n" + head + two,
            "lambda",
        ),
        ("no_models", "method: ties\n" + head, "models"),
        ("no_method", head + two, "method"),
        (
            "missing_model_path",
            "method: ties\n" + head + "models: [./does/not/exist]\n",
            "does not exist",
        ),
        (
            "hub_id_is_not_fetched",
            "method: ties\n" + head + "models: [meta-llama/Llama-3-8B]\n",
            "does not exist",
        ),
        ("shape_mismatch", f"method: ties\n{head}models: [{m['a']}, {m['wide']}]\n", "shape"),
        (
            "extra_tensor",
            f"method: ties\n{head}models: [{m['a']}, {m['extra']}]\n",
            "model.layers.0.extra",
        ),
        ("nan_input", f"method: ties\n{head}models: [{m['a']}, {m['nan']}]\n", "NaN|finite"),
        ("inf_input", f"method: ties\n{head}models: [{m['a']}, {m['inf']}]\n", "Inf|finite"),
        ("yaml_bomb", "method: ties\n" + head + two + _bomb("junk"), "aliases"),
        (
            "yaml_bomb_in_params",
            _bomb("x").replace("\nx: *i", "\nparams: {density: *i}")
            + "method: ties\n"
            + head
            + two,
            "aliases",
        ),
        (
            "python_object_tag",
            f"method: !!python/object/apply:os.system [touch {root / CANARY}]\n" + head + two,
            "constructor",
        ),
        ("python_name_tag", "method: !!python/name:os.system\n" + head + two, "constructor"),
        ("duplicate_key", "method: ties\nmethod: dare\n" + head + two, "duplicate key"),
        ("not_a_mapping", "- ties\n- dare\n", "mapping|object|dict"),
        ("empty_file", "", "empty|mapping|object|dict|method"),
        ("bad_yaml_syntax", "method: [ties\n", "not valid YAML"),
        (
            "mergekit_unknown_key",
            f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['a']}\n    parameters: {{densty: 0.5}}\n",
            "densty",
        ),
    ]


def build_corpus(root: Path) -> list[Case]:
    """Write every malformed input under ``root``; return the cases (≥ 100)."""
    root.mkdir(parents=True, exist_ok=True)
    canary = root / CANARY
    cases: list[Case] = []
    files = root / "safetensors"
    files.mkdir(exist_ok=True)
    for name, content, expect in _safetensors_cases():
        p = files / f"{name}.safetensors"
        p.write_bytes(content)
        cases.append(Case(f"safetensors_{name}", ("inspect", str(p)), expect))
    for name, path, expect in _sharded_cases(root) + _peft_cases(root):
        cases.append(Case(name, ("inspect", str(path)), expect))
    for name, path, expect in _pickle_cases(root, canary):
        cases.append(Case(name, ("inspect", str(path), "--allow-pickle"), expect))
    recipes = root / "recipes"
    recipes.mkdir()
    for name, text, expect in _recipe_cases(root):
        r = recipes / f"{name}.yaml"
        r.write_text(text)
        cases.append(Case(f"recipe_{name}", ("merge", str(r), str(root / "out" / name)), expect))
    out_is_input = recipes / "output_is_input.yaml"
    out_is_input.write_text(
        (recipes / "misspelled_top.yaml").read_text().replace("modles: []\n", "")
    )
    a = root / "models" / "a"
    cases.append(
        Case(
            "recipe_output_is_input",
            ("merge", str(out_is_input), str(a), "--force"),
            "overlaps the input",
        )
    )
    pt = root / "pickle_refused_by_default.pt"
    torch.save({"w": torch.ones(1)}, pt)
    cases.append(Case("pickle_refused_by_default", ("inspect", str(pt)), "--allow-pickle"))
    return cases


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus-out")
    built = build_corpus(out)
    json.dump([c.__dict__ for c in built], sys.stdout, indent=1)
    print(f"\n{len(built)} cases written under {out}", file=sys.stderr)
