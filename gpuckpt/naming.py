"""Mappings keyed by tensor names or regular expressions (``shardings=``): a name's value is the
one under the key equal to it, else under the first key (a regular expression, or a compiled
pattern) that matches the whole name, else None."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from .errors import InvalidArgumentError

V = TypeVar("V")


class NameRules(Generic[V]):
    """``(key, value)`` pairs, their keys compiled once; :meth:`lookup` gives a name's value.

    ``what`` names the argument in errors: a key that is not a string or pattern, or not a valid
    regular expression, is an InvalidArgumentError at construction, before anything is read.
    """

    __slots__ = ("_exact", "_items", "_rules")

    def __init__(self, items: Iterable[tuple[Any, V]], what: str) -> None:
        self._exact: dict[str, V] = {}
        self._rules: list[tuple[re.Pattern[str], V]] = []
        self._items = list(items)
        for key, value in self._items:
            try:
                pattern = re.compile(key)
            except (re.error, TypeError) as exc:
                raise InvalidArgumentError(f"{what} key {key!r} is not a name or regular expression: {exc}") from None
            if not isinstance(pattern.pattern, str):  # a bytes pattern compiles, but never matches a name
                raise InvalidArgumentError(f"{what} key {key!r} is not a name or regular expression: bytes, not str")
            if isinstance(key, str):
                self._exact.setdefault(key, value)
            self._rules.append((pattern, value))

    def items(self) -> list[tuple[Any, V]]:
        """The ``(key, value)`` pairs, in their order."""
        return list(self._items)

    def lookup(self, name: str) -> V | None:
        """The value for ``name``: the key equal to it, else the first pattern matching it whole."""
        if name in self._exact:
            return self._exact[name]
        return next((value for pattern, value in self._rules if pattern.fullmatch(name)), None)
