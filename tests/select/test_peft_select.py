"""The PEFT track's selector rows compute SPT's plan and RDP's layers once per (task, seed,
budget) and reuse them across the lr grid (splice.bench.peft_select): a row runs its lrs and
seeds in one process (one worker of splice.bench.peft_pool), which keeps the choice."""

from __future__ import annotations

from splice.bench import peft_select
from splice.bench.peft import PeftConfig, run_peft
from splice.select import rdp, spt

SENSITIVITY, TRAJECTORY = spt.sensitivity, rdp.trajectory


def _run(bert_dir, csv_file, tmp_path, monkeypatch, keep: int) -> tuple[list[dict], dict]:
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / f"cache-{keep}"))  # no row from disk
    monkeypatch.setattr(peft_select, "KEEP", keep)
    monkeypatch.setattr(peft_select, "_CHOSEN", type(peft_select._CHOSEN)())
    calls = {"spt": 0, "rdp": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(spt, "sensitivity", counted("spt", SENSITIVITY))
    monkeypatch.setattr(rdp, "trajectory", counted("rdp", TRAJECTORY))
    cfg = PeftConfig(
        tasks=(str(csv_file),), methods=("lora", "spt", "rdp"), steps=4, batch_size=8,
        lr_grid=(1e-3, 5e-3, 2e-2), head_lr_grid=(1e-2,), full_lr_grid=(1e-4,),
        seeds=(0, 1), caps=(40, 8, 8), text_model=str(bert_dir), workers=1,  # counted here
    )  # fmt: skip
    rows = [r for r in run_peft(cfg)["rows"] if r["key"] in ("spt", "rdp")]
    return rows, calls


def test_the_lr_grid_runs_each_selector_once_per_seed_with_the_same_numbers(
    bert_dir, csv_file, tmp_path, monkeypatch
):
    fresh, fresh_calls = _run(bert_dir, csv_file, tmp_path, monkeypatch, keep=0)
    reused, calls = _run(bert_dir, csv_file, tmp_path, monkeypatch, keep=8)
    # 3 lrs at seed 0, then seed 1 at the pick: 4 runs a row; a pass per seed when reused
    assert fresh_calls == {"spt": 4, "rdp": 4} and calls == {"spt": 2, "rdp": 2}
    assert [r["key"] for r in reused] == ["spt", "rdp"] and all(r["status"] == "ok" for r in reused)
    for a, b in zip(fresh, reused, strict=True):
        assert len(a["val"]) == 3
        for field in ("val", "lr", "acc", "selection", "adapter_params"):
            assert a[field] == b[field], field
