"""A preset whose rules depend on the base model's attribute prefix (``bert.``, ``transformer.``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..mapping import NameMap, Rule


class PrefixedPreset(NameMap):
    """Rules built for a base prefix; :meth:`bind` picks it from the target's names: ``base`` when
    some target name starts with it, else ``""`` (the base model class itself)."""

    def __init__(self, name: str, build: Callable[[str], list[Rule]], base: str, default_base: str) -> None:
        super().__init__(build(default_base), name=name)
        self._build = build
        self.base = base
        self.default_base = default_base

    def for_base(self, base: str) -> NameMap:
        return NameMap(self._build(base), name=f"{self.name} (base {base!r})")

    def bind(self, target_names: Iterable[str]) -> NameMap:
        names = list(target_names)
        return self.for_base(self.base if any(n.startswith(self.base) for n in names) else "")
