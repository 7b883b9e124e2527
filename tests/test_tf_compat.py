"""The drop-in API (``gpuckpt.load_checkpoint``, ``CheckpointReader``, ``list_variables``,
``latest_checkpoint``) against TensorFlow's own reader, on checkpoints TensorFlow wrote: the gaps
TensorFlow's reader tests found (dtype maps, ``file://`` URIs, assignment maps, V1 checkpoints,
``debug_string``, ``ckpt[name]``, string slices)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import FIXTURE_PREFIXES, assert_bit_exact, fixture_path, tf_or_skip

import gpuckpt
from gpuckpt.dtypes import DataType


def _tf2_checkpoint(tf, prefix):
    """A TF2 checkpoint holding a DT_VARIANT tensor (a dataset iterator's state), strings of
    every rank up to 3, an empty tensor and a scalar."""
    iterator = iter(tf.data.Dataset.range(10))
    next(iterator)
    words = np.array([b"", b"a", b"bb", b"ccc" * 50, b"\x00\xff", b"x" * 300], dtype=object)
    checkpoint = tf.train.Checkpoint(
        it=iterator,
        w=tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
        s0=tf.Variable(b"hello"),
        s1=tf.Variable(words),
        s2=tf.Variable(words.reshape(2, 3)),
        s3=tf.Variable(np.concatenate([words, words[::-1]]).reshape(2, 3, 2)),
        empty=tf.Variable(np.zeros((0, 4), np.float16)),
        step=tf.Variable(np.int64(7)),
    )
    return checkpoint.write(prefix)


@pytest.fixture(scope="module")
def tf2_prefix(tmp_path_factory):
    tf = tf_or_skip()
    return _tf2_checkpoint(tf, str(tmp_path_factory.mktemp("tf2") / "model"))


def _v(name):
    return f"{name}/.ATTRIBUTES/VARIABLE_VALUE"


# -- get_variable_to_dtype_map ----------------------------------------------------------------------


@pytest.mark.tf
def test_dtype_map_names_variant_like_tensorflow(tf2_prefix):
    tf = tf_or_skip()
    theirs = tf.train.load_checkpoint(tf2_prefix).get_variable_to_dtype_map()
    with gpuckpt.load_checkpoint(tf2_prefix) as reader:
        ours = reader.get_variable_to_dtype_map()
    assert sorted(ours) == sorted(theirs)
    assert theirs["it/.ATTRIBUTES/ITERATOR_STATE"] == tf.variant
    for name, dtype in ours.items():
        assert dtype.name == theirs[name].name, name
        assert dtype == theirs[name] and theirs[name] == dtype and not dtype != theirs[name], name
        assert hash(dtype) == hash(theirs[name]), name
        assert dtype.as_datatype_enum == theirs[name].as_datatype_enum, name
        assert str(dtype) == str(theirs[name]), name
        if theirs[name] != tf.variant:
            assert dtype.as_numpy_dtype == theirs[name].as_numpy_dtype, name
            assert dtype == theirs[name].as_numpy_dtype and dtype == np.dtype(theirs[name].as_numpy_dtype), name
    with pytest.raises(gpuckpt.UnsupportedError, match="variant"):
        _ = ours["it/.ATTRIBUTES/ITERATOR_STATE"].as_numpy_dtype


@pytest.mark.tf
def test_dtype_map_names_resource_like_tensorflow(tmp_path):
    """No saver writes DT_RESOURCE, but an index may name it: TF lists it as ``tf.resource``."""
    tf = tf_or_skip()
    bundle = make_bundle({"r": np.zeros(3, np.int8), "w": np.ones(2, np.float32)})
    bundle.entries[b"r"].dtype = DataType.DT_RESOURCE
    prefix = bundle.write(str(tmp_path / "resource"))
    theirs = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    ours = gpuckpt.load_checkpoint(prefix).get_variable_to_dtype_map()
    assert theirs["r"] == tf.resource
    assert ours["r"].name == "resource" and ours["r"] == theirs["r"] and ours["r"] == "resource"
    assert ours["w"] == np.float32 and ours["w"] == "float32" and ours["w"] == theirs["w"]


def _probes(tf):
    import ml_dtypes

    numpy_types = [
        np.float16, np.float32, np.float64, np.longdouble, np.int8, np.int16, np.int32, np.int64, np.uint8,
        np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128, np.object_, np.bytes_, np.str_,
        np.longlong, np.ulonglong, np.intc, np.datetime64, np.void,
        ml_dtypes.bfloat16, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e5m2fnuz, ml_dtypes.int4, ml_dtypes.uint4,
        ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.float4_e2m1fn,
    ]  # fmt: skip
    probes = list(numpy_types) + [np.dtype(t) for t in numpy_types]
    probes += [np.dtype(">f4"), np.dtype("S5"), np.dtype("U3"), np.dtype([("x", "i1")])]
    probes += [np.dtype([(q, f)]) for q, f in [("qint8", "i1"), ("quint8", "u1"), ("qint16", "<i2"),
                                               ("quint16", "<u2"), ("qint32", "<i4"), ("qint8", "u1")]]  # fmt: skip
    names = [tf.as_dtype(v).name for v in list(range(1, 34))]
    probes += names + [n + "_ref" for n in names] + ["half", "float", "double", "DT_FLOAT", "f4", "tf.float32", ""]
    probes += list(range(0, 36)) + [101, 120, 121, 133, 1.0, 2.5, True, False, np.int64(3), np.float32(2.0)]
    probes += [np.float32(0.5), np.array([1.5], np.float32), np.array([1], np.int8), np.zeros((), object)]
    probes += [None, object(), object, float, bool, int, str, bytes, complex]
    probes += [tf.as_dtype(v) for v in range(1, 34)] + [tf.float32._as_ref]
    return probes


@pytest.mark.tf
def test_dtype_equality_and_hash_as_tf_dtype():
    """For every type a checkpoint can hold, ``==``/``!=``/``hash`` agree with ``tf.DType`` against
    every kind of value ``tf.as_dtype`` takes (and some it refuses)."""
    tf = tf_or_skip()
    from gpuckpt.compat import DType

    probes = _probes(tf)
    for value in range(1, 34):
        ours, theirs = DType(value), tf.as_dtype(value)
        assert ours.name == theirs.name and ours.as_datatype_enum == theirs.as_datatype_enum
        for attribute in ("is_floating", "is_integer", "is_complex", "is_bool", "is_quantized", "is_unsigned"):
            assert getattr(ours, attribute) == getattr(theirs, attribute), (theirs, attribute)
        assert ours.size == theirs.size and ours.is_numpy_compatible == theirs.is_numpy_compatible, theirs
        assert ours.base_dtype is ours and str(ours) == str(theirs)
        if value in gpuckpt.dtypes.DTYPES:
            assert ours == gpuckpt.dtypes.DTYPES[value]  # what the map gave before
        assert hash(ours) == hash(theirs) == value
        assert DType(value) is ours and pickle.loads(pickle.dumps(ours)) is ours
        assert {theirs: 1}[ours] == 1 and {ours: 1}[theirs] == 1 and {ours: 1}[value] == 1
        for probe in probes:
            assert (ours == probe) == (theirs == probe), (theirs, probe)
            assert (ours != probe) == (theirs != probe), (theirs, probe)
            assert (probe == ours) == (probe == theirs), (probe, theirs)
        if value in gpuckpt.dtypes.DTYPES:
            assert ours.as_numpy_dtype == gpuckpt.dtypes.DTYPES[value].as_numpy_dtype  # as before
            if not theirs.is_quantized:
                assert ours.as_numpy_dtype == theirs.as_numpy_dtype


def test_dtype_map_and_names_never_import_ml_dtypes():
    """Listing dtypes, their names and comparing them needs no ml_dtypes (``import gpuckpt`` does
    not import it); only asking for a type it holds does."""
    code = (
        "import sys, numpy as np, gpuckpt\n"
        f"reader = gpuckpt.load_checkpoint({fixture_path('raw/all_dtypes')!r})\n"
        "dtypes = reader.get_variable_to_dtype_map()\n"
        "assert dtypes['bfloat16'].name == 'bfloat16' and dtypes['bfloat16'] == 'bfloat16'\n"
        "assert dtypes['float32'] == np.float32 and dtypes['bfloat16'] != np.float32 and reader.debug_string()\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        "assert dtypes['bfloat16'].as_numpy_dtype.__name__ == 'bfloat16'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- file:// URIs and other schemes -----------------------------------------------------------------


@pytest.mark.tf
def test_file_uris_read_like_tensorflow(tmp_path):
    tf = tf_or_skip()
    run = tmp_path / "run"
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])), str(run), max_to_keep=2)
    prefix = manager.save()
    for uri in (f"file://{prefix}", f"file://{run}", f"file://localhost{prefix}"):
        expected = tf.train.list_variables(uri)
        assert gpuckpt.list_variables(uri) == expected, uri
        with gpuckpt.load_checkpoint(uri) as reader:
            theirs = tf.train.load_checkpoint(uri)
            assert reader.get_variable_to_shape_map() == theirs.get_variable_to_shape_map()
            assert_bit_exact(reader.get_tensor(_v("v")), theirs.get_tensor(_v("v")))
        with gpuckpt.open(uri) as ckpt:
            assert ckpt.prefix == prefix
    for directory in (f"file://{run}", f"file://localhost{run}", f"file://{tmp_path}"):
        assert gpuckpt.latest_checkpoint(directory) == tf.train.latest_checkpoint(directory), directory
    assert gpuckpt.latest_checkpoint(f"file://{run}") == f"file://{prefix}"


@pytest.mark.parametrize("uri", ["gs://bucket/train/ckpt-1", "s3://bucket/ckpt", "hdfs://namenode/ckpt", "HTTP://x/y"])
def test_other_uri_schemes_are_named_unsupported(uri):
    """TF fails on these here too (no network or no file system for the scheme); gpuckpt says
    at once that it reads local files only, naming the path."""
    for call in (gpuckpt.open, gpuckpt.load_checkpoint, gpuckpt.list_variables, gpuckpt.latest_checkpoint):
        with pytest.raises(gpuckpt.UnsupportedError, match="local files only") as caught:
            call(uri)
        assert uri in str(caught.value)


def test_file_uri_with_a_host_is_refused(tmp_path):
    with pytest.raises(gpuckpt.UnsupportedError, match="did you mean") as caught:
        gpuckpt.open(f"file://tmp{tmp_path}/ckpt")
    assert f"file://tmp{tmp_path}/ckpt" in str(caught.value)


# -- assignment maps ----------------------------------------------------------------------------------


@pytest.mark.tf
def test_assignment_map_name_to_scope_refused_as_tensorflow_does(tmp_path):
    tf = tf_or_skip()
    v1 = tf.compat.v1
    prefix = str(tmp_path / "model.ckpt")
    graph = tf.Graph()
    with graph.as_default():
        v1.get_variable("var1", initializer=np.ones(3, np.float32))
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            saver.save(session, prefix)
    for old in ("var1", "absent"):
        graph = tf.Graph()
        with graph.as_default():
            v1.get_variable("scope/var1", shape=[3])
            with pytest.raises(ValueError, match="should map to scope only"):
                v1.train.init_from_checkpoint(prefix, {old: "scope/"})
        sources = [(prefix, {old: "scope/"})]
        for call, args in ((gpuckpt.restore_many, (sources,)), (gpuckpt.merge, (str(tmp_path / "out" / "m"), sources))):
            with pytest.raises(gpuckpt.InvalidArgumentError, match="to a scope.*scope only") as caught:
                call(*args)
            assert isinstance(caught.value, ValueError) and repr(old) in str(caught.value)
    assert not os.path.exists(tmp_path / "out" / "m.index")
    # The maps TF accepts still work, and give TF's values.
    assert list(gpuckpt.restore_many([(prefix, {"var1": "scope/var1"})])) == ["scope/var1"]
    assert list(gpuckpt.restore_many([(prefix, {"/": "scope/"})])) == ["scope/var1"]


# -- V1 checkpoints -----------------------------------------------------------------------------------


def _save_v1(tf, directory, sharded):
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.get_variable("a", initializer=np.arange(6, dtype=np.float32).reshape(2, 3))
        v1.get_variable("b", initializer=np.int64(7))
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V1, sharded=sharded)
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            return saver.save(session, os.path.join(directory, "model.ckpt"), global_step=3)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.tf
def test_v1_checkpoint_is_named_unsupported(tmp_path, sharded):
    tf = tf_or_skip()
    saved = _save_v1(tf, str(tmp_path), sharded)
    files = sorted(os.listdir(tmp_path))
    assert not any(f.endswith(".index") for f in files)  # V1: the prefix (or its shards) is the table
    table = str(tmp_path / ("model.ckpt-3-00000-of-00001" if sharded else "model.ckpt-3"))
    assert os.path.basename(table) in files
    assert tf.train.load_checkpoint(str(tmp_path)).get_variable_to_shape_map() == {"a": [2, 3], "b": []}
    assert gpuckpt.latest_checkpoint(tmp_path) == tf.train.latest_checkpoint(str(tmp_path)) == saved
    for path in (saved, str(tmp_path), f"file://{tmp_path}", str(tmp_path / "model.ckpt-3")):
        for call in (gpuckpt.open, gpuckpt.load_checkpoint, gpuckpt.list_variables):
            with pytest.raises(gpuckpt.UnsupportedError, match="V1 checkpoint") as caught:
                call(path)
            assert not isinstance(caught.value, FileNotFoundError)
            assert table in str(caught.value), (path, str(caught.value))


def test_a_file_that_is_not_a_table_is_still_not_found(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(gpuckpt.CheckpointNotFoundError):
        gpuckpt.open(tmp_path / "model.ckpt")


# -- debug_string -------------------------------------------------------------------------------------


@pytest.mark.tf
def test_debug_string_as_tensorflow(tf2_prefix):
    tf = tf_or_skip()
    prefixes = [tf2_prefix] + [fixture_path(p) for p in FIXTURE_PREFIXES]
    for prefix in prefixes:
        theirs = tf.train.load_checkpoint(prefix).debug_string()
        with gpuckpt.load_checkpoint(prefix) as reader:
            assert reader.debug_string() == theirs, prefix
    # A partitioned variable: listed as TF lists it, by its slices' raw keys, not by its name.
    theirs = tf.train.load_checkpoint(fixture_path("tf1_partitioned/model.ckpt-3")).debug_string()
    assert b"\x00pv\x00\x01\x01\x02\x80\x84\x80\x83 (DT_FLOAT) [4,3]\n" in theirs
    assert not any(line.startswith(b"pv ") for line in theirs.splitlines())


@pytest.mark.tf
def test_debug_string_of_an_unknown_dtype_as_tensorflow(tmp_path):
    """A future dtype this reader does not know: TF prints an empty enum name; the dtype map
    still names it (TF's raises TypeError there)."""
    tf = tf_or_skip()
    bundle = make_bundle({"u": np.zeros(3, np.int8), "w": np.ones(2, np.float32)})
    bundle.entries[b"u"].dtype = 77
    prefix = bundle.write(str(tmp_path / "unknown"))
    with gpuckpt.load_checkpoint(prefix) as reader:
        assert (
            reader.debug_string() == tf.train.load_checkpoint(prefix).debug_string() == b"u () [3]\nw (DT_FLOAT) [2]\n"
        )
        assert "77" in reader.get_variable_to_dtype_map()["u"].name


@pytest.mark.tf
def test_debug_string_lines(tf2_prefix):
    with gpuckpt.load_checkpoint(tf2_prefix) as reader:
        lines = reader.debug_string().decode().splitlines()
    assert lines == sorted(lines)  # no partitioned tensors here: key order is name order
    assert "it/.ATTRIBUTES/ITERATOR_STATE (DT_VARIANT) [3]" in lines
    assert f"{_v('empty')} (DT_HALF) [0,4]" in lines and f"{_v('step')} (DT_INT64) []" in lines


# -- ckpt[name] ---------------------------------------------------------------------------------------


@pytest.mark.tf
def test_getitem_is_get_tensor(tf2_prefix):
    tf = tf_or_skip()
    reader = tf.train.load_checkpoint(tf2_prefix)
    with gpuckpt.open(tf2_prefix) as ckpt:
        for name in ckpt.keys():
            if name.startswith("it/"):
                with pytest.raises(gpuckpt.UnsupportedError):
                    ckpt[name]
                continue
            assert_bit_exact(ckpt[name], reader.get_tensor(name), name)
            assert_bit_exact(ckpt[name], ckpt.get_tensor(name), name)
        with pytest.raises(KeyError):
            ckpt["no/such/tensor"]


# -- string slices ------------------------------------------------------------------------------------

STRING_KEYS = {
    0: [(), ...],
    1: [0, -1, 5, slice(None), slice(1, 4), slice(None, None, -2), slice(4, 1, -1), slice(3, 3), ...],
    2: [0, (1, 2), (-1, slice(None)), (slice(None), 1), (slice(None, None, -1), slice(0, 3, 2)), (..., 0), ...],
    3: [1, (0, 2, 1), (1, ..., 0), (slice(None), 1, slice(None)), (slice(0, 2), slice(None, None, -1), 1), ...],
}


@pytest.mark.parametrize("rank", sorted(STRING_KEYS))
@pytest.mark.tf
def test_string_slices_of_every_rank(tf2_prefix, rank):
    """``get_slice`` of a string tensor gives object arrays of ``bytes`` (0-d for one element), as
    ``get_tensor`` does, equal to TF's tensor indexed the same way."""
    tf = tf_or_skip()
    name = _v(f"s{rank}")
    full = tf.train.load_checkpoint(tf2_prefix).get_tensor(name)
    full = np.array(full, dtype=object) if isinstance(full, bytes) else full
    assert full.ndim == rank
    with gpuckpt.open(tf2_prefix) as ckpt:
        lazy = ckpt.get_slice(name)
        assert lazy.dtype == object and lazy.shape == full.shape
        for key in STRING_KEYS[rank]:
            expected = full[key]
            expected = expected if isinstance(expected, np.ndarray) else np.array(expected, dtype=object)
            got = lazy[key]
            assert_bit_exact(got, expected, f"{name}[{key!r}]")
            assert got.base is None  # owns its memory, not a view of the whole tensor
        with pytest.raises(IndexError):
            lazy[(0,) * (rank + 1)]


# -- DT_VARIANT: checked, never decoded ---------------------------------------------------------------

_ITERATOR = "it/.ATTRIBUTES/ITERATOR_STATE"


def _copy_checkpoint(prefix, into):
    os.makedirs(into)
    for name in os.listdir(os.path.dirname(prefix)):
        if name.startswith(os.path.basename(prefix) + "."):
            with open(os.path.join(os.path.dirname(prefix), name), "rb") as f:
                data = f.read()
            with open(os.path.join(into, name), "wb") as f:
                f.write(data)
    return os.path.join(into, os.path.basename(prefix))


@pytest.mark.tf
def test_verify_checks_the_variant_tensor_tensorflow_wrote(tf2_prefix, tmp_path, capsys):
    """An intact dataset-iterator state is verified (its element and entry checksums), not
    reported damaged; a flipped byte inside it is damage, named, and only there."""
    from gpuckpt.cli import main

    assert main(["--quiet", "verify", tf2_prefix]) == 0
    assert "all 9 tensors verified" in capsys.readouterr().out
    copy = _copy_checkpoint(tf2_prefix, str(tmp_path / "copy"))
    with gpuckpt.open(copy) as ckpt:
        entry = ckpt.index.tensors[_ITERATOR]
        data_file = ckpt.data_files()[entry.shard_id]
    with open(data_file, "r+b") as f:
        f.seek(entry.offset + entry.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))
    assert main(["--quiet", "verify", copy]) == 3
    captured = capsys.readouterr()
    assert f"1 of 9 tensors damaged: {_ITERATOR}" in captured.out
    assert f"DAMAGED {_ITERATOR}: variant element" in captured.err


@pytest.mark.tf
def test_merge_carries_a_variant_tensor_byte_for_byte(tf2_prefix, tmp_path):
    tf = tf_or_skip()
    from gpuckpt.cli import main

    out = str(tmp_path / "merged" / "model")
    assert main(["merge", out, tf2_prefix]) == 0
    with gpuckpt.open(tf2_prefix) as source, gpuckpt.open(out) as merged:
        theirs, ours = source.index.tensors[_ITERATOR], merged.index.tensors[_ITERATOR]
        assert merged.read_raw(ours) == source.read_raw(theirs)
        assert (ours.dtype, ours.shape, ours.masked_crc32c) == (theirs.dtype, theirs.shape, theirs.masked_crc32c)
    assert tf.train.load_checkpoint(out).get_variable_to_dtype_map()[_ITERATOR] == tf.variant
