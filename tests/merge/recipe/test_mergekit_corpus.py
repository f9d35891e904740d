"""mergekit compatibility: its example recipes (adapted to local fixtures, see each file's
first line) and one recipe per 0.1.5 method run through ``splice merge`` unchanged, or are
refused with a one-line reason; each new method name maps to splice's method with
mergekit's defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from splice.io import open_checkpoint
from splice.merge import merge, merge_state_dicts
from splice.merge.base import methods
from tests.cli._run import run_cli
from tests.merge._ckpt import finetune, save, tiny_llama

CORPUS = Path(__file__).parent / "mergekit_corpus"
REFUSED = {
    # recipe → what the one-line error must say, while splice lacks the feature
    "ex_orcamini_platy_44layer.yml": "'passthrough' is not in splice",  # layer stacking
    "ex_multimerge.yml": "expected a single document",  # mergekit-multi
}
if "passthrough" in methods.names():  # slices/passthrough landed (issue #31 item 2)
    del REFUSED["ex_orcamini_platy_44layer.yml"]
    del REFUSED["ex_multimerge.yml"]  # multi-document recipes landed with it
ARGS = {"ex_multimerge.yml": ["--intermediates", "stages"]}  # mergekit-multi's intermediates
STACKED = {"ex_orcamini_platy_44layer.yml": [("ft0", 0), ("ft0", 1), ("ft1", 1), ("ft1", 2)]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-corpus")
    base = tiny_llama(0)
    fts = [finetune(base, s, scale=0.05 * (s + 1)) for s in range(3)]
    save(base, root / "base")
    for i, ft in enumerate(fts):
        save(ft, root / f"ft{i}")
    return root, base, fts


def _load(path: Path) -> dict:
    ckpt = open_checkpoint(path)
    return {n: ckpt[n] for n in ckpt}


@pytest.mark.parametrize("recipe", sorted(p.name for p in CORPUS.glob("*.yml")))
def test_corpus_recipe_runs_or_is_refused_in_one_line(models, recipe, monkeypatch, capsys):
    root, base, _ = models
    work = root / f"run-{recipe}"
    work.mkdir()
    for d in ("base", "ft0", "ft1", "ft2"):
        (work / d).symlink_to(root / d)
    shutil.copy(CORPUS / recipe, work / recipe)
    monkeypatch.chdir(work)
    code, _, err = run_cli(monkeypatch, capsys, "merge", recipe, "out", *ARGS.get(recipe, []))
    if recipe in REFUSED:
        assert code == 1 and err.count("\n") == 1, err
        assert REFUSED[recipe] in err and "Traceback" not in err
        assert not (work / "out").exists()
        return
    assert code == 0, err
    out = _load(work / "out")
    if recipe in STACKED:  # passthrough stacking: each output layer is one source layer
        _check_stacked(out, base, root, STACKED[recipe])
        return
    assert set(out) == set(base)
    floats = [n for n in base if base[n].is_floating_point()]
    assert all(torch.isfinite(out[n].float()).all() for n in floats)
    assert any(not torch.equal(out[n].float(), base[n]) for n in floats)


def _check_stacked(out: dict, base: dict, root: Path, layers: list[tuple[str, int]]) -> None:
    prefix = "model.layers."
    shared = {n for n in base if not n.startswith(prefix)}
    assert {n for n in out if not n.startswith(prefix)} == shared
    for i, (model, j) in enumerate(layers):
        src = _load(root / model)
        for name in (n for n in src if n.startswith(f"{prefix}{j}.")):
            mine = name.replace(f"{prefix}{j}.", f"{prefix}{i}.", 1)
            assert torch.equal(out[mine], src[name].to(out[mine].dtype)), mine
    assert not any(n.startswith(f"{prefix}{len(layers)}.") for n in out)


W = [0.5, 0.3, 0.2]
# mergekit method → (its global params, its per-model params, splice method, params, model params)
MAPPINGS = {
    "breadcrumbs": (
        {"lambda": 0.9},
        {"density": 0.6, "gamma": 0.05},
        "breadcrumbs",
        {"lambda": 0.9},
        {"density": 0.6, "gamma": 0.05},
    ),
    "breadcrumbs_ties": (
        {"normalize": True},
        {"density": 0.6},
        "breadcrumbs",
        {"consensus": "ties", "normalize": True},
        {"density": 0.6},
    ),
    "della": (
        {},
        {"density": 0.6, "epsilon": 0.1},
        "della",
        {"rescale": "l1"},
        {"density": 0.6, "epsilon": 0.1},
    ),
    "della_linear": (
        {"rescale": False},
        {"density": 0.6},
        "della",
        {"consensus": None, "normalize": False, "rescale": "off"},
        {"density": 0.6},
    ),
    "sce": ({"select_topk": 0.5}, None, "sce", {"select_topk": 0.5, "mergekit_exact": True}, None),
    "model_stock": ({}, None, "model_stock", {}, None),
    "multislerp": ({}, {}, "multislerp", {"mergekit_norms": True}, {}),
    "ram": ({}, None, "ram", {}, None),
    "ramplus_tl": ({"epsilon": 0.01}, None, "ram", {"plus": True, "epsilon": 0.01}, None),
}


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_mergekit_names_map_to_splice_methods(models, tmp_path, name):
    root, base, fts = models
    mk_params, mk_per_model, method, params, per_model = MAPPINGS[name]
    entries = []
    for i, w in enumerate(W):
        p = None if mk_per_model is None else {**mk_per_model, "weight": w}
        entries.append({"model": str(root / f"ft{i}"), **({"parameters": p} if p else {})})
    recipe = {"merge_method": name, "base_model": str(root / "base"), "models": entries}
    recipe["parameters"] = mk_params
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    got = _load(merge(tmp_path / "r.yml", tmp_path / "out"))
    mps = None if per_model is None else [{**per_model, "weight": w} for w in W]
    want = merge_state_dicts(method, fts, base=base, params=params, model_params=mps)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def test_two_model_and_baseless_names(models, tmp_path):
    root, base, fts = models
    cases = [
        ("nearswap", {"t": 0.01}, [0], True, [base, fts[0]]),  # the base is listed, as in the docs
        ("arcee_fusion", {}, [0], True, None),
        ("nuslerp", {}, [0, 1], True, None),
        ("karcher", {}, [0, 1], True, None),  # mergekit counts a karcher base as an input
    ]
    for name, params, which, with_base, listed in cases:
        refs = [str(root / f"ft{i}") for i in which]
        if listed is not None:
            refs = [str(root / "base"), *refs]
        recipe = {"merge_method": name, "models": [{"model": r} for r in refs]}
        if with_base:
            recipe["base_model"] = str(root / "base")
        recipe["parameters"] = params
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
        got = _load(merge(tmp_path / f"{name}.yml", tmp_path / name))
        inputs = [fts[i] for i in which]
        if name == "karcher":
            want = merge_state_dicts(name, [*inputs, base], params=params)
        else:
            want = merge_state_dicts(name, inputs, base=base, params=params)
        for n in base:
            assert torch.equal(got[n], want[n]), (name, n)
