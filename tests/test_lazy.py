"""``splice._lazy.lazy_import``: a module imported on first use, then bound in its place."""

from __future__ import annotations

import sys

from splice._lazy import lazy_import


def test_lazy_module_imports_on_first_use_and_replaces_itself(tmp_path, monkeypatch):
    (tmp_path / "lazy_probe_mod.py").write_text("VALUE = 41\ndef inc(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_probe_mod", raising=False)
    namespace: dict = {}
    namespace["lazy_probe_mod"] = stand_in = lazy_import("lazy_probe_mod", namespace)
    assert "lazy_probe_mod" not in sys.modules and "imported on first use" in repr(stand_in)
    assert not hasattr(stand_in, "__wrapped__")  # probes for dunders import nothing
    assert "lazy_probe_mod" not in sys.modules
    assert stand_in.inc(stand_in.VALUE) == 42
    module = sys.modules["lazy_probe_mod"]
    assert namespace["lazy_probe_mod"] is module  # the real module took its name


def test_bind_names_the_variable(tmp_path, monkeypatch):
    (tmp_path / "lazy_pkg_probe").mkdir()
    (tmp_path / "lazy_pkg_probe" / "__init__.py").write_text("")
    (tmp_path / "lazy_pkg_probe" / "inner.py").write_text("X = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    namespace["inner"] = lazy_import("lazy_pkg_probe.inner", namespace)
    namespace["other"] = lazy_import("lazy_pkg_probe.inner", namespace, bind="other")
    assert namespace["inner"].X == "x" and namespace["inner"] is sys.modules["lazy_pkg_probe.inner"]
    assert namespace["other"].X == "x" and namespace["other"] is namespace["inner"]
