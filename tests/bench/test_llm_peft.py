"""The LLM suite's PEFT track on a tiny random Llama: rows, measurements, cache, CLI."""

from __future__ import annotations

import json

import pytest

from splice.bench.llm_peft import LLMPeftConfig, configure_llm_peft, run_llm_peft
from splice.bench.peft_report import summarize, to_markdown
from splice.data.causal_lm import load_causal_lm
from splice.data.llm_tasks import LLM_TASKS
from tests.bench._llm_fixture import gen_task, tiny_llama
from tests.cli._run import run_cli


@pytest.fixture()
def llama(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(LLM_TASKS, "syn", gen_task("syn"))
    monkeypatch.setitem(LLM_TASKS, "syn_open", gen_task("syn_open", labels=False))
    return tiny_llama(tmp_path / "llama", chat=True)


def test_peft_rows_on_a_tiny_llama_train_measure_and_rerun_from_cache(llama):
    cfg = LLMPeftConfig(model=str(llama), tasks=("syn", "syn_open"), caps=(200, 12, 24),
                        methods=("lora", "ia3", "ramt", "sparse"), steps=150,
                        lr_grid=(1e-2, 3e-2), full=True, full_lr_grid=(1e-3,))  # fmt: skip
    first = run_llm_peft(cfg)
    second = run_llm_peft(cfg)
    model, _ = load_causal_lm(llama)  # every parameter, the tied embedding once
    rows = {(r["task"], r["key"]): r for r in first["rows"]}
    assert [r["key"] for r in first["rows"][:7]] == [
        "zero_shot", "lora", "ia3", "ramt", "spt", "id3", "full"]  # fmt: skip
    for task in ("syn", "syn_open"):
        zero, lora, full = rows[task, "zero_shot"], rows[task, "lora"], rows[task, "full"]
        assert lora["status"] == full["status"] == "ok"
        # the synthetic task is learnable: full fine-tuning answers every test example, LoRA
        # (r=8 on q/v) and IA³ (192 scales) most, from a random model's 0-21 %
        assert full["acc"] == [1.0] and lora["acc"][0] >= 0.9 > 0.5 > zero["acc"][0]
        assert rows[task, "ia3"]["acc"][0] > zero["acc"][0] + 0.5
        assert set(lora["val"]) == {"0.01", "0.03"}
        assert lora["lr"] == max((v, -float(k)) for k, v in lora["val"].items())[1] * -1
        assert lora["s_per_step"] > 0 and lora["peak_rss_mb"] > 0
        # LoRA r=8 on q_proj (64→64) and v_proj (64→32) of 2 layers: 8·(64+64) + 8·(64+32)
        assert lora["adapter_params"] == 2 * (8 * 128 + 8 * 96) and lora["head_params"] == 0
        assert 0 < rows[task, "ia3"]["adapter_params"] < lora["adapter_params"]
        assert lora["saved_bytes"] > 4 * lora["adapter_params"]  # the float32 tensors + config
        assert full["adapter_params"] == sum(p.numel() for p in model.parameters())
        assert full["saved_bytes"] > 4 * full["adapter_params"]
        # methods that cannot run here: their rows say why
        assert rows[task, "ramt"]["status"] == rows[task, "spt"]["status"] == "n/a"
        assert rows[task, "id3"]["status"] == "n/a"  # sparse: its selectors' rows
        assert "selector" in rows[task, "spt"]["reason"]
        assert "teacher-gated gradient" in rows[task, "ramt"]["reason"]
    assert not any(r.get("cached") for r in first["rows"])
    again = [r for r in second["rows"] if r["status"] == "ok"]
    assert again and all(r["cached"] for r in again)
    assert [r.get("acc") for r in first["rows"]] == [r.get("acc") for r in second["rows"]]
    md = to_markdown(first)
    assert "## llm" in md and "Exact match (%)" in md and "| zero-shot | –" in md
    summary = {s["key"]: s for s in summarize(first)}
    assert summary["full"]["avg_acc"][0] == 1.0 and summary["ramt"]["note"].startswith("n/a")


def test_configure_llm_peft_and_usage_errors(monkeypatch, capsys):
    assert configure_llm_peft("quick").methods == ("lora", "dora", "ia3")
    assert configure_llm_peft("quick", methods=["all"]).methods is None
    assert configure_llm_peft("full").full and configure_llm_peft("full").methods is None
    cfg = configure_llm_peft("quick", options={"lora": {"r": 4}}, steps=5, budget=1000)
    assert (cfg.options, cfg.steps, cfg.budget) == ({"lora": {"r": 4}}, 5, 1000)
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--track", "peft",
                           "--methods", "lorra")  # fmt: skip
    assert code == 1 and "did you mean 'lora'" in err  # as the PEFT track's
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--track", "peft",
                           "--set", "lora.nope=1")  # fmt: skip
    assert code == 1 and "nope" in err
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--budget", "100")
    assert code == 2 and "--track peft" in err


def test_cli_runs_the_llm_peft_track_and_writes_the_peft_report(llama, tmp_path, monkeypatch,
                                                                capsys):  # fmt: skip
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--track", "peft",
                                "--text-model", str(llama), "--tasks", "syn", "--steps", "3",
                                "--methods", "lora,prompt", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "estimate" in err and "LoRA" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["track"] == "peft" and results["suite"] == "llm"
    keys = [r["key"] for r in results["rows"]]
    assert keys == ["zero_shot", "lora", "prompt", "full"]
    assert results["rows"][-1]["status"] == "n/a"  # full fine-tuning: the full profile's
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
