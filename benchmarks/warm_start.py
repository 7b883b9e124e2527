"""Warm start on the host: restore(out=) into existing arrays, fresh restores, process history and
start-up, each against the memory-copy floor measured in the same run.

    python benchmarks/warm_start.py [--size-mb 1024] [--tensors 185] [--many 100000]
                                    [--startup-mb 100] [--repeat 5]

Writes (with gpuckpt.save, cached under .bench/) a checkpoint of ~SIZE MiB in ~TENSORS tensors of
mixed fp32/bf16/fp16 (the same tensors as benchmarks/restore_host.py), one of MANY small tensors,
and two of ~STARTUP MiB (fp32/fp16 only, and with bf16). With the page cache warm, best of --repeat
after a warm-up (the in-process figures timed in turn, round after round, so that load from other
processes falls on all of them alike), it times:

* floor: one single-threaded memcpy of the (mapped, warm) data file into memory already faulted
  in; the same by ``preadv`` in 1 MiB chunks (how gpuckpt reads); the verified reader's method
  alone (``preadv`` and a crc32c per chunk, by the reader's threads, each its share of the file:
  what ``restore(out=)`` can reach, benchmarks/floors.py); where the time of a fresh array goes:
  faulting memory in (the kernel zeroes each page) in 4 KiB pages and in 2 MiB pages;
* ``restore(out=arrays)`` into existing arrays, verified and not; the old path as a baseline
  (``restore()`` into new arrays, then copied into the given ones);
* ``restore()`` into new arrays, verified and not; and with numpy's allocator instead of the
  restore's own mapping (gpuckpt/host/arena.py), as a baseline;
* in new processes: the same fresh restore, and the same after first opening the MANY-tensor
  checkpoint (the process-history effect), with both allocators;
* a new process that imports gpuckpt, opens a STARTUP MiB checkpoint and restores it, against
  the floors of starting Python, importing numpy (and ml_dtypes, which bf16 tensors need).

Every restore is checked bit for bit against the arrays written before anything is timed. Ratios
compare figures of one run. Results go to benchmarks/results/warm-start-<machine>.json unless
--out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import restore_host  # noqa: E402
from floors import CopyFloors  # noqa: E402
from report import machine_info, write_results  # noqa: E402
from restore_host import large_arrays, many_arrays  # noqa: E402

import gpuckpt  # noqa: E402
from gpuckpt.host import reader  # noqa: E402

GiB = 1 << 30


def best_of(repeat, fn):
    """restore_host's best of ``repeat``, after one warm-up run."""
    fn()
    return restore_host.best_of(repeat, fn)[0]


def write(prefix, arrays):
    if not os.path.exists(prefix + ".index"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        gpuckpt.save(prefix, arrays)
    return prefix


def warm(prefix):
    """Bring the files into the page cache as a first read from disk leaves them: dropped, then
    read once in order (readahead fills the cache with large folios). Files this process has just
    written sit in the cache as the writes left them, and ``preadv`` from those pages was up to 1.6x
    slower on this project's machine; a memcpy from a mapping of them much less so."""
    for name in os.listdir(os.path.dirname(prefix)):
        if name.startswith(os.path.basename(prefix) + "."):
            with open(os.path.join(os.path.dirname(prefix), name), "rb") as f:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while f.read(64 << 20):
                    pass


def numpy_allocator():
    """New arrays from numpy.empty, as before gpuckpt/host/arena.py (a context for baselines)."""

    class Patch:
        def __enter__(self):
            self.saved = reader.MIN_BYTES
            reader.MIN_BYTES = 1 << 62

        def __exit__(self, *exc):
            reader.MIN_BYTES = self.saved

    return Patch()


def cpu_pressure():
    """The share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def check(arrays, expected):
    assert set(arrays) == set(expected)
    for name, value in expected.items():
        assert arrays[name].dtype == value.dtype and arrays[name].tobytes() == value.tobytes(), name


def interleaved(repeat, runs, cpu=False):
    """Best time of each of ``runs`` (name -> function), timed in turn, round after round, after
    one warm-up round: load from other processes on a shared machine falls on all of them alike.
    With ``cpu``, also the least CPU time (all threads of this process, user and system) of each,
    as ``NAME_cpu_s``: what it costs whatever else runs on the machine."""
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for round_number in range(repeat + 1):
        for name, fn in runs.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()  # its result (arrays) is dropped before the next run
            if round_number:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
    best = {name: min(values) for name, values in times.items()}
    if cpu:
        best.update({name.removesuffix("_s") + "_cpu_s": min(values) for name, values in cpu_times.items()})
    return best


def fault_per_GiB(size, repeat):
    """Where a new array's time goes: faulting it in (the kernel zeroes each page), in 4 KiB and
    in 2 MiB pages, per GiB."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return {}
    span = -(-size // (2 << 20)) * (2 << 20)

    def fault(advice):
        def run():
            region = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(advice)
            np.frombuffer(region, np.uint8)[:: mmap.PAGESIZE] = 1

        return run

    seconds = interleaved(repeat, {"4KiB": fault(mmap.MADV_NOHUGEPAGE), "2MiB": fault(mmap.MADV_HUGEPAGE)})
    return {f"fault_{pages}_pages_s_per_GiB": t * GiB / span for pages, t in seconds.items()}


def in_process(prefix, expected, repeat):
    """The floors, restore(out=), fresh restores and the baselines, interleaved."""
    data_path = prefix + ".data-00000-of-00001"
    size = os.path.getsize(data_path)
    with gpuckpt.open(prefix) as ckpt, CopyFloors(data_path, ckpt.threads) as floors:
        check(ckpt.restore(), expected)
        out = ckpt.restore()  # arrays to fill: faulted in by this first restore
        given = dict(out)
        for array in out.values():
            array[...] = 0
        check(ckpt.restore(out=out), expected)
        assert all(out[name] is given[name] for name in out)
        with numpy_allocator():
            check(ckpt.restore(), expected)

        def old_out_path():  # what out= did before: new arrays, then a second pass into the given ones
            for name, array in ckpt.restore().items():
                out[name][...] = array

        def fresh_numpy_allocator():
            with numpy_allocator():
                ckpt.restore()

        seconds = interleaved(
            repeat,
            {
                **floors.timings(),
                "out_verified_s": lambda: ckpt.restore(out=out),
                "out_unverified_s": lambda: ckpt.restore(out=out, verify=False),
                "fresh_verified_s": lambda: ckpt.restore(),
                "fresh_unverified_s": lambda: ckpt.restore(verify=False),
                "baseline_fresh_numpy_allocator_verified_s": fresh_numpy_allocator,
                "baseline_old_out_path_verified_s": old_out_path,
            },
            cpu=True,
        )
    return {"bytes": size, **seconds, **fault_per_GiB(size, repeat)}


def child_history(args):
    """Run in a new process: the fresh restore's best time, after first opening MANY if asked."""
    held = gpuckpt.open(args.many_prefix) if args.many_prefix else None
    shapes = held.keys() if held is not None else None  # a hundred thousand small objects live
    allocator = numpy_allocator() if args.allocator == "numpy" else None
    if allocator:
        allocator.__enter__()
    with gpuckpt.open(args.prefix) as ckpt:
        seconds = best_of(args.repeat, lambda: ckpt.restore())
    print(json.dumps({"seconds": seconds, "held": 0 if shapes is None else len(shapes)}))
    return 0


def history(large, many, repeat):
    def run(allocator, many_prefix):
        command = [sys.executable, __file__, "--child", "history", "--prefix", large, "--allocator", allocator]
        command += ["--repeat", str(repeat)] + (["--many-prefix", many_prefix] if many_prefix else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]

    result = {}
    for allocator in ("arena", "numpy"):
        new, after = run(allocator, None), run(allocator, many)
        result[allocator] = {"new_process_s": new, "after_opening_many_s": after, "ratio": after / new}
    return result


STARTUP = (
    "import gpuckpt\n"
    "with gpuckpt.open({prefix!r}) as ckpt:\n"
    "    arrays = ckpt.restore()\n"
    "assert sum(a.nbytes for a in arrays.values()) == {nbytes}\n"
)


def wall(code, repeat):
    def run():
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

    return best_of(repeat, run)


def startup(prefixes, repeat):
    result = {
        "python_s": wall("pass", repeat),
        "import_numpy_s": wall("import numpy", repeat),
        "import_numpy_ml_dtypes_s": wall("import numpy, ml_dtypes", repeat),
    }
    for label, (prefix, expected) in prefixes.items():
        nbytes = sum(a.nbytes for a in expected.values())
        with gpuckpt.open(prefix) as ckpt:
            in_process_s = best_of(repeat, lambda: ckpt.restore())  # noqa: B023 - called at once
        result[label] = {
            "bytes": nbytes,
            "new_process_import_open_restore_s": wall(STARTUP.format(prefix=prefix, nbytes=nbytes), repeat),
            "restore_in_a_warm_process_s": in_process_s,
        }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=185)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--startup-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument(
        "--out", default=None, help="JSON results path (default benchmarks/results/warm-start-<host>.json)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--many-prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default="arena", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "history":
        return child_history(args)

    results = {"machine": machine_info(), "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    expected = large_arrays(args.size_mb, args.tensors)
    large = write(os.path.join(args.work_dir, f"warm-large-{args.size_mb}mb-{args.tensors}t", "ckpt"), expected)
    many = write(os.path.join(args.work_dir, f"warm-many-{args.many}", "ckpt"), many_arrays(args.many))
    mixed = large_arrays(args.startup_mb, 40, seed=3)
    plain = {n: a.astype(np.float32) if a.dtype.name == "bfloat16" else a for n, a in mixed.items()}
    startup_prefixes = {
        "fp32_fp16": (write(os.path.join(args.work_dir, f"warm-start-{args.startup_mb}mb-fp32", "ckpt"), plain), plain),
        "with_bf16": (write(os.path.join(args.work_dir, f"warm-start-{args.startup_mb}mb-bf16", "ckpt"), mixed), mixed),
    }
    for prefix in (large, many, *(p for p, _ in startup_prefixes.values())):
        warm(prefix)
    for prefix, arrays in startup_prefixes.values():
        with gpuckpt.open(prefix) as ckpt:
            check(ckpt.restore(), arrays)

    pressure = {"before_pct": cpu_pressure()}
    timed = in_process(large, expected, args.repeat)
    pressure["after_in_process_pct"] = cpu_pressure()
    results["cpu_pressure_avg10"] = pressure  # other work on a shared machine: high means noisy figures
    memcpy = timed["floor_memcpy_prefaulted_s"]
    # the verified reader's method alone (preadv + crc32c per chunk, its threads): what out= can reach
    method_floor = next(v for k, v in timed.items() if k.startswith("floor_preadv_crc32c") and k.endswith("threads_s"))
    results["large"] = timed
    results["history"] = history(large, many, args.repeat)
    results["startup"] = startup(startup_prefixes, args.repeat)
    new_process = results["startup"]["fp32_fp16"]["new_process_import_open_restore_s"]
    results["targets"] = {
        "out_verified_over_floor (<= 1.25)": timed["out_verified_s"] / memcpy,
        "out_verified_over_fresh_verified (<= 1)": timed["out_verified_s"] / timed["fresh_verified_s"],
        "fresh_verified_over_floor (<= 1.25)": timed["fresh_verified_s"] / memcpy,
        "after_opening_many_over_new_process (<= 1.3)": results["history"]["arena"]["ratio"],
        "new_process_fp32_startup_s (<= 0.35)": new_process,
        "out_verified_over_its_method_floor": timed["out_verified_s"] / method_floor,
        "method_floor_over_floor": method_floor / memcpy,
        "old_out_path_over_out_verified": timed["baseline_old_out_path_verified_s"] / timed["out_verified_s"],
        "numpy_allocator_over_fresh_verified": timed["baseline_fresh_numpy_allocator_verified_s"]
        / timed["fresh_verified_s"],
    }
    print(json.dumps(results, indent=2))
    path = write_results(results, args.out, "warm-start")
    print(f"\nresults: {path}")
    for target, value in results["targets"].items():
        print(f"{target}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
