"""The PEFT track of ``splice bench`` on a tiny BERT built in the test (tests/bench/conftest.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from torch import nn

from splice.adapters import METHODS
from splice.adapters.inject import find_sites
from splice.adapters.layer import FAMILIES
from splice.adapters.lora import LoRA, LoRAAdapter
from splice.bench.peft import PeftConfig, run_peft
from splice.bench.peft_budget import fit_budget, size_knobs
from splice.bench.peft_pool import makespan, workers_for
from splice.bench.peft_report import summarize, write_peft_report


def _config(tiny, **kw) -> PeftConfig:
    model_dir, paths = tiny
    base = {
        "tasks": tuple(paths),
        "methods": ("lora", "nola"),
        "steps": 12,
        "batch_size": 8,
        "lr_grid": (1e-3, 1e-2),
        "full_lr_grid": (1e-4,),
        "head_lr_grid": (1e-2, 1e-1),
        "caps": (60, 20, 30),
        "text_model": str(model_dir),
    }
    return PeftConfig(**(base | kw))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """A fresh cache; one thread (a model this small only waits on a second one)."""
    import torch

    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(results, key):
    return [r for r in results["rows"] if r["key"] == key]


def test_tiny_run_writes_all_three_files_and_repeats_from_cache(tiny, tmp_path, monkeypatch):
    first = run_peft(_config(tiny, methods=("lora", "nola", "mos")))
    assert [r["key"] for r in first["rows"]] == ["probe", "lora", "nola", "mos", "full"] * 2
    for r in _rows(first, "mos"):  # r=8 needs more layers per pool than the tiny BERT's 2
        assert (
            r["status"] == "n/a" and "mos rejects it: " in r["reason"] and "(e−p)·L" in r["reason"]
        )
    for r in first["rows"]:
        if r["key"] == "mos":
            continue
        assert r["status"] == "ok" and not r["cached"]
        assert r["lr"] in {"probe": (1e-2, 1e-1), "full": (1e-4,)}.get(r["key"], (1e-3, 1e-2))
        assert r["lr"] == max(map(float, r["val"]), key=lambda lr: (r["val"][f"{lr:g}"], -lr))
        assert 0.0 <= r["acc"][0] <= 1.0 and r["s_per_step"] > 0 and r["saved_bytes"] > 0
    for r in first["rows"]:  # every row trains its head at the probe's pick for its task
        probe = next(p for p in _rows(first, "probe") if p["task"] == r["task"])
        assert r["head_lr"] == probe["lr"]
    lora, nola = _rows(first, "lora")[0], _rows(first, "nola")[0]
    # LoRA r=8 on query/value of 2 layers of width 32: 4 matrices × 8 × (32 + 32)
    assert lora["adapter_params"] == 4 * 8 * 64 and nola["adapter_params"] == 4 * (256 + 256)
    assert _rows(first, "probe")[0]["adapter_params"] == 0
    full = _rows(first, "full")[0]
    from transformers import BertModel

    every = sum(p.numel() for p in BertModel.from_pretrained(str(tiny[0])).parameters())
    assert full["adapter_params"] == every
    assert full["saved_bytes"] > 4 * full["adapter_params"]  # float32 tensors and a header
    assert all(r["head_params"] == 33 * 2 for r in _rows(first, "lora")[:1])  # 2 classes

    out = tmp_path / "out"
    paths = write_peft_report(first, out)
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    avg = {(s["suite"], s["key"]): s["avg_acc"] and s["avg_acc"][0] for s in data["summary"]}
    expect = np.mean([r["acc"][0] for r in _rows(first, "lora")])
    assert avg["text", "lora"] == pytest.approx(expect)
    md = (out / "results.md").read_text()
    assert "Protocol" in md and "| linear probe |" in md and "Pareto" in md
    assert "- MoS (Mixture of Shards): n/a: mos rejects it" in md

    again = run_peft(_config(tiny, methods=("lora", "nola", "mos")))
    assert all(r["cached"] for r in again["rows"] if r["key"] != "mos")
    assert [r.get("acc") for r in again["rows"]] == [r.get("acc") for r in first["rows"]]

    # a re-run on an empty cache in one process (the first ran its rows in two worker
    # processes where the machine has two CPUs) trains every row again and repeats every number
    assert first["meta"]["workers"] == min(2, os.cpu_count() or 1)
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "fresh"))
    fresh = run_peft(_config(tiny, methods=("lora", "nola", "mos"), workers=1))
    assert fresh["meta"]["workers"] == 1
    assert not any(r.get("cached") for r in fresh["rows"])
    fields = ("status", "lr", "val", "acc", "head_lr", "adapter_params", "head_params",
              "saved_bytes", "reason")  # fmt: skip
    assert [[r.get(f) for f in fields] for r in fresh["rows"]] == [
        [r.get(f) for f in fields] for r in first["rows"]
    ]


class _Broken(LoRA):
    pretty_name = "broken"
    family = "additive"

    def build(self, sites, cfg):
        return [_Raising(site, cfg) for site in sites]


class _Raising(LoRAAdapter):
    def forward(self, x, y):
        raise RuntimeError("kaboom in forward")


class _Scaled(LoRA):
    """A LoRA variant registered by this test only: the benchmark has never heard of it."""

    pretty_name = "test-registered LoRA"
    family = "reparameterized"


@pytest.fixture
def registered():
    METHODS.names()  # discover the package first, so the test's names are additions
    METHODS.register("zz_test_lora")(_Scaled)
    METHODS.register("zz_broken")(_Broken)
    yield
    for name in ("zz_test_lora", "zz_broken"):
        METHODS._items.pop(name)


def test_registered_method_appears_and_a_raising_method_gets_an_error_row(tiny, registered):
    # MoS's default r=8 needs 4 layers per pool at e=2; the tiny BERT has 2
    cfg = _config(tiny, methods=None, tasks=tiny[1][:1], options={"mos": {"r": 4}})
    results = run_peft(cfg)
    keys = [r["key"] for r in results["rows"]]
    # sparse (configured by a selector) is trained by the selector rows, after the others
    methods = [n for n, c in METHODS.items() if not c.selected_by]
    assert keys == ["probe", *methods, "spt", "rdp", "id3", "full"]
    assert "zz_test_lora" in keys
    row = _rows(results, "zz_test_lora")[0]
    assert row["status"] == "ok" and row["family"] == "reparameterized" and row["acc"]
    broken = _rows(results, "zz_broken")[0]
    assert broken["status"] == "error" and "RuntimeError: kaboom in forward" in broken["error"]
    for r in results["rows"]:
        if r["key"] != "zz_broken":
            assert r["status"] == "ok", r
    summary = {s["key"]: s for s in summarize(results)}
    assert summary["zz_broken"]["note"].startswith("error: RuntimeError: kaboom")


def test_budget_gives_counts_within_granularity(tiny):
    from transformers import BertModel

    from splice.bench.peft import _own_sites

    model = BertModel.from_pretrained(str(tiny[0]))
    targets = ["query", "value"]
    linear = [s for _, _, s in find_sites(model, targets)]
    for name, cls in METHODS.items():
        if cls.selected_by:  # sized by its selector (tests/select), not by the benchmark
            continue
        encoder = type("Encoder", (), {"module": model, "default_targets": targets})
        sites = _own_sites(cls, encoder, {}) or linear  # prefix: attention modules
        for budget in (300, 2000, 5000):
            sizing = fit_budget(cls, sites, {}, budget)
            if sizing is None:  # no size knob: a size the model fixes (IA³, OFT's blocks)
                assert not size_knobs(cls, sites, {}), name
                break

            cfg = cls.Config(**sizing.options)
            assert cls().num_parameters(sites, cfg) == sizing.count
            if sizing.floor:  # the smallest structure is already above the budget
                assert sizing.count > budget
            else:
                assert abs(sizing.count - budget) <= sizing.step, (name, budget, sizing)
    sites = linear
    lora = fit_budget(METHODS.get("lora"), sites, {}, 2000)
    assert lora.options["r"] == round(2000 / (4 * 64)) and lora.step == 4 * 64
    nola = fit_budget(METHODS.get("nola"), sites, {}, 2000)
    assert nola.knob == ("k", "l") and nola.options["k"] == nola.options["l"] == 250


def test_budget_run_reports_the_actual_count(tiny):
    results = run_peft(_config(tiny, methods=("lora", "mos"), budget=1024, tasks=tiny[1][:1]))
    for key in ("lora", "mos"):
        row = _rows(results, key)[0]
        assert row["adapter_params"] == row["budget"]["count"]
        assert abs(row["adapter_params"] - 1024) <= row["budget"]["step"] or row["budget"]["floor"]


def test_every_method_declares_a_family_and_the_docs_table_is_the_registry():
    from pathlib import Path

    from splice.bench.peft_report import taxonomy_markdown

    for name, cls in METHODS.items():
        assert getattr(cls, "family", None) in FAMILIES, name
    doc = (Path(__file__).resolve().parents[2] / "docs" / "adapters.md").read_text()
    table = taxonomy_markdown()
    assert all(f"`{name}`" in table for name in METHODS.names())
    assert table in doc, "docs/adapters.md's taxonomy table is stale: paste taxonomy_markdown()"


def test_conv_only_backbone_marks_linear_only_methods_not_applicable():
    from splice.bench.peft import _row_plans

    class Encoder:  # a conv net with the image encoder's shape of interface
        module = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1))
        default_targets = ("0", "1")

    plans = {p["key"]: p for p in _row_plans(PeftConfig(tasks=("x",)), Encoder())}
    assert "conv" in plans["ept"]["reason"] and "linear" in plans["ept"]["reason"]
    assert "reason" not in plans["lora"]
    for name in ("prefix", "mam", "prompt", "parallel"):  # they find no transformer there
        assert plans[name]["reason"].startswith(f"{name} does not apply to Sequential: ")


def test_selector_rows_train_through_the_loop_at_loras_count(tiny):
    from splice.select._common import matrix_sites

    results = run_peft(_config(tiny, methods=("lora", "spt", "rdp", "id3"), tasks=tiny[1][:1]))
    assert [r["key"] for r in results["rows"]] == ["probe", "lora", "spt", "rdp", "id3", "full"]
    rows = {r["key"]: r for r in results["rows"]}
    lora = rows["lora"]["adapter_params"]
    assert lora == 4 * 8 * 64  # the selectors' budget: LoRA's count
    for key in ("spt", "rdp", "id3"):
        r = rows[key]
        assert r["status"] == "ok" and r["kind"] == "selector" and r["select"]["budget"] == lora
        grid = (1e-4,) if key == "id3" else (1e-3, 1e-2)  # ID³: full fine-tuning's grid
        assert r["head_lr"] == rows["probe"]["lr"] and set(map(float, r["val"])) == set(grid)
        assert 0.0 <= r["acc"][0] <= 1.0 and r["saved_bytes"] > 0 and r["s_per_step"] > 0
    # ID³: exactly B entries of the stack's Linear weights, saved as a sparse adapter
    assert rows["id3"]["adapter_params"] == lora and rows["id3"]["selection"]["horizon"] == 6
    # RDP: K = ⌈2/2⌉ = 1 of the 2 layers, LoRA rank doubled to 16 on query/value: LoRA's count
    rdp = rows["rdp"]
    assert len(rdp["selection"]["layers"]) == 1 and rdp["selection"]["layers"][0] in (0, 1)
    assert rdp["select"]["r"] == 16 and rdp["adapter_params"] == 2 * 16 * (32 + 32)
    # SPT: the τ′ sweep's total is what trains; LoRA r=8 matrices and sparse entries
    spt = rows["spt"]
    assert spt["adapter_params"] == spt["selection"]["total"]
    assert abs(spt["adapter_params"] - lora) <= 512  # one structured module (8·(32+32))
    from transformers import BertModel

    total = sum(
        m.weight.numel() for m, _ in matrix_sites(BertModel.from_pretrained(str(tiny[0]))).values()
    )
    assert spt["adapter_params"] < total
    md = summarize(results)
    assert {s["key"]: s["label"] for s in md}["id3"] == "ID³ (selector)"


def test_sparse_expands_to_its_selectors_and_a_conv_net_states_why_not(tiny):
    from splice.bench.peft import _row_plans

    cfg = _config(tiny, methods=("sparse",))
    conv = type(
        "Encoder", (), {"module": nn.Sequential(nn.Conv2d(3, 8, 3)), "default_targets": ["0"]}
    )
    plans = _row_plans(cfg, conv)
    assert [p["key"] for p in plans] == ["probe", "spt", "id3", "full"]
    for p in plans[1:3]:
        assert "does not apply to Sequential" in p["reason"] and "Linear" in p["reason"]


def test_makespan_is_longest_first_over_the_workers_and_workers_stay_on_the_cpu():
    # LPT on 2 workers: 5 | 4 then 3 → 5+2, 4+3; one worker: the sum; no jobs: 0
    assert makespan([2, 3, 4, 5], 2) == 7 and makespan([2, 3, 4, 5], 1) == 14
    assert makespan([], 3) == 0 and makespan([9, 1, 1], 2) == 9
    assert workers_for(64, "cpu") == (os.cpu_count() or 1) and workers_for(2, "cuda:0") == 1
    assert workers_for(1, "cpu") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "--workers belongs to --track peft"),
        (["--suite", "llm", "--track", "peft", "--workers", "2"], "--workers belongs to the text"),
        (["--track", "peft", "--workers", "0"], "greater than or equal to 1"),
        (["--grow", "1"], "--grow belongs to --track peft"),
        (["--suite", "llm", "--track", "peft", "--grow", "1"], "--grow belongs to the text"),
        (["--track", "peft", "--grow", "-1"], "greater than or equal to 0"),
    ],
)
def test_workers_and_grow_options_are_the_peft_tracks(args, message, tmp_path, monkeypatch, capsys):
    from tests.cli._run import run_cli

    code, _, stderr = run_cli(monkeypatch, capsys, "bench", *args, "--out", str(tmp_path / "o"))
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "o").exists()


def test_ramt_picks_init_and_threshold_with_the_lr_on_validation(tiny, monkeypatch):
    from splice.adapters.ramt import RAMT
    from splice.bench.peft_report import _table
    from splice.bench.peft_rows import Task, search_grids, search_values

    # the searched values scale the row's own (the defaults, or --set), the first variant first
    own, half = {"init": 0.0625, "threshold": 0.03125}, {"init": 0.03125, "threshold": 0.015625}
    assert search_values(RAMT, {}) == [own, half] and search_values(LoRA, {}) == []
    assert search_values(RAMT, {"init": 0.2, "threshold": 0.1})[1] == {
        "init": 0.1,
        "threshold": 0.05,
    }
    # a halved pair runs only where its K = (init − τ)/lr lies within the own values' Ks:
    # on {1e-3, 5e-3} (K 31.25 and 6.25) at 1e-3 (15.6), not at 5e-3 (3.1); LoRA: every lr
    ramt = {"key": "ramt", "search": [own, half]}
    assert search_grids(ramt, (1e-3, 5e-3)) == [[1e-3, 5e-3], [1e-3]]
    assert search_grids(ramt, (1e-3, 2e-3, 4e-3)) == [[1e-3, 2e-3, 4e-3], [1e-3, 2e-3]]
    assert search_grids({"key": "lora"}, (1e-3, 5e-3)) == [[1e-3, 5e-3]]
    # validation scores set per (init, lr, seed), losses per (init, lr); every run is
    # recorded, the test split is real
    runs, table, losses = [], {}, {}
    run, score = Task.run, Task.score

    def spy_run(self, key, lr, head_lr, seed, plan):
        out = run(self, key, lr, head_lr, seed, plan)
        runs.append((seed, lr, plan.get("options", {}).get("init")))
        return out | {"at": (plan.get("options", {}).get("init"), lr), "seed": seed}

    def fake_val(self, out, split, loss=False):
        if split == "val" and out["at"] in table:
            acc = table[out["at"]][out["seed"]]
            return (acc, losses.get(out["at"], 1.0)) if loss else acc
        return score(self, out, split, loss)

    monkeypatch.setattr(Task, "run", spy_run)
    monkeypatch.setattr(Task, "score", fake_val)
    # validation at seeds 0 and 1 averaged: seed 0 alone would pick the own values at 1e-2
    o, h = own["init"], half["init"]
    tied = {(o, 1e-3): [0.5, 0.5], (o, 1e-2): [0.75, 0.75], (h, 1e-3): [1.0, 0.5]}
    for steps, val, loss, pick in [
        (4, {(o, 1e-3): [0.5, 0.5], (o, 1e-2): [1.0, 0.25], (h, 1e-3): [0.75, 0.75]}, {},
         (1e-3, half)),
        (5, tied, {}, (1e-2, own)),  # a tie at equal losses goes to the row's own values
        (6, tied, {(h, 1e-3): 0.5}, (1e-3, half)),  # else to the lower validation loss
    ]:  # fmt: skip
        runs.clear()
        table.clear()
        table.update(val)
        losses.clear()
        losses.update(loss)
        cfg = _config(tiny, methods=("ramt",), tasks=tiny[1][:1], seeds=(0, 1, 2), steps=steps,
                      workers=1)  # fmt: skip
        results = run_peft(cfg)
        row = _rows(results, "ramt")[0]
        assert (row["lr"], row["picked"]) == pick and len(row["acc"]) == 3
        tag = " init=0.03125 threshold=0.015625"
        names = {f"{lr:g}{tag if i < 0.06 else ''}": v for (i, lr), v in val.items()}
        assert row["val"] == {k: sum(v) / 2 for k, v in names.items()}
        assert row["val_seeds"] == names
        assert row["val_loss"] == {f"{lr:g}{tag if i < 0.06 else ''}": loss.get((i, lr), 1.0)
                                   for i, lr in val}  # fmt: skip
        ramt = [r for r in runs if r[2] is not None]  # the probe's runs have no options
        grid = sorted((s, lr, i) for i, lr in val for s in (0, 1))
        assert sorted(ramt[:6]) == grid  # the grid at seeds 0 and 1, their runs scored on test
        assert ramt[6:] == [(2, pick[0], pick[1]["init"])]  # seed 2 at the pick
        assert (
            f"{pick[0]:g} init {pick[1]['init']:g} threshold" in _table(results, "text")[1][1][-1]
        )
