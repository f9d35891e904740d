"""LoRA extraction (fine-tune − base → PEFT LoRA): exact at full rank (loaded with peft),
the best rank-r approximation below it, per-tensor errors, modules_to_save, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from splice.errors import SpliceError
from splice.merge.extract import ExtractOptions, extract_lora, lowrank_factors
from tests.merge._hf import tiny_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("extract")
    base = tiny_hf("llama", root / "base", seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.2." in name and "mlp" in name:
                continue  # untouched: left out of the adapter
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(root / "ft"))
    return base, root / "ft"


def _merged(base, adapter):
    import peft
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    return peft.PeftModel.from_pretrained(m, str(adapter)).merge_and_unload().state_dict()


def test_full_rank_reproduces_the_fine_tune_through_peft(pair, tmp_path):
    import transformers

    base, ft = pair
    report = extract_lora(ft, base, tmp_path / "lora", ExtractOptions(max_rank=64))
    want = transformers.AutoModelForCausalLM.from_pretrained(str(ft)).state_dict()
    got = _merged(base, tmp_path / "lora")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5)
    assert report["relative_error_max"] < 1e-6
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in cfg["modules_to_save"] and "lm_head" in cfg["modules_to_save"]
    assert "model.norm" in cfg["modules_to_save"]
    assert not any("layers.2.mlp" in t for t in cfg["target_modules"])
    assert report["unchanged_tensors"] == 3  # gate, up, down of layer 2


def test_truncated_rank_is_the_svd_truncation_with_its_error(pair, tmp_path):
    import transformers

    base, ft = pair
    report = extract_lora(ft, base, tmp_path / "r2", ExtractOptions(max_rank=2))
    sd_b = transformers.AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    sd_f = transformers.AutoModelForCausalLM.from_pretrained(str(ft)).state_dict()
    got = _merged(base, tmp_path / "r2")
    name = "model.layers.0.mlp.up_proj.weight"
    d = (sd_f[name] - sd_b[name]).double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close((got[name] - sd_b[name]).double(), best, atol=1e-5, rtol=1e-4)
    want_err = float((s[2:] ** 2).sum().sqrt() / s.norm())
    assert report["relative_error"][name] == pytest.approx(want_err, rel=1e-6)
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2


def test_sv_epsilon_drops_small_singular_values():
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(6, 3, generator=g, dtype=torch.float64)
        @ torch.diag(torch.tensor([5.0, 1.0, 1e-4], dtype=torch.float64))
        @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    )
    b, a, err = lowrank_factors(x, max_rank=8, sv_epsilon=1e-2)
    assert b.shape == (6, 2) and a.shape == (2, 9)
    s = torch.linalg.svdvals(x)
    assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)
    tall_b, tall_a, _ = lowrank_factors(x.T, max_rank=8)  # the other orientation
    torch.testing.assert_close(tall_b @ tall_a, x.T)


def test_errors_are_one_line_and_write_nothing(pair, tmp_path):
    base, ft = pair
    with pytest.raises(SpliceError, match="max_rank 0 must be >= 1"):
        extract_lora(ft, base, tmp_path / "x", ExtractOptions(max_rank=0))
    (tmp_path / "taken").mkdir()
    with pytest.raises(SpliceError, match="already exists"):
        extract_lora(ft, base, tmp_path / "taken")
    assert not (tmp_path / "x").exists()


def test_cli(pair, tmp_path, monkeypatch, capsys):
    from tests.cli._run import run_cli

    base, ft = pair
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "extract-lora",
        str(ft),
        str(base),
        str(tmp_path / "o"),
        "--max-rank",
        "4",
        "-e",
        "self_attn",
        "--json",
    )
    report = json.loads(out)
    assert code == 0 and report["rank"] == 4
    assert not any("self_attn" in k for k in report["relative_error"])
    code, _, err = run_cli(
        monkeypatch, capsys, "extract-lora", str(ft), str(base), str(tmp_path / "o")
    )
    assert code == 1 and "already exists" in err and "\n" not in err.strip()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_conv1d_biases_and_tied_heads_round_trip(family, tmp_path):
    """GPT-2: Conv1D weights (fan_in_fan_out) and a head tied to its saved embedding;
    Qwen2: changed q/k/v biases (bias: lora_only) — full rank still gives the fine-tune."""
    import transformers

    base = tiny_hf(family, tmp_path / "base", seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "ft"))
    extract_lora(tmp_path / "ft", base, tmp_path / "lora", ExtractOptions(max_rank=64))
    got = _merged(base, tmp_path / "lora")
    want = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft")).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=2e-6, rtol=1e-5)
