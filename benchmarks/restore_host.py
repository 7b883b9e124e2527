"""Host restore benchmark: gpuckpt against TensorFlow and against the memory-copy floor, in one run.

    python benchmarks/restore_host.py [--size-mb 1024] [--tensors 185] [--many 100000] [--repeat 3]

Writes (with TensorFlow, cached under .bench/) a checkpoint of ~SIZE MiB in ~TENSORS tensors of
mixed fp32/bf16/fp16, and one of MANY small tensors. With the page cache warm, it times:

* floor: one single-threaded memcpy of the (mapped, warm) data file into memory already faulted
  in; also into a fresh allocation (which pays the page faults a restore pays) and by ``preadv``;
* crc32c over the data file (the cost verification adds);
* gpuckpt ``restore()`` of all tensors, verified and not, with 1 and 2 reader threads;
* TensorFlow: ``tf.train.load_checkpoint(...).get_tensor`` over every key;
* for MANY: open + shape map, and restore of every tensor, gpuckpt against TensorFlow.

Correctness is checked (every tensor against TF, bit for bit) before anything is timed. Each figure
is the best of --repeat runs; ratios compare numbers measured in the same run. Results go to
benchmarks/results/host-<machine>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from report import machine_info, write_results  # noqa: E402

import gpuckpt  # noqa: E402
from gpuckpt.format.crc import crc32c  # noqa: E402


def best_of(repeat, fn):
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()  # its result (arrays) is dropped before the next run
        times.append(time.perf_counter() - start)
    return min(times), sorted(times)[len(times) // 2]


def import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def write_checkpoint(prefix, arrays):
    """Save with TensorFlow's SaveV2 (the same bytes any TF saver writes)."""
    tf = import_tf()
    if os.path.exists(prefix + ".index"):
        return
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    names = sorted(arrays)
    tensors = [tf.constant(arrays[n]) for n in names]
    tf.raw_ops.SaveV2(prefix=prefix + ".tmp", tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    for suffix in (".data-00000-of-00001", ".index"):  # index last: the checkpoint exists once it does
        os.replace(prefix + ".tmp" + suffix, prefix + suffix)


def large_arrays(size_mb, count, seed=0):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(np.log(4e3), np.log(64e6), count))
    sizes = (weights / weights.sum() * size_mb * 2**20).astype(np.int64)
    kinds = [np.float32, ml_dtypes.bfloat16, np.float16]
    arrays = {}
    for i, nbytes in enumerate(sizes):
        dtype = np.dtype(kinds[i % 3])
        n = max(1, int(nbytes) // dtype.itemsize)
        cols = 256 if n >= 4096 else 1
        n -= n % cols
        arrays[f"layer_{i:03d}/{['kernel', 'bias', 'embedding'][i % 3]}"] = (
            rng.standard_normal(n, np.float32).astype(dtype).reshape(-1, cols)
        )
    return arrays


def many_arrays(count, seed=1):
    rng = np.random.default_rng(seed)
    return {
        f"block_{i // 100:04d}/param_{i % 100:02d}": rng.standard_normal(int(rng.integers(1, 64))).astype(np.float32)
        for i in range(count)
    }


def warm(prefix):
    for name in (prefix + ".index", prefix + ".data-00000-of-00001"):
        with open(name, "rb") as f:
            while f.read(64 << 20):
                pass


def check_against_tf(prefix):
    tf = import_tf()
    reader = tf.train.load_checkpoint(prefix)
    with gpuckpt.open(prefix) as ckpt:
        restored = ckpt.restore()
        for name in ckpt.keys():
            theirs = reader.get_tensor(name)
            assert restored[name].dtype == theirs.dtype and restored[name].tobytes() == theirs.tobytes(), name


def floors(data_path, repeat):
    """The physical floor: one memcpy of the data file out of the (warm) page cache."""
    size = os.path.getsize(data_path)
    fd = os.open(data_path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        source = np.frombuffer(mapped, np.uint8)
        prefaulted = np.ones(size, np.uint8)
        np.copyto(prefaulted, source)  # map every page of the file once, so only the copy is timed

        def memcpy_prefaulted():
            np.copyto(prefaulted, source)

        def memcpy_fresh():
            fresh = np.empty(size, np.uint8)
            np.copyto(fresh, source)
            return fresh

        def pread_prefaulted():
            view = memoryview(prefaulted)
            for start in range(0, size, 4 << 20):
                os.preadv(fd, [view[start : start + (4 << 20)]], start)

        def checksum():
            view = memoryview(prefaulted)
            crc = 0
            for start in range(0, size, 64 << 20):
                crc = crc32c(view[start : start + (64 << 20)], crc)
            return crc

        result = {
            "bytes": size,
            "memcpy_prefaulted_s": best_of(repeat, memcpy_prefaulted)[0],
            "memcpy_fresh_alloc_s": best_of(repeat, memcpy_fresh)[0],
            "pread_prefaulted_s": best_of(repeat, pread_prefaulted)[0],
            "crc32c_s": best_of(repeat, checksum)[0],
        }
        source = None  # drop the export of the mapping so it can close
        mapped.close()
        return result
    finally:
        os.close(fd)


def time_gpuckpt_restore(prefix, repeat, verify, threads):
    def run():
        with gpuckpt.open(prefix) as ckpt:
            return ckpt.restore(verify=verify, threads=threads)

    return best_of(repeat, run)[0]


def time_tf_restore(prefix, repeat):
    tf = import_tf()

    def run():
        reader = tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}

    return best_of(repeat, run)[0]


def time_open_and_list(prefix, repeat):
    tf = import_tf()

    def ours():
        with gpuckpt.load_checkpoint(prefix) as reader:
            return reader.get_variable_to_shape_map()

    def theirs():
        return tf.train.load_checkpoint(prefix).get_variable_to_shape_map()

    return best_of(repeat, ours)[0], best_of(repeat, theirs)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=185)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument("--out", default=None, help="JSON results path (default benchmarks/results/host-<host>.json)")
    args = parser.parse_args(argv)

    results = {"machine": machine_info(), "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    large = os.path.join(args.work_dir, f"large-{args.size_mb}mb-{args.tensors}t", "ckpt")
    write_checkpoint(large, large_arrays(args.size_mb, args.tensors))
    warm(large)
    check_against_tf(large)
    floor = floors(large + ".data-00000-of-00001", args.repeat)
    big = {
        "floor": floor,
        "gpuckpt_verified_2threads_s": time_gpuckpt_restore(large, args.repeat, True, 2),
        "gpuckpt_verified_1thread_s": time_gpuckpt_restore(large, args.repeat, True, 1),
        "gpuckpt_unverified_2threads_s": time_gpuckpt_restore(large, args.repeat, False, 2),
        "tensorflow_s": time_tf_restore(large, args.repeat),
    }
    best = big["gpuckpt_verified_2threads_s"]
    big["ratios"] = {
        "tf_over_gpuckpt_verified": big["tensorflow_s"] / best,
        "gpuckpt_verified_over_memcpy_prefaulted": best / floor["memcpy_prefaulted_s"],
        "gpuckpt_verified_over_memcpy_fresh": best / floor["memcpy_fresh_alloc_s"],
        "gpuckpt_verified_GBps": floor["bytes"] / best / 1e9,
    }
    results["large"] = big

    many = os.path.join(args.work_dir, f"many-{args.many}", "ckpt")
    write_checkpoint(many, many_arrays(args.many))
    warm(many)
    check_against_tf(many)
    ours_open, tf_open = time_open_and_list(many, args.repeat)
    small = {
        "tensors": args.many,
        "gpuckpt_open_and_shape_map_s": ours_open,
        "tensorflow_open_and_shape_map_s": tf_open,
        "gpuckpt_restore_all_s": time_gpuckpt_restore(many, args.repeat, True, 2),
        "tensorflow_restore_all_s": time_tf_restore(many, max(1, args.repeat // 3)),
    }
    small["ratios"] = {
        "tf_over_gpuckpt_restore": small["tensorflow_restore_all_s"] / small["gpuckpt_restore_all_s"],
        "tf_over_gpuckpt_open": tf_open / ours_open,
    }
    results["many"] = small

    print(json.dumps(results, indent=2))
    write_results(results, args.out, "host")
    r, m = big["ratios"], small["ratios"]
    print(
        f"\n1 GiB-class: gpuckpt verified {best:.3f}s ({r['gpuckpt_verified_GBps']:.2f} GB/s) | "
        f"TF {big['tensorflow_s']:.3f}s -> {r['tf_over_gpuckpt_verified']:.2f}x faster | "
        f"memcpy floor {floor['memcpy_prefaulted_s']:.3f}s -> "
        f"{r['gpuckpt_verified_over_memcpy_prefaulted']:.2f}x of floor\n"
        f"{args.many} tensors: gpuckpt {small['gpuckpt_restore_all_s']:.3f}s | "
        f"TF {small['tensorflow_restore_all_s']:.3f}s -> {m['tf_over_gpuckpt_restore']:.1f}x | "
        f"open+list {ours_open:.3f}s vs TF {tf_open:.3f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
