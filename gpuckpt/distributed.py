"""torch.distributed: one checkpoint restored by every rank of a process group, each rank reading only
its own shards, or every byte read once by one rank and shared through the group's collectives.

``import gpuckpt`` never imports this module (nor torch); ``import gpuckpt.distributed`` does. It
works with the process group the program already has (``torch.distributed.init_process_group``:
gloo on CPUs, NCCL on GPUs); it opens no transport of its own::

    import gpuckpt, gpuckpt.distributed as gd
    from gpuckpt.distributed import Split

    # tensor parallelism: each rank reads its piece of the sharded weights, and nothing else
    got = gd.restore("ckpt/model.ckpt-1000", shardings={r".*/attention/(q|k|v)/kernel": Split(dim=1),
                                                        r".*/attention/output/kernel": Split(dim=0)})
    got.tensors["layer_0/attention/q/kernel"]      # this rank's columns, a torch.Tensor
    got.bytes_read                                 # {rank: {data file: bytes}}: what each rank read

    # slow storage (NFS, cold cache): each tensor read once, by one rank, and broadcast to the others
    got = gd.restore("ckpt/model.ckpt-1000", mode="once")
    # or sent as regions: each rank receives only its pieces, storage still read once
    got = gd.restore("ckpt/model.ckpt-1000", shardings=..., mode="once")

Modes
-----
``mode="own"`` (each rank its own shards): a tensor with a sharding spec is read as the region the
spec gives this rank (only those bytes: the runs ``Checkpoint.restore(regions=)`` reads, runs
less than a page apart read together; the crc32c cannot check them; a region that is the whole
tensor is a whole, verified read). A tensor
without one is replicated: read whole (and verified) by every rank (``replicated="each"``, no data
collective at all), or read once and shared as in mode "once" (``replicated="once"``; where the
specs tile their tensors, storage then sees each byte once).

``mode="once"`` (read once, share): the selected tensors are split between the ranks by bytes
(:func:`plan_owners`: largest first, each to the rank holding the fewest bytes so far, ties by
name, then lowest rank, so every rank computes the same plan from the index alone); each rank reads
its share whole and verified. A tensor every rank needs whole is then broadcast from its owner
(``broadcast``, received straight into the tensor's final memory); a tensor with a spec is sent by
its owner to each rank as that rank's region alone (``isend``/``irecv``, tagged by the tensor's
position), so each rank receives and holds only its pieces. Storage sees each byte once: the ranks'
reads add up to the checkpoint's data, not N times it. (The owner computes every rank's region, so
a region function must give the same answer for a rank on every rank.)

Why a broadcast per tensor and not one ``all_gather`` of each rank's bytes: an all_gather needs
equal contributions (every share padded to the largest), a receive buffer of N shares, and a copy
out of it into each tensor (twice the checkpoint in memory, unless tensors are left as views at
offsets their types may not be aligned to, all keeping one block alive). A broadcast per tensor
moves the same bytes, pads nothing, and lands in the tensor's own memory. They are queued
asynchronously (``async_op=True``) in key order and waited for at the end, so Python's per-call
cost overlaps the transfers; the point-to-point regions follow, queued the same way.

Failures
--------
Nothing a rank does before the data phase can leave another rank waiting in a collective: every
rank first does all its local work (opening the checkpoint, choosing names, computing its regions,
reading, allocating what it will receive) with every exception caught, then all ranks exchange a
status (``all_gather_object``: ok, or the tensor, error type and message; with each rank's bytes
read and an index fingerprint, so ranks that opened different checkpoints are refused too). If any
rank failed, every rank raises :class:`~gpuckpt.DistributedRestoreError` naming each failed rank
and tensor, together, before any data moves, and the group stays usable. A rank that dies, hangs
or never calls ``restore`` makes the others' status exchange fail (at once for a closed connection,
after ``timeout`` for a silent peer), and they raise the same error. ``timeout`` is how long the
ranks wait for the slowest one to finish reading; the data collectives that follow run under the
group's own timeout (``init_process_group(timeout=)``), and a rank dying during them makes the
others raise the same error, naming the tensor in transfer. After a timeout or a rank gone the
groups are in the state torch leaves them after any failed collective: make new ones before
restoring again. (A failure reported through the statuses leaves them usable.)

The status exchange runs on ``group`` when it is a gloo group, else on a gloo group over the same
ranks, made by the first call for those ranks (by them alone: ``use_local_synchronization``,
so the groups a program makes afterwards get the same names on every rank) and kept. With
``timeout``, it starts with ``monitored_barrier(timeout=)``, gloo's barrier with a timeout of its
own, so no group is made per timeout; without, the group's own timeout applies (torch's default,
30 minutes, on the gloo twin of an NCCL group).

Memory a rank cannot get is reported when the allocation raises (``MemoryError``); the kernel's
OOM killer ending a process shows up on the others as a rank gone.

Devices
-------
Tensors arrive on the host (``torch.from_numpy`` over the restored arrays, no copy); ``device=``
moves them after the restore (``Tensor.to``). On an NCCL group what is shared travels between
CUDA tensors on ``torch.cuda.current_device()`` (the owner copies its host bytes there first) and
arrives there. The NCCL
path is written to torch's documented API but has not run (no GPU build of torch here).

``mesh=`` (a 1-D ``DeviceMesh`` over the group) returns ``DTensor``\\ s: a tensor under a
:class:`Split` of ``mesh.size()`` pieces as ``Shard(dim)`` (torch.chunk's split, which is
:func:`split_region`'s), the others as ``Replicate()``; the local tensor is the one read, no copy
and no collective (``DTensor.from_local(run_check=False)`` with the global shape and stride given).
A Split's piece is then the rank's local rank on the mesh (``DeviceMesh.get_local_rank()``), which is
where DTensor's own ``distribute_tensor`` and ``full_tensor`` put it: torch takes it from the mesh's
process group, in rank order, so on a mesh listed out of rank order it differs from the rank's
``get_coordinate()``. Regions from a callable cannot be described as
placements and are refused with a mesh.

Dtypes: those :mod:`gpuckpt.torch` has (strings and the sub-byte types are refused by name); no
``dtype=`` conversion here.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import Checkpoint, NameSelector
from .checkpoint import open as open_checkpoint
from .errors import DistributedRestoreError, InvalidArgumentError, UnsupportedError, describe
from .naming import NameRules
from .regions import region_of
from .torch import from_numpy, torch_dtype

MODES = ("own", "once")


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    """Split a tensor along ``dim`` into ``pieces`` (default: the group's size), as tensor
    parallelism does; rank ``r`` holds piece ``r % pieces`` (its local rank on the mesh with ``mesh=``).
    Pieces are torch.chunk's: ``ceil(size / pieces)`` long, the last ones shorter or empty."""

    dim: int
    pieces: int | None = None


RegionFunction = Callable[[int, int, tuple[int, ...]], Any]
ShardingSpec = Union[Split, tuple[int, int], tuple[int], RegionFunction]  # noqa: UP007 - a runtime alias on 3.10


def split_region(shape: Sequence[int], dim: int, pieces: int, piece: int) -> tuple[slice, ...]:
    """The region (one slice per axis) of piece ``piece`` of ``pieces`` along ``dim`` of a tensor of
    ``shape``, with torch.chunk's sizes (what ``DTensor``'s ``Shard(dim)`` holds)."""
    shape = tuple(shape)
    if not -len(shape) <= dim < len(shape):
        raise InvalidArgumentError(f"Split(dim={dim}) is out of range for a tensor of shape {shape}")
    if pieces < 1 or not 0 <= piece < pieces:
        raise InvalidArgumentError(f"piece {piece} of {pieces} does not exist")
    dim %= len(shape)
    chunk = -(-shape[dim] // pieces)
    start = min(piece * chunk, shape[dim])
    stop = min(start + chunk, shape[dim])
    return tuple(slice(start, stop) if axis == dim else slice(None) for axis in range(len(shape)))


def plan_owners(sizes: Sequence[tuple[str, int]], world: int) -> dict[str, int]:
    """Which rank reads each tensor in ``mode="once"``: largest first, each to the rank holding the
    fewest bytes so far (ties: the lower rank), equal sizes in name order; the same plan whatever
    order ``(name, bytes)`` pairs come in. No rank ends more than the largest tensor above another."""
    if world < 1:
        raise InvalidArgumentError(f"a group of {world} ranks")
    loads = [0] * world
    owners = {}
    for name, nbytes in sorted(sizes, key=lambda pair: (-pair[1], pair[0])):
        lightest = loads.index(min(loads))
        owners[name] = lightest
        loads[lightest] += nbytes
    return owners


@dataclasses.dataclass
class DistributedRestore:
    """What :func:`restore` returns on each rank."""

    tensors: dict[str, Any]  #: name -> torch.Tensor (this rank's region of it), or DTensor with ``mesh=``
    regions: dict[str, Any]  #: name -> the basic index of the full tensor this rank holds (None: whole)
    owners: dict[str, int]  #: the rank that read each tensor read once and shared (none in mode "own" by default)
    bytes_read: dict[int, dict[str, int]]  #: rank -> {data file: bytes read from it by this restore}
    read_seconds: dict[int, float]  #: rank -> seconds its local phase took (open, read, allocate)
    mode: str
    rank: int
    world_size: int

    def bytes_read_by_rank(self) -> dict[int, int]:
        """Rank -> bytes it read from storage in this restore."""
        return {rank: sum(files.values()) for rank, files in self.bytes_read.items()}

    def total_bytes_read(self) -> int:
        """Bytes read from storage by all ranks together (the checkpoint's data once, in mode "once")."""
        return sum(self.bytes_read_by_rank().values())


# -- the local phase: everything a rank does alone, every failure caught ---------------------------


class _Failed(Exception):
    """A local failure, with the tensor it happened on."""

    def __init__(self, tensor: str | None, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.tensor = tensor
        self.cause = cause


def _compile(shardings: Mapping[str, Any] | None) -> NameRules[Any]:
    """Check every spec's type (rank-independent, raised at once) and compile the name patterns."""
    specs = []
    for key, spec in (shardings or {}).items():
        if isinstance(spec, tuple):
            if not 1 <= len(spec) <= 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
                raise InvalidArgumentError(f"sharding {key!r}: a tuple spec is (dim, pieces), not {spec!r}")
            spec = Split(*spec)
        elif not isinstance(spec, Split) and not callable(spec):
            raise InvalidArgumentError(
                f"sharding {key!r}: give Split(dim, pieces), (dim, pieces) or a function (rank, world, shape) -> "
                f"region, not {type(spec).__name__}"
            )
        if isinstance(spec, Split):
            if not _is_int(spec.dim) or not (spec.pieces is None or _is_int(spec.pieces)):
                raise InvalidArgumentError(f"sharding {key!r}: Split's dim and pieces are ints, not {spec!r}")
            if spec.pieces is not None and spec.pieces < 1:
                raise InvalidArgumentError(f"sharding {key!r}: Split(pieces={spec.pieces}) needs at least one piece")
        specs.append((key, spec))
    return NameRules(specs, "shardings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spec_for(name: str, compiled: NameRules[Any]) -> Any:
    """The spec for ``name``: the key equal to it, else the first pattern matching it whole."""
    return compiled.lookup(name)


def _region(spec: Any, rank: int, world: int, piece: int, shape: tuple[int, ...], where: str = "") -> Any:
    """This rank's basic index of a tensor of ``shape`` under ``spec`` (None: the whole tensor).
    A function's region is checked as ``restore(regions=)`` checks it (:func:`~gpuckpt.regions.region_of`:
    bounds, rank, basic indices only), here and not after the reads; RegionError ends with ``where``."""
    if spec is None:
        return None
    if isinstance(spec, Split):
        pieces = world if spec.pieces is None else spec.pieces
        return split_region(shape, spec.dim, pieces, piece % pieces)
    region = spec(rank, world, shape)
    region_of(region, shape, where)
    return region


def _read(ckpt: Checkpoint, regions: dict[str, Any], verify: bool | None, threads: int | None) -> dict[str, np.ndarray]:
    """``{name: region or None}``, each read by a restore of its own: a region reads only the runs
    it needs (``restore(regions=)``), None (or a region that is the whole) the tensor whole, verified.

    One restore per tensor, not one for all: the planner reads small neighbours together, across
    gaps of up to 64 KiB that here hold other ranks' tensors, so a batch would read bytes that
    are not this rank's (and a failure could not say which tensor it was). It costs about 25 us
    a tensor more (5,000 tensors of 256 bytes: 32 us each alone, 6 us in one restore).
    """
    arrays = {}
    for name, region in regions.items():
        try:
            one = None if region is None else {name: region}
            arrays[name] = ckpt.restore([name], regions=one, verify=verify, threads=threads)[name]
        except Exception as exc:  # noqa: BLE001 - reported to the group
            raise _Failed(name, exc) from exc
    return arrays


def _fingerprint(ckpt: Checkpoint, names: list[str], specs: dict[str, Any], how: tuple[str, str]) -> str:
    """What every rank must agree on, since the data phase follows from it: the names selected,
    their index entries, which of them have a spec and which kind, and the modes."""
    digest = hashlib.sha256(repr(how).encode())
    for name in names:
        e = ckpt.index.tensors[name]
        spec = specs[name]
        kind = None if spec is None else repr(spec) if isinstance(spec, Split) else "function"
        digest.update(repr((e.name, e.dtype, e.shape, e.size, e.masked_crc32c, len(e.slices), kind)).encode())
    return digest.hexdigest()


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {path: n - before.get(path, 0) for path, n in after.items() if n - before.get(path, 0)}


def _region_shape(region: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's shape of ``tensor[region]`` for a tensor of ``shape`` (a region :func:`_region` checked)."""
    return shape if region is None else region_of(region, shape).shape


def _wire(array: np.ndarray) -> torch.Tensor:
    """The bytes of a C-contiguous host array as a uint8 tensor over the same memory."""
    return torch.from_numpy(array.reshape(-1).view(np.uint8))


@dataclasses.dataclass
class _Local:
    """What a rank's local phase produced."""

    names: list[str] = dataclasses.field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dtypes: dict[str, np.dtype] = dataclasses.field(default_factory=dict)
    specs: dict[str, Any] = dataclasses.field(default_factory=dict)
    regions: dict[str, Any] = dataclasses.field(default_factory=dict)  #: this rank's
    owners: dict[str, int] = dataclasses.field(default_factory=dict)  #: tensors read once and shared
    results: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  #: host arrays returned
    #: uint8 buffers the collectives fill (host: views of ``results``; CUDA: the memory returned)
    wires: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: an owner's region of a sharded shared tensor for each other rank: (rank, bytes)
    sends: dict[str, list[tuple[int, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""


def _local_phase(
    ckpt: Checkpoint,
    names: NameSelector,
    compiled: NameRules[Any],
    mode: str,
    replicated: str,
    rank: int,
    world: int,
    pieces: list[int],
    verify: bool | None,
    threads: int | None,
    comm_device: torch.device,
) -> _Local:
    """Choose, check, read and allocate; raises :class:`_Failed` naming the tensor it failed on.
    ``pieces[r]``: the piece a Split gives rank ``r``."""
    local = _Local()
    current: str | None = None
    try:
        local.names = [e.name for e in ckpt._select(names)]
        for current in local.names:
            info = ckpt.info(current)
            where = describe(ckpt.index.path, current)
            if info.dtype is None:
                raise UnsupportedError(f"{info.tf_dtype} tensors cannot be read: {where}")
            torch_dtype(info.dtype, where)  # strings and sub-byte types are refused by name
            local.shapes[current] = info.shape
            local.dtypes[current] = info.dtype
            local.specs[current] = _spec_for(current, compiled)
            local.regions[current] = _region(local.specs[current], rank, world, pieces[rank], info.shape, where)
        current = None
        local.fingerprint = _fingerprint(ckpt, local.names, local.specs, (mode, replicated))
        if mode == "once":
            shared = list(local.names)
        else:
            shared = [n for n in local.names if local.specs[n] is None] if replicated == "once" else []
        local.owners = plan_owners([(n, ckpt.info(n).nbytes) for n in shared], world)
        # this rank's reads: its regions, and the tensors it owns whole; then those it owns and cuts
        # into regions for the others, one at a time (the host holds one such whole at most)
        batch = {n: local.regions[n] for n in local.names if n not in local.owners}
        batch.update({n: None for n, r in local.owners.items() if r == rank and local.specs[n] is None})
        current = None
        local.results = _read(ckpt, batch, verify, threads)
        for current in local.names:
            if local.owners.get(current) == rank and local.specs[current] is not None:
                whole = ckpt.restore([current], verify=verify, threads=threads)[current]
                # a copy, not a view of the whole; np.array: an integer on every axis gives a scalar
                local.results[current] = np.array(whole[local.regions[current]], copy=True)
                sends = []
                where = describe(ckpt.index.path, current)
                for other in range(world):
                    theirs = _region(local.specs[current], other, world, pieces[other], local.shapes[current], where)
                    part = np.asarray(whole[theirs])
                    part = part if part.flags.c_contiguous else part.copy()  # a view where it is contiguous
                    if other != rank and part.size:
                        sends.append((other, _wire(part).to(comm_device)))
                local.sends[current] = sends
                del whole  # LIFETIME: the regions sent are copies, or views their wires keep alive
        for current in local.owners:  # what the others send: allocated now, so no rank fails later
            if local.owners[current] != rank:
                shape = _region_shape(local.regions[current], local.shapes[current])
                if comm_device.type == "cpu":
                    local.results[current] = np.empty(shape, local.dtypes[current])
                else:
                    nbytes = math.prod(shape) * local.dtypes[current].itemsize
                    local.wires[current] = torch.empty(nbytes, dtype=torch.uint8, device=comm_device)
                    continue
            if comm_device.type == "cpu":
                local.wires[current] = _wire(local.results[current])
            else:
                local.wires[current] = _wire(local.results.pop(current)).to(comm_device)
        return local
    except _Failed:
        raise
    except Exception as exc:  # noqa: BLE001 - every local failure is reported to the group
        raise _Failed(current, exc) from exc


# -- the status exchange ----------------------------------------------------------------------------

_STATUS_GROUPS: dict[tuple[int, ...], tuple[Any, Any]] = {}  # ranks -> (default group then, gloo twin)


def _status_group(group: Any) -> Any:
    """The gloo group the status exchange runs on: ``group`` when it is a gloo group, else a gloo
    group over the same ranks, made by the first call for those ranks and kept (one per set of
    ranks, while the default group it was made under lives). It is made with
    ``use_local_synchronization``: only those ranks take part, and its name comes from its ranks,
    so the default group's count of groups (which names every group made after it, on every
    rank alike) is left as it was (torch/distributed/distributed_c10d.py, _process_group_name)."""
    if "gloo" in str(dist.get_backend(group)):
        return group
    ranks = tuple(dist.get_process_group_ranks(group))
    world = dist.group.WORLD
    found = _STATUS_GROUPS.get(ranks)
    if found is None or found[0] is not world:
        side = dist.new_group(ranks=list(ranks), backend="gloo", use_local_synchronization=True)
        _STATUS_GROUPS[ranks] = found = (world, side)
    return found[1]


def _as_timedelta(timeout: Any) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return datetime.timedelta(seconds=timeout)
    raise InvalidArgumentError(f"timeout={timeout!r}: give seconds (> 0), a datetime.timedelta, or None")


def _failure_lines(failures: list[tuple[int, str | None, str, str]]) -> str:
    return "; ".join(
        f"rank {rank}" + (f" on tensor {tensor!r}" if tensor is not None else "") + f": {kind}: {message}"
        for rank, tensor, kind, message in failures
    )


# -- the entry point --------------------------------------------------------------------------------


def restore(
    checkpoint: Checkpoint | str | os.PathLike[str],
    names: NameSelector = None,
    *,
    shardings: Mapping[str, ShardingSpec] | None = None,
    mode: str = "own",
    replicated: str = "each",
    group: Any = None,
    mesh: Any = None,
    device: Any = None,
    verify: bool | None = None,
    threads: int | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> DistributedRestore:
    """Restore a checkpoint on every rank of a process group; every rank must call it, with the
    same arguments (the regions a function gives may differ by rank, as they should).

    Parameters
    ----------
    checkpoint : an open :class:`~gpuckpt.Checkpoint`, or a path (opened here and closed at the
        end, so a rank that cannot open it is reported to the others like any other failure).
    names : which tensors, as for :meth:`Checkpoint.restore` (None: all).
    shardings : ``{name or regular expression (matched whole): spec}``, the exact name winning,
        then the first pattern in order. A spec is :class:`Split` ``(dim, pieces)`` (or that
        tuple), or a function ``(rank, world_size, shape) -> basic index`` (ranges, integers,
        steps) giving this rank's region. Tensors without one are whole on every rank.
    mode : ``"own"``: each rank reads only what it holds; ``"once"``: each tensor is read by one
        rank and broadcast, or sent as regions (see the module docs).
    replicated : mode "own", tensors without a spec: ``"each"`` rank reads them, or they are
        read ``"once"`` and broadcast.
    group : the process group (default: the default group).
    mesh : a 1-D ``DeviceMesh`` over the group: return ``DTensor``\\ s (see the module docs).
    device : where the tensors end up (a torch device or "cuda:N"; default the host, or the CUDA
        device that shared tensors travel on, for those, on an NCCL group).
    verify : check crc32c of what is read whole (default: the checkpoint's setting). Regions are
        not checked: the crc32c covers whole tensors.
    timeout : seconds (or a timedelta) every rank waits for the others to finish their reads
        before giving up (see the module docs for None).

    Returns
    -------
    DistributedRestore : this rank's tensors and regions, the owner of each tensor (mode "once"),
        and every rank's bytes read per data file during this call.

    Raises
    ------
    DistributedRestoreError : on every rank, when any rank failed (naming it and the tensor), when
        the ranks opened different checkpoints or selected different tensors, when a rank died or
        did not report within ``timeout``, or when a data collective failed.
    InvalidArgumentError : arguments no rank could use (a bad mode, spec or pattern), at once.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"mode={mode!r}: give 'own' (each rank its own shards) or 'once' (read once, share)")
    if replicated not in ("each", "once"):
        raise InvalidArgumentError(f"replicated={replicated!r}: give 'each' (every rank reads them) or 'once'")
    compiled = _compile(shardings)
    wait = _as_timedelta(timeout)
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("gpuckpt.distributed.restore needs an initialized torch.distributed process group")
    group = dist.group.WORLD if group is None else group
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a process outside it
        raise InvalidArgumentError("group=: this process is not a member of that group; only its ranks call restore")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pieces = list(range(world))
    if mesh is not None:
        if mesh.ndim != 1 or mesh.size() != world:
            raise UnsupportedError(f"mesh={mesh}: a 1-D mesh over the group's {world} ranks is supported")
        for key, spec in compiled.items():
            if not isinstance(spec, Split):
                raise InvalidArgumentError(f"sharding {key!r}: a region function has no DTensor placement; drop mesh=")
            if spec.pieces not in (None, world):
                raise InvalidArgumentError(f"sharding {key!r}: Split(pieces={spec.pieces}) on a mesh of {world}")
        # A rank's piece is its local rank on the mesh, as DTensor's own sharding places it
        # (distribute_tensor, full_tensor): torch takes that from the mesh's process group, in rank
        # order, so on a mesh listed out of rank order it is not the rank's mesh coordinate.
        mesh_group = mesh.get_group()
        members = set(dist.get_process_group_ranks(mesh_group))
        globals_ = [dist.get_global_rank(group, r) for r in range(world)]
        if set(globals_) != members:
            raise InvalidArgumentError(f"mesh={mesh}: a mesh over the group's ranks {sorted(globals_)}")
        pieces = [dist.get_group_rank(mesh_group, g) for g in globals_]
    backend = str(dist.get_backend(group))
    comm_device = torch.device("cpu")
    if (mode == "once" or replicated == "once") and "gloo" not in backend:
        comm_device = torch.device("cuda", torch.cuda.current_device())
    try:
        status_group = _status_group(group)
    except Exception as exc:  # noqa: BLE001 - a rank gone before the call: the side group cannot be made
        raise DistributedRestoreError(
            f"rank {rank}: not every rank reported its status (a rank died, hangs, or never called restore): "
            f"making the gloo group for the statuses failed: {type(exc).__name__}: {exc}",
            [],
        ) from exc

    started = time.perf_counter()
    ckpt: Checkpoint | None = None
    opened_here = not isinstance(checkpoint, Checkpoint)
    failure: tuple[int, str | None, str, str] | None = None
    cause: BaseException | None = None
    local = _Local()
    before: dict[str, int] = {}
    try:
        try:
            ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
            before = ckpt.bytes_read()
        except Exception as exc:  # noqa: BLE001 - reported to the group
            raise _Failed(None, exc) from exc
        local = _local_phase(ckpt, names, compiled, mode, replicated, rank, world, pieces, verify, threads, comm_device)
    except _Failed as failed:
        failure = (rank, failed.tensor, type(failed.cause).__name__, str(failed.cause))
        cause = failed.cause
        local = _Local()  # LIFETIME: what was read or allocated goes before anyone waits
    read = _delta(ckpt.bytes_read(), before) if ckpt is not None else {}
    status = {
        "failure": failure,
        "fingerprint": local.fingerprint,
        "bytes_read": read,
        "seconds": time.perf_counter() - started,
    }
    try:
        statuses = _exchange(status, status_group, wait, world, rank, failure, cause)
        failures = [s["failure"] for s in statuses if s["failure"] is not None]
        if failures:
            raise DistributedRestoreError(
                f"restore failed on {len(failures)} of {world} ranks: {_failure_lines(failures)}", failures
            ) from cause
        prints = {s["fingerprint"] for s in statuses}
        if len(prints) > 1:
            differ = [r for r, s in enumerate(statuses) if s["fingerprint"] != statuses[0]["fingerprint"]]
            raise DistributedRestoreError(
                f"ranks {differ} opened another checkpoint, or selected other tensors, specs or modes, than "
                f"rank 0 (names, index entries, kinds of spec or modes differ); nothing was exchanged",
                [(r, None, "Mismatch", "another checkpoint, selection, spec or mode than rank 0") for r in differ],
            )
        if local.owners:
            _share(local, group, rank)
        tensors = _finish(local, mesh, device, comm_device, ckpt.index.path if ckpt is not None else "")
    finally:
        if opened_here and ckpt is not None:
            ckpt.close()
    return DistributedRestore(
        tensors=tensors,
        regions={n: local.regions[n] for n in local.names},
        owners=dict(local.owners),
        bytes_read={r: dict(s["bytes_read"]) for r, s in enumerate(statuses)},
        read_seconds={r: float(s["seconds"]) for r, s in enumerate(statuses)},
        mode=mode,
        rank=rank,
        world_size=world,
    )


def _exchange(
    status: dict[str, Any],
    status_group: Any,
    wait: datetime.timedelta | None,
    world: int,
    rank: int,
    failure: tuple[int, str | None, str, str] | None,
    cause: BaseException | None,
) -> list[dict[str, Any]]:
    """Every rank's status, or DistributedRestoreError when some rank never sent one. With
    ``wait``, a ``monitored_barrier`` first: every rank gets there within ``wait`` or all raise
    (gloo's barrier with a timeout of its own, so no group needs that timeout built in)."""
    statuses: list[Any] = [None] * world
    try:
        if wait is not None:
            dist.monitored_barrier(group=status_group, timeout=wait)
        dist.all_gather_object(statuses, status, group=status_group)
    except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError subclasses for a dead or silent peer
        own = [failure] if failure is not None else []
        mine = f"; this rank failed too: {_failure_lines(own)}" if own else ""
        raise DistributedRestoreError(
            f"rank {rank}: not every rank reported its status (a rank died, hangs, is still reading after the "
            f"timeout, or never called restore): {type(exc).__name__}: {exc}{mine}",
            own,
        ) from (cause or exc)
    return statuses


def _share(local: _Local, group: Any, rank: int) -> None:
    """Every shared tensor from its owner: the whole ones broadcast, in key order, queued together
    and waited for in turn; then each rank's region of the sharded ones, point to point."""
    current: str | None = None
    try:
        works = []
        for current in local.owners:
            if local.specs[current] is None and local.wires[current].numel():
                source = dist.get_global_rank(group, local.owners[current])  # src= is a global rank
                works.append((current, dist.broadcast(local.wires[current], src=source, group=group, async_op=True)))
        for current, work in works:  # noqa: B007 - named in the error below
            work.wait()
        works = []
        for tag, current in enumerate(local.names):
            owner = local.owners.get(current)
            if owner is None or local.specs[current] is None:
                continue
            if owner == rank:
                for other, payload in local.sends.pop(current):
                    works.append(
                        (current, dist.isend(payload, dst=dist.get_global_rank(group, other), group=group, tag=tag))
                    )
            elif local.wires[current].numel():
                source = dist.get_global_rank(group, owner)
                works.append((current, dist.irecv(local.wires[current], src=source, group=group, tag=tag)))
        for current, work in works:  # noqa: B007 - named in the error below
            work.wait()  # LIFETIME: each payload sent stays referenced by ``works`` until here
    except Exception as exc:  # noqa: BLE001 - a collective failing: name the tensor it was on
        raise DistributedRestoreError(
            f"rank {rank}: the transfer of tensor {current!r} (read by rank {local.owners.get(current or '')}) "
            f"failed: {type(exc).__name__}: {exc}",
            [(rank, current, type(exc).__name__, str(exc))],
        ) from exc


def _finish(local: _Local, mesh: Any, device: Any, comm_device: torch.device, path: str) -> dict[str, Any]:
    """The torch tensors this rank returns: its regions, on ``device``, as DTensors with a mesh."""
    tensors: dict[str, Any] = {}
    for name in local.names:
        where = describe(path, name)
        if name in local.results:
            tensor = from_numpy(local.results.pop(name), where)
            local.wires.pop(name, None)
        else:
            wanted = torch_dtype(local.dtypes[name], where)
            shape = _region_shape(local.regions[name], local.shapes[name])
            tensor = local.wires.pop(name).view(wanted).reshape(shape)
        if device is not None:
            tensor = tensor.to(device)
        if mesh is not None:
            tensor = _dtensor(tensor, mesh, local.specs[name], local.shapes[name])
        tensors[name] = tensor
    return tensors


def _dtensor(local_tensor: torch.Tensor, mesh: Any, spec: Any, shape: tuple[int, ...]) -> Any:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if mesh.device_type != local_tensor.device.type:
        local_tensor = local_tensor.to(mesh.device_type)
    placement = Replicate() if spec is None else Shard(spec.dim % len(shape))
    stride = tuple(math.prod(shape[axis + 1 :]) for axis in range(len(shape)))
    return DTensor.from_local(local_tensor, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)
