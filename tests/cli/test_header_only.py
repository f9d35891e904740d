"""Header-only commands answer without importing torch (issue #21, item 13).

``splice inspect`` on a model dir, ``splice merge … --plan`` and the preflight's refusals read
headers, configs and recipes; each runs here in a fresh process, which must end without
``torch`` in ``sys.modules``. Their output is compared with the same command in a process that
imported torch first (the path every command took before), and with references computed here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.merge._ckpt import finetune, save, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys
{preload}
from splice.cli import main
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def _splice(*args: str, preload: bool = False) -> tuple[int, str, str, bool]:
    """``splice ARGS`` in a fresh process: exit code, stdout, stderr, whether torch was
    imported (``preload``: the process imports torch before the command)."""
    code = CHILD.format(preload="import torch" if preload else "")
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120"},
    )
    *err, last = done.stderr.rstrip("\n").split("\n")
    assert last.startswith("torch imported: "), done.stderr[-2000:]
    return done.returncode, done.stdout, "\n".join(err), last.endswith("True")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("headers")
    base = tiny_llama(0)
    save(base, root / "base")
    save(finetune(base, 1), root / "ft1", shard=600)  # sharded
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in finetune(base, 2).items()}
    save(half, root / "ft2")
    wide = finetune(base, 3)
    wide["model.layers.2.mlp.down_proj.weight"] = torch.randn(8, 13)
    save(wide, root / "wide")
    short = finetune(base, 4)
    del short["model.layers.1.mlp.up_proj.weight"]
    save(short, root / "short")
    floaty = finetune(base, 5)
    floaty["model.steps"] = floaty["model.steps"].float()
    save(floaty, root / "floaty")
    return root


def _recipe(root: Path, name: str, models: list[str], **kw: object) -> str:
    recipe = {"method": "ties", "base": str(root / "base"), "models": models, **kw}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return str(path)


def test_inspect_a_model_dir_reads_headers_without_torch(inputs):
    for path in (inputs / "ft1", inputs / "ft2" / "model.safetensors"):
        code, out, err, imported = _splice("inspect", str(path), "--json")
        assert code == 0 and not imported, err
        summary = json.loads(out)
        assert summary == json.loads(_splice("inspect", str(path), "--json", preload=True)[1])
        # reference: the tensors themselves, as safetensors loads them
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        tensors = {k: v for f in files for k, v in load_file(f).items()}
        dtypes: dict[str, dict[str, int]] = {}
        for t in tensors.values():
            d = dtypes.setdefault(str(t.dtype).removeprefix("torch."), {"tensors": 0, "params": 0})
            d["tensors"] += 1
            d["params"] += t.numel()
        assert summary["dtypes"] == dtypes and summary["tensors"] == len(tensors)
        assert summary["params"] == sum(t.numel() for t in tensors.values())
        assert summary["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    text = _splice("inspect", str(inputs / "ft2"))
    assert text[0] == 0 and not text[3] and "bfloat16" in text[1]
    assert text[1] == _splice("inspect", str(inputs / "ft2"), preload=True)[1]


def _same_plan(plan: dict, reference: dict) -> None:
    """Equal reports, but for the seconds and the process footprint: planned here without
    torch it is this process plus torch's import (which the reference process holds)."""
    got, want = dict(plan), dict(reference)
    got.pop("preflight_seconds"), want.pop("preflight_seconds")
    p, q = dict(got.pop("plan")), dict(want.pop("plan"))
    assert got == want
    assert 1.0 <= p.pop("baseline_ram") / q.pop("baseline_ram") <= 1.15
    assert p.pop("total_ram") - p["peak_ram"] >= q.pop("total_ram") - q["peak_ram"]
    assert p == q


def test_plan_answers_without_torch_and_prints_the_same_plan(inputs):
    m = [str(inputs / "ft1"), str(inputs / "ft2")]
    recipes = [
        _recipe(inputs, "ties_bf16", m, params={"density": 0.5}, dtype="bf16", lines={"beta": 0.5}),
        _recipe(inputs, "pcb", m, method="pcb", out_dtype="float16"),
    ]
    for recipe in recipes:
        args = ("merge", recipe, str(inputs / "out"), "--plan", "--json")
        code, out, err, imported = _splice(*args)
        assert code == 0 and not imported, err
        _same_plan(json.loads(out), json.loads(_splice(*args, preload=True)[1]))
    args = ("merge", recipes[0], str(inputs / "out"), "--plan", "--max-shard-size", "2KB")
    code, text, err, imported = _splice(*args)
    assert code == 0 and not imported, err
    reference = _splice(*args, preload=True)[1]

    def masked(s: str) -> str:  # the total and the process figure differ (see _same_plan)
        s = re.sub(r"passed in [\d.]+ s", "passed in S s", s)
        return re.sub(r"peak RAM +[\d.]+ \w+ \([\d.]+ \w+ process", "peak RAM T (P process", s)

    assert masked(text) == masked(reference) and "4 shard(s)" in text
    assert not (inputs / "out").exists()


@pytest.mark.parametrize(
    ("name", "models", "extra", "message"),
    [
        (
            "wide",
            ["ft1", "wide"],
            {},
            r"wide: model\.layers\.2\.mlp\.down_proj\.weight: shape \(8, 13\) differs from "
            r"\(8, 12\) in .*base — fix: merge checkpoints of one architecture and size",
        ),
        ("short", ["ft1", "short"], {}, r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' of "),
        ("floaty", ["floaty"], {}, r"model\.steps: dtype torch\.float32 here but torch\.int64 "),
        ("method", ["ft1"], {"method": "tiez"}, r"unknown merge method 'tiez' — fix: .*'ties'"),
        ("key", ["ft1"], {"params": {"densty": 0.5}}, r"unknown parameter of ties 'densty'"),
        ("value", ["ft1"], {"params": {"density": 2}}, r"invalid parameter density: .*less than"),
        ("path", ["ft1", "nope"], {}, r"nope: model path does not exist"),
    ],
)
def test_preflight_refusals_answer_without_torch(inputs, name, models, extra, message):
    recipe = _recipe(inputs, name, [str(inputs / m) for m in models], **extra)
    for plan in ((), ("--plan",)):
        code, out, err, imported = _splice("merge", recipe, str(inputs / "out"), *plan)
        assert code == 1 and not imported and not out, err
        assert re.fullmatch(r"error: .*" + message + r".*", err), err
    assert not (inputs / "out").exists()
