"""TF2 object-based names: decode ``_CHECKPOINTABLE_OBJECT_GRAPH`` (FORMAT.md 6.3, 6.4).

Maps each checkpoint key to the object that owns it: its path from the root through the trackable
graph, the attribute name, TF1-style full name, and what kind of state it is (model variable,
optimizer slot, other optimizer state, the save counter), so callers can select or skip optimizer
state without string guessing.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from ..errors import FormatError, describe

if TYPE_CHECKING:
    from .._proto import trackable_object_graph_pb2

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
OPTIMIZER_SLOT_MARK = "/.OPTIMIZER_SLOT/"
SAVE_COUNTER_KEY = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"


class StateKind(str, enum.Enum):
    """What a checkpoint key holds, for selecting what to restore."""

    MODEL = "model"  #: a model's own variable (or any state not listed below)
    OPTIMIZER_SLOT = "optimizer_slot"  #: per-variable optimizer state (Adam m/v, momentum)
    OPTIMIZER = "optimizer"  #: other optimizer state (iterations, learning rate, Keras 3 optimizer variables)
    COUNTER = "counter"  #: the checkpoint's save counter / global step
    OBJECT_GRAPH = "object_graph"  #: the object graph entry itself


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectAttribute:
    """Where a checkpoint key sits in the trackable object graph."""

    key: str
    object_path: str  #: local names from the root, joined with "/" (unescaped)
    attribute: str  #: e.g. "VARIABLE_VALUE"
    full_name: str  #: the TF1-style variable name, e.g. "dense/kernel"
    kind: StateKind


def _parse(serialized: bytes, path: str) -> trackable_object_graph_pb2.TrackableObjectGraph:
    from .._proto import trackable_object_graph_pb2  # imported on first use, not by `import gpuckpt`

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    try:
        graph.ParseFromString(serialized)
    except DecodeError as exc:
        raise FormatError(f"object graph is not parseable ({exc}): " + describe(path, OBJECT_GRAPH_KEY)) from None
    return graph


_OPTIMIZER_EDGE = "optimizer"
_OPTIMIZER_CHILDREN = {"_iterations", "iter"}  # Keras 3 and Keras 2 optimizers' step counters


def _optimizer_nodes(graph: trackable_object_graph_pb2.TrackableObjectGraph) -> set[int]:
    """Nodes that are optimizers: they hold slot variables (TF1, Keras 2), are reached through an
    edge named "optimizer", or own a step counter child (Keras 3 optimizers have no slot variables)."""
    found = set()
    for node_id, node in enumerate(graph.nodes):
        if node.slot_variables or any(c.local_name in _OPTIMIZER_CHILDREN for c in node.children):
            found.add(node_id)
        found.update(c.node_id for c in node.children if c.local_name == _OPTIMIZER_EDGE)
    return found


def _breadth_first(
    graph: trackable_object_graph_pb2.TrackableObjectGraph, path: str, avoid: set[int]
) -> list[list[str] | None]:
    """The first (shortest, then earliest) path of local names from the root to each node, as TF
    names them, never entering a node in ``avoid``; None for nodes so unreachable."""
    nodes = graph.nodes
    paths: list[list[str] | None] = [None] * len(nodes)
    if not nodes:
        return paths
    paths[0] = []
    queue = collections.deque([0])
    while queue:
        node_id = queue.popleft()
        for child in nodes[node_id].children:
            if not 0 <= child.node_id < len(nodes):
                raise FormatError(
                    f"object graph node {node_id} names child {child.node_id}, outside [0, {len(nodes)}): "
                    + describe(path, OBJECT_GRAPH_KEY)
                )
            if paths[child.node_id] is None and child.node_id not in avoid:
                paths[child.node_id] = paths[node_id] + [child.local_name]  # type: ignore[operator]
                queue.append(child.node_id)
    return paths


def decode_object_graph(serialized: bytes, path: str) -> dict[str, ObjectAttribute]:
    """Map every checkpoint key named in the object graph to its :class:`ObjectAttribute`.

    A variable reachable from the root without passing through an optimizer is model state (Keras 3
    optimizers also track the model's variables, often on the shorter path); one reachable only
    through an optimizer is optimizer state. ``object_path`` prefers the path outside optimizers.
    """
    graph = _parse(serialized, path)
    optimizers = _optimizer_nodes(graph)
    model_paths = _breadth_first(graph, path, avoid=optimizers)
    any_paths = _breadth_first(graph, path, avoid=set())
    slot_nodes = {slot.slot_variable_node_id for node in graph.nodes for slot in node.slot_variables}

    result: dict[str, ObjectAttribute] = {}
    for node_id, node in enumerate(graph.nodes):
        node_path = model_paths[node_id] if model_paths[node_id] is not None else any_paths[node_id]
        for attr in node.attributes:
            key = attr.checkpoint_key
            if node_id in slot_nodes or OPTIMIZER_SLOT_MARK in key:
                kind = StateKind.OPTIMIZER_SLOT
            elif key == SAVE_COUNTER_KEY:
                kind = StateKind.COUNTER
            elif model_paths[node_id] is None:
                kind = StateKind.OPTIMIZER
            else:
                kind = StateKind.MODEL
            object_path = "/".join(node_path) if node_path is not None else key.split("/.ATTRIBUTES/")[0]
            result[key] = ObjectAttribute(key, object_path, attr.name, attr.full_name, kind)
    return result


# TF1 name-based checkpoints have no object graph: their optimizers name slots by convention.
_TF1_SLOT_SUFFIXES = (
    "/Adam",
    "/Adam_1",
    "/Momentum",
    "/RMSProp",
    "/RMSProp_1",
    "/Adagrad",
    "/Ftrl",
    "/Ftrl_1",
    "/Adadelta",
    "/Adadelta_1",
    "/AdamW",
    "/AdamW_1",
)
_TF1_OPTIMIZER_NAMES = ("beta1_power", "beta2_power")
_TF1_COUNTER_NAMES = ("global_step",)


_ATTRIBUTES_MARK = "/.ATTRIBUTES/"


def classify_name(name: str) -> StateKind:
    """Best-effort kind of a key in a checkpoint without an object graph, from its name alone.

    TF1 name-based keys follow TF1's optimizers' conventions (``w/Adam``, ``beta1_power``,
    ``global_step``, also under a scope). Object-based keys whose graph is gone (a ``gpuckpt
    merge`` output drops it) are read from their path: ``.OPTIMIZER_SLOT`` marks a slot,
    ``save_counter`` is the counter, anything under an ``optimizer`` object is optimizer state
    (its ``iter`` / ``_iterations`` step counter included, as the object graph says) except the
    model variables a Keras 3 optimizer tracks (``optimizer/_trainable_variables/N``).
    """
    if name == OBJECT_GRAPH_KEY:
        return StateKind.OBJECT_GRAPH
    if OPTIMIZER_SLOT_MARK in name:
        return StateKind.OPTIMIZER_SLOT
    if _ATTRIBUTES_MARK in name:
        path = name.split(_ATTRIBUTES_MARK)[0].split("/")
        if path[-1] == "save_counter":
            return StateKind.COUNTER
        for number, part in enumerate(path[:-1]):
            if part == _OPTIMIZER_EDGE:  # Keras 3 optimizers also track the model's variables
                return StateKind.MODEL if path[number + 1] == "_trainable_variables" else StateKind.OPTIMIZER
        return StateKind.MODEL
    if name.endswith(_TF1_SLOT_SUFFIXES):
        return StateKind.OPTIMIZER_SLOT
    last = name.split("/")[-1]
    if last in _TF1_OPTIMIZER_NAMES:
        return StateKind.OPTIMIZER
    if last in _TF1_COUNTER_NAMES:
        return StateKind.COUNTER
    return StateKind.MODEL
