"""Modules imported on first use: header-only commands import code they never run.

``splice inspect``, ``splice merge --plan`` and the preflight's refusals read headers, configs
and recipes; importing torch (1–3 s) would be most of their time. Modules on that path bind
torch with :func:`lazy_import` instead of ``import torch``: the name is a stand-in until an
attribute is first used, then the real module replaces it in the importing module's globals,
so later uses cost what a plain ``import torch`` does (docs/design.md, "Header-only commands").
"""

from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Any

__all__ = ["lazy_import"]


class _LazyModule:
    """Stands for module ``name`` under ``bind`` in ``namespace`` until first used."""

    def __init__(self, name: str, namespace: MutableMapping[str, Any], bind: str) -> None:
        self._name, self._namespace, self._bind = name, namespace, bind

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):  # copy/pickle/inspect probes
            raise AttributeError(attr)
        module = importlib.import_module(self._name)
        if self._namespace.get(self._bind) is self:
            self._namespace[self._bind] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_import(name: str, namespace: MutableMapping[str, Any], bind: str | None = None) -> Any:
    """A stand-in for ``import name`` (bound as ``bind``, default the last dotted part) in the
    module whose ``globals()`` is ``namespace``; the module is imported on first attribute use.

    Names evaluated when the importing module runs (decorators, default values, base
    classes, module constants) import it at once: keep those free of it.
    """
    return _LazyModule(name, namespace, bind or name.rpartition(".")[2])
