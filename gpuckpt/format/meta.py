"""``.meta`` files (``MetaGraphDef``) and ``saved_model.pb``: what a graph holds, summarised
(FORMAT.md 1.4, 1.5). Restoring never needs them; inspecting a checkpoint directory does."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError

from .._proto import meta_graph_pb2
from ..dtypes import DTYPES, dtype_name
from ..errors import FormatError, describe

VARIABLE_OPS = {"VariableV2", "Variable", "VarHandleOp", "AutoReloadVariable"}
MAX_META_BYTES = 1 << 31  # protobuf's own limit for one message
_IMPORT_SCOPE = re.compile(r"^import(_\d+)?$")
_NUMBERED_SCOPE = re.compile(r"^(.+)_(\d+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class GraphVariable:
    name: str
    dtype: str
    shape: tuple[int, ...] | None  # None when the graph does not say
    op: str


@dataclasses.dataclass(frozen=True, slots=True)
class MetaGraphSummary:
    """One meta graph, summarised. ``part_bytes`` gives the serialized size of each part."""

    tags: tuple[str, ...]
    tensorflow_version: str
    node_count: int
    ops: dict[str, int]  #: op type -> node count, most common first
    scopes: dict[str, int]  #: top-level name scope -> node count, largest first
    variables: tuple[GraphVariable, ...]
    saver: dict[str, object]
    collections: dict[str, tuple[str, int]]  #: name -> (kind, number of values)
    signatures: dict[str, dict[str, object]]
    function_count: int
    part_bytes: dict[str, int]
    #: what recurs when a graph is imported again: "import" -> the import scopes; a scope -> its
    #: numbered copies; a variable -> its numbered copies of the same dtype and shape
    repeated_imports: dict[str, list[str]]


def _copied_variables(variables: Sequence[GraphVariable]) -> dict[str, list[str]]:
    """Importing a graph again without a scope makes TF rename each clashing variable ``name_N``:
    copies ``X_N`` of a variable ``X`` (same dtype and shape), reported when one suffix ``N`` copies
    at least half the variables (a single ``Adam_1`` beside ``Adam`` is TF1's own naming)."""
    by_name = {v.name: v for v in variables}
    copies: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)  # N -> (X, X_N)
    for v in variables:
        match = _NUMBERED_SCOPE.match(v.name)
        base = by_name.get(match.group(1)) if match else None
        if match and base is not None and (base.dtype, base.shape) == (v.dtype, v.shape):
            copies[match.group(2)].append((base.name, v.name))
    found: dict[str, list[str]] = {}
    for pairs in copies.values():
        if len(pairs) >= 0.5 * (len(variables) - sum(len(p) for p in copies.values())):
            for base_name, copy in pairs:
                found.setdefault(base_name, []).append(copy)
    return {k: sorted(v) for k, v in found.items()}


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:  # a value this schema does not know (a newer TF, or a damaged file)
        return f"unknown ({value})"


def _dtype_label(value: int) -> str:
    info = DTYPES.get(value)
    return info.name if info is not None else dtype_name(value)


def _shape(attr: meta_graph_pb2.AttrValue) -> tuple[int, ...] | None:
    if not attr.HasField("shape") or attr.shape.unknown_rank:
        return None
    return tuple(d.size for d in attr.shape.dim)


def _repeated_imports(members: dict[str, set[str]]) -> dict[str, list[str]]:
    """Scopes that look like the same graph imported again (what repeated ``import_meta_graph``
    leaves behind): ``import``, ``import_1``, ...; and ``name_1``, ``name_2`` beside ``name`` when
    they hold mostly the same node names (so ``Sum`` and ``Sum_1`` of one graph do not count).

    ``members`` maps each top-level scope to the node names under it, relative to the scope.
    """
    found: dict[str, list[str]] = {}
    imports = sorted(s for s in members if _IMPORT_SCOPE.match(s))
    if imports:
        found["import"] = imports
    for scope in sorted(members):
        match = _NUMBERED_SCOPE.match(scope)
        if not match or _IMPORT_SCOPE.match(scope) or match.group(1) not in members:
            continue
        base, copy = members[match.group(1)], members[scope]
        if len(copy) >= 3 and len(base & copy) >= 0.5 * len(base | copy):
            found.setdefault(match.group(1), []).append(scope)
    return found


def summarize_meta_graph(meta: meta_graph_pb2.MetaGraphDef) -> MetaGraphSummary:
    nodes = meta.graph_def.node
    ops = collections.Counter(n.op for n in nodes)
    scopes = collections.Counter(n.name.split("/", 1)[0] for n in nodes)
    members: dict[str, set[str]] = collections.defaultdict(set)
    for n in nodes:
        scope, _, rest = n.name.partition("/")
        members[scope].add(rest)
    variables = tuple(
        GraphVariable(n.name, _dtype_label(n.attr["dtype"].type), _shape(n.attr["shape"]), n.op)
        for n in nodes
        if n.op in VARIABLE_OPS
    )
    collections_summary = {}
    for name, value in meta.collection_def.items():
        kind = value.WhichOneof("kind") or "empty"
        collections_summary[name] = (kind, len(getattr(value, kind).value) if kind != "empty" else 0)
    signatures = {
        name: {
            "method": sig.method_name,
            "inputs": {k: v.name for k, v in sig.inputs.items()},
            "outputs": {k: v.name for k, v in sig.outputs.items()},
        }
        for name, sig in meta.signature_def.items()
    }
    saver = {}
    if meta.HasField("saver_def"):
        s = meta.saver_def
        saver = {
            "version": _enum_name(meta_graph_pb2.SaverDef.CheckpointFormatVersion, s.version),
            "max_to_keep": s.max_to_keep,
            "sharded": s.sharded,
            "keep_checkpoint_every_n_hours": s.keep_checkpoint_every_n_hours,
            "restore_op_name": s.restore_op_name,
        }
    library = meta.graph_def.library
    part_bytes = {
        "meta_info_def": meta.meta_info_def.ByteSize(),
        "graph_def.node": sum(n.ByteSize() for n in nodes),
        "graph_def.library": library.ByteSize(),
        "saver_def": meta.saver_def.ByteSize(),
        "collection_def": sum(v.ByteSize() for v in meta.collection_def.values()),
        "signature_def": sum(v.ByteSize() for v in meta.signature_def.values()),
        "object_graph_def": len(meta.object_graph_def),
        "total": meta.ByteSize(),
    }
    return MetaGraphSummary(
        tags=tuple(meta.meta_info_def.tags),
        tensorflow_version=meta.meta_info_def.tensorflow_version,
        node_count=len(nodes),
        ops=dict(ops.most_common()),
        scopes=dict(scopes.most_common()),
        variables=variables,
        saver=saver,
        collections=collections_summary,
        signatures=signatures,
        function_count=len(library.function),
        part_bytes=part_bytes,
        repeated_imports={**_repeated_imports(members), **_copied_variables(variables)},
    )


def read_meta(path: str | os.PathLike[str]) -> list[MetaGraphSummary]:
    """Summaries of the meta graphs in a ``.meta`` file (one) or a ``saved_model.pb`` (each)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise FormatError("graph file is larger than protobuf's 2 GiB limit: " + describe(path))
    return parse_meta(data, path)


def parse_meta(data: bytes, path: str) -> list[MetaGraphSummary]:
    """Summaries of the graphs in the bytes of a ``.meta`` file, or of a ``saved_model.pb``."""
    try:
        if os.path.basename(path) == "saved_model.pb":
            saved = meta_graph_pb2.SavedModel.FromString(data)
            return [summarize_meta_graph(m) for m in saved.meta_graphs]
        return [summarize_meta_graph(meta_graph_pb2.MetaGraphDef.FromString(data))]
    except DecodeError as exc:
        raise FormatError(f"graph file is not a parseable MetaGraphDef/SavedModel ({exc}): " + describe(path)) from None


def find_meta(prefix: str) -> str | None:
    """The graph file belonging to a checkpoint prefix: ``PREFIX.meta``, or a SavedModel's
    ``saved_model.pb`` for ``.../variables/variables``."""
    if os.path.isfile(prefix + ".meta"):
        return prefix + ".meta"
    saved_model = os.path.join(os.path.dirname(os.path.dirname(prefix)), "saved_model.pb")
    if prefix.endswith(os.path.join("variables", "variables")) and os.path.isfile(saved_model):
        return saved_model
    return None
