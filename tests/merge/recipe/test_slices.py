"""mergekit ``slices:``: passthrough layer stacking, per-slice parameters and precedence,
and one-line errors that name the recipe's line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge, merge_state_dicts, plan_merge
from tests.merge._ckpt import save, tiny_llama
from tests.merge._hf import tiny_hf
from tests.merge._recipes import base_and_finetunes, load_dir, write_recipe

STACK = """\
merge_method: passthrough
slices:
  - sources:
      - model: {ft0}
        layer_range: [0, 2]
  - sources:
      - model: {ft1}
        layer_range: [1, 3]
  - sources:
      - model: {ft0}
        layer_range: [1, 2]
dtype: float32
"""


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return base_and_finetunes(tmp_path_factory.mktemp("slice-models"))


def _write(tmp_path: Path, text: str, **paths) -> Path:
    return write_recipe(tmp_path, text, "recipe.yml", **paths)


_load = load_dir


def _layer(sd: dict, i: int, j: int) -> dict:
    """Layer ``i`` of ``sd`` renamed to output layer ``j``."""
    pre = f"model.layers.{i}."
    return {f"model.layers.{j}.{k[len(pre) :]}": v for k, v in sd.items() if k.startswith(pre)}


def test_passthrough_stacking_matches_a_hand_built_stack(disk, tmp_path):
    paths, _, fts = disk
    out = merge(_write(tmp_path, STACK, **paths), tmp_path / "out")
    got = _load(out)
    want = {k: v for k, v in fts[0].items() if "layers." not in k}  # embeddings: first slice
    want["model.norm.weight"] = fts[0]["model.norm.weight"]  # post weights: the last slice's
    want["lm_head.weight"] = fts[0]["lm_head.weight"]
    for i, j in ((0, 0), (1, 1)):
        want.update(_layer(fts[0], i, j))
    for i, j in ((1, 2), (2, 3)):
        want.update(_layer(fts[1], i, j))
    want.update(_layer(fts[0], 1, 4))  # layer 1 of ft0 again: written a second time
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    plan = plan_merge(_write(tmp_path, STACK, **paths))  # headers only, same tensors
    assert plan["tensors"]["merged"] == sum(v.is_floating_point() for v in got.values())
    assert plan["architecture"]["stacks"] == {"model.layers": 5}
    assert json.loads((out / "splice-ledger.json").read_text())["method"] == "passthrough"


def test_stacked_llama_loads_in_transformers(tmp_path):
    import transformers

    a = tiny_hf("llama", tmp_path / "a", seed=1)
    b = tiny_hf("llama", tmp_path / "b", seed=2)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
        ],
    }
    out = merge(recipe, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 4
    ma = transformers.AutoModelForCausalLM.from_pretrained(str(a))
    mb = transformers.AutoModelForCausalLM.from_pretrained(str(b))
    hand = transformers.AutoModelForCausalLM.from_pretrained(str(a))
    hand.model.layers.append(mb.model.layers[1])
    hand.model.norm, hand.lm_head = mb.model.norm, mb.lm_head  # the last slice's (mergekit)
    hand.config.num_hidden_layers = 4
    for i, layer in enumerate(hand.model.layers):
        layer.self_attn.layer_idx = i
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hand(ids).logits)
        assert not torch.allclose(model(ids).logits, ma(ids).logits)


SLERP = """\
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {ft0}
        layer_range: [0, 2]
    parameters:
      t: [0, 1]
  - sources:
      - model: {base}
        layer_range: [2, 3]
      - model: {ft0}
        layer_range: [2, 3]
    parameters:
      t:
        - filter: mlp
          value: 0.25
parameters:
  t: 0.5
"""


def test_per_slice_parameters_and_precedence(disk, tmp_path):
    paths, base, fts = disk
    out = merge(_write(tmp_path, SLERP, **paths), tmp_path / "out")
    got = _load(out)

    def slerp(name: str, t: float) -> torch.Tensor:
        return merge_state_dicts(
            "slerp", [{name: fts[0][name]}], base={name: base[name]}, params={"t": t}
        )[name]

    # slice 1: gradient [0, 1] over its own two layers (t = 0 then 1)
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[q.format(0)], base[q.format(0)])
    torch.testing.assert_close(got[q.format(1)], slerp(q.format(1), 1.0))
    # slice 2: the slice's filter list wins for mlp, falls through to the global t elsewhere
    up = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(got[up], slerp(up, 0.25))
    torch.testing.assert_close(got[q.format(2)], slerp(q.format(2), 0.5))
    # the embedding is merged with the first slice's parameters at depth 0: t = 0
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


LINEAR = """\
merge_method: linear
slices:
  - sources:
      - model: {ft0}
        layer_range: [1, 3]
        parameters: {{weight: 3.0}}
      - model: {ft1}
        layer_range: [0, 2]
    parameters: {{weight: 2.0}}
parameters: {{weight: 1.0, normalize: true}}
"""


def test_source_over_slice_over_global_for_per_model_parameters(disk, tmp_path):
    paths, _, fts = disk
    out = merge(_write(tmp_path, LINEAR, **paths), tmp_path / "o")
    got = _load(out)
    for j in range(2):
        name = f"model.layers.{j}.mlp.up_proj.weight"
        a, b = fts[0][name.replace(f".{j}.", f".{j + 1}.")], fts[1][name]
        torch.testing.assert_close(got[name], (3 * a + 2 * b) / 5)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_modules_block_is_its_modules_recipe_with_its_own_parameter_level(disk, tmp_path):
    paths, _, fts = disk
    text = """\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: {ft0}
      - model: {ft1}
        parameters: {{weight: 3.0}}
    parameters: {{weight: 2.0}}
parameters: {{weight: 1.0}}
"""
    got = _load(merge(_write(tmp_path, text, **paths), tmp_path / "o"))
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], (2 * fts[0][name] + 3 * fts[1][name]) / 5)
    two = text.replace("parameters: {{weight: 1.0}}", "  vision_tower: {{models: []}}")
    with pytest.raises(SpliceError, match=r"recipe\.yml:2: modules: has 2 modules"):
        merge(_write(tmp_path, two, **paths), tmp_path / "o2")


def test_full_range_slice_is_a_plain_merge(disk, tmp_path):
    paths, base, _ = disk
    text = SLERP.split("  - sources:\n      - model: {base}\n        layer_range: [2, 3]")[0]
    text = text.replace("[0, 2]", "[0, 3]") + "parameters:\n  t: 0.5\n"
    plan = plan_merge(_write(tmp_path, text, **paths))
    assert plan["tensors"]["merged"] == len([k for k in base if k != "model.steps"])


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("[1, 3]", "[1, 4]", 8, r"layer_range \[1, 4\] is outside .*ft1, which has 3 layers"),
        ("[1, 2]", "[2, 1]", 11, r"layer_range \[2, 1\] is empty"),
        (
            "[1, 2]\n",
            "[1, 2]\n      - model: {ft1}\n        layer_range: [0, 2]\n",
            9,
            r"different layer counts \[1, 2\]",
        ),
        ("merge_method: passthrough", "merge_method: passthru", 1, "did you mean"),
    ],
)
def test_slice_errors_name_the_recipe_line(disk, tmp_path, old, new, line, message):
    paths, _, _ = disk
    recipe = _write(tmp_path, STACK.replace(old, new, 1), **paths)
    with pytest.raises(SpliceError, match=message) as e:
        merge(recipe, tmp_path / "out")
    assert re.search(rf"recipe\.yml:{line}\b", str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_slices_of_another_architecture_are_refused(disk, tmp_path):
    paths, _, _ = disk
    wide = tiny_llama(3, hidden=10)
    cfg = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 10}
    save(wide, tmp_path / "wide", cfg=cfg)
    text = STACK.replace("{ft1}", str(tmp_path / "wide"))
    with pytest.raises(SpliceError, match=r"recipe\.yml:7: hidden_size is 10 here but 8"):
        merge(_write(tmp_path, text, **paths), tmp_path / "out")


def test_an_adapter_output_cannot_stack_layers(disk, tmp_path):
    paths, _, _ = disk
    with pytest.raises(SpliceError, match="adapter output cannot stack layers"):
        merge(_write(tmp_path, STACK, **paths), tmp_path / "out", output="adapter")
