"""Recipes: mergekit YAML runs unchanged, splice YAML, and every user error is one line, early."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from splice.errors import SpliceError
from splice.merge import merge, merge_state_dicts
from splice.merge.recipe import Gradient, Rule, evaluate, load_recipe, parse_setting
from tests.merge._ckpt import config, finetune, save, tiny_llama
from tests.merge._recipes import base_and_finetunes, load_dir, write_recipe
from tests.merge.methods.test_ties import ties_mergekit

MERGEKIT = {
    "linear": """
merge_method: linear
models:
  - model: {ft0}
    parameters: {{weight: 0.3}}
  - model: {ft1}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {ft0}
        layer_range: [0, 3]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3]
    - filter: mlp
      value: [1, 0.5, 0.7]
    - value: 0.5
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}
  - model: {ft0}
    parameters: {{weight: 1.0}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.6}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {ft1}
    parameters: {{density: 0.3, weight: 0.5}}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
tokenizer_source: base
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft0}
    parameters: {{density: 0.6, weight: 0.5}}
  - model: {ft1}
    parameters: {{density: [0.4, 0.8], weight: 0.5}}
parameters: {{int8_mask: true}}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {ft0}
    parameters: {{density: 0.7, weight: 1.0}}
  - model: {ft1}
    parameters: {{density: 0.7, weight: 1.0}}
parameters: {{normalize: true}}
""",
}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return base_and_finetunes(tmp_path_factory.mktemp("recipe-models"))


def _write(tmp_path: Path, text: str, **paths) -> Path:
    return write_recipe(tmp_path, text, "recipe.yml", **paths)


_load = load_dir


@pytest.mark.parametrize("name", sorted(MERGEKIT))
def test_mergekit_fixtures_parse(disk, tmp_path, name):
    paths, _, _ = disk
    r = load_recipe(_write(tmp_path, MERGEKIT[name], **paths))
    assert r.dialect == "mergekit"
    assert r.method == {"dare_ties": "dare", "dare_linear": "dare"}.get(name, name)
    assert all(Path(m.path).is_dir() for m in r.models)


def test_mergekit_linear_task_arithmetic_ties_run_unchanged(disk, tmp_path):
    paths, base, fts = disk
    runs = {}
    for name in ("linear", "task_arithmetic", "ties"):
        out = merge(_write(tmp_path, MERGEKIT[name], **paths), tmp_path / name)
        runs[name] = _load(out)
    lin = merge_state_dicts("linear", fts, model_params=[{"weight": 0.3}, {"weight": 0.7}])
    ta = merge_state_dicts(
        "task_arithmetic",
        fts,
        base=base,
        params={"lambda": 0.6},
        model_params=[{"weight": 1.0}, {"weight": 0.5}],
    )
    ties = ties_mergekit(base, fts, [0.5, 0.3], [0.5, 0.5])
    for n, b in base.items():
        assert torch.equal(runs["linear"][n], lin[n])
        assert torch.equal(runs["task_arithmetic"][n], ta[n])
        if b.is_floating_point():
            torch.testing.assert_close(runs["ties"][n], ties[n], atol=1e-6, rtol=0)


def test_mergekit_dare_maps_density_and_l1_rescale(disk, tmp_path):
    paths, _, _ = disk
    r = load_recipe(_write(tmp_path, MERGEKIT["dare_ties"], **paths))
    g = r.flat_settings()
    assert g["consensus"] == "ties" and g["rescale"] == "l1"
    assert g["aggregate"] == "sum" and g["zero_sign"] == "positive"
    assert r.models[0].settings["p"] == pytest.approx(0.4)
    grad = r.models[1].settings["p"]
    assert isinstance(grad, Gradient) and grad.values == pytest.approx((0.6, 0.2))
    lin = load_recipe(_write(tmp_path, MERGEKIT["dare_linear"], **paths))
    g = lin.flat_settings()
    assert g["consensus"] is None and g["aggregate"] == "mean"
    out = merge(_write(tmp_path, MERGEKIT["dare_ties"], **paths), tmp_path / "dt", seed=2)
    assert set(_load(out)) == set(tiny_llama(0))


def test_mergekit_slerp_slices_with_filtered_gradients(disk, tmp_path):
    paths, base, fts = disk
    out = merge(_write(tmp_path, MERGEKIT["slerp"], **paths), tmp_path / "slerp")
    got = _load(out)
    t = [
        {"filter": "self_attn", "value": {"gradient": [0, 0.5, 0.3]}},
        {"filter": "mlp", "value": {"gradient": [1, 0.5, 0.7]}},
        {"value": 0.5},
    ]
    ref = merge_state_dicts("slerp", fts[:1], base=base, params={"t": t})
    assert all(torch.equal(got[n], ref[n]) for n in base)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got[q0], base[q0])  # t = 0 at the first layer


def test_native_ties_defaults_to_the_papers_global_scope(disk, tmp_path):
    paths, base, fts = disk
    recipe = {"method": "ties", "base": str(paths["base"]), "models": [str(paths["ft0"])]}
    r = load_recipe(recipe)
    assert r.dialect == "splice" and "scope" not in r.settings
    out = _load(merge(recipe, tmp_path / "out"))
    ref = merge_state_dicts("ties", fts[:1], base=base, params={"scope": "global"})
    assert all(torch.equal(out[n], ref[n]) for n in base)
    per_tensor = merge_state_dicts("ties", fts[:1], base=base, params={"scope": "tensor"})
    assert any(not torch.equal(out[n], per_tensor[n]) for n in base)


def test_gradients_interpolate_like_mergekit():
    g = Gradient((0.0, 1.0, 0.5))
    assert [g.at(x) for x in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.75, 0.5]
    assert Gradient(("a", "b")).at(0.9) == "a" and Gradient(("a", "b")).at(1.0) == "b"
    rules = (Rule("mlp", 0.1), Rule(None, Gradient((0.0, 1.0))))
    assert evaluate(rules, "model.layers.1.mlp.up", 0.5) == 0.1
    assert evaluate(rules, "model.layers.1.attn", 0.5) == 0.5
    assert parse_setting([{"filter": "x", "value": [1, 2]}], "t", mergekit=True) == (
        Rule("x", Gradient((1, 2))),
    )


def test_per_model_settings_override_global_ones(disk):
    _, base, fts = disk
    got = merge_state_dicts(
        "task_arithmetic",
        fts,
        base=base,
        params={"weight": 0.0},
        model_params=[{"weight": 1.0}, {}],
    )
    ref = merge_state_dicts("task_arithmetic", fts[:1], base=base)
    assert all(torch.equal(got[n], ref[n]) for n in base)


# --------------------------------------------------------------------- errors, all before output


@pytest.fixture
def no_execute(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the merge started before the error was found")

    import splice.merge.api as api
    import splice.merge.output.model as model

    monkeypatch.setattr(model, "execute", refuse)
    monkeypatch.setattr(api, "execute", refuse)


def _native(paths, **kw):
    return {"method": "ties", "base": str(paths["base"]), "models": [str(paths["ft0"])], **kw}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"params": {"densty": 0.3}}, "unknown parameter of ties 'densty'.*did you mean 'density'"),
        ({"method": "tie"}, "unknown merge method 'tie'.*did you mean 'ties'"),
        ({"modles": []}, "unknown key 'modles'.*did you mean 'models'"),
        ({"params": {"density": 1.5}}, "density.*less than or equal to 1"),
        ({"params": {"lambda": [0.1, 0.2]}}, "bare list.*gradient"),
        ({"params": {"lambda": {"gradient": []}}}, "non-empty list"),
        ({"params": {"weight": "heavy"}}, "weight.*number"),
        ({"base": "org/model-7b"}, "does not exist.*never downloads"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"lines": {"beta": 0.5, "gamma": 0.5}}, "lines: gamma"),
    ],
)
def test_recipe_errors_are_one_line_and_early(disk, tmp_path, no_execute, change, message):
    paths, _, _ = disk
    with pytest.raises(SpliceError, match=message) as e:
        merge(_native(paths, **change), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_per_model_typo_in_mergekit_yaml(disk, tmp_path, no_execute):
    paths, _, _ = disk
    text = MERGEKIT["ties"].replace("density: 0.3", "densty: 0.3")
    with pytest.raises(SpliceError, match=r"'densty'.*did you mean 'density'"):
        merge(_write(tmp_path, text, **paths), tmp_path / "out")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("merge_method: ties", "merge_method: dare-ties", "did you mean 'dare_ties'"),
        ("merge_method: ties", "merge_method: weighted_average", "not in splice"),
        ("tokenizer_source: base", "tokenizer_source: ./none", "not base, union or a model dir"),
        ("dtype: float32", "dtype: float32\nchat_template: chatml", "not supported"),
        ("dtype: float32", "dtpye: float32", "unknown key 'dtpye'.*did you mean 'dtype'"),
    ],
)
def test_mergekit_errors(disk, tmp_path, no_execute, old, new, message):
    paths, _, _ = disk
    text = MERGEKIT["ties"].replace(old, new)
    with pytest.raises(SpliceError, match=message):
        merge(_write(tmp_path, text, **paths), tmp_path / "out")


def test_shape_mismatch_and_incompatible_architectures(disk, tmp_path, no_execute):
    paths, base, _ = disk
    wide = tiny_llama(1, hidden=10)
    save(wide, tmp_path / "wide")
    with pytest.raises(SpliceError, match=r"shape .* differs"):
        merge(_native(paths, models=[str(tmp_path / "wide")]), tmp_path / "out")
    save(finetune(base, 3), tmp_path / "other", cfg=config(model_type="mistral"))
    with pytest.raises(SpliceError, match="incompatible architectures: model_type"):
        merge(_native(paths, models=[str(tmp_path / "other")]), tmp_path / "out")
    short = {k: v for k, v in base.items() if "layers.2." not in k}
    save(short, tmp_path / "short")
    with pytest.raises(SpliceError, match="missing"):
        merge(_native(paths, models=[str(tmp_path / "short")]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("method: ties\nmodels: [a, b\n")
    with pytest.raises(SpliceError, match=r"bad\.yml:\d+"):
        load_recipe(p)


# ------------------------------------------------------------------------------------- CLI


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from splice.cli import main

    monkeypatch.setattr(sys, "argv", ["splice", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def test_cli_merge_list_and_errors(disk, tmp_path, monkeypatch, capsys):
    paths, _, _ = disk
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_native(paths, params={"density": 0.5})))
    code, out, _ = _cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "o"), "--json")
    assert code == 0 and json.loads(out)["out"] == str(tmp_path / "o")
    code, _, err = _cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "o"))
    assert code == 1 and "already exists" in err and "Traceback" not in err
    code, _, _ = _cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "o"), "--force")
    assert code == 0
    recipe.write_text(yaml.safe_dump(_native(paths, params={"densty": 0.5})))
    code, _, err = _cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "o2"))
    assert code == 1 and err.count("\n") == 1 and "did you mean 'density'" in err
    code, out, _ = _cli(monkeypatch, capsys, "merge", "--list", "--json")
    table = {row["name"]: row for row in json.loads(out)}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare"} <= set(table)
    assert {p["name"] for p in table["ties"]["params"]} >= {"density", "lambda", "scope"}
    from splice.merge.learned import learned

    for name, lm in learned.items():  # data-driven and continual methods are listed too
        assert table[name]["data"] == lm.data
        assert {p["name"] for p in table[name]["params"]} == set(lm.Params.model_fields)
    assert table["opcm"]["kind"] == "continual" and table["lot"]["kind"] == "learned"
    code, out, _ = _cli(monkeypatch, capsys, "merge", "--list")
    assert code == 0 and "density" in out and "arxiv.org/abs/2306.01708" in out
    assert "adamerging (learned, unlabeled data)" in out


def test_mergekit_model_plus_lora_reference(disk, tmp_path):
    from tests.merge._ckpt import lora_adapter

    paths, base, _ = disk
    target = "model.layers.1.self_attn.v_proj.weight"
    delta = lora_adapter(tmp_path / "lora", base, [target])[target]
    text = f"""
merge_method: task_arithmetic
base_model: {paths["base"]}
models:
  - model: {paths["base"]}+{tmp_path / "lora"}
"""
    out = _load(merge(_write(tmp_path, text), tmp_path / "out"))
    torch.testing.assert_close(out[target], base[target] + delta, atol=1e-6, rtol=0)
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])


def test_learned_recipes_are_told_by_file_name(tmp_path):
    """``is_learned_recipe`` answers from the learned package's file names (so ``--plan`` and
    the preflight never import the learned methods and torch): each file registers its own."""
    from splice._registry import module_names
    from splice.merge.learned import learned
    from splice.merge.recipe import is_learned_recipe

    assert module_names("splice.merge.learned") == learned.names()
    for name in learned.names():
        assert is_learned_recipe({"method": name, "models": ["a"]})
    assert is_learned_recipe({"method": "ties", "models": ["a"], "data": {}})
    assert not is_learned_recipe({"method": "ties", "models": ["a"]})
    assert not is_learned_recipe({"merge_method": "ties", "models": [{"model": "a"}]})
    path = tmp_path / "r.yaml"
    path.write_text("method: adamerging\nmodels: [a]\n")
    assert is_learned_recipe(path)
    path.write_text("method: ties\nmethod: adamerging\n")
    with pytest.raises(SpliceError, match="duplicate key"):
        is_learned_recipe(path)
