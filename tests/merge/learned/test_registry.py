"""Every learned method: one file, one registered name, a schema that matches its function."""

from __future__ import annotations

import pkgutil

import pytest

import splice.merge.learned as pkg
from splice.errors import SpliceError
from splice.merge.learned import learned

FILES = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def test_each_file_registers_one_method_named_after_it():
    assert learned.names() == FILES
    assert {"adamerging", "atlas", "concrete", "lot", "opcm"} <= set(FILES)
    for name in FILES:
        m = learned.get(name)
        assert m.name == name and m.pretty_name and "arxiv.org" in m.reference
        assert m.fn.__module__ == f"splice.merge.learned.{name}"


@pytest.mark.parametrize("name", FILES)
def test_params_schema_mirrors_the_function_defaults(name):
    m = learned.get(name)
    assert m.defaults() == m.Params().model_dump()


def test_unknown_or_invalid_params_fail_with_the_valid_keys():
    with pytest.raises(SpliceError, match="valid keys"):
        learned.get("adamerging").params({"stpes": 3})
    with pytest.raises(SpliceError, match="steps"):
        learned.get("adamerging").params({"steps": -1})
    with pytest.raises(SpliceError, match="did you mean 'adamerging'"):
        learned.get("adamergin")


def test_continual_methods_are_data_free_generators():
    for name in FILES:
        m = learned.get(name)
        assert m.continual == (m.data == "none")


@pytest.mark.parametrize("name", FILES)
def test_short_schedules_are_valid_and_keep_the_step_budget(name):
    m = learned.get(name)
    short = m.params(m.short)
    full = m.Params()
    for steps, lr in (("steps", "lr"), ("steps", "mask_lr"), ("adamerging_steps", "adamerging_lr")):
        if steps in m.short and lr in m.short:
            budget = getattr(full, steps) * getattr(full, lr)
            assert getattr(short, steps) < getattr(full, steps)
            assert getattr(short, steps) * getattr(short, lr) >= 0.5 * budget


def test_the_documented_import_gives_the_functions_even_after_discovery():
    """docs/merging-learned.md: ``from splice.merge.learned import adamerging, ...`` then
    ``adamerging(base, deltas, data, heads=...)``: the names are the callables, not the modules
    (also once the registry has imported every file)."""
    import importlib

    import torch

    from tests.merge.learned._toys import TASKS, deltas, heads, inputs, mlp

    learned.discover()
    mod = importlib.import_module("splice.merge.learned")
    adamerging, atlas, concrete, lot, opcm = (
        getattr(mod, n) for n in ("adamerging", "atlas", "concrete", "lot", "opcm")
    )
    from splice.merge.learned import adamerging as direct

    assert direct is adamerging
    for fn in (adamerging, atlas, concrete, lot, opcm):
        assert callable(fn) and fn.__name__ in learned.names()
    base, hs, x = mlp(), heads(), inputs()
    ds = deltas(base)
    labeled = {t: (x[t], torch.zeros(len(x[t]), dtype=torch.long)) for t in TASKS}
    fwd = lambda m, b: m(b)  # noqa: E731
    out = adamerging(base, ds, x, heads=hs, forward=fwd, mode="layer", steps=1)
    base.load_state_dict(out.weights, strict=False)
    assert out.coefficients is not None and len(out.history) == 1
    assert atlas(base, ds, labeled, heads=hs, objective="ce", steps=1).weights
    assert concrete(base, ds, x, heads=hs, inner="adamerging", steps=1).weights
    assert lot(base, ds, x, forward=fwd).weights
    steps = list(opcm(base, [(t, ds[t]) for t in TASKS]))
    assert [s.task for s in steps] == list(TASKS)
