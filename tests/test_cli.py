"""The gpuckpt command: in-process through ``main(argv)`` (exit code, stdout, stderr), and through
subprocess calls as a user runs it where the process itself matters (``python -m``, TF's logging)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import fixture_path

import gpuckpt
from gpuckpt.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuckpt", *args], capture_output=True, text=True, cwd=ROOT)


def test_no_arguments_lists_and_restores_the_bundled_sample():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "16 tensors" in result.stdout and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in result.stdout
    assert "B/s, crc32c verified" in result.stdout and "restored 16 tensors (" in result.stdout


def test_ls_filter_and_json():
    result = run("ls", fixture_path("tf1_partitioned"), "--filter", "^pv", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["pv", "pv/Adam", "pv/Adam_1"]
    assert rows[0]["partitioned"] and rows[0]["shape"] == [10, 3] and rows[0]["kind"] == "model"
    text = run("ls", fixture_path("raw", "all_dtypes"))
    assert "bfloat16" in text.stdout and "float8_e4m3fn" in text.stdout


def test_inspect_shows_object_graph_and_meta():
    keras = run("inspect", fixture_path("keras_adam"))
    assert keras.returncode == 0, keras.stderr
    assert "object graph:" in keras.stdout and "_functional" in keras.stdout
    tf1 = run("inspect", fixture_path("tf1_partitioned"), "--json")
    report = json.loads(tf1.stdout)
    assert report["meta_file"].endswith("model.ckpt-3.meta")
    assert report["meta"][0]["saver"]["version"] == "V2"
    saved = run("inspect", fixture_path("saved_model"))
    assert "signature serving_default" in saved.stdout


def test_verify_names_damaged_tensors(tmp_path):
    for name in os.listdir(fixture_path("raw")):
        shutil.copy(fixture_path("raw", name), tmp_path / name)
    assert run("verify", fixture_path("keras_adam")).returncode == 0
    before = run("verify", str(tmp_path / "all_dtypes"))  # sl_incomplete is refused, as TF refuses it
    assert before.returncode == 3 and "sl_incomplete" in before.stdout and "int64" not in before.stdout
    with gpuckpt.open(tmp_path / "all_dtypes") as ckpt:
        offset = ckpt.index.tensors["int64"].offset
    data = tmp_path / "all_dtypes.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[offset] ^= 0xFF
    data.write_bytes(raw)
    result = run("verify", str(tmp_path / "all_dtypes"))
    assert result.returncode == 3
    assert "int64" in result.stdout and "sl_incomplete" in result.stdout
    assert "DAMAGED int64" in result.stderr


def test_restore_and_bench_report_rates():
    result = run("restore", fixture_path("sharded"), "--threads", "2")
    assert result.returncode == 0 and "B/s, crc32c verified" in result.stdout
    result = run("bench", fixture_path("sharded"), "--repeat", "1", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)  # stdout is the JSON document and nothing else
    assert figures["warm_gpuckpt_s"] > 0 and figures["bytes"] == 168 and figures["device"] == "cpu"
    assert "warm_gpuckpt" in result.stderr  # the table, for a person watching
    for line in ("oneDNN", "absl::InitializeLog"):  # TensorFlow's import noise, on no stream
        assert line not in result.stdout and line not in result.stderr


def test_merge_command(tmp_path):
    out = str(tmp_path / "merged")
    result = run(
        "merge",
        out,
        fixture_path("tf1_partitioned") + "=pv:model/pv,dense/:model/dense/",
        fixture_path("sharded") + "=dev0/:other/",
        "--skip-optimizer",
        "--cast",
        "model/.*=float16",
    )
    assert result.returncode == 0, result.stderr
    with gpuckpt.open(out) as ckpt:
        assert sorted(ckpt.keys()) == ["model/dense/kernel", "model/pv", "other/b", "other/w"]
        assert ckpt.info("model/pv").tf_dtype == "float16"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("ls", "/nonexistent/ckpt"), "no TensorFlow checkpoint found"),
        (("restore", fixture_path("keras_adam"), "--device", "cuda"), "CuPy is not installed"),
    ],
)
def test_errors_are_one_line_without_traceback(args, needle):
    result = run(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("gpuckpt: error: ") and needle in result.stderr
    assert "Traceback" not in result.stderr
    debug = run("--debug", *args)
    assert "Traceback" in debug.stderr


def test_usage_errors_exit_2():
    assert run("ls").returncode == 2


# -- in-process: every failure a user can cause ends in one line and its exit code ------------------
def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, needle: str) -> None:
    assert "Traceback" not in err
    assert err.strip(), "no message"
    last = err.strip().splitlines()[-1]
    assert "error:" in last and needle in last, err


@pytest.mark.parametrize(
    "args",
    [
        ("ls", fixture_path("sharded"), "--filter", "["),
        ("restore", fixture_path("sharded"), "--filter", "("),
    ],
)
def test_bad_regular_expression_is_bad_usage(capsys, args):
    code, out, err = cli(capsys, *args)
    assert code == 2 and not out
    assert_one_line_error(err, "is not a valid regular expression")


def test_library_refuses_a_bad_regular_expression_as_invalid_argument():
    with gpuckpt.open(fixture_path("sharded")) as ckpt:
        with pytest.raises(gpuckpt.InvalidArgumentError, match=r"names='\(' is not a valid regular expression"):
            ckpt.restore("(")
        with pytest.raises(ValueError):  # what code catching re's or numpy's errors expects
            ckpt.restore_async("[")


@pytest.mark.parametrize(
    "cast, needle",
    [
        ("pv=float17", "float17"),  # not a dtype
        ("pv", "is not REGEX=DTYPE"),
        ("=float16", "is not REGEX=DTYPE"),
        ("[=float16", "is not a valid regular expression"),
    ],
)
def test_bad_cast_is_bad_usage(capsys, tmp_path, cast, needle):
    code, out, err = cli(capsys, "merge", str(tmp_path / "m"), fixture_path("tf1_partitioned"), "--cast", cast)
    assert code == 2 and not out
    assert_one_line_error(err, needle)
    assert not list(tmp_path.iterdir())


def test_bad_assignment_map_is_bad_usage(capsys, tmp_path):
    code, _, err = cli(capsys, "merge", str(tmp_path / "m"), fixture_path("tf1_partitioned") + "=pv")
    assert code == 2
    assert_one_line_error(err, "expected old:new")


def test_invalid_argument_from_the_library_is_exit_2_and_a_bug_is_one_line(capsys, monkeypatch):
    def refuse(args):
        raise gpuckpt.InvalidArgumentError("dtype='float17' is not a dtype")

    monkeypatch.setattr("gpuckpt.cli.cmd_ls", refuse)
    code, _, err = cli(capsys, "ls", fixture_path("sharded"))
    assert code == 2 and err == "gpuckpt: error: dtype='float17' is not a dtype\n"

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("gpuckpt.cli.cmd_ls", broken)
    code, _, err = cli(capsys, "ls", fixture_path("sharded"))
    assert code == 1 and err.count("\n") == 1 and "internal error: RuntimeError: a bug" in err
    code, _, err = cli(capsys, "--debug", "ls", fixture_path("sharded"))
    assert code == 1 and "Traceback" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (("bench", fixture_path("sharded"), "--repeat", "0"), "--repeat: 0 is not a positive whole number"),
        (("restore", fixture_path("sharded"), "--threads", "0"), "--threads: 0 is not a positive"),
        (("restore", fixture_path("sharded"), "--threads", "-3"), "--threads: -3 is not a positive"),
        (("restore", fixture_path("sharded"), "--threads", "two"), "'two' is not a whole number"),
        (("restore", fixture_path("sharded"), "--device", "gpu"), "expected cpu, cuda, cuda:N or auto"),
        (("bench", fixture_path("sharded"), "--device", "cuda:x"), "expected cpu, cuda, cuda:N or auto"),
        (("merge", "out", fixture_path("sharded"), "--max-shard-bytes", "0"), "--max-shard-bytes: 0"),
    ],
)
def test_numbers_and_devices_are_checked_as_usage(capsys, args, needle):
    code, out, err = cli(capsys, *args)
    assert code == 2 and not out
    assert_one_line_error(err, needle)


def test_restore_filter_matching_nothing_is_an_error(capsys):
    code, out, err = cli(capsys, "restore", fixture_path("sharded"), "--filter", "nothing/.*")
    assert code == 1 and not out
    assert_one_line_error(err, "--filter 'nothing/.*' matches no tensor name")


def test_restore_counts_and_rates_read_well(capsys):
    code, out, _ = cli(capsys, "restore", fixture_path("keras_adam"), "--filter", "save_counter/.*")
    assert code == 0
    assert "restored 1 tensor (8 B)" in out  # not "1 tensors"
    assert "0.00 GB/s" not in out and re.search(r" = [\d.]+ (B|kB|MB|GB)/s, crc32c verified", out), out


def _copy(name, tmp_path):
    shutil.copytree(fixture_path(name), tmp_path / name)
    return tmp_path / name


def test_verify_reports_short_and_missing_data_files_as_damage(capsys, tmp_path):
    ckpt = _copy("sharded", tmp_path)
    short = ckpt / "model.ckpt-7.data-00001-of-00003"
    os.truncate(short, 10)
    code, out, err = cli(capsys, "verify", str(ckpt))
    assert code == 3, err
    assert str(short) in out and "10 bytes, the index needs 56" in out
    assert ".index" not in out + err  # the data file is damaged, not the index
    assert "DAMAGED dev1/w: data file" in err and "DAMAGED dev0/w" not in err  # the rest is read and checked
    missing = ckpt / "model.ckpt-7.data-00002-of-00003"
    missing.unlink()
    code, out, err = cli(capsys, "verify", str(ckpt))
    assert code == 3
    assert f"{missing} (missing)" in out and f"DAMAGED dev2/b: data file {str(missing)!r} is missing" in err


def test_verify_of_a_partitioned_checkpoint_without_its_data_file(capsys, tmp_path):
    ckpt = _copy("tf1_partitioned", tmp_path)
    (ckpt / "model.ckpt-3.data-00000-of-00001").unlink()
    code, out, err = cli(capsys, "verify", str(ckpt))
    assert code == 3 and "9 of 9 tensors damaged" in out and "DAMAGED pv: data file" in err


def test_verify_of_a_damaged_index_is_damage(capsys, tmp_path):
    ckpt = _copy("sharded", tmp_path)
    index = ckpt / "model.ckpt-7.index"
    raw = bytearray(index.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    index.write_bytes(raw)
    code, out, err = cli(capsys, "verify", str(ckpt))
    assert code == 3 and "the index is damaged" in out and err.startswith("DAMAGED index: ")


def test_merge_onto_an_existing_output_names_the_flag(capsys, tmp_path):
    out = str(tmp_path / "m")
    assert cli(capsys, "merge", out, fixture_path("sharded"))[0] == 0
    code, _, err = cli(capsys, "merge", out, fixture_path("sharded"))
    assert code == 1
    assert_one_line_error(err, "(pass --overwrite to replace it)")
    assert "overwrite=True" not in err
    assert cli(capsys, "merge", out, fixture_path("keras_adam"), "--overwrite")[0] == 0
    with gpuckpt.open(out) as ckpt:
        assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in ckpt


def test_merged_directory_opens_and_labels_counters(capsys, tmp_path):
    out = tmp_path / "new_dir" / "merged"
    code, stdout, _ = cli(capsys, "merge", str(out), fixture_path("keras_adam"), "--skip-optimizer")
    assert code == 0 and "5 tensors from 1 checkpoint in" in stdout and "the latest in" in stdout
    code, stdout, _ = cli(capsys, "ls", str(out.parent), "--json")  # the new directory got a state file
    assert code == 0
    kinds = {r["name"]: r["kind"] for r in json.loads(stdout)}
    assert kinds.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == "counter"
    assert set(kinds.values()) == {"model"}


def test_merge_state_file_flags(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("a directory with other files in it")
    assert cli(capsys, "merge", str(tmp_path / "a"), fixture_path("sharded"))[0] == 0
    assert not (tmp_path / "checkpoint").exists()  # not a new directory: no state file unasked
    assert cli(capsys, "merge", str(tmp_path / "b"), fixture_path("sharded"), "--update-state")[0] == 0
    assert gpuckpt.latest_checkpoint(tmp_path) == str(tmp_path / "b")
    assert cli(capsys, "merge", str(tmp_path / "c"), fixture_path("sharded"))[0] == 0  # it has one now
    assert gpuckpt.latest_checkpoint(tmp_path) == str(tmp_path / "c")
    fresh = tmp_path / "fresh" / "m"
    assert cli(capsys, "merge", str(fresh), fixture_path("sharded"), "--no-update-state")[0] == 0
    assert not (fresh.parent / "checkpoint").exists()


def test_ls_columns_fit_long_dtype_names(capsys):
    code, out, _ = cli(capsys, "ls", fixture_path("raw", "all_dtypes"))
    assert code == 0
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    shape_columns = {line.index("[") for line in rows}
    assert len(shape_columns) == 1, out  # float8_e4m3b11fnuz does not push its row's shape along
    assert all(re.search(r"float4_e2m1fn +\[", line) for line in rows if line.split()[0] == "float4_e2m1fn")


def test_help_is_plain_text_and_every_option_is_explained(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "``" not in out and "Exit codes" in out
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in [("gpuckpt", parser), *commands.choices.items()]:
        for action in sub._actions:
            if action is commands:
                continue  # the list of commands, each with its own help
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_a_name_mapped_twice_in_an_assignment_map_is_bad_usage(capsys, tmp_path):
    source = gpuckpt.save(str(tmp_path / "src"), {"a/w": np.ones(2, np.float32)})
    code, _, err = cli(capsys, "merge", str(tmp_path / "m"), source + "=a/:x/,a/:y/")
    assert code == 2
    assert_one_line_error(err, "mapped twice")
    assert not os.path.exists(str(tmp_path / "m") + ".index")
