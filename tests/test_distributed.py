"""gpuckpt.distributed on 4 processes over loopback (gloo; the rendezvous store is this process's,
on a port the system picked): each rank its own shards, and read once and share, every rank's
tensors equal to the single-process restore bit for bit; the bytes each rank read (each-own: only
its regions; read-once: the ranks' reads add up to the checkpoint's data); a rank failing part-way
(a damaged copy of a tensor, memory refused, a rank too slow, a rank gone) makes every rank raise
DistributedRestoreError naming the rank and the tensor, and every process exits by itself.

Each scenario is one spawn of 4 workers (this file run as a script), which write what they got to
a pickle per rank; the tests compare those with a restore in this process.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="gpuckpt.distributed needs PyTorch (pip install torch==2.13.0)")
dist = torch.distributed
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
from gpuckpt.distributed import Split, plan_owners, split_region  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 4
SPAWN_TIMEOUT_S = 60  # a hung worker is killed, and the test fails


def _rows_every_world(rank: int, world: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A region function: every world-th row from the rank's own (steps on the first axis)."""
    return np.s_[rank::world]


SHARDINGS = {
    "dense/kernel": Split(1),  # (8, 8192) float32: columns, one run of 8 KiB per row
    "embed/table": (0, 4),  # (1000, 64) bfloat16: 250 rows each
    r"layer_\d+/w": Split(0),  # (10, 3000) float16: torch.chunk's 3, 3, 3, 1 rows
    "odd/rows": _rows_every_world,  # (64, 2048) float32: rows rank, rank + 4, ...
    "tiny": Split(0),  # (3,) int32: 1, 1, 1, 0 elements
    "part/var": Split(0),  # (64, 300) float32 saved as rows 0:40 and 40:64: rank 2's rows 32:48 straddle them
}
MESH_SHARDINGS = {"dense/kernel": Split(1), "embed/table": Split(0), r"layer_\d+/w": Split(0), "tiny": Split(0)}


def _tensors() -> dict[str, object]:
    rng = np.random.default_rng(12)
    part = rng.standard_normal((64, 300)).astype(np.float32)
    return {
        "dense/kernel": rng.standard_normal((8, 8192)).astype(np.float32),
        "embed/table": rng.standard_normal((1000, 64)).astype(ml_dtypes.bfloat16),
        "layer_0/w": rng.standard_normal((10, 3000)).astype(np.float16),
        "layer_1/w": rng.standard_normal((10, 3000)).astype(np.float16),
        "odd/rows": rng.standard_normal((64, 2048)).astype(np.float32),
        "tiny": np.array([1, 2, 3], np.int32),
        "bias": rng.standard_normal(5000).astype(np.float16),
        "mask": rng.integers(0, 2, (7, 5)).astype(bool),
        "step": np.array(1234, np.int64),
        "phase": (rng.standard_normal(300) + 1j * rng.standard_normal(300)).astype(np.complex64),
        "empty": np.zeros((0, 4), np.float32),
        "part/var": gpuckpt.Partitioned((64, 300), [(np.s_[:40, :], part[:40]), (np.s_[40:, :], part[40:])]),
    }


# -- the workers -------------------------------------------------------------------------------


def _bits(tensor: torch.Tensor) -> bytes:
    if tensor.numel() == 0:
        return b""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _summary(got) -> dict:  # type: ignore[no-untyped-def]
    return {
        "tensors": {n: (str(t.dtype), tuple(t.shape), _bits(t)) for n, t in got.tensors.items()},
        "regions": got.regions,
        "owners": got.owners,
        "bytes_read": got.bytes_read,
        "rank": got.rank,
        "world_size": got.world_size,
    }


def _error(exc: BaseException) -> dict:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "rank": getattr(exc, "rank", None),
        "tensor": getattr(exc, "tensor", None),
        "failures": getattr(exc, "failures", None),
        "is_checkpoint_error": isinstance(exc, gpuckpt.CheckpointError),
    }


def _attempt(call) -> dict:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    try:
        return {"ok": _summary(call()), "seconds": time.monotonic() - started}
    except Exception as exc:
        return {"error": _error(exc), "seconds": time.monotonic() - started}


def _worker(rank: int, port: int, scenario: str, config_path: str) -> None:
    import gpuckpt.distributed as gd

    with open(config_path, "rb") as f:
        config = pickle.load(f)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=config["group_timeout"])
    )
    prefix = config["prefix"]
    results: dict[str, object] = {}
    if scenario == "modes":
        results["own"] = _attempt(lambda: gd.restore(prefix, shardings=SHARDINGS, mode="own", timeout=20))
        results["once"] = _attempt(lambda: gd.restore(prefix, mode="once", timeout=20))
        results["once_sharded"] = _attempt(lambda: gd.restore(prefix, shardings=SHARDINGS, mode="once", timeout=20))
        results["own_shared"] = _attempt(lambda: gd.restore(prefix, shardings=SHARDINGS, replicated="once", timeout=20))
        with gpuckpt.open(prefix) as ckpt:  # an open Checkpoint, a selection by pattern
            results["own_open"] = _attempt(lambda: gd.restore(ckpt, r"layer_.*", shardings=SHARDINGS))
        pair = dist.new_group([2, 3])  # every rank creates it; ranks 2 and 3 restore on it alone
        if rank in (2, 3):
            results["subgroup"] = _attempt(lambda: gd.restore(prefix, mode="once", group=pair, timeout=20))
            real_backend = dist.get_backend  # the subgroup as an NCCL group: statuses go on its gloo twin
            dist.get_backend = lambda group=None: "nccl"
            try:
                results["subgroup_twin"] = _attempt(lambda: gd.restore(prefix, ["tiny"], group=pair, timeout=20))
            finally:
                dist.get_backend = real_backend
        else:
            results["not_a_member"] = _attempt(lambda: gd.restore(prefix, group=pair))
        every = dist.new_group(list(range(WORLD)))  # a group made after: every rank must agree on its name
        total = torch.ones(1)
        dist.all_reduce(total, group=every)
        results["group_after_subgroup"] = float(total)
        fds = len(os.listdir("/proc/self/fd"))
        for seconds in (11, 12, 13, 14, 15):  # a timeout of its own each call
            gd.restore(prefix, ["tiny"], timeout=seconds)
        results["fds_after_timeouts"] = len(os.listdir("/proc/self/fd")) - fds

        def one_element(r: int, world: int, shape: tuple[int, ...]) -> tuple[int, int]:
            return (r, 0)  # an integer on every axis: a 0-d region

        results["int_region"] = {
            mode: _attempt(
                lambda m=mode: gd.restore(prefix, ["dense/kernel"], shardings={"dense/kernel": one_element}, mode=m)
            )
            for mode in ("own", "once")
        }
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (WORLD,))
        got = gd.restore(prefix, shardings=MESH_SHARDINGS, mesh=mesh, timeout=20)
        once = gd.restore(prefix, shardings=MESH_SHARDINGS, mesh=mesh, mode="once", timeout=20)
        results["mesh_once"] = {name: _bits(t.to_local()) for name, t in once.tensors.items()}
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import Shard, distribute_tensor

        permuted = DeviceMesh("cpu", torch.tensor([1, 0, 3, 2]))  # listed out of rank order
        shuffled = gd.restore(prefix, ["embed/table"], shardings={"embed/table": Split(0)}, mesh=permuted)
        table = shuffled.tensors["embed/table"]
        with gpuckpt.open(prefix) as ckpt:
            whole = torch.from_numpy(ckpt["embed/table"].view(np.int16)).view(torch.bfloat16)
        reference = distribute_tensor(whole, permuted, [Shard(0)])  # torch's own placement of the pieces
        results["mesh_permuted"] = (
            _bits(table.to_local()) == _bits(reference.to_local()),
            _bits(table.full_tensor()) == _bits(whole),
        )
        results["mesh"] = {
            name: (
                isinstance(t, DTensor),
                [repr(p) for p in t.placements],
                tuple(t.shape),
                _bits(t.to_local()),
                _bits(t.full_tensor()),
            )
            for name, t in got.tensors.items()
        }
    elif scenario == "failures":
        bad_rank, damaged = config["bad_rank"], config["damaged_prefix"]
        mine = damaged if rank == bad_rank else prefix
        results["damaged_once"] = _attempt(lambda: gd.restore(mine, mode="once", timeout=20))
        results["damaged_own"] = _attempt(lambda: gd.restore(mine, shardings=SHARDINGS, timeout=20))

        def refused(r: int, world: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
            if r == 1:
                raise MemoryError("injected: no memory for this region")
            return np.s_[r::world]

        results["memory"] = _attempt(lambda: gd.restore(prefix, shardings={**SHARDINGS, "odd/rows": refused}))
        results["other_checkpoint"] = _attempt(
            lambda: gd.restore(prefix, ["bias"] if rank == 3 else ["bias", "step"], timeout=20)
        )
        results["after"] = _attempt(lambda: gd.restore(prefix, mode="once", timeout=20))  # the group still works

        def slow(r: int, world: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
            if r == 3:
                time.sleep(6)  # still reading when the others stop waiting
            return np.s_[r::world]

        results["slow"] = _attempt(lambda: gd.restore(prefix, shardings={"odd/rows": slow}, timeout=1.5))
    elif scenario == "gone":
        if rank == 3 and config["when"] in ("before", "before_with_timeout"):
            os._exit(7)  # dies without a word, before restore
        if rank == 3:  # dies once the statuses are in, as the tensors are being sent
            gd._share = lambda *args: os._exit(7)
        timeout = 5 if config["when"] == "before_with_timeout" else None
        results["gone"] = _attempt(lambda: gd.restore(prefix, mode="once", timeout=timeout))
    with open(os.path.join(config["out"], f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)  # nothing left to wait for: a broken gloo pair must not keep the process


# -- the driver ------------------------------------------------------------------------------------


def _spawn(scenario: str, config: dict, tmp_path) -> tuple[list[dict], float]:  # type: ignore[no-untyped-def]
    out = tmp_path / f"out-{scenario}"
    out.mkdir()
    config = {"group_timeout": 20, **config, "out": str(out)}
    config_path = tmp_path / f"{scenario}.pkl"
    config_path.write_bytes(pickle.dumps(config))
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30)
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(store.port), scenario, str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            left = max(1.0, SPAWN_TIMEOUT_S - (time.monotonic() - started))
            logs.append(proc.communicate(timeout=left)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    del store
    codes = [proc.returncode for proc in procs]
    expected = [7 if scenario == "gone" and rank == 3 else 0 for rank in range(WORLD)]
    assert codes == expected, "\n".join(
        f"rank {r} exited {c}:\n{log[-3000:]}" for r, (c, log) in enumerate(zip(codes, logs, strict=True))
    )
    results = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else None)
    return results, elapsed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("distributed")
    prefix = gpuckpt.save(str(root / "model.ckpt-1"), _tensors())
    with gpuckpt.open(prefix) as ckpt:
        full = ckpt.restore()
        sizes = {n: ckpt.info(n).nbytes for n in ckpt}
        files = ckpt.data_files()
    return {"prefix": prefix, "full": full, "sizes": sizes, "files": files, "root": root}


def _region_bytes(full: np.ndarray, region: object) -> bytes:
    return np.ascontiguousarray(full if region is None else full[region]).tobytes()


def _expected_region(name: str, rank: int, shape: tuple[int, ...], shardings: dict) -> object:
    from gpuckpt.distributed import _compile, _spec_for

    spec = _spec_for(name, _compile(shardings))
    if spec is None:
        return None
    if isinstance(spec, Split):
        return split_region(shape, spec.dim, WORLD if spec.pieces is None else spec.pieces, rank)
    return spec(rank, WORLD, shape)


def _check_tensors(summary: dict, checkpoint: dict, rank: int, shardings: dict, names: list[str] | None = None) -> None:
    full = checkpoint["full"]
    names = list(full) if names is None else names
    assert list(summary["tensors"]) == names
    for name in names:
        region = _expected_region(name, rank, full[name].shape, shardings)
        dtype, shape, data = summary["tensors"][name]
        expected = full[name] if region is None else full[name][region]
        assert shape == expected.shape, (rank, name)
        assert data == _region_bytes(full[name], region), (rank, name)
        got_region = summary["regions"][name]
        assert (got_region is None) == (region is None) and (region is None or str(got_region) == str(region))


@pytest.fixture(scope="module")
def modes(checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    results, elapsed = _spawn("modes", {"prefix": checkpoint["prefix"]}, tmp_path_factory.mktemp("modes"))
    return results


def test_plan_owners_is_balanced_and_deterministic():
    sizes = [("a", 100), ("b", 100), ("c", 60), ("d", 50), ("e", 40), ("f", 0)]
    owners = plan_owners(sizes, 3)
    assert owners == plan_owners(list(reversed(sizes)), 3)
    assert owners == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 0, "f": 1}
    loads = [sum(n for name, n in sizes if owners[name] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(n for _, n in sizes)
    assert plan_owners(sizes, 1) == dict.fromkeys("abcdef", 0)


def test_plan_owners_on_random_sizes():
    rng = np.random.default_rng(5)
    for world in (1, 2, 3, 4, 8):
        sizes = [(f"t{i}", int(n)) for i, n in enumerate(rng.integers(0, 1 << 20, 200))]
        owners = plan_owners(sizes, world)
        order = rng.permutation(len(sizes))
        assert plan_owners([sizes[i] for i in order], world) == owners
        loads = [sum(n for name, n in sizes if owners[name] == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(n for _, n in sizes)


def test_arguments_refused_at_once():
    import gpuckpt.distributed as gd

    for kwargs in (
        {"mode": "twice"},
        {"replicated": "some"},
        {"shardings": {"x": (0, 1, 2)}},
        {"shardings": {"x": "rows"}},
        {"shardings": {"(": Split(0)}},
        {"shardings": {"x": Split(0, 0)}},
        {"shardings": {"x": Split(0.5)}},  # type: ignore[arg-type]
        {"shardings": {"x": Split(True)}},
        {"shardings": {"x": Split(0, 2.0)}},  # type: ignore[arg-type]
        {"timeout": -1},
    ):
        with pytest.raises(gpuckpt.InvalidArgumentError) as info:
            gd.restore("nowhere", **kwargs)
        assert "initialized" not in str(info.value), kwargs  # refused for itself, before the group is needed
    assert not dist.is_initialized()
    with pytest.raises(gpuckpt.InvalidArgumentError, match="initialized"):
        gd.restore("nowhere")


def test_split_region_is_torch_chunk():
    for size in range(0, 12):
        for pieces in range(1, 6):
            full = torch.arange(size * 2).reshape(size, 2)
            chunks = list(torch.chunk(full, pieces, dim=0)) if size else []
            for piece in range(pieces):
                got = full[split_region((size, 2), 0, pieces, piece)]
                want = chunks[piece] if piece < len(chunks) else full[:0]
                assert torch.equal(got, want), (size, pieces, piece)
    assert split_region((4, 6), -1, 3, 2) == (slice(None), slice(4, 6))
    with pytest.raises(gpuckpt.InvalidArgumentError):
        split_region((4,), 1, 2, 0)


def test_specs_by_name_and_region_functions_checked_as_restore_checks_regions():
    from gpuckpt.distributed import _compile, _region, _region_shape, _spec_for
    from gpuckpt.regions import RegionError

    compiled = _compile({"a.*": Split(0), "ab": (1, 2), r"x\d": lambda rank, world, shape: (rank, ...)})
    assert _spec_for("ab", compiled) == Split(1, 2)  # the equal key first, then the first full match
    assert _spec_for("abc", compiled) == Split(0) and _spec_for("x1y", compiled) is None
    with pytest.raises(gpuckpt.InvalidArgumentError, match="regular expression"):
        _compile({"(": Split(0)})

    rows = _spec_for("x1", compiled)
    assert _region(rows, 2, 4, 2, (4, 6), "w") == (2, ...) and _region_shape((2, ...), (4, 6)) == (6,)
    assert _region_shape(None, (4, 6)) == (4, 6) and _region_shape((None, slice(1, 3)), (4, 6)) == (1, 2, 6)
    # numpy would index with these; restore(regions=) refuses them, so the spec does, before any read
    for bad in ([0, 1], np.array([True, False, True, False]), (True,), (0, 0, 0), (4,), (slice(0, 1, 0),)):
        with pytest.raises(RegionError, match="w$"):
            _region(lambda rank, world, shape, bad=bad: bad, 0, 4, 0, (4, 6), "w")


def test_every_rank_own_shards_bit_for_bit_and_only_their_bytes(modes, checkpoint):
    full, sizes = checkpoint["full"], checkpoint["sizes"]
    for rank, result in enumerate(modes):
        assert "ok" in result["own"], result["own"]
        summary = result["own"]["ok"]
        assert summary["rank"] == rank and summary["world_size"] == WORLD and summary["owners"] == {}
        _check_tensors(summary, checkpoint, rank, SHARDINGS)
        expected = 0
        for name in full:
            region = _expected_region(name, rank, full[name].shape, SHARDINGS)
            expected += sizes[name] if region is None else full[name][region].nbytes
        # every rank reports every rank's reads, the same figures
        assert summary["bytes_read"] == modes[0]["own"]["ok"]["bytes_read"]
        assert sum(summary["bytes_read"][rank].values()) == expected, rank
    # the sharded bytes are read once between the ranks; the replicated ones by each
    sharded = [n for n in full if _expected_region(n, 0, full[n].shape, SHARDINGS) is not None]
    replicated = sum(sizes[n] for n in full if n not in sharded)
    total = sum(sum(files.values()) for files in modes[0]["own"]["ok"]["bytes_read"].values())
    assert total == sum(sizes[n] for n in sharded) + WORLD * replicated


def test_read_once_every_rank_everything_and_each_byte_read_once(modes, checkpoint):
    sizes = checkpoint["sizes"]
    data_bytes = sum(os.path.getsize(f) for f in checkpoint["files"])
    assert data_bytes == sum(sizes.values())  # gpuckpt.save packs tensors densely
    owners = plan_owners(list(sizes.items()), WORLD)
    for rank, result in enumerate(modes):
        summary = result["once"]["ok"]
        _check_tensors(summary, checkpoint, rank, {})
        assert summary["owners"] == owners
        per_rank = {r: sum(files.values()) for r, files in summary["bytes_read"].items()}
        assert per_rank == {r: sum(n for name, n in sizes.items() if owners[name] == r) for r in range(WORLD)}
        assert sum(per_rank.values()) == data_bytes
        assert max(per_rank.values()) - min(per_rank.values()) <= max(sizes.values())
        # with specs too: each rank keeps its region of what it received; storage still read once
        sharded = result["once_sharded"]["ok"]
        _check_tensors(sharded, checkpoint, rank, SHARDINGS)
        assert sum(sum(files.values()) for files in sharded["bytes_read"].values()) == data_bytes


def test_own_shards_with_the_replicated_tensors_read_once(modes, checkpoint):
    full, sizes = checkpoint["full"], checkpoint["sizes"]
    replicated = [n for n in full if _expected_region(n, 0, full[n].shape, SHARDINGS) is None]
    owners = plan_owners([(n, sizes[n]) for n in replicated], WORLD)
    for rank, result in enumerate(modes):
        summary = result["own_shared"]["ok"]
        _check_tensors(summary, checkpoint, rank, SHARDINGS)
        assert summary["owners"] == owners
        expected = sum(sizes[n] for n in replicated if owners[n] == rank)
        expected += sum(
            full[n][_expected_region(n, rank, full[n].shape, SHARDINGS)].nbytes for n in full if n not in owners
        )
        assert sum(summary["bytes_read"][rank].values()) == expected
        # the regions tile the sharded tensors, so storage sees each byte once
        assert sum(sum(f.values()) for f in summary["bytes_read"].values()) == sum(sizes.values())


def test_an_open_checkpoint_and_a_selection(modes, checkpoint):
    names = ["layer_0/w", "layer_1/w"]
    for rank, result in enumerate(modes):
        summary = result["own_open"]["ok"]
        _check_tensors(summary, checkpoint, rank, SHARDINGS, names)
        assert (
            sum(summary["bytes_read"][rank].values())
            == 2 * checkpoint["full"]["layer_0/w"][split_region((10, 3000), 0, WORLD, rank)].nbytes
        )


def test_read_once_on_a_subgroup(modes, checkpoint):
    sizes = checkpoint["sizes"]
    owners = plan_owners(list(sizes.items()), 2)
    for rank in (2, 3):
        summary = modes[rank]["subgroup"]["ok"]
        assert summary["rank"] == rank - 2 and summary["world_size"] == 2 and summary["owners"] == owners
        _check_tensors(summary, checkpoint, rank, {})
        per_rank = {r: sum(files.values()) for r, files in summary["bytes_read"].items()}
        assert per_rank == {r: sum(n for name, n in sizes.items() if owners[name] == r) for r in range(2)}
    assert "subgroup" not in modes[0] and "subgroup" not in modes[1]
    for rank in (0, 1):  # a process outside the subgroup is told so at once
        error = modes[rank]["not_a_member"]["error"]
        assert error["type"] == "InvalidArgumentError" and "not a member" in error["message"], error


def test_a_restore_on_a_subgroup_leaves_the_groups_made_after_it_working(modes):
    """Only the subgroup's ranks call restore; a group every rank makes afterwards must still get
    the same name on every rank (no group made by the members alone may shift the count)."""
    assert [result["group_after_subgroup"] for result in modes] == [float(WORLD)] * WORLD


def test_an_nccl_subgroups_statuses_go_on_a_gloo_twin_made_by_its_ranks_alone(modes, checkpoint):
    for rank in (2, 3):
        summary = modes[rank]["subgroup_twin"]["ok"]
        assert summary["world_size"] == 2 and list(summary["tensors"]) == ["tiny"]
        assert summary["tensors"]["tiny"][2] == checkpoint["full"]["tiny"].tobytes()


def test_a_timeout_of_its_own_per_call_keeps_no_group_open(modes):
    assert [result["fds_after_timeouts"] for result in modes] == [0] * WORLD


def test_a_region_of_one_element_is_0_d_on_every_rank_in_both_modes(modes, checkpoint):
    full = checkpoint["full"]["dense/kernel"]
    for rank, result in enumerate(modes):
        for mode, attempt in result["int_region"].items():
            dtype, shape, data = attempt["ok"]["tensors"]["dense/kernel"]
            assert shape == () and data == full[rank, 0].tobytes(), (rank, mode)


def test_a_mesh_listed_out_of_rank_order_gives_torchs_own_placement(modes):
    for rank, result in enumerate(modes):
        assert result["mesh_permuted"] == (True, True), rank


def test_dtensors_on_a_device_mesh(modes, checkpoint):
    full = checkpoint["full"]
    for rank, result in enumerate(modes):
        assert set(result["mesh"]) == set(full)
        for name, (is_dtensor, placements, shape, local, whole) in result["mesh"].items():
            region = _expected_region(name, rank, full[name].shape, MESH_SHARDINGS)
            assert is_dtensor and shape == full[name].shape, name
            assert placements == (
                ["Replicate()"] if region is None else ["Shard(dim=0)" if name != "dense/kernel" else "Shard(dim=1)"]
            ), (name, placements)
            assert local == _region_bytes(full[name], region), (rank, name)
            assert whole == full[name].tobytes(), (rank, name)
            assert result["mesh_once"][name] == local, (rank, name)


@pytest.fixture(scope="module")
def failures(checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    owners = plan_owners(list(checkpoint["sizes"].items()), WORLD)
    bad_rank = owners["bias"]  # the rank that reads "bias" in mode "once"; every rank reads it in mode "own"
    with gpuckpt.open(checkpoint["prefix"]) as ckpt:
        entry = ckpt.index.tensors["bias"]
    damaged_dir = checkpoint["root"] / "damaged"
    damaged_dir.mkdir()
    for path in [checkpoint["prefix"] + ".index", *checkpoint["files"]]:
        shutil.copy(path, damaged_dir)
    damaged = str(damaged_dir / os.path.basename(checkpoint["prefix"]))
    data = damaged_dir / os.path.basename(checkpoint["files"][0])
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 100] ^= 0x40
    data.write_bytes(bytes(raw))
    config = {"prefix": checkpoint["prefix"], "damaged_prefix": damaged, "bad_rank": bad_rank}
    results, _ = _spawn("failures", config, tmp_path_factory.mktemp("failures"))
    return results, bad_rank


def _all_raised(results: list[dict], key: str) -> list[dict]:
    errors = []
    for rank, result in enumerate(results):
        assert "error" in result[key], (rank, key, result[key])
        error = result[key]["error"]
        assert error["type"] == "DistributedRestoreError" and error["is_checkpoint_error"], error
        errors.append(error)
    return errors


def test_a_damaged_tensor_on_one_rank_makes_every_rank_raise(failures):
    results, bad_rank = failures
    for key in ("damaged_once", "damaged_own"):
        for error in _all_raised(results, key):
            assert error["rank"] == bad_rank and error["tensor"] == "bias", error
            assert error["failures"] == [(bad_rank, "bias", "ChecksumError", error["failures"][0][3])]
            assert f"rank {bad_rank} on tensor 'bias': ChecksumError" in error["message"]


def test_memory_refused_on_one_rank_makes_every_rank_raise(failures):
    results, _ = failures
    for error in _all_raised(results, "memory"):
        assert error["rank"] == 1 and error["tensor"] == "odd/rows", error
        assert "MemoryError: injected" in error["message"]


def test_ranks_that_select_other_tensors_are_refused_together(failures):
    results, _ = failures
    for error in _all_raised(results, "other_checkpoint"):
        assert error["rank"] == 3 and "ranks [3]" in error["message"], error


def test_the_group_is_usable_after_a_reported_failure(failures, checkpoint):
    results, _ = failures
    for rank, result in enumerate(results):
        _check_tensors(result["after"]["ok"], checkpoint, rank, {})


def test_a_rank_still_reading_after_the_timeout(failures):
    results, _ = failures
    errors = _all_raised(results, "slow")
    for rank, error in enumerate(errors):
        assert "not every rank reported" in error["message"], error
        if rank != 3:  # the waiting ranks gave up after the timeout, not after the slow rank
            assert results[rank]["slow"]["seconds"] < 5.5, results[rank]["slow"]


@pytest.mark.parametrize("when", ["before", "before_with_timeout", "sharing"])
def test_a_rank_gone_makes_the_others_raise(checkpoint, tmp_path, when):
    results, elapsed = _spawn("gone", {"prefix": checkpoint["prefix"], "when": when}, tmp_path)
    assert results[3] is None
    for rank in range(3):
        error = results[rank]["gone"]["error"]
        assert error["type"] == "DistributedRestoreError", error
        if when.startswith("before"):
            assert "not every rank reported" in error["message"], error
        else:  # the collective it was in names the tensor
            assert (
                error["rank"] == rank and error["tensor"] is not None and "the transfer of tensor" in error["message"]
            ), error
        assert results[rank]["gone"]["seconds"] < 15


def test_benchmark_smoke(tmp_path):
    """benchmarks/restore_distributed.py at its smallest: 2 ranks, 4 MiB, every mode checked bit
    for bit before it is timed; read once reads the checkpoint once, every rank reading all, twice."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import restore_distributed

    out = tmp_path / "distributed.json"
    argv = ["--ranks", "2", "--size-mb", "4", "--repeat", "1", "--timeout-s", "60"]
    assert restore_distributed.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["modes"]["once"]["read_over_checkpoint"] == 1.0
    assert result["modes"]["all"]["read_over_checkpoint"] == 2.0
    assert 0.5 < result["modes"]["own"]["read_over_checkpoint"] < 2.0
    assert result["modes"]["own"]["cold_s"]["best"] > 0 and result["machine"]["cores"] >= 1


def test_import_gpuckpt_does_not_import_torch():
    code = "import gpuckpt, sys; assert 'torch' not in sys.modules and 'gpuckpt.distributed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
