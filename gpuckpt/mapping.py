"""Name mappings: from a checkpoint's TensorFlow names to another framework's parameter names.

A :class:`NameMap` is an ordered list of rules; the first rule whose regular expression matches the
whole checkpoint name decides:

* :func:`rule` ``(pattern, target, transpose=..., reshape=..., dtype=...)`` maps the name to
  ``match.expand(target)`` (``\\1``, ``\\g<name>``: the captured layer indices and names), with
  the transforms applied to the tensor in this order: reshape, transpose, dtype;
* :func:`skip` drops the names it matches, by pattern or by :class:`~gpuckpt.StateKind`
  (optimizer slots, optimizer state, counters, the object graph), and records why.

A name no rule matches is *unmapped*: :meth:`NameMap.plan` lists it, and the loaders report it
(``strict=True`` refuses it); nothing is dropped silently. Two checkpoint names mapped to one
target name are an :class:`~gpuckpt.InvalidArgumentError` naming both.

Rules can also be written as JSON (``gpuckpt convert --map FILE``)::

    {"rules": [
      {"skip_kinds": ["optimizer_slot", "optimizer", "counter", "object_graph"]},
      {"skip": ".*/adam_[mv]", "why": "AdamWeightDecay slots"},
      {"match": "bert/encoder/layer_(\\\\d+)/attention/self/(query|key|value)/kernel",
       "to": "bert.encoder.layer.\\\\1.attention.self.\\\\2.weight", "transpose": true}
    ]}

This module is framework-neutral: it decides names and shapes. :mod:`gpuckpt.torch` applies the
transforms to tensors on their device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO, TypeVar, Union

import numpy as np

from .errors import CheckpointError, InvalidArgumentError
from .format.object_graph import StateKind, classify_name

#: ``reshape="target"``: reshape to the shape the target already has.
TARGET_SHAPE = "target"
#: ``reshape="squeeze"``: drop every axis of size 1 (GPT-2's ``[1, nx, nf]`` Conv1D kernels become
#: ``[nx, nf]``, as ``numpy.squeeze`` does in transformers' loader).
SQUEEZE = "squeeze"

#: The kinds that are not a model's weights: what a loader skips unless a rule says otherwise.
NOT_MODEL_KINDS = (StateKind.OPTIMIZER_SLOT, StateKind.OPTIMIZER, StateKind.COUNTER, StateKind.OBJECT_GRAPH)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One mapping rule: the checkpoint names ``pattern`` matches (whole names) get the name
    ``target`` expands to; or, with ``skip`` set, are dropped for that reason."""

    pattern: re.Pattern[str] | None  #: None: the rule matches by kind only
    target: str | None = None  #: a ``re.Match.expand`` template; None for a skip rule
    transpose: tuple[int, ...] | bool = False  #: True reverses the axes (``a.T``); a tuple permutes them
    reshape: tuple[int, ...] | str | None = None  #: a shape, or "target" for the target's own shape
    dtype: str | None = None  #: cast to this dtype (by name, e.g. "float16", "int64") after the read
    skip: str | None = None  #: the reason names matched by this rule are skipped
    kinds: frozenset[StateKind] = frozenset()  #: skip rules: the kinds they skip

    @property
    def is_skip(self) -> bool:
        return self.skip is not None

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The numpy type ``dtype`` names (None without one)."""
        return None if self.dtype is None else _numpy_dtype_named(self.dtype)

    @property
    def has_transform(self) -> bool:
        """Whether the tensor is changed beyond a reshape (reshapes of contiguous memory are views)."""
        return bool(self.transpose) or self.dtype is not None

    def matches(self, name: str, kind: StateKind | None) -> re.Match[str] | bool | None:
        if self.kinds and kind is not None and kind in self.kinds:
            return True
        if self.pattern is not None:
            return self.pattern.fullmatch(name)
        return None

    def axes(self, ndim: int) -> tuple[int, ...] | None:
        """The permutation the transpose applies to an array of ``ndim`` axes (None: none)."""
        if self.transpose is True:
            return tuple(range(ndim - 1, -1, -1))
        if not self.transpose:
            return None
        axes = tuple(self.transpose)
        if sorted(axes) != list(range(ndim)):
            raise InvalidArgumentError(f"transpose={axes} is not a permutation of {ndim} axes")
        return axes

    def reshaped_shape(self, shape: Sequence[int], target_shape: Sequence[int] | None) -> tuple[int, ...]:
        """The shape after this rule's reshape alone (before its transpose). ``"target"`` reshapes
        so that the final shape, after the transpose, is ``target_shape``."""
        shape = tuple(int(d) for d in shape)
        if self.reshape is None:
            return shape
        if self.reshape == SQUEEZE:
            return tuple(d for d in shape if d != 1)
        if self.reshape == TARGET_SHAPE:
            if target_shape is None:
                raise InvalidArgumentError('reshape="target" needs the target\'s shape')
            final = tuple(int(d) for d in target_shape)
            axes = self.axes(len(final))
            wanted = final if axes is None else tuple(final[axes.index(i)] for i in range(len(final)))
        else:
            assert isinstance(self.reshape, tuple)
            wanted = self.reshape
        if _count(wanted) != _count(shape):
            raise InvalidArgumentError(f"cannot reshape {list(shape)} ({_count(shape)} elements) to {list(wanted)}")
        return wanted

    def result_shape(self, shape: Sequence[int], target_shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """The shape a tensor of ``shape`` has after this rule's reshape and transpose
        (``target_shape``: the target's shape, for ``reshape="target"``); InvalidArgumentError when
        the reshape cannot apply to that many elements."""
        shape = self.reshaped_shape(shape, target_shape)
        axes = self.axes(len(shape))
        return shape if axes is None else tuple(shape[a] for a in axes)

    def describe(self) -> str:
        if self.is_skip:
            what = self.pattern.pattern if self.pattern is not None else ""
            kinds = ",".join(sorted(k.value for k in self.kinds))
            return f"skip {what or 'kinds=' + kinds} ({self.skip})"
        extras = [f"transpose={self.transpose}" if self.transpose else ""]
        extras += [f"reshape={self.reshape}" if self.reshape else "", f"dtype={self.dtype}" if self.dtype else ""]
        suffix = " ".join(e for e in extras if e)
        assert self.pattern is not None
        return f"{self.pattern.pattern} -> {self.target}" + (f" [{suffix}]" if suffix else "")


def _count(shape: Sequence[int]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise InvalidArgumentError(f"mapping pattern {pattern!r} is not a regular expression: {exc}") from None


def rule(
    pattern: str | re.Pattern[str],
    target: str,
    *,
    transpose: bool | Sequence[int] = False,
    reshape: Sequence[int] | str | None = None,
    dtype: Any = None,
) -> Rule:
    """A rule mapping the names ``pattern`` matches (whole names) to ``match.expand(target)``."""
    compiled = _compile(pattern)
    if not isinstance(target, str):
        raise InvalidArgumentError(f"mapping target {target!r} for {compiled.pattern!r} is not a string")
    if reshape is not None and not (isinstance(reshape, str) and reshape in (TARGET_SHAPE, SQUEEZE)):
        if isinstance(reshape, str):
            raise InvalidArgumentError(f'reshape={reshape!r}: a shape, "target" or "squeeze"')
        reshape = _integers(reshape, "reshape", compiled)
        if any(d < 0 for d in reshape):
            raise InvalidArgumentError(f"rule for {compiled.pattern!r}: reshape={list(reshape)} has a negative size")
    if not isinstance(transpose, bool):
        transpose = _integers(transpose, "transpose", compiled)
        if sorted(transpose) != list(range(len(transpose))):
            raise InvalidArgumentError(
                f"rule for {compiled.pattern!r}: transpose={list(transpose)} is not a permutation of its axes"
            )
    if dtype is not None:
        spelled = _dtype_name(dtype)
        try:
            # one name per type ("half", "f2" and np.float16 are "float16"): the conversion is
            # chosen by the type, never by how it was spelled
            dtype = _numpy_dtype_named(spelled).name
        except Exception as exc:  # noqa: BLE001 - any way a name fails is the same refusal
            where = f"rule for {compiled.pattern!r}"
            raise InvalidArgumentError(f"{where}: dtype={spelled!r} is not a type: {exc}") from None
    _check_template(compiled, target)
    return Rule(compiled, target, transpose, reshape, dtype)


def _integers(values: Any, what: str, pattern: re.Pattern[str]) -> tuple[int, ...]:
    """A rule's axes or sizes: a sequence of integers (numpy's too), never floats, bools or a string."""
    try:
        items = tuple(values) if not isinstance(values, (str, bytes)) else None
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise InvalidArgumentError(f"rule for {pattern.pattern!r}: {what}={values!r} is not a sequence of integers")
    return tuple(int(v) for v in items)


def _check_template(pattern: re.Pattern[str], target: str) -> None:
    """A template that ``pattern``'s matches cannot fill (a group it lacks, a bad escape) is
    refused here, not at the first match. Decided by ``re`` itself: the template is expanded
    against a match of a stand-in pattern with the same groups (numbered and named alike), each
    matching nothing, so escapes (``\\\\1`` is a backslash and a 1; ``\\012`` is octal) follow Python's
    own rules on every Python version."""
    names = {number: name for name, number in pattern.groupindex.items()}
    stand_in = "".join(f"(?P<{names[n]}>)" if n in names else "()" for n in range(1, pattern.groups + 1))
    match = re.match(stand_in, "")
    assert match is not None
    try:
        match.expand(target)
    except (re.error, IndexError) as exc:  # IndexError: an unknown group name
        raise InvalidArgumentError(
            f"mapping target {target!r} is not a template {pattern.pattern!r} can fill: {exc}"
        ) from None


def skip(pattern: str | re.Pattern[str] | None = None, *, kinds: Iterable[Any] = (), why: str | None = None) -> Rule:
    """A rule dropping the names ``pattern`` matches and/or the keys of the given kinds."""
    kind_set = frozenset(StateKind(k) for k in kinds)
    if pattern is None and not kind_set:
        raise InvalidArgumentError("a skip rule needs a pattern or kinds")
    compiled = _compile(pattern) if pattern is not None else None
    reason = why or (f"kind {', '.join(sorted(k.value for k in kind_set))}" if kind_set else f"matches {pattern!r}")
    return Rule(compiled, None, skip=reason, kinds=kind_set)


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None:  # torch.float16 and numpy scalar types
        text = str(dtype)
        name = text.removeprefix("torch.") if text.startswith("torch.") else getattr(dtype, "__name__", text)
    return str(name).removeprefix("ml_dtypes.")


@dataclasses.dataclass(frozen=True)
class Mapped:
    """A checkpoint name and where it goes."""

    source: str
    target: str
    rule: Rule | None  #: None for a plain name-to-name entry


@dataclasses.dataclass(frozen=True)
class MappingPlan:
    """What a :class:`NameMap` does with a checkpoint's names."""

    mapped: dict[str, Mapped]  #: by checkpoint name
    skipped: dict[str, str]  #: checkpoint name -> why
    unmapped: list[str]  #: no rule matched: reported, never dropped silently

    def by_target(self) -> dict[str, Mapped]:
        return {m.target: m for m in self.mapped.values()}


KindOf = Callable[[str], StateKind]


class NameMap:
    """Ordered rules from checkpoint names to target names; the first matching rule decides.

    ``NameMap(rules, prefix=...)``: ``prefix`` is prepended to every mapped target (presets use it
    for a base model's attribute, e.g. ``"bert."`` in ``BertForPreTraining``). ``fallback`` is
    what an unmatched name becomes: None leaves it unmapped (reported); a function gives its
    target name (e.g. ``lambda n: n.replace("/", ".")``).
    """

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        prefix: str = "",
        fallback: Callable[[str], str | None] | None = None,
        name: str = "custom",
    ) -> None:
        self.rules = list(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise InvalidArgumentError(f"mapping rule {r!r} is not a Rule (use gpuckpt.mapping.rule/skip)")
        self.prefix = prefix
        self.fallback = fallback
        self.name = name

    def __repr__(self) -> str:
        return f"<NameMap {self.name!r}: {len(self.rules)} rules, prefix={self.prefix!r}>"

    def with_prefix(self, prefix: str) -> NameMap:
        return NameMap(self.rules, prefix=prefix, fallback=self.fallback, name=self.name)

    def bind(self, target_names: Iterable[str]) -> NameMap:
        """This map adapted to a target's names (presets choose their prefix here); as is by default."""
        return self

    def lookup(self, name: str, kind: StateKind | None = None) -> Mapped | str | None:
        """Where ``name`` goes: a :class:`Mapped`, the reason it is skipped (str), or None (unmapped)."""
        for r in self.rules:
            match = r.matches(name, kind)
            if not match:
                continue
            if r.is_skip:
                if match is True and kind is not None:  # matched by kind: say which
                    return f"kind {kind.value}"
                return r.skip
            assert r.target is not None
            expanded = match.expand(r.target) if isinstance(match, re.Match) else r.target
            return Mapped(name, self.prefix + expanded, r)
        if self.fallback is not None:
            target = self.fallback(name)
            if target is not None:
                return Mapped(name, self.prefix + target, None)
        return None

    def plan(self, names: Iterable[str], kind: KindOf | None = None, where: str = "") -> MappingPlan:
        """Apply the rules to every name (``kind``: ``Checkpoint.kind``, for the kind skip rules;
        without it, the kind is read from the name alone, as for a checkpoint without an object graph)."""
        if kind is None:
            kind = classify_name
        mapped: dict[str, Mapped] = {}
        skipped: dict[str, str] = {}
        unmapped: list[str] = []
        owners: dict[str, str] = {}
        for name in names:
            result = self.lookup(name, kind(name) if kind is not None else None)
            if result is None:
                unmapped.append(name)
            elif isinstance(result, str):
                skipped[name] = result
            else:
                if result.target in owners:
                    raise InvalidArgumentError(
                        f"{owners[result.target]!r} and {name!r} both map to {result.target!r}"
                        + (f": {where}" if where else "")
                    )
                owners[result.target] = name
                mapped[name] = result
        return MappingPlan(mapped, skipped, unmapped)

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], name: str = "custom") -> NameMap:
        """A map from its JSON form: ``{"prefix": "...", "rules": [...]}`` (see the module docs)."""
        if not isinstance(spec, Mapping) or not isinstance(spec.get("rules"), list):
            raise InvalidArgumentError('a mapping file holds {"rules": [...]} (and optionally "prefix")')
        unknown = set(spec) - {"rules", "prefix", "preset"}
        if unknown:
            raise InvalidArgumentError(f"unknown mapping keys {sorted(unknown)}")
        rules = []
        for number, item in enumerate(spec["rules"]):
            if not isinstance(item, Mapping):
                raise InvalidArgumentError(f"mapping rule {number} is not an object: {item!r}")
            keys = set(item)
            if "skip" in item or "skip_kinds" in item:
                extra = keys - {"skip", "skip_kinds", "why"}
                if extra:
                    raise InvalidArgumentError(f"mapping rule {number}: unknown keys {sorted(extra)} for a skip rule")
                try:
                    rules.append(skip(item.get("skip"), kinds=item.get("skip_kinds", ()), why=item.get("why")))
                except ValueError as exc:
                    raise InvalidArgumentError(f"mapping rule {number}: {exc}") from None
                continue
            extra = keys - {"match", "to", "transpose", "reshape", "dtype"}
            if extra or "match" not in item or "to" not in item:
                raise InvalidArgumentError(
                    f"mapping rule {number} needs 'match' and 'to' (and optionally transpose, reshape, dtype); "
                    f"got {sorted(keys)}"
                )
            rules.append(
                rule(
                    item["match"],
                    item["to"],
                    transpose=item.get("transpose", False),
                    reshape=item.get("reshape"),
                    dtype=item.get("dtype"),
                )
            )
        if spec.get("preset"):  # a file may extend a preset: its rules first, then the preset's
            from .presets import get_preset

            return _Extended(rules, get_preset(spec["preset"]), prefix=spec.get("prefix", ""), name=name)
        return cls(rules, prefix=spec.get("prefix", ""), name=name)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> NameMap:
        """A map from a JSON file (see the module docs)."""
        with open(path, encoding="utf-8") as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"mapping file {str(path)!r} is not JSON: {exc}") from None
        return cls.from_dict(spec, name=os.fspath(path))


class _Extended(NameMap):
    """A file's own rules in front of a preset's (the preset still adapts its rules to the target)."""

    def __init__(self, rules: list[Rule], preset: NameMap, prefix: str, name: str) -> None:
        super().__init__(rules + preset.rules, prefix=prefix, name=name)
        self._own = rules
        self._preset = preset

    def bind(self, target_names: Iterable[str]) -> NameMap:
        return NameMap(self._own + self._preset.bind(target_names).rules, prefix=self.prefix, name=self.name)


MappingLike = Union[None, str, NameMap, Mapping[str, str], Sequence[Rule]]  # noqa: UP007 - a runtime alias (3.10)


def identity(name: str) -> str:
    return name


def as_name_map(mapping: MappingLike) -> NameMap:
    """A :class:`NameMap` from what the loaders accept: None (every model key under its own name,
    optimizer state and counters skipped), a preset's name ("bert", "gpt2"), a path to a JSON
    file, a dict ``{checkpoint name: target name}`` (only those names are mapped), a list of rules,
    or a NameMap."""
    if isinstance(mapping, NameMap):
        return mapping
    if mapping is None:
        return NameMap([skip(kinds=NOT_MODEL_KINDS)], fallback=identity, name="identity")
    if isinstance(mapping, str):
        from .presets import PRESETS, get_preset

        if mapping in PRESETS:
            return get_preset(mapping)
        if os.path.exists(mapping):
            return NameMap.from_file(mapping)
        raise InvalidArgumentError(f"mapping={mapping!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if isinstance(mapping, Mapping):
        table = dict(mapping)
        for k, v in table.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidArgumentError(f"mapping entry {k!r}: {v!r} is not a pair of names")
        exact = [rule(re.escape(k), v.replace("\\", "\\\\")) for k, v in table.items()]
        return NameMap(exact + [skip(kinds=NOT_MODEL_KINDS)], name="dict")
    if isinstance(mapping, Sequence):
        return NameMap(mapping)  # type: ignore[arg-type] # NameMap checks every item is a Rule
    raise InvalidArgumentError(f"mapping={mapping!r}: a preset name, a file, a dict of names, rules or a NameMap")


# -- what a loader reports (torch and JAX) -------------------------------------------------------------


class LoadError(CheckpointError, RuntimeError):
    """A loader's ``load_into(strict=True)`` found names or shapes that do not fit (nothing was written);
    ``.result`` holds the full :class:`LoadResult`. A RuntimeError, as ``load_state_dict``'s."""

    def __init__(self, message: str, result: LoadResult) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass
class Mismatch:
    """A checkpoint tensor whose shape (after the rule's transforms) is not its target's."""

    target: str
    source: str
    checkpoint_shape: tuple[int, ...]  #: after the rule's reshape and transpose
    target_shape: tuple[int, ...]


@dataclasses.dataclass
class LoadResult:
    """What :func:`load_into` did: what ``load_state_dict`` reports, and the mapping's own lists.

    ``missing_keys`` and ``unexpected_keys`` are target (state dict) names, as
    ``load_state_dict`` gives them; ``unmapped_keys`` and ``skipped`` are checkpoint names.
    """

    missing_keys: list[str]  #: in the module, filled by no checkpoint tensor
    unexpected_keys: list[str]  #: mapped names the module does not have (``sources`` says from where)
    mismatched_keys: list[Mismatch]  #: shapes that do not fit (or a checkpoint type the target cannot take)
    unmapped_keys: list[str]  #: checkpoint names no rule maps: reported, never dropped silently
    skipped: dict[str, str]  #: checkpoint name -> why a skip rule dropped it (optimizer slots, counters)
    loaded: dict[str, str]  #: target name -> the checkpoint name written into it
    sources: dict[str, str]  #: unexpected target name -> the checkpoint name that mapped to it

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys or self.unmapped_keys)

    def describe(self) -> str:
        lines = []
        if self.missing_keys:
            lines.append("missing: " + ", ".join(self.missing_keys))
        if self.unexpected_keys:
            lines.append("unexpected: " + ", ".join(f"{t} (from {self.sources[t]})" for t in self.unexpected_keys))
        for m in self.mismatched_keys:
            lines.append(
                f"size mismatch for {m.target} (from {m.source}): checkpoint {list(m.checkpoint_shape)}, "
                f"module {list(m.target_shape)}"
            )
        if self.unmapped_keys:
            lines.append("unmapped checkpoint names: " + ", ".join(self.unmapped_keys))
        return "; ".join(lines) or "everything mapped and loaded"


@dataclasses.dataclass(frozen=True)
class Match:
    """A checkpoint tensor that fits its target: name, rule, stored dtype and shape."""

    source: str
    target: str
    rule: Rule | None
    stored: np.dtype
    shape: tuple[int, ...]  #: the checkpoint's shape (before the rule's transforms)


def plan_load(
    ckpt: Any,
    mapping: MappingLike,
    targets: Mapping[str, tuple[int, ...]],
    identity: Callable[[str], object] | None = None,
) -> tuple[LoadResult, list[Match], MappingPlan]:
    """Match a checkpoint's names to a target's, by ``mapping``: what fits, and the report.

    ``targets``: each target name's shape. ``identity``: names giving the same value share one
    tensor (tied weights): it is filled once, through any of them, and is missing only when none
    is mapped; two checkpoint names onto one tensor are an InvalidArgumentError naming both.
    Nothing is read.
    """
    identity = identity or (lambda name: name)
    name_map = as_name_map(mapping).bind(targets)
    path = ckpt.index.path
    plan = name_map.plan(ckpt.keys(), kind=ckpt.kind, where=f"file {path!r}")
    aliases: dict[object, list[str]] = {}
    for name in targets:
        aliases.setdefault(identity(name), []).append(name)
    matches: list[Match] = []
    unexpected: list[str] = []
    sources: dict[str, str] = {}
    mismatched: list[Mismatch] = []
    filled: dict[object, str] = {}
    present: set[object] = set()
    for source, mapped in plan.mapped.items():
        target = mapped.target
        if target not in targets:
            unexpected.append(target)
            sources[target] = source
            continue
        info = ckpt.info(source)
        shape = tuple(targets[target])
        stored = info.dtype
        final = info.shape
        fits = False
        if stored is not None and stored.kind != "O":  # strings and unreadable types fit no tensor
            try:
                final = mapped.rule.result_shape(info.shape, shape) if mapped.rule is not None else info.shape
                fits = final == shape
            except InvalidArgumentError:  # a reshape that cannot apply to this many elements
                pass
        key = identity(target)
        if not fits or stored is None:  # present but not fitting: mismatched, not missing (as load_state_dict says)
            mismatched.append(Mismatch(target, source, tuple(final), shape))
            present.add(key)
            continue
        if key in filled:
            raise InvalidArgumentError(
                f"{filled[key]!r} and {source!r} both map to the same tensor ({', '.join(aliases[key])}): file {path!r}"
            )
        filled[key] = source
        matches.append(Match(source, target, mapped.rule, np.dtype(stored), tuple(info.shape)))
    missing = [n for key, names in aliases.items() if key not in filled and key not in present for n in names]
    loaded = {m.target: m.source for m in matches}
    result = LoadResult(missing, unexpected, mismatched, list(plan.unmapped), dict(plan.skipped), loaded, sources)
    return result, matches, plan


# -- converting a checkpoint into a safetensors file ---------------------------------------------------

#: numpy dtype name -> safetensors dtype (safetensors has no complex128, string or sub-byte types)
SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
CONVERT_BATCH_BYTES = 64 << 20  #: tensors are read, transformed and written in groups of at most this many bytes


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote: target name -> checkpoint name, and what it left out and why."""

    written: dict[str, str]
    skipped: dict[str, str]
    unmapped: list[str]


def _safetensors_dtype(dtype: Any, where: str) -> str:
    from .errors import UnsupportedError

    name = np.dtype(dtype).name
    if name not in SAFETENSORS_DTYPES:
        raise UnsupportedError(f"safetensors has no {name} type: {where}")
    return SAFETENSORS_DTYPES[name]


def _transformed(array: np.ndarray, r: Rule | None, where: str) -> np.ndarray:
    """The rule's transforms on a host array (reshape, transpose, dtype), C-contiguous."""
    if r is not None:
        if r.reshape is not None:
            array = array.reshape(r.reshaped_shape(array.shape, None))
        axes = r.axes(array.ndim)
        if axes is not None:
            array = array.transpose(axes)
        if r.dtype is not None:
            array = _cast(array, r.dtype, where)
    # not np.ascontiguousarray, which makes a 0-d array 1-d
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _numpy_dtype_named(name: str) -> np.dtype:
    """The numpy dtype of a rule's type name: numpy's own ("bool", "float32"), else ml_dtypes'
    ("bfloat16", "int4"). Asked of np.dtype, not of the numpy module's attributes: NumPy 1.26
    has no ``np.bool``, though "bool" is its dtype's name."""
    from .dtypes import numpy_dtype

    try:
        return np.dtype(name)
    except TypeError:
        return numpy_dtype("ml_dtypes." + name)


def _cast(array: np.ndarray, name: str, where: str) -> np.ndarray:
    from .casting import FLOATING, TARGETS
    from .host.convert import convert as convert_floats

    target = _numpy_dtype_named(name)
    if array.dtype.name in FLOATING and target.name in TARGETS:
        return convert_floats(array, target, where)  # the project's rule, as dtype= on restores
    return array.astype(target)


_Item = TypeVar("_Item")


def batched(items: Sequence[_Item], nbytes: Callable[[_Item], int], limit: int) -> list[list[_Item]]:
    """``items`` in order, cut into runs whose bytes add up to at most ``limit`` (an item larger
    than ``limit`` is a run of its own): the tensors restored together by one call."""
    batches: list[list[_Item]] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if not batches or size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += n
    return batches


def convert(
    checkpoint: Any,
    out: str | os.PathLike[str],
    mapping: MappingLike = None,
    *,
    allow_unmapped: bool = False,
    metadata: Mapping[str, str] | None = None,
    verify: bool | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Write a checkpoint's tensors, renamed and transformed by ``mapping``, as a safetensors file.
    An existing ``out`` is refused (FileExistsError) unless ``overwrite``.

    ``checkpoint``: an open :class:`~gpuckpt.Checkpoint` or a path. ``mapping``: as for
    :func:`gpuckpt.torch.load_into` (a preset writes its unbound names: ``bert.*`` and ``cls.*``,
    GPT-2's base names). Names no rule maps are refused (:class:`~gpuckpt.InvalidArgumentError`
    listing them) unless ``allow_unmapped``, which leaves them out and lists them in the result.
    Tensors are read, transformed and written in groups of at most :data:`CONVERT_BATCH_BYTES`
    (the header, with every shape and offset, is computed from the index first), through a
    temporary file renamed into place at the end. No framework is needed.
    """
    from .checkpoint import Checkpoint
    from .checkpoint import open as open_checkpoint

    if not isinstance(checkpoint, Checkpoint):
        with open_checkpoint(checkpoint) as ckpt:
            return convert(
                ckpt, out, mapping, allow_unmapped=allow_unmapped, metadata=metadata, verify=verify, overwrite=overwrite
            )
    ckpt = checkpoint
    path = ckpt.index.path
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{os.fspath(out)!r} exists (pass overwrite=True to replace it)")
    plan = as_name_map(mapping).plan(ckpt.keys(), kind=ckpt.kind, where=f"file {path!r}")
    if plan.unmapped and not allow_unmapped:
        raise InvalidArgumentError(
            f"no rule maps {', '.join(plan.unmapped)} (add rules or skip rules, or allow unmapped names): file {path!r}"
        )
    entries: list[tuple[str, Mapped, tuple[int, ...], str]] = []
    header: dict[str, Any] = {}
    offset = 0
    for source, mapped in sorted(plan.mapped.items(), key=lambda item: item[1].target):
        info = ckpt.info(source)
        where = f"file {path!r}, tensor {source!r}"
        if mapped.target == "__metadata__":  # safetensors' own key in the header
            raise InvalidArgumentError(f"a tensor cannot be named '__metadata__' in a safetensors file: {where}")
        if info.dtype is None or info.dtype.kind == "O":
            from .errors import UnsupportedError

            raise UnsupportedError(f"{info.tf_dtype} tensors cannot be written to safetensors: {where}")
        r = mapped.rule
        shape = r.result_shape(info.shape, None) if r is not None else info.shape
        dtype = (
            np.dtype(info.dtype)
            if r is None or r.dtype is None
            else _cast(np.zeros(0, info.dtype), r.dtype, where).dtype
        )
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[mapped.target] = {
            "dtype": _safetensors_dtype(dtype, where),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append((source, mapped, shape, where))
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    from .writer import write_atomically

    def write(f: BinaryIO) -> None:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for batch in batched(entries, lambda item: ckpt.info(item[0]).nbytes, CONVERT_BATCH_BYTES):
            arrays = ckpt.restore([b[0] for b in batch], device="cpu", verify=verify)
            for source, mapped, shape, where in batch:
                array = _transformed(arrays.pop(source), mapped.rule, where)
                assert array.shape == shape, (array.shape, shape)
                f.write(array.reshape(-1).view(np.uint8).data)

    write_atomically(os.fspath(out), write)
    return ConvertResult({m.target: s for s, m, _, _ in entries}, dict(plan.skipped), list(plan.unmapped))
