"""Name -> builder registries for models, pruners, datasets and tasks (the timm ``@register_model`` idea).

Each registry fills itself on first lookup by importing every module of its package, so adding a
pruner is one new file in ``compress/pruners/`` and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Generic, Iterator, TypeVar

from compress.errors import CompressError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: Dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a plugin or a test that registered an entry for a while)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            importlib.import_module(info.name)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise CompressError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._entries.items()))


MODELS: Registry = Registry("model", "compress.models")
PRUNERS: Registry = Registry("pruner", "compress.pruners")
DATASETS: Registry = Registry("dataset", "compress.data")
TASKS: Registry = Registry("task", "compress.tasks")
FAMILIES: Registry = Registry("model family", "compress.families")

register_model = MODELS.register
register_pruner = PRUNERS.register
register_dataset = DATASETS.register
register_task = TASKS.register
register_family = FAMILIES.register
