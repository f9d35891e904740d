"""A small name → object registry with module discovery.

Each method registers itself in its own file; :meth:`Registry.discover` imports every module
of a package once, so adding a method is adding one file.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from splice.errors import SpliceError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps method names to objects; imports ``package`` lazily on first lookup."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        importlib.import_module(self.package)
        for name in module_names(self.package):
            importlib.import_module(f"{self.package}.{name}")

    def get(self, name: str) -> T:
        """The object registered as ``name``. A file named after it is imported first, alone
        (where a method registers its own file name, a lookup imports one method, not all);
        failing that, the whole package."""
        if name not in self._items and not self._discovered and name in module_names(self.package):
            importlib.import_module(f"{self.package}.{name}")
        if name not in self._items:
            self.discover()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose from {self.names()}"
            raise SpliceError(f"unknown {self.kind} {name!r}", fix=hint)
        return self._items[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self.discover()
        yield from sorted(self._items.items())


def module_names(package: str) -> list[str]:
    """The public module names of ``package``, found on disk without importing the package or
    its modules (only its parents): where each file registers its own name, as the learned
    methods do, this answers "is that one of ours?" without importing their dependencies."""
    spec = importlib.util.find_spec(package)
    paths = (spec.submodule_search_locations or []) if spec else []
    return sorted(i.name for i in pkgutil.iter_modules(paths) if not i.name.startswith("_"))


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` (PEP 562): each public name in ``names`` is taken
    from the module it maps to, imported on first access, so importing the package is cheap."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
