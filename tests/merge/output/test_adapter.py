"""LoRA → LoRA merging in adapter space, checked by loading the result in real ``peft``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.errors import SpliceError
from splice.io import open_checkpoint
from splice.merge import merge, merge_state_dicts, plan_merge
from splice.merge.base import methods
from tests.merge._hf import tiny_hf
from tests.merge.output.test_ledger import assert_full_coverage

ADAPTERS = {  # name: (rank, alpha, targets, seed)
    "a": (4, 8, ["q_proj", "v_proj", "up_proj", "embed_tokens"], 1),
    "b": (4, 4, ["q_proj", "v_proj", "up_proj"], 2),
    "c": (2, 8, ["q_proj", "down_proj"], 3),
}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    import peft
    import transformers

    root = tmp_path_factory.mktemp("adapters")
    tiny_hf("llama", root / "base")
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        cfg = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False
        )
        peft.get_peft_model(model, cfg).save_pretrained(root / name, save_embedding_layers=False)
    return root


def reference_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha/r)·B·A per base tensor, read straight from the adapter files."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in t.items():
        if "lora_A" not in key and "lora_embedding_A" not in key:
            continue
        b = t[key.replace("_A", "_B")]
        d = (b.double() @ a.double()) * (cfg["lora_alpha"] / cfg["r"])
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        out[f"{module}.weight"] = d.T if "embedding" in key else d
    return out


def peft_deltas(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], object]:
    """ΔW of every LoRA module of the merged adapter as *peft* loads and computes it."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    loaded = peft.PeftModel.from_pretrained(model, adapter)
    out = {}
    for name, module in loaded.base_model.model.named_modules():
        if (hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})) or (
            hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A
        ):
            out[f"{name}.weight"] = module.get_delta_weight("default").double()
    return out, loaded


def _recipe(root: Path, method: str, **kw) -> dict:
    return {
        "method": method,
        "models": [
            {"path": str(root / "a"), "params": {"weight": 0.5}},
            {"path": str(root / "b"), "params": {"weight": 0.3}},
            {"path": str(root / "c"), "params": {"weight": -0.2}},
        ],
        "output": "adapter",
        **kw,
    }


def test_exact_rank_concatenates_and_loads_in_peft(disk, tmp_path):
    refs = [reference_deltas(disk / n) for n in ADAPTERS]
    weights = [0.5, 0.3, -0.2]
    out = merge(_recipe(disk, "task_arithmetic", params={"lambda": 0.8}), tmp_path / "m")
    ledger = assert_full_coverage(out, {str(disk / n): disk / n for n in ADAPTERS})
    report = ledger["adapter"]
    assert report["rank"] == 10 and report["factorization"] == ["exact (concatenated factors)"]
    got, loaded = peft_deltas(disk / "base", out)
    targets = sorted(set().union(*refs))
    assert sorted(got) == targets
    for name in targets:
        want = 0.8 * sum(w * r.get(name, 0) for w, r in zip(weights, refs, strict=True))
        err = float((got[name] - want).norm() / want.norm())
        assert err < 1e-6 and err <= report["relative_error"][name] + 1e-6, name
    assert report["relative_error_total"] < 1e-6
    # the same ΔW through the whole network: peft's forward == base + Σ c_i ΔW_i
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(disk / "base")
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in got:
                param += (
                    0.8 * sum(w * r.get(name, 0) for w, r in zip(weights, refs, strict=True))
                ).float()
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        diff = (loaded(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4


def _eckart_young(m: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


def test_ties_at_rank_n_is_the_truncated_svd_of_the_merged_delta(disk, tmp_path):
    base_ckpt = open_checkpoint(disk / "base")
    base = {n: base_ckpt[n] for n in base_ckpt}
    refs = [reference_deltas(disk / n) for n in ADAPTERS]
    fts = [{n: t + r[n].float() if n in r else t.clone() for n, t in base.items()} for r in refs]
    params = {"density": 0.5, "scope": "tensor"}
    want = merge_state_dicts(
        "ties",
        fts,
        base=base,
        params=params,
        model_params=[{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}],
    )
    recipe = _recipe(disk, "ties", params=params, rank=3, base=str(disk / "base"))
    out = merge(recipe, tmp_path / "m")
    ledger = json.loads((out / "splice-ledger.json").read_text())
    report = ledger["adapter"]
    got, _ = peft_deltas(disk / "base", out)
    sq_res = sq_all = 0.0
    for name, delta in got.items():
        exact = want[name].double() - base[name].double()
        err = float((delta - exact).norm() / exact.norm())
        optimum = _eckart_young(exact, 3)
        assert err == pytest.approx(report["relative_error"][name], rel=1e-3, abs=1e-6)
        assert err == pytest.approx(optimum, rel=1e-3, abs=1e-6), name  # the best rank-3 fit
        sq_res += float((delta - exact).norm() ** 2)
        sq_all += float(exact.norm() ** 2)
    assert math.sqrt(sq_res / sq_all) == pytest.approx(report["relative_error_total"], rel=1e-3)
    assert report["factorization"] == ["full SVD"]
    assert ledger["fidelity"]["logits"]["max_abs_logit_diff"] > 0  # rank 3 is lossy


def test_linear_at_rank_n_uses_the_stacked_factors(disk, tmp_path):
    refs = [reference_deltas(disk / n) for n in ADAPTERS]
    out = merge(_recipe(disk, "linear", rank=4), tmp_path / "m")
    report = json.loads((out / "splice-ledger.json").read_text())["adapter"]
    assert report["factorization"] == ["exact SVD of the stacked factors"]
    got, _ = peft_deltas(disk / "base", out)
    for name, delta in got.items():
        exact = sum(w * r.get(name, 0) for w, r in zip([0.5, 0.3, -0.2], refs, strict=True)) / 0.6
        err = float((delta - exact).norm() / exact.norm())
        assert err == pytest.approx(_eckart_young(exact, 4), rel=1e-3, abs=1e-6), name


def test_plan_and_errors(disk, tmp_path):
    plan = plan_merge(_recipe(disk, "ties", rank=8))
    assert plan["output"] == "adapter" and plan["base"].startswith("none")
    with pytest.raises(SpliceError, match="rank: exact concatenates"):
        merge(_recipe(disk, "ties", rank="exact"), tmp_path / "x")
    with pytest.raises(SpliceError, match="needs a rank"):
        merge(_recipe(disk, "ties"), tmp_path / "x")
    slerp = {"method": "slerp", "models": [str(disk / "a")], "output": "adapter", "rank": 2}
    with pytest.raises(SpliceError, match=r"depends on the base weights.*fix: add `base:`"):
        merge(slerp, tmp_path / "x")
    mixed = _recipe(disk, "task_arithmetic")
    mixed["models"][0] = str(disk / "base")
    with pytest.raises(SpliceError, match="not one"):
        merge(mixed, tmp_path / "x", output="adapter")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", [n for n, cls in methods.items() if cls.delta_only])
def test_delta_only_methods_do_not_need_the_base(method):
    """merge(θ₀ + τ) − θ₀ == merge(0 + τ): what makes ΔW-space merging exact without base."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.w": torch.randn(12, 10, generator=g) * 3, "b": torch.randn(10)}
    taus = [{n: torch.randn(t.shape, generator=g) * 0.1 for n, t in base.items()} for _ in "ab"]
    zero = {n: torch.zeros_like(t) for n, t in base.items()}
    params = {
        "pcb": {"ratio": 0.5},
        "do_merge": {"rank": 2},
        "dc_merge": {"rank": 2},
        "dare": {"p": 0.5},
    }
    kw = {"params": params.get(method, {}), "seed": 1}
    full = merge_state_dicts(
        method, [{n: base[n] + t[n] for n in base} for t in taus], base=base, **kw
    )
    delta = merge_state_dicts(method, [dict(t) for t in taus], base=zero, **kw)
    for n in base:
        torch.testing.assert_close(full[n] - base[n], delta[n], atol=2e-5, rtol=1e-4)


def test_fidelity_logits_of_an_exact_adapter_merge(disk, tmp_path, capsys, monkeypatch):
    import sys

    import yaml

    from splice.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(disk, "task_arithmetic", base=str(disk / "base"))))
    monkeypatch.setattr(sys, "argv", ["splice", "merge", str(recipe), str(tmp_path / "m")])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert (e.value.code or 0) == 0
    logits = json.loads((tmp_path / "m" / "splice-ledger.json").read_text())["fidelity"]["logits"]
    assert logits["model"] == "LlamaForCausalLM" and logits["max_abs_logit_diff"] < 1e-4
    assert "logits (2×16 random tokens): max |Δ|" in out
    assert "adapter: rank 10, exact (concatenated factors); relative error" in out
