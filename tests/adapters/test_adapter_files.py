"""``splice_adapter.json``: written compact (no ``sites`` list beside ``shapes``, no
indentation), and directories written in the earlier form (``sites`` and ``shapes``, indent 2)
still load to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from splice.adapters import DEFAULT, hotswap_adapter, inject, load_adapter, save_adapter
from splice.adapters.files import read_adapter
from splice.errors import SpliceError

from .conftest import make_model, perturb

SITES = ["layers.0.proj", "layers.1.proj", "layers.2.proj"]


def _saved(tmp_path, method="lora", **options):
    model, x = make_model("linear")
    inject(model, method, ["proj"], **options)
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a", x, y


def _old_format(adapter_dir) -> dict:
    """Rewrite a dir's JSON as the earlier writer did: ``sites`` before ``shapes``, indent 2."""
    f = adapter_dir / "splice_adapter.json"
    info = json.loads(f.read_text())
    old = {}
    for key, value in info.items():
        if key == "shapes":
            old["sites"] = list(value)
        old[key] = value
    f.write_text(json.dumps(old, indent=2) + "\n")
    return old


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": 2}), ("bilora", {"r": 2})])
def test_the_json_is_compact_and_loads_to_the_same_outputs(tmp_path, method, options):
    path, x, y = _saved(tmp_path, method, **options)
    text = (path / "splice_adapter.json").read_text()
    info = json.loads(text)
    assert "sites" not in info and list(info["shapes"]) == SITES
    assert text == json.dumps(info, separators=(",", ":")) + "\n"  # no indentation or spaces
    assert read_adapter(path)[0]["sites"] == SITES
    fresh, _ = make_model("linear")
    with torch.no_grad():
        assert torch.equal(load_adapter(fresh, path)(x), y)


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": 2}), ("bilora", {"r": 2})])
def test_an_old_format_dir_still_loads(tmp_path, method, options):
    path, x, y = _saved(tmp_path, method, **options)
    compact = (path / "splice_adapter.json").stat().st_size
    old = _old_format(path)
    assert old["sites"] == SITES and (path / "splice_adapter.json").stat().st_size > compact
    assert read_adapter(path)[0]["sites"] == SITES
    fresh, _ = make_model("linear")
    with torch.no_grad():
        assert torch.equal(load_adapter(fresh, path)(x), y)


def test_an_old_format_dir_with_sites_the_model_lacks_is_an_error(tmp_path):
    path, _, _ = _saved(tmp_path, r=2)
    old = _old_format(path)
    old["sites"][0] = "layers.9.proj"
    (path / "splice_adapter.json").write_text(json.dumps(old, indent=2))
    with pytest.raises(SpliceError, match=r"matched layers differ from the adapter's"):
        load_adapter(make_model("linear")[0], path)


def test_hotswap_reads_compact_and_old_dirs(tmp_path):
    path, x, y = _saved(tmp_path, r=2)
    served, _ = make_model("linear")
    inject(served, "lora", ["proj"], r=2)
    hotswap_adapter(served, DEFAULT, path)
    with torch.no_grad():
        assert torch.equal(served(x), y)
    _old_format(path)
    hotswap_adapter(served, DEFAULT, path)
    with torch.no_grad():
        assert torch.equal(served(x), y)
