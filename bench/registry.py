"""One small registry type shared by methods and datasets.

Entries register themselves when their module is imported; ``load`` imports those modules on the first
lookup, so importing a package for its interface (``bench.methods.base``) loads no implementation.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, load: Optional[Callable[[], None]] = None):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._load = load

    def _loaded(self) -> Dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None  # cleared first: a lookup while loading does not recurse
            try:
                load()
            except BaseException:
                self._load = load  # a failed import fails every lookup, never leaves a partial registry
                raise
        return self._items

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator; also sets the class's ``name``, so the name is written once."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            obj.name = name
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        try:
            return self._loaded()[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: str) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
