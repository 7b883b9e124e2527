"""Every tensor of every committed TF-written fixture, against what TensorFlow's reader returned."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import EXPECTED, FIXTURE_PREFIXES, assert_bit_exact, fixture_path

import gpuckpt
from gpuckpt import StateKind


@pytest.mark.parametrize("prefix", FIXTURE_PREFIXES)
def test_every_tensor_matches_tensorflow(prefix):
    expected = EXPECTED[prefix]
    with gpuckpt.open(fixture_path(prefix)) as ckpt:
        assert sorted(ckpt.keys()) == sorted(expected["shapes"])
        got = ckpt.restore(list(expected["tensors"]))
        for name, value in expected["tensors"].items():
            assert_bit_exact(got[name], value, name)
            assert_bit_exact(ckpt.get_tensor(name), value, name)
        for name in ckpt.keys():
            info = ckpt.info(name)
            assert info.tf_dtype == expected["dtypes"][name]
            assert list(info.shape) == expected["shapes"][name]


@pytest.mark.parametrize("prefix", FIXTURE_PREFIXES)
def test_compat_reader_matches_tensorflow(prefix):
    expected = EXPECTED[prefix]
    with gpuckpt.load_checkpoint(fixture_path(prefix)) as reader:
        assert reader.get_variable_to_shape_map() == expected["shapes"]
        assert {k: v.name for k, v in reader.get_variable_to_dtype_map().items()} == expected["dtypes"]
        for name, value in expected["tensors"].items():
            assert reader.has_tensor(name)
            ours = reader.get_tensor(name)
            assert type(ours) is type(value), name  # scalars come back as numpy scalars or bytes, as from TF
            assert_bit_exact(np.asarray(ours, dtype=object if isinstance(ours, bytes) else None), value, name)
        assert not reader.has_tensor("no/such/tensor")


def test_list_variables_is_sorted_names_and_shapes():
    listed = gpuckpt.list_variables(fixture_path("tf1_partitioned"))
    assert listed == sorted(listed)
    assert ("pv", [10, 3]) in listed


@pytest.mark.parametrize("directory", ["keras_adam", "tf1_partitioned", "sharded"])
def test_latest_checkpoint_matches_tensorflow(directory):
    latest = gpuckpt.latest_checkpoint(fixture_path(directory))
    assert latest == fixture_path(EXPECTED["__latest__"][directory])


def test_latest_checkpoint_without_state_file_is_none(tmp_path):
    assert gpuckpt.latest_checkpoint(tmp_path) is None


def test_latest_checkpoint_absolute_paths_and_missing_index(tmp_path):
    src = fixture_path("tf1_partitioned")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path}/model.ckpt-2"\n')
    assert gpuckpt.latest_checkpoint(tmp_path) == f"{tmp_path}/model.ckpt-2"
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-99"\n')
    assert gpuckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="model.ckpt-99"):
        gpuckpt.open(tmp_path)


@pytest.mark.parametrize(
    "path, prefix",
    [
        ("keras_adam", "keras_adam/ckpt-2"),
        ("keras_adam/ckpt-1", "keras_adam/ckpt-1"),
        ("keras_adam/ckpt-1.index", "keras_adam/ckpt-1"),
        ("saved_model", "saved_model/variables/variables"),
        ("sharded", "sharded/model.ckpt-7"),
    ],
)
def test_open_accepts_every_kind_of_path(path, prefix):
    with gpuckpt.open(fixture_path(path)) as ckpt:
        assert ckpt.prefix == fixture_path(prefix)


def test_open_nothing_lists_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        gpuckpt.open(tmp_path / "nope")
    assert "nope.index" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        gpuckpt.open(tmp_path)
    message = str(info.value)
    assert "variables/variables.index" in message and "checkpoint" in message


def test_sharded_bundle_uses_several_data_files():
    with gpuckpt.open(fixture_path("sharded")) as ckpt:
        assert ckpt.num_shards == 3
        assert {ckpt.info(n).shard_id for n in ckpt.keys()} == {0, 1, 2}


def test_partitioned_variable_and_lazy_slices():
    expected = EXPECTED["tf1_partitioned/model.ckpt-3"]["tensors"]["pv"]
    with gpuckpt.open(fixture_path("tf1_partitioned")) as ckpt:
        assert ckpt.info("pv").partitioned
        lazy = ckpt.get_slice("pv")
        assert lazy.shape == (10, 3) and lazy.dtype == np.float32
        for key in [np.s_[:], np.s_[3:8], np.s_[::-2, 1], np.s_[9], np.s_[..., 2], np.s_[2:9:3, ::2], np.s_[5:5]]:
            np.testing.assert_array_equal(lazy[key], expected[key])
            assert lazy[key].shape == expected[key].shape


def test_raw_slices_and_insufficient_slices():
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        np.testing.assert_array_equal(ckpt.get_tensor("sl"), full)
        np.testing.assert_array_equal(ckpt.get_tensor("sl_cols"), full)
        np.testing.assert_array_equal(ckpt.get_slice("sl_incomplete")[:, 1:4], full[:, 1:4])
        with pytest.raises(gpuckpt.FormatError, match="sufficient slices.*sl_incomplete"):
            ckpt.get_tensor("sl_incomplete")
        with pytest.raises(gpuckpt.FormatError):
            ckpt.restore()  # all tensors, including the incomplete one: nothing partial comes back


def test_lazy_slice_of_unpartitioned_tensor_and_strings():
    tensors = EXPECTED["raw/all_dtypes"]["tensors"]
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        np.testing.assert_array_equal(ckpt.get_slice("float64")[1:, ::-1], tensors["float64"][1:, ::-1])
        assert list(ckpt.get_slice("strings")[1:3]) == list(tensors["strings"][1:3])
        with pytest.raises(IndexError):
            ckpt.get_slice("sl")[0, 0, 0]


def test_restored_arrays_own_their_memory():
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        arrays = ckpt.restore([n for n in ckpt.keys() if n != "sl_incomplete"], threads=2)
        arrays["lazy"] = ckpt.get_slice("sl")[1:3, 2]
        arrays["lazy_strings"] = ckpt.get_slice("strings")[1:]
    for name, array in arrays.items():
        assert array.flags.owndata and array.flags.writeable, name


def test_zero_copy_views_are_read_only_and_copies_are_owned():
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        view = ckpt.get_tensor("float32", copy=False)
        owned = ckpt.get_tensor("float32")
        assert not view.flags.writeable
        assert owned.flags.writeable and owned.flags.owndata
        np.testing.assert_array_equal(view, owned)
        with pytest.raises(gpuckpt.UnsupportedError):
            ckpt.get_tensor("strings", copy=False)
        with pytest.raises(gpuckpt.UnsupportedError):
            ckpt.get_tensor("int4", copy=False)  # needs its high bits cleared
    np.testing.assert_array_equal(view, owned)  # the mapping outlives close() while views exist
    owned[...] = 0  # owned arrays are the caller's to change


def test_restore_selectors():
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        assert list(ckpt.restore(["int8", "uint8"])) == ["int8", "uint8"]
        assert set(ckpt.restore(r"float8_.*")) == {n for n in ckpt.keys() if n.startswith("float8_")}
        assert set(ckpt.restore(lambda n: n.startswith("string"))) == {n for n in ckpt.keys() if n.startswith("string")}
        with pytest.raises(gpuckpt.TensorNotFoundError, match="flaot32.*did you mean 'float32'") as info:
            ckpt.restore(["flaot32"])
        assert isinstance(info.value, KeyError)
        seen = []
        ckpt.restore(["float32", "float64"], progress=lambda done, total: seen.append((done, total)), threads=2)
        assert seen and seen[-1][0] == seen[-1][1] == 12 * 4 + 12 * 8


def test_object_graph_kinds_keras3():
    with gpuckpt.open(fixture_path("keras_adam")) as ckpt:
        objects = ckpt.objects()
        kernel = objects["optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"]
        assert kernel.kind == StateKind.MODEL
        assert kernel.object_path.startswith("model/")
        assert kernel.full_name == "sequential/dense/kernel"
        assert ckpt.kind("optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE") != StateKind.MODEL
        assert ckpt.kind("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == StateKind.COUNTER
        assert ckpt.kind("_CHECKPOINTABLE_OBJECT_GRAPH") == StateKind.OBJECT_GRAPH
        model = ckpt.model_keys()
        assert len(model) == 4 and all(ckpt.kind(k) == StateKind.MODEL for k in model)


def test_tf1_name_kinds():
    with gpuckpt.open(fixture_path("tf1_partitioned")) as ckpt:
        assert ckpt.objects() == {}
        assert ckpt.model_keys() == ["dense/kernel", "pv"]
        assert ckpt.kind("pv/Adam_1") == StateKind.OPTIMIZER_SLOT
        assert ckpt.kind("global_step") == StateKind.COUNTER


def test_closed_checkpoint_and_devices():
    ckpt = gpuckpt.open(fixture_path("raw", "all_dtypes"), device="auto")
    assert ckpt.device == "cpu"
    ckpt.close()
    ckpt.close()
    with pytest.raises(gpuckpt.ClosedCheckpointError):
        ckpt.get_tensor("float32")
    assert "float32" in ckpt  # metadata stays available
    with pytest.raises(gpuckpt.DeviceUnavailableError, match="cuda"):
        gpuckpt.open(fixture_path("raw", "all_dtypes"), device="cuda")
    with gpuckpt.open(fixture_path("raw", "all_dtypes")) as ckpt:
        with pytest.raises(gpuckpt.DeviceUnavailableError):
            ckpt.get_tensor("float32", device="cuda:1")
        with pytest.raises(ValueError):
            ckpt.restore(device="tpu")


def test_verify_false_skips_checksums(tmp_path):
    src = fixture_path("raw")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    data = tmp_path / "all_dtypes.data-00000-of-00001"
    with gpuckpt.open(tmp_path / "all_dtypes") as ckpt:
        info = ckpt.index.tensors["float64"]
    raw = bytearray(data.read_bytes())
    raw[info.offset] ^= 0x01
    data.write_bytes(raw)
    with gpuckpt.open(tmp_path / "all_dtypes") as ckpt:
        with pytest.raises(gpuckpt.ChecksumError, match="float64"):
            ckpt.get_tensor("float64")
        assert ckpt.get_tensor("float64", verify=False).shape == (3, 4)
    with gpuckpt.open(tmp_path / "all_dtypes", verify=False) as ckpt:
        ckpt.get_tensor("float64")
