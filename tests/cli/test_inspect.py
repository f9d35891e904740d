"""`splice inspect` summaries and diffs, and the CLI's error contract (one line, exit 1/2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splice._names import layer_index
from splice.deltas.summary import diff_report, summarize
from splice.io import CheckpointWriter


def _model(dest: Path, bump: float = 0.0) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.mlp.weight": torch.randn(8, 8, generator=g) for i in range(3)}
    sd["embed.weight"] = torch.randn(10, 8, generator=g)
    sd["model.layers.1.mlp.weight"] += bump
    with CheckpointWriter(dest, max_shard_size="600B") as w:
        for k, v in sd.items():
            w.write(k, v.half() if k == "embed.weight" else v)
    return dest


def _splice(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from splice.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_layer_index() -> None:
    assert layer_index("model.layers.12.mlp.weight") == 12
    assert layer_index("h.0.attn.c_attn.weight") == 0
    assert layer_index("embed.weight") is None


def test_summary_counts_from_headers(tmp_path: Path) -> None:
    s = summarize(_model(tmp_path / "m"))
    assert s["format"] == "hf" and s["tensors"] == 4 and s["params"] == 3 * 64 + 80
    assert s["bytes"] == 3 * 64 * 4 + 80 * 2 and s["layers"] == 3 and len(s["files"]) > 1
    assert s["dtypes"] == {
        "float32": {"tensors": 3, "params": 192},
        "float16": {"tensors": 1, "params": 80},
    }


def test_diff_finds_the_changed_layer(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b", bump=0.5)
    r = diff_report(a, b)
    assert r["compared"] == 4 and r["differing"] == 1
    changed = [t for t in r["tensors"] if not t["equal"]]
    assert [t["name"] for t in changed] == ["model.layers.1.mlp.weight"]
    assert changed[0]["max_abs"] == pytest.approx(0.5)
    assert r["by_layer"]["0"] == 0 and r["by_layer"]["1"] > 0


def test_cli_json_summary_and_diff(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b", bump=1.0)
    out = _splice("inspect", str(a), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tensors"] == 4
    out = _splice("inspect", str(a), str(b), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["differing"] == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x00\x01"), "too short"),
        (lambda p: p.write_bytes(b"\xff" * 16), "runs past the end"),
        (lambda p: None, "no such file"),
    ],
)
def test_cli_user_error_is_one_line_exit_1(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "x.safetensors"
    make(p)
    out = _splice("inspect", str(p))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_cli_usage_error_exit_2() -> None:
    out = _splice("inspect")
    assert out.returncode == 2 and "Missing argument" in out.stderr


def _adapter(dest: Path) -> Path:
    import json

    from safetensors.torch import save_file

    dest.mkdir()
    (dest / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    save_file(
        {
            "base_model.model.model.layers.2.mlp.lora_A.weight": torch.ones(2, 8),
            "base_model.model.model.layers.2.mlp.lora_B.weight": torch.full((8, 2), 0.1),
        },
        dest / "adapter_model.safetensors",
    )
    return dest


def test_adapter_summary_and_diff_against_base(tmp_path: Path) -> None:
    base, ad = _model(tmp_path / "base"), _adapter(tmp_path / "ad")
    s = summarize(ad)
    assert s["format"] == "peft"
    assert s["lora"]["modules"] == 1 and s["lora"]["ranks"] == [2] and s["lora"]["scales"] == [2.0]
    r = diff_report(base, ad)
    changed = [t for t in r["tensors"] if not t["equal"]]
    assert [t["name"] for t in changed] == ["model.layers.2.mlp.weight"]
    assert changed[0]["max_abs"] == pytest.approx(2.0 * 0.1 * 2, rel=1e-3)  # scale·(B@A) = 2·0.2
