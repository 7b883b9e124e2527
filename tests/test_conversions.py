"""``dtype=`` on the host: the project's conversion rule end to end (restore, get_tensor, merge),
refusals before any read, the difference from ``tf.cast``, and ml_dtypes imported only when needed."""

from __future__ import annotations

import os
import subprocess
import sys

import float_reference
import numpy as np
import pytest
from bundle_builder import make_bundle

import gpuckpt
from gpuckpt.dtypes import DTYPES, DataType, numpy_dtype
from gpuckpt.host.floats import FORMATS, convert_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


def _hard_values(dtype_name: str, count: int = 50_000) -> np.ndarray:
    """Random bit patterns of a type, with its subnormals, infinities, NaNs (signaling and quiet,
    with payloads) and signed zeros, as an array of that type."""
    dtype = np.dtype(dtype_name) if dtype_name != "bfloat16" else numpy_dtype("ml_dtypes.bfloat16")
    unsigned = f"u{dtype.itemsize}"
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2 ** (8 * dtype.itemsize), count, dtype=np.uint64).astype(unsigned)
    fmt = FORMATS[SHORT[dtype_name]]
    specials = [0, 1, fmt.infinity, fmt.infinity + 1, fmt.infinity | (1 << (fmt.mbits - 1)), (1 << fmt.mbits) - 1]
    specials += [s | (1 << (fmt.width - 1)) for s in specials]
    return np.concatenate([bits, np.array(specials, dtype=unsigned)]).view(dtype)


@pytest.fixture(scope="module")
def floats_bundle(tmp_path_factory):
    tensors = {name: _hard_values(name).reshape(-1, 2) for name in SHORT}
    prefix = make_bundle(tensors).write(str(tmp_path_factory.mktemp("floats") / "ckpt"))
    return prefix, tensors


@pytest.mark.parametrize("target", sorted(SHORT))
def test_restore_converts_by_the_rule(floats_bundle, target):
    prefix, tensors = floats_bundle
    with gpuckpt.open(prefix) as ckpt:
        restored = ckpt.restore(dtype=target)
        single = ckpt.get_tensor("float64", dtype=target)
    for name, array in restored.items():
        source = tensors[name]
        assert array.dtype.name == target and array.shape == source.shape, name
        ours = array.reshape(-1).view(f"u{array.dtype.itemsize}")
        bits = source.reshape(-1).view(f"u{source.dtype.itemsize}")
        if name == target:  # no conversion: the stored bits, signaling NaNs included
            assert array.tobytes() == source.tobytes()
            continue
        assert float_reference.check(SHORT[name], SHORT[target], bits, ours) is None, f"{name} -> {target}"
    assert single.tobytes() == restored["float64"].tobytes()


def test_mapping_converts_only_the_names_it_matches(floats_bundle):
    prefix, tensors = floats_bundle
    with gpuckpt.open(prefix) as ckpt:
        restored = ckpt.restore(dtype={"float6.": np.float16, "bfloat16": "float32"})
    assert restored["float64"].dtype == np.float16 and restored["bfloat16"].dtype == np.float32
    assert restored["float32"].tobytes() == tensors["float32"].tobytes()


def test_merge_and_restore_many_use_the_same_rule(floats_bundle, tmp_path):
    prefix, tensors = floats_bundle
    arrays = gpuckpt.restore_many([(prefix, None)], dtypes={".*": "bfloat16"})
    gpuckpt.merge(str(tmp_path / "merged"), [(prefix, None)], dtypes={".*": "bfloat16"})
    with gpuckpt.open(str(tmp_path / "merged")) as merged, gpuckpt.open(prefix) as ckpt:
        for name in tensors:
            expected = ckpt.get_tensor(name, dtype="bfloat16").tobytes()
            assert arrays[name].tobytes() == expected and merged.get_tensor(name).tobytes() == expected, name


@pytest.mark.parametrize(
    "dtype", ["float17", np.int32, "int8", "float8_e4m3fn", object, {"w": "float17"}, {"[": np.float16}]
)
def test_bad_dtype_argument_is_refused_before_reading(floats_bundle, dtype):
    prefix, _ = floats_bundle
    with gpuckpt.open(prefix) as ckpt:
        with pytest.raises(gpuckpt.InvalidArgumentError) as caught:
            ckpt.restore(dtype=dtype)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)


def test_undefined_conversion_names_the_tensor_before_reading(tmp_path):
    """float8_e4m3fnuz has no conversion (host or device): refused by name, and nothing is read
    (the data file is gone, so a read would fail differently)."""
    fnuz = np.arange(256, dtype=np.uint8).view(numpy_dtype("ml_dtypes.float8_e4m3fnuz"))
    prefix = make_bundle({"q": fnuz, "w": np.ones(3, np.float32)}).write(str(tmp_path / "ckpt"))
    with gpuckpt.open(prefix) as ckpt:
        os.unlink(prefix + ".data-00000-of-00001")
        with pytest.raises(gpuckpt.UnsupportedError, match=r"float8_e4m3fnuz to float32.*tensor 'q'"):
            ckpt.restore(dtype=np.float32)


def test_restored_dtype_and_convertible_follow_the_chooser_and_conversions_def():
    from gpuckpt.casting import TARGETS, convertible, dtype_chooser, restored_dtype

    sources = ["float16", "bfloat16", "float32", "float64", "ml_dtypes.float8_e4m3fn", "ml_dtypes.float8_e5m2"]
    others = ["int8", "int32", "uint64", "bool", "complex64", "ml_dtypes.float8_e4m3fnuz", "object"]
    for stored in map(numpy_dtype, sources + others):
        for wanted in map(numpy_dtype, TARGETS + ("int32", "ml_dtypes.float8_e5m2")):
            # the set torch.py and jax.py once spelled out by hand
            expected = stored != wanted and stored.name in {s.removeprefix("ml_dtypes.") for s in sources}
            assert convertible(stored, wanted) == (expected and wanted.name in TARGETS), (stored, wanted)
    half = numpy_dtype("float16")
    chooser = dtype_chooser({"a.*": "float16"})
    assert restored_dtype(chooser, "ab", np.dtype("float32")) == half
    assert restored_dtype(chooser, "b", np.dtype("float32")) == np.dtype("float32")
    assert restored_dtype(chooser, "ab", np.dtype("int32")) == np.dtype("int32")
    assert restored_dtype(None, "ab", np.dtype("float64")) == np.dtype("float64")
    assert restored_dtype(dtype_chooser("float16"), "x", np.dtype(object)) == np.dtype(object)


def test_dtype_info_itemsizes_match_numpy():
    for value, info in DTYPES.items():
        if info.numpy is not None:
            assert info.itemsize == info.numpy.itemsize, DataType(value).name


def test_import_open_and_ls_do_not_import_ml_dtypes():
    """ml_dtypes costs ~0.4 s to import: opening, listing and restoring a checkpoint of numpy
    types never import it; the first bfloat16 array does. ``import gpuckpt`` alone imports
    neither crc32c nor the protobuf modules (benchmarks/startup.py times it)."""
    code = (
        "import sys, gpuckpt, gpuckpt.cli\n"
        "assert not {'ml_dtypes', 'crc32c', 'gpuckpt._proto.tensor_bundle_pb2'} & set(sys.modules), 'imported'\n"
        "ck = gpuckpt.open(sys.argv[1]); ck.restore(); [ck.info(k) for k in ck.keys()]\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported by open/restore'\n"
        "assert gpuckpt.cli.main(['ls', sys.argv[1]]) == 0\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported by ls'\n"
        "from gpuckpt.dtypes import DTYPES\n"
        "assert DTYPES[14].numpy.name == 'bfloat16' and 'ml_dtypes' in sys.modules\n"
    )
    sample = os.path.join(ROOT, "gpuckpt", "samples", "keras_adam")
    result = subprocess.run([sys.executable, "-c", code, sample], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_listing_bfloat16_tensors_does_not_import_ml_dtypes(floats_bundle):
    prefix, _ = floats_bundle
    code = (
        "import sys, gpuckpt, gpuckpt.cli\n"
        "ck = gpuckpt.open(sys.argv[1]); infos = [ck.info(k) for k in ck.keys()]\n"
        "assert gpuckpt.cli.main(['ls', sys.argv[1]]) == 0 and 'ml_dtypes' not in sys.modules\n"
        "assert {i.tf_dtype for i in infos} >= {'bfloat16'} and 'ml_dtypes' not in sys.modules\n"
        "assert [i.dtype.name for i in infos if i.tf_dtype == 'bfloat16'] == ['bfloat16']\n"
    )
    result = subprocess.run([sys.executable, "-c", code, prefix], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.tf
def test_tf_cast_differs_only_by_flushing_subnormals_and_rounding_through_float32():
    """The README's account of tf.cast on the CPU, measured: every value where it differs from
    this project's rule is a subnormal result it flushed to zero, or a float64 it rounded through
    float32 first; there are such values; float32 to float16/bfloat16 agree everywhere."""
    tf = pytest.importorskip("tensorflow")
    from test_kernels import inputs

    for source in ("f64", "f32"):
        bits = inputs(source)
        bits = bits[~float_reference.is_nan(FORMATS[source], bits)]
        values = tf.constant(bits.view(np.float64 if source == "f64" else np.float32))
        for target, tf_type in (("f32", tf.float32), ("f16", tf.float16), ("bf16", tf.bfloat16)):
            if target == source:
                continue
            theirs = tf.cast(values, tf_type).numpy().view(f"u{FORMATS[target].width // 8}")
            ours = convert_bits(source, target, bits)
            differ = np.flatnonzero(ours != theirs)
            if source == "f32":
                assert differ.size == 0, f"{source}->{target}"
                continue
            flushed = (float_reference.decode(FORMATS[target], theirs[differ]) == 0) & (
                float_reference.decode(FORMATS[target], ours[differ]) != 0
            )
            through_f32 = (
                convert_bits("f32", target, convert_bits("f64", "f32", bits[differ])) if target != "f32" else None
            )
            explained = flushed | (False if through_f32 is None else theirs[differ] == through_f32)
            assert explained.all(), f"{source}->{target}: {int(bits[differ][~explained][0]):#x}"
            assert differ.size > 100, f"{source}->{target}: tf.cast now agrees; update the README"
