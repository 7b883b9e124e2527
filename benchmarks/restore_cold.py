"""Cold-cache host restore: gpuckpt by reader thread count against reading the file and TensorFlow.

    python benchmarks/restore_cold.py [--size-mb 1024] [--tensors 185] [--threads 1,2,4,8]
                                      [--repeat 5] [--out FILE]

What a server pays the first time it restores, when the checkpoint is not in the page cache.
Writes (with gpuckpt.save, cached under .bench/) the checkpoint benchmarks/restore_host.py uses,
checks one verified restore against the arrays written, then times, round after round (so load
from other processes and the storage's own caching fall on all alike), each after dropping the
data file from the page cache (``posix_fadvise`` DONTNEED, gpuckpt.host.shards.drop_from_page_cache):

* floor: reading the file once in order, 4 MiB at a time, one thread (what ``cat`` does), and
  the same split between 4 threads, each its quarter;
* gpuckpt ``restore()`` (verified) with each of --threads reader threads;
* TensorFlow, where installed: ``tf.train.load_checkpoint(...).get_tensor`` over every key.

Figures are the best and the median of --repeat; ratios compare the best of one run. Cold reads
here come from a virtual disk the host machine may cache itself: the medians show how steady it
was. Results go to benchmarks/results/cold-<machine>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import machine_info, write_results  # noqa: E402
from restore_host import large_arrays  # noqa: E402

import gpuckpt  # noqa: E402
from gpuckpt.host.shards import drop_from_page_cache  # noqa: E402

READ_BYTES = 4 << 20


def read_file(path, threads):
    """Read the file once, ``threads`` threads each reading its equal share in order."""
    size = os.path.getsize(path)
    share = -(-size // threads)

    def part(start):
        fd = os.open(path, os.O_RDONLY)
        try:
            buffer = memoryview(bytearray(READ_BYTES))
            for offset in range(start, min(size, start + share), READ_BYTES):
                os.preadv(fd, [buffer[: min(READ_BYTES, start + share - offset)]], offset)
        finally:
            os.close(fd)

    workers = [threading.Thread(target=part, args=(start,)) for start in range(0, size, share)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=185)
    parser.add_argument("--threads", default="1,2,4,8", help="reader thread counts to time, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]

    prefix = os.path.join(args.work_dir, f"warm-large-{args.size_mb}mb-{args.tensors}t", "ckpt")
    arrays = large_arrays(args.size_mb, args.tensors)
    if not os.path.exists(prefix + ".index"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        gpuckpt.save(prefix, arrays)
    data = prefix + ".data-00000-of-00001"
    with gpuckpt.open(prefix) as ckpt:
        restored = ckpt.restore()
    for name, value in arrays.items():
        assert restored[name].tobytes() == np.asarray(value).tobytes(), name
    del restored
    if not drop_from_page_cache([data]):
        print("this platform cannot drop files from the page cache: nothing to measure")
        return 1

    def restore(threads):
        with gpuckpt.open(prefix, threads=threads) as ckpt:
            ckpt.restore()

    timed = {
        "floor_read_in_order_1thread_s": lambda: read_file(data, 1),
        "floor_read_in_order_4threads_s": lambda: read_file(data, 4),
        **{f"gpuckpt_verified_{n}threads_s": (lambda n=n: restore(n)) for n in counts},
    }
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        def tf_restore():
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)

        timed["tensorflow_s"] = tf_restore
    except ImportError:
        pass
    seconds = {name: [] for name in timed}
    for _ in range(args.repeat):
        for name, fn in timed.items():
            drop_from_page_cache([data])
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    figures = {name: {"best": min(t), "median": sorted(t)[len(t) // 2], "all": t} for name, t in seconds.items()}
    floor = figures["floor_read_in_order_1thread_s"]["best"]
    results = {
        "machine": machine_info(),
        "args": vars(args),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "bytes": os.path.getsize(data),
        "cold": figures,
        "ratios_to_reading_in_order_1thread": {name: f["best"] / floor for name, f in figures.items()},
    }
    path = write_results(results, args.out, "cold")
    for name, f in figures.items():
        print(f"{name:36s} best {f['best']:7.3f} s  median {f['median']:7.3f} s  ({f['best'] / floor:5.2f}x the floor)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
