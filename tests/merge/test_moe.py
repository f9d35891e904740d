"""MoE assembly: Mixtral / Qwen2-MoE from dense experts load in transformers and route;
router initialization against an independent computation; one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from splice.errors import SpliceError
from splice.merge.moe import build_moe
from tests.merge._hf import tiny_hf
from tests.merge._recipes import save_word_tokenizer

WORDS = ["<pad>", "<s>", "a", "b", "c", "d", "e", "f"]


def _with_tokenizer(path: Path) -> Path:
    return save_word_tokenizer(path, WORDS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {"base": _with_tokenizer(tiny_hf("llama", root / "base", seed=0))}
    for i in (1, 2):
        out[f"ft{i}"] = tiny_hf("llama", root / f"ft{i}", seed=i)
    out["qbase"] = _with_tokenizer(tiny_hf("qwen2", root / "qbase", seed=3))
    for i in (4, 5):
        out[f"q{i}"] = tiny_hf("qwen2", root / f"q{i}", seed=i)
    out["wide"] = tiny_hf("llama", root / "wide", seed=6, intermediate_size=48)
    return out


RECIPE = """\
base_model: {base}
gate_mode: {mode}
experts_per_token: 1
experts:
  - source_model: {ft1}
    positive_prompts: ["a b", "a"]
    negative_prompts: ["e"]
  - source_model: {ft2}
    positive_prompts: ["c d"]
"""


def _write(tmp_path: Path, text: str, **kw) -> Path:
    p = tmp_path / "moe.yml"
    p.write_text(text.format(**{k: str(v) for k, v in kw.items()}))
    return p


def _sd(path: Path) -> dict:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_mixtral_from_llama_experts_loads_and_routes(models, tmp_path):
    import transformers

    recipe = _write(tmp_path, RECIPE, mode="cheap_embed", **models)
    build_moe(recipe, tmp_path / "out")
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(moe).__name__ == "MixtralForCausalLM"
    base, ft1, ft2 = (_sd(models[k]) for k in ("base", "ft1", "ft2"))
    got = moe.state_dict()
    p = "model.layers.1."
    torch.testing.assert_close(
        got[p + "self_attn.q_proj.weight"], base[p + "self_attn.q_proj.weight"]
    )
    for i, ft in enumerate((ft1, ft2)):
        gu = torch.cat([ft[p + "mlp.gate_proj.weight"], ft[p + "mlp.up_proj.weight"]])
        torch.testing.assert_close(got[p + "mlp.experts.gate_up_proj"][i], gu)
        torch.testing.assert_close(
            got[p + "mlp.experts.down_proj"][i], ft[p + "mlp.down_proj.weight"]
        )
    # cheap_embed: normalized sum of the prompts' token embeddings (bos included), minus negatives
    emb = base["model.embed_tokens.weight"]

    def unit(ids_per_prompt):
        v = sum(emb[ids].sum(0) for ids in ids_per_prompt)
        return v / v.norm()

    g0 = unit([[1, 2, 3], [1, 2]]) - unit([[1, 6]])
    torch.testing.assert_close(got[p + "mlp.gate.weight"][0], g0 / g0.norm())
    torch.testing.assert_close(got[p + "mlp.gate.weight"][1], unit([[1, 4, 5]]))
    # it routes: tokens go to both experts
    chosen = []
    hook = moe.model.layers[0].mlp.gate.register_forward_hook(
        lambda m, i, o: chosen.append(o[2].flatten())
    )
    with torch.no_grad():
        moe(torch.tensor([[2, 3, 4, 5, 6, 7, 2, 4]]))
    hook.remove()
    assert set(chosen[0].tolist()) == {0, 1}


def test_hidden_gates_are_the_base_models_hidden_states(models, tmp_path):
    import transformers

    build_moe(_write(tmp_path, RECIPE, mode="hidden", **models), tmp_path / "out")
    got = _sd(tmp_path / "out")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(models["base"]))

    def state(ids):
        with torch.no_grad():
            hs = base(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return [h[0, -1] for h in hs[:-1]]

    for layer in range(3):
        v = state([1, 4, 5])[layer]
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"][1], v / v.norm())


def test_qwen2_moe_with_a_shared_expert(models, tmp_path):
    import transformers

    text = """\
base_model: {qbase}
gate_mode: cheap_embed
experts:
  - source_model: {q4}
    positive_prompts: ["a b"]
  - source_model: {q5}
    positive_prompts: ["c d"]
shared_experts:
  - source_model: {qbase}
    positive_prompts: ["e f"]
    residual_scale: 0.5
"""
    build_moe(_write(tmp_path, text, **models), tmp_path / "out")
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    base = _sd(models["qbase"])
    got = moe.state_dict()
    p = "model.layers.0."
    torch.testing.assert_close(
        got[p + "mlp.shared_expert.down_proj.weight"], 0.5 * base[p + "mlp.down_proj.weight"]
    )
    torch.testing.assert_close(got[p + "self_attn.q_proj.bias"], base[p + "self_attn.q_proj.bias"])
    with torch.no_grad():
        assert torch.isfinite(moe(torch.tensor([[2, 3, 4]])).logits).all()


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("{ft2}", "{wide}"), 8, "has intermediate_size 48, the base 32"),
        (("gate_mode: cheap_embed", "gate_mode: random"), 2, "routes arbitrarily"),
        (('    positive_prompts: ["c d"]\n', ""), 8, "needs positive_prompts"),
        (("experts_per_token: 1", "experts_per_token: 3"), 3, "2 experts but experts_per_token"),
    ],
)
def test_moe_errors_name_the_line(models, tmp_path, change, line, message):
    text = RECIPE.replace("{mode}", "cheap_embed").replace(*change)
    with pytest.raises(SpliceError, match=message) as e:
        build_moe(_write(tmp_path, text, **models), tmp_path / "out")
    assert re.search(rf"moe\.yml:{line}\b", str(e.value)), str(e.value)
    assert not (tmp_path / "out").exists()
