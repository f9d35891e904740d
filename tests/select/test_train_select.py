"""``splice train --select spt|rdp|id3 --budget N`` on a tiny random BERT: the choice is
reported, saved with the adapter and reloaded; bad budgets fail before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from splice.adapters import adapter_layers, load_adapter
from splice.cli import app
from splice.errors import SpliceError
from tests.train.test_train import run


def test_spt_selection_is_reported_and_reloaded(bert_dir, csv_file, tmp_path):
    opts = {"batches": 2, "r": 2}
    m = run(bert_dir, csv_file, tmp_path / "o", select="spt", budget=400, select_options=opts)
    sel = m["selection"]
    assert sel["selector"] == "spt" and sel["lowrank"] and sel["entries"]
    assert m["adapter_parameters"] == sel["total"]
    model = load_adapter(None, tmp_path / "o" / "adapter")
    layers = adapter_layers(model)
    assert sorted(layers) == sorted([*sel["lowrank"], *sel["entries"]])
    for name, n in sel["entries"].items():
        assert layers[name].adapter.indices.numel() == n
    again = load_adapter(None, tmp_path / "o" / "adapter")
    x = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)


def test_spt_bf16_pass_through_splice_train_keeps_the_structured_choice(
    bert_dir, csv_file, tmp_path
):
    opts = {"batches": 2, "r": 2}
    exact = run(bert_dir, csv_file, tmp_path / "a", select="spt", budget=400,
                select_options=opts | {"precision": "fp32"})  # fmt: skip
    low = run(bert_dir, csv_file, tmp_path / "b", select="spt", budget=400,
              select_options=opts | {"precision": "bf16"})  # fmt: skip
    a, b = exact["selection"], low["selection"]
    assert (a["precision"], b["precision"]) == ("fp32", "bf16")  # what ran is recorded
    # rounding moves a few sparse entries, not which matrices get a LoRA or entries
    assert a["lowrank"] == b["lowrank"] and sorted(a["entries"]) == sorted(b["entries"])
    assert a["tau"] != b["tau"] or a["entries"] != b["entries"]  # the bf16 pass ran
    # the sweep lands within one structured module (r·(d_in + d_out) ≤ 2·48) of the budget
    assert low["adapter_parameters"] == b["total"] and abs(b["total"] - 400) <= 2 * 48


def test_rdp_adapts_the_chosen_layers(bert_dir, csv_file, tmp_path):
    m = run(bert_dir, csv_file, tmp_path / "o", select="rdp", budget=1)
    layers = m["selection"]["layers"]
    assert len(layers) == 1 and layers[0] in (0, 1)
    info = json.loads((tmp_path / "o" / "adapter" / "splice_adapter.json").read_text())
    assert info["layers"] == layers and info["method"] == "lora"
    with pytest.raises(SpliceError, match=r"layer budget K=3 is outside 1\.\.1"):
        run(bert_dir, csv_file, tmp_path / "bad", select="rdp", budget=3)
    assert not (tmp_path / "bad").exists()


def test_id3_saves_exactly_b_entries(bert_dir, csv_file, tmp_path):
    m = run(bert_dir, csv_file, tmp_path / "o", select="id3", budget=50, steps=4)
    assert m["adapter_parameters"] == 50 and sum(m["selection"]["entries"].values()) == 50
    saved = load_file(str(tmp_path / "o" / "adapter" / "splice_adapter.safetensors"))
    assert sum(t.numel() for k, t in saved.items() if k.endswith(".values")) == 50


@pytest.mark.parametrize(
    ("select", "budget", "message"),
    [
        ("spt", "0", "budget 0 is outside 1..4096"),
        ("spt", "999999", "budget 999999 is outside 1..4096"),
        ("id3", "0", "budget 0 is outside 1..4096"),
        ("id3", "999999", "budget 999999 is outside 1..4096"),
        ("rdp", "0", "layer budget K=0 is outside 1..1"),
        ("rdp", "3", "layer budget K=3 is outside 1..1"),  # K > L
    ],
)
def test_cli_bad_budget_is_one_line_exit_1_nothing_written(
    bert_dir,
    csv_file,
    tmp_path,
    select,
    budget,
    message,
):
    out = tmp_path / "out"
    args = ["train", str(bert_dir), str(csv_file), "--out", str(out), "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--select", select, "--budget", budget])
    assert isinstance(result.exception, SpliceError), result.output  # main(): one line, exit 1
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


@pytest.mark.parametrize("case", ["no rows", "no batches"])
def test_cli_calibration_without_rows_is_one_line_exit_1_nothing_written(
    bert_dir, csv_file, tmp_path, case
):
    out, data = tmp_path / "out", tmp_path / "empty.csv"
    data.write_text("text,label\n")  # a header and no rows
    args = ["train", str(bert_dir), "--out", str(out), "--select", "rdp", "--budget", "1"]
    if case == "no rows":
        args.insert(2, str(data))
        message = "no rows"
    else:
        args[2:2] = [str(csv_file), "--select-set", "calibration=0"]
        message = "--select rdp option calibration=0: Input should be greater than 0"
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SpliceError), result.output  # main(): one line, exit 1
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


def test_cli_process_prints_one_line_and_exits_1(bert_dir, csv_file, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "splice.cli", "train", str(bert_dir), str(csv_file)]
    cmd += ["--out", str(out), "--select", "spt", "--budget", "0"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: budget 0 is outside 1..4096 (4096 tunable entries) — fix: choose 1..4096"
    ]
    assert not out.exists()
