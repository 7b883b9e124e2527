"""Data files truncated, regrown and replaced while another process restores from them.

A reader in a child process loops over every read path (threaded host restore, the staged device
pipeline on the host stand-in, lazy slices, fresh opens) while this process changes the files under
it. The child must survive (a SIGBUS would kill it), and every result must be the right data or a
CheckpointError. ``get_tensor(copy=False)`` is the documented exception: its view is the file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

import gpuckpt

CHILD = textwrap.dedent(
    """
    import json, os, random, sys, time
    import numpy as np
    import gpuckpt
    from gpuckpt.device import HostDevice

    live, versions, seconds = sys.argv[1], sys.argv[2:-1], float(sys.argv[-1])
    expected = [gpuckpt.open(v).restore() for v in versions]
    held = gpuckpt.open(live)  # opened once, kept across the changes
    counts = {"ok": 0, "error": 0}
    errors = set()

    def matches(result, names):
        return any(all(np.array_equal(result[n], e[n]) for n in names) for e in expected)

    def one_round(ckpt, rng, slices=True):
        choice = rng.randrange(4 if slices else 2)
        if choice == 0:
            result = ckpt.restore(threads=2)
        elif choice == 1:
            result = {n: np.asarray(a) for n, a in ckpt.restore(device=HostDevice()).items()}
        else:
            name = rng.choice(sorted(expected[0]))
            start = rng.randrange(len(expected[0][name]))
            part = ckpt.get_slice(name)[start : start + rng.randrange(1, 5000)]
            if not any(np.array_equal(part, e[name][start : start + len(part)]) for e in expected):
                raise SystemExit(f"wrong slice of {name}")
            return
        if not matches(result, sorted(result)):
            raise SystemExit("a restore returned data that is neither version")

    print("ready", flush=True)
    rng = random.Random(0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if rng.random() < 0.3:
                with gpuckpt.open(live) as fresh:
                    one_round(fresh, rng, slices=os.environ["FRESH_SLICES"] == "1")
            else:
                one_round(held, rng)
            counts["ok"] += 1
        except gpuckpt.CheckpointError as error:
            counts["error"] += 1
            errors.add(type(error).__name__)
    print(json.dumps({**counts, "errors": sorted(errors)}), flush=True)
    """
)


def _write(prefix: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": rng.standard_normal(int(rng.integers(1000, 200_000))).astype(np.float32) for i in range(12)}
    gpuckpt.save(prefix, tensors, max_shard_bytes=2 << 20)
    return tensors


def _files(prefix: str) -> list[str]:
    folder, base = os.path.split(prefix)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(base + "."))


def _run_child(live: str, versions: list[str], change, fresh_slices: bool = True, expect_errors: bool = True) -> dict:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, live, *versions, "2.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FRESH_SLICES": "1" if fresh_slices else "0"},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    rng = random.Random(1)
    while child.poll() is None:
        change(rng)
    out, err = child.communicate(timeout=60)
    assert child.returncode != -signal.SIGBUS, "the reader was killed by SIGBUS"
    assert child.returncode == 0, err
    report = json.loads(out)
    assert report["ok"] > 0 and (report["error"] > 0 or not expect_errors), report  # both outcomes exercised
    assert set(report["errors"]) <= {"FormatError", "ChecksumError", "MissingShardError"}, report
    return report


def test_data_files_truncated_and_regrown_underneath(tmp_path):
    live = str(tmp_path / "ckpt")
    _write(live, 0)
    data_files = [f for f in _files(live) if ".data-" in f]
    assert len(data_files) > 1
    originals = {f: open(f, "rb").read() for f in data_files}

    def change(rng):
        path = rng.choice(data_files)
        with open(path, "r+b") as f:
            f.truncate(rng.randrange(len(originals[path])))
            time.sleep(rng.random() * 0.003)
            f.seek(0)
            f.write(originals[path])  # the same bytes back: any result is the old data or an error

    _run_child(live, [live], change)


def test_next_checkpoint_written_and_old_deleted_underneath(tmp_path):
    """TensorFlow's pattern: write the next checkpoint under a new prefix, delete the old one."""
    versions = [str(tmp_path / "a" / "ckpt"), str(tmp_path / "b" / "ckpt")]
    contents = [_write(prefix, seed) for seed, prefix in enumerate(versions)]
    live = tmp_path / "train"
    gpuckpt.save(str(live / "ckpt-0"), contents[0], update_state=True)
    step = iter(range(1, 10**6))

    def change(rng):
        n = next(step)
        gpuckpt.save(str(live / f"ckpt-{n}"), contents[n % 2], max_shard_bytes=2 << 20, max_to_keep=1)

    # Errors are possible (the state file names a checkpoint deleted a moment later) but rare.
    _run_child(str(live), versions, change, expect_errors=False)


def test_same_prefix_replaced_file_by_file_underneath(tmp_path):
    """A writer renaming new files over the same prefix one at a time: a fresh open can pair an
    index with another version's data. Verified restores catch it; slices are not checksummed,
    so the child takes slices only from the checkpoint it opened before the changes."""
    versions = [str(tmp_path / "a" / "ckpt"), str(tmp_path / "b" / "ckpt")]
    for seed, prefix in enumerate(versions):
        os.makedirs(os.path.dirname(prefix))
        _write(prefix, seed)
    live = str(tmp_path / "ckpt")
    for path in _files(versions[0]):
        os.link(path, live + path[len(versions[0]) :])

    def change(rng):
        source = rng.choice(versions)
        for path in _files(source):
            target = live + path[len(source) :]
            if os.path.samefile(path, target):
                continue
            staged = target + ".tmp"
            os.link(path, staged)
            os.replace(staged, target)  # one file at a time, as a writer renames
            time.sleep(rng.random() * 0.002)

    _run_child(live, versions, change, fresh_slices=False)


def test_a_zero_copy_view_is_the_documented_exception(tmp_path):
    """copy=False hands out the file's own pages: if the file shrinks, touching them is SIGBUS."""
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"w": np.ones(1 << 20, np.float32)})
    code = textwrap.dedent(
        f"""
        import gpuckpt
        view = gpuckpt.open({prefix!r}).get_tensor("w", copy=False)
        open({prefix + ".data-00000-of-00001"!r}, "r+b").truncate(0)
        print(float(view[-1]))
        """
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGBUS


def test_arrays_already_read_survive_truncation(tmp_path):
    """What get_tensor and get_slice return owns its memory: the file may go afterwards."""
    prefix = str(tmp_path / "ckpt")
    gpuckpt.save(prefix, {"w": np.arange(1 << 20, dtype=np.float32)})
    with gpuckpt.open(prefix) as ckpt:
        value = ckpt.get_tensor("w")
        lazy = ckpt.get_slice("w")[10:20]
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(0)
        assert value[-1] == (1 << 20) - 1 and lazy.tolist() == list(range(10, 20))
