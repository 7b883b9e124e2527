"""gpuckpt.jax.restore(shardings=...): global jax.Arrays laid out by a Sharding, on 8 host devices
(1-D and 2-D meshes; sharded, replicated, partially replicated; uneven shapes where JAX allows
them), each equal bit for bit to the single-process restore, each distinct shard read once (the
bytes read are the distinct regions' bytes: a replicated tensor once, not once per device), and on
two JAX processes of 4 devices each, each process reading only its own shards.

JAX takes its device count from XLA_FLAGS when its backend starts, and another test module may
have started it with one device: the cases run in fresh interpreters, this file run as a script
(``python tests/test_jax_sharding.py CASE PREFIX``) with the flag set before jax is imported.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

if __name__ == "__main__":  # a case in a fresh interpreter: 8 host devices unless told otherwise
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="gpuckpt.jax needs JAX (pip install jax)")
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
import gpuckpt.jax as gj  # noqa: E402

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
EIGHT = "--xla_force_host_platform_device_count=8"

#: (mesh shape, PartitionSpec as a tuple, distinct shards) for the bytes-read cases on WIDE
SPECS = [
    ((8,), ("x",), 8),
    ((8,), (None, "x"), 8),
    ((8,), (), 1),  # replicated on all 8
    ((2, 4), ("x", "y"), 8),
    ((2, 4), ("y", "x"), 8),
    ((2, 4), ("x",), 2),  # a 2-way split replicated 4 ways
    ((2, 4), (None, "y"), 4),  # a 4-way split replicated 2 ways
    ((2, 4), (("x", "y"),), 8),
    ((2, 4), (None, ("y", "x")), 8),
    ((4, 2), ("y", None), 2),
    ((2, 4), (), 1),
]


def _tensors() -> dict[str, object]:
    rng = np.random.default_rng(12)
    whole = rng.standard_normal((8, 16)).astype(np.float32)
    parts = [((slice(0, 3), slice(None)), whole[:3]), ((slice(3, 8), slice(None)), whole[3:])]
    int4 = ml_dtypes.int4
    return {
        # rows of 64 KiB: a column shard is one run per row, so no read spans more than its region
        "wide": rng.standard_normal((8, 16384)).astype(np.float32),
        "narrow": rng.standard_normal((8, 12)).astype(np.float32),  # small rows: the reader spans
        "odd": rng.standard_normal((6, 10)).astype(np.float32),
        "scalar": np.float32(2.5),
        "bf16": rng.standard_normal((8, 64)).astype(ml_dtypes.bfloat16),
        "int4": rng.integers(-8, 8, (8, 16)).astype(int4),
        "f64": rng.standard_normal((8, 16)),
        "i64": rng.integers(-(2**62), 2**62, (4, 8)),
        "parts": gpuckpt.Partitioned((8, 16), parts),
        "words": np.array([b"a", b"b"], dtype=object),
        "step": np.int64(7),
    }


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return gpuckpt.save(str(tmp_path_factory.mktemp("sharding") / "ckpt"), _tensors())


def _run(case: str, prefix: str, *extra: str, flags: str = EIGHT, timeout: float = 240) -> str:
    env = dict(os.environ, XLA_FLAGS=flags)
    done = subprocess.run(
        [sys.executable, HERE, case, prefix, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{case}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- the cases, each run in its own interpreter -----------------------------------------------------


def _mesh(shape: tuple[int, ...]):
    from jax.sharding import Mesh

    names = ("x", "y")[: len(shape)]
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _named(mesh_shape: tuple[int, ...], spec: tuple) -> object:
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(_mesh(mesh_shape), PartitionSpec(*spec))


def _total(ckpt: gpuckpt.Checkpoint) -> int:
    return sum(ckpt.bytes_read().values())


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(d) for s, d in zip(index, shape, strict=True))


def _check_global(array, sharding, reference: np.ndarray, name: str) -> None:
    """The global array is laid out as asked and equals the reference bit for bit, shard by shard."""
    assert isinstance(array, jax.Array), name
    assert array.sharding == sharding, (name, array.sharding, sharding)
    assert array.shape == reference.shape and array.dtype == reference.dtype, (name, array.dtype, reference.dtype)
    assert {s.device for s in array.addressable_shards} == set(sharding.addressable_devices), name
    for shard in array.addressable_shards:
        assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(reference[shard.index]).tobytes(), name
    if array.is_fully_addressable:
        assert np.asarray(array).tobytes() == reference.tobytes(), name


def case_specs(prefix: str) -> None:
    """Every spec of SPECS on WIDE: the layout asked, the single-process bits, each distinct shard
    once on the host (bytes read == the distinct regions' bytes == the tensor's bytes on one
    process, in one verified read of the whole it tiles); the replicas of a region alias its host
    buffer on CPU devices (as jax.device_put does), and are device copies of it on devices with
    memory of their own (CPU devices taken for such here, the GPU path)."""
    with gpuckpt.open(prefix) as ckpt:
        reference = ckpt.get_tensor("wide")
    filled: list[int] = []  # the host buffers of the regions
    reads: list[tuple] = []  # the regions read
    host_shards, read_region = gj._host_shards, gj._read_region

    def spy_shards(*args, **kwargs):
        for group, array in host_shards(*args, **kwargs):
            filled.append(array.ctypes.data)
            yield group, array

    def spy_read(ckpt, plan, region, *args, **kwargs):
        reads.append(region)
        return read_region(ckpt, plan, region, *args, **kwargs)

    gj._host_shards, gj._read_region = spy_shards, spy_read
    for own_memory in (False, True):
        gj._shares_host_memory = (lambda device: False) if own_memory else (lambda device: True)
        for mesh_shape, spec, distinct in SPECS:
            sharding = _named(mesh_shape, spec)
            filled.clear()
            reads.clear()
            with gpuckpt.open(prefix) as ckpt:
                array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding})["wide"]
                read = _total(ckpt)
            where = (mesh_shape, spec, "device copies" if own_memory else "aliased")
            _check_global(array, sharding, reference, str(where))
            regions = {_bounds(s.index, reference.shape) for s in array.addressable_shards}
            assert len(regions) == distinct, where
            region_bytes = sum(reference[tuple(slice(*b) for b in r)].nbytes for r in regions)
            assert read == region_bytes == reference.nbytes, (where, read, region_bytes)
            assert reads == [(slice(0, 8, 1), slice(0, 16384, 1))], where  # one read: the whole, verified
            pointers = [s.data.unsafe_buffer_pointer() for s in array.addressable_shards]
            assert len(filled) == distinct, where  # each region once on the host
            if own_memory:  # each device its own buffer, the first of each region the host's
                assert len(set(pointers)) == len(pointers) and set(filled) <= set(pointers), where
            else:  # every shard is its region's host buffer
                assert set(pointers) == set(filled), where
            print(where, "shards", len(pointers), "distinct", distinct, "bytes read", read)


def case_small_rows(prefix: str) -> None:
    """Column shards of a tensor with small rows: read by itself, each region would read across
    the rows' gaps (one read beats many small ones, the region reader's cost model), more than
    its bytes; the shards of one process tile a box (here the whole tensor), read once, verified,
    and cut on the host: exactly the tensor's bytes."""
    for mesh_shape, spec in [((2, 4), (None, "y")), ((4, 2), (None, "x")), ((2, 4), ("x", "y"))]:
        sharding = _named(mesh_shape, spec)
        with gpuckpt.open(prefix) as ckpt:
            reference = ckpt.get_tensor("narrow")
        with gpuckpt.open(prefix) as ckpt:
            array = gj.restore(ckpt, ["narrow"], shardings={"narrow": sharding})["narrow"]
            read = _total(ckpt)
        _check_global(array, sharding, reference, str(spec))
        alone = 0
        for bounds in {_bounds(s.index, reference.shape) for s in array.addressable_shards}:
            with gpuckpt.open(prefix) as ckpt:
                ckpt.restore(["narrow"], regions={"narrow": tuple(slice(*b) for b in bounds)})
                alone += _total(ckpt)
        assert read == reference.nbytes < alone, (spec, read, alone)
        print(spec, "bytes read", read, "tensor", reference.nbytes, "each region by itself", alone)


def case_kinds(prefix: str) -> None:
    """Uneven shapes JAX allows (a split axis that divides, the others any size), scalars,
    partitioned tensors, bfloat16 and int4, dtype= conversion, names without a sharding restored
    as today, exact names before regexes, None to opt out; uneven splits refused before a read."""
    import jax.numpy as jnp  # noqa: F401 - the int4 shards need jnp's types registered

    rows2 = _named((2, 4), ("x",))
    grid = _named((2, 4), ("x", "y"))
    cols = _named((8,), (None, "x"))
    replicated = _named((2, 4), ())
    with gpuckpt.open(prefix) as ckpt:
        names = ["odd", "scalar", "parts", "bf16", "int4", "narrow", "wide"]
        reference = ckpt.restore(names)
        shardings = {"odd": rows2, "scalar": replicated, "parts": grid, "int4": cols, "b.*": cols, "narrow": None}
        arrays = gj.restore(ckpt, names, shardings=shardings, device="cpu")
        assert list(arrays) == names
        for name, sharding in [("odd", rows2), ("scalar", replicated), ("parts", grid), ("bf16", cols), ("int4", cols)]:
            _check_global(arrays[name], sharding, reference[name], name)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[5])
        _check_global(gj.get_tensor(ckpt, "odd", sharding=one), one, reference["odd"], "odd on device 5")
        _check_global(gj.get_tensor(ckpt, "odd", sharding=rows2), rows2, reference["odd"], "odd by get_tensor")
        for name in ("narrow", "wide"):  # no sharding: today's restore, on the default device
            assert arrays[name].devices() == {jax.devices("cpu")[0]}, name
            assert np.asarray(arrays[name]).tobytes() == reference[name].tobytes(), name

        converted = gj.restore(ckpt, ["wide", "bf16"], shardings={".*": grid}, dtype="bfloat16")
        for name in ("wide", "bf16"):
            _check_global(converted[name], grid, ckpt.get_tensor(name, dtype="bfloat16"), name)
        nested = gj.restore_tree(ckpt, ["wide", "scalar"], shardings={"wide": grid})
        _check_global(nested["wide"], grid, reference["wide"], "restore_tree")
        halves = gj.restore(ckpt, ["f64"], shardings={"f64": rows2}, dtype="float32")["f64"]
        _check_global(halves, rows2, ckpt.get_tensor("f64", dtype="float32"), "f64")

        refusals = [
            ({"odd": _named((2, 4), ("y",))}, gpuckpt.InvalidArgumentError, "odd"),  # 6 rows, 4 ways
            ({"odd": _named((2, 4), ("x", None, None))}, gpuckpt.InvalidArgumentError, "odd"),  # rank 3
            ({"odd": "not a sharding"}, gpuckpt.InvalidArgumentError, "odd"),
            ({"(": rows2}, gpuckpt.InvalidArgumentError, "regular expression"),
        ]
        for shardings, error, words in refusals:
            start = _total(ckpt)
            try:
                gj.restore(ckpt, ["wide", "odd"], shardings=shardings)
            except error as exc:
                assert words in str(exc), (shardings, exc)
            else:
                raise AssertionError(f"{shardings} was accepted")
            assert _total(ckpt) == start, shardings  # refused before anything was read
        for name, words in [("f64", "jax_enable_x64"), ("words", "string")]:
            start = _total(ckpt)
            try:
                gj.restore(ckpt, [name], shardings={name: replicated})
            except gpuckpt.UnsupportedError as exc:
                assert words in str(exc) and repr(name) in str(exc), exc
            else:
                raise AssertionError(f"{name} was accepted")
            assert _total(ckpt) == start, name
    print("kinds ok")


def case_damaged(prefix: str, copy: str) -> None:
    """A flipped byte in WIDE (in ``copy``, a copy of the checkpoint): the one read of the whole
    a process's shards tile is verified, so every sharded restore of it raises ChecksumError
    naming the tensor; ``verify=False`` reads it, the flipped element in the global array."""
    import glob
    import shutil

    for path in glob.glob(prefix + ".*"):
        shutil.copy(path, copy + path[len(prefix) :])
    with gpuckpt.open(copy) as ckpt:
        entry = ckpt.index.tensors["wide"]
        reference = ckpt.get_tensor("narrow")  # other tensors are still fine
        data = ckpt.data_files()[entry.shard_id]
    with open(data, "r+b") as f:
        f.seek(entry.offset + 5 * 16384 * 4 + 7)  # row 5, element 1
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with gpuckpt.open(prefix) as ckpt:
        good = ckpt.get_tensor("wide")
    for mesh_shape, spec in [((2, 4), ("x", "y")), ((8,), ()), ((2, 4), (None, "y"))]:
        sharding = _named(mesh_shape, spec)
        with gpuckpt.open(copy) as ckpt:
            try:
                gj.restore(ckpt, ["wide", "narrow"], shardings={".*": sharding})
            except gpuckpt.ChecksumError as exc:
                assert "'wide'" in str(exc), exc
            else:
                raise AssertionError(f"{spec}: the flipped byte was not noticed")
            array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding}, verify=False)["wide"]
            values = np.asarray(array)
            assert (values != good).sum() == 1 and values[5, 1] != good[5, 1], spec
            _check_global(gj.get_tensor(ckpt, "narrow", sharding=sharding), sharding, reference, "narrow")
    print("damaged ok")


def case_x64(prefix: str) -> None:
    """64-bit types under jax_enable_x64, sharded and replicated."""
    jax.config.update("jax_enable_x64", True)
    with gpuckpt.open(prefix) as ckpt:
        reference = ckpt.restore(["f64", "i64", "step"])
        shardings = {"f64": _named((2, 4), ("x", "y")), "i64": _named((2, 4), (None, "y")), "step": _named((8,), ())}
        arrays = gj.restore(ckpt, list(reference), shardings=shardings)
        for name, sharding in shardings.items():
            _check_global(arrays[name], sharding, reference[name], name)
    print("x64 ok")


def case_property(prefix: str) -> None:
    """Random meshes, specs and regions of WIDE's leading rows: the global array equals numpy's
    and the bytes read are the distinct regions' bytes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    with gpuckpt.open(prefix) as ckpt:
        full = ckpt.get_tensor("wide")

    @st.composite
    def layouts(draw):
        mesh_shape = draw(st.sampled_from([(8,), (2, 4), (4, 2), (1, 8), (2, 2), (4,)]))
        axes = ["x", "y"][: len(mesh_shape)]
        spec = []
        for _ in range(2):
            left = [a for a in axes if a not in [x for s in spec if s for x in (s if isinstance(s, tuple) else (s,))]]
            choice = draw(st.sampled_from([None, *left, *([tuple(left)] if len(left) == 2 else [])]))
            spec.append(choice)
        while spec and spec[-1] is None and draw(st.booleans()):
            spec.pop()
        return mesh_shape, tuple(spec)

    @settings(max_examples=40, deadline=None, database=None)
    @given(layouts())
    def check(layout):
        mesh_shape, spec = layout
        sharding = _named(mesh_shape, spec)
        with gpuckpt.open(prefix) as ckpt:
            array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding})["wide"]
            read = _total(ckpt)
        _check_global(array, sharding, full, str(layout))
        regions = {_bounds(s.index, full.shape) for s in array.addressable_shards}
        assert read == sum(full[tuple(slice(*b) for b in r)].nbytes for r in regions), layout

    check()
    print("property ok")


def case_process(prefix: str, process: str, port: str) -> None:
    """One of two JAX processes of 4 CPU devices each, on one global 2x4 mesh: each reads only
    the shards its devices hold."""
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=int(process), initialization_timeout=120
    )
    try:
        assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
        with gpuckpt.open(prefix) as ckpt:
            reference = ckpt.get_tensor("wide")
        for spec, fraction in [(("x", "y"), 2), (("x",), 2), ((None, ("x", "y")), 2), ((), 1), (("y",), 1)]:
            sharding = _named((2, 4), spec)
            with gpuckpt.open(prefix) as ckpt:
                array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding})["wide"]
                read = _total(ckpt)
            assert not array.is_fully_addressable, spec
            _check_global(array, sharding, reference, str(spec))
            regions = {_bounds(s.index, reference.shape) for s in array.addressable_shards}
            region_bytes = sum(reference[tuple(slice(*b) for b in r)].nbytes for r in regions)
            assert read == region_bytes == reference.nbytes // fraction, (spec, read, region_bytes)
            print("process", process, spec, "bytes read", read, "of", reference.nbytes)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        by_process = [[d for d in jax.devices() if d.process_index == p] for p in (0, 1)]
        interleaved = [d for pair in zip(*by_process, strict=True) for d in pair]
        sharding = NamedSharding(Mesh(np.array(interleaved), ("x",)), PartitionSpec("x"))
        with gpuckpt.open(prefix) as ckpt:  # every other row: no box, each region by itself
            array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding})["wide"]
            read = _total(ckpt)
        _check_global(array, sharding, reference, "interleaved")
        rows = sorted(s.index[0].start for s in array.addressable_shards)
        assert rows == list(range(int(process), 8, 2)) and read == reference.nbytes // 2, (rows, read)
        print("process", process, "every other row: bytes read", read)
        first = _mesh((2, 2))  # the first process's devices only: the second holds no shard
        sharding = _named((2, 2), ("x", "y"))
        assert set(first.devices.flat) == set(jax.devices()[:4])
        with gpuckpt.open(prefix) as ckpt:
            array = gj.restore(ckpt, ["wide"], shardings={"wide": sharding})["wide"]
            read = _total(ckpt)
        assert array.shape == reference.shape and array.dtype == reference.dtype
        assert read == (reference.nbytes if process == "0" else 0), (process, read)
        assert len(array.addressable_shards) == (4 if process == "0" else 0)
        _check_global(array, sharding, reference, "first process only")
        print("process", process, "on the first process's devices: bytes read", read)
    finally:
        jax.distributed.shutdown()


# -- the tests ---------------------------------------------------------------------------------------


def test_meshes_specs_and_each_distinct_shard_read_once(prefix):
    out = _run("case_specs", prefix)
    assert out.count("bytes read") == 2 * len(SPECS)


def test_small_rows_read_once_as_the_box_the_shards_tile(prefix):
    _run("case_small_rows", prefix)


def test_shapes_dtypes_defaults_and_refusals(prefix):
    _run("case_kinds", prefix)


def test_a_damaged_tensor_is_noticed_by_its_sharded_restore(prefix, tmp_path):
    _run("case_damaged", prefix, str(tmp_path / "damaged"))


def test_64_bit_types_sharded_with_x64(prefix):
    _run("case_x64", prefix)


def test_random_layouts_equal_numpy_and_read_their_regions_once(prefix):
    _run("case_property", prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_each_read_only_their_shards(prefix):
    port = str(_free_port())
    flags = "--xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags)
    command = [sys.executable, HERE, "case_process", prefix]
    workers = [
        subprocess.Popen(
            [*command, str(p), port], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for p in (0, 1)
    ]
    try:
        results = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (out, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, f"{out}\n{err}"
        assert out.count("bytes read") == 7, out


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
