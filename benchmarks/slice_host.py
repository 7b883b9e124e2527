"""Lazy slicing benchmark: ``get_slice(name)[key]`` against the mapped-file floor and TensorFlow.

    python benchmarks/slice_host.py [--rows 1000000] [--cols 64] [--repeat 15] [--out FILE]

Saves one float32 embedding of ROWS x COLS (cached under .bench/), checks every selection against
numpy, then times each selection, best of --repeat, with the page cache warm:

* gpuckpt ``get_slice`` (reads the selected runs, or longer stretches through one 4 MiB buffer,
  with ``preadv``: no mapping, so a file truncated underneath is an error instead of a SIGBUS);
* gpuckpt ``restore(regions={name: key})``: the same reader, reading at most a page beyond the
  selection between two of its runs (and the whole tensor, verified, for ``everything``);
* floor: ``numpy.memmap`` of the data file, indexed and copied (the pages are already mapped and
  cached, so only the selected bytes are touched: the fastest a reader can be, and the way that
  can kill the process if the file shrinks);
* TensorFlow, where installed: ``load_checkpoint(...).get_tensor(name)[key]`` (TF has no partial
  read: it reads the whole tensor).

Prints ratios measured in the same run; results go to benchmarks/results/slice-<machine>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from report import machine_info, write_results  # noqa: E402

import gpuckpt  # noqa: E402

SELECTIONS = {
    "1000 rows": np.s_[1000:2000],
    "one row": np.s_[5],
    "one column": np.s_[:, 3],
    "every 100th row": np.s_[::100],
    "block of rows x 10 columns": np.s_[1000:200_000, 10:20],
    "every 3rd column": np.s_[:, ::3],
    "every 7th row, 4 columns": np.s_[::7, 5:9],
    "rows reversed": np.s_[::-1],
    "everything": np.s_[...],
}


def best_ms(repeat, fn):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    prefix = os.path.join(args.work_dir, f"slice-{args.rows}x{args.cols}", "ckpt")
    embedding = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    if not os.path.exists(prefix + ".index"):
        gpuckpt.save(prefix, {"embedding": embedding})
    mapped = np.memmap(prefix + ".data-00000-of-00001", np.float32, "r", shape=embedding.shape)
    try:
        import tensorflow as tf

        tf_reader = tf.train.load_checkpoint(prefix)
    except ImportError:
        tf_reader = None

    results = {"machine": machine_info(), "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rows = {}
    with gpuckpt.open(prefix) as ckpt:
        lazy = ckpt.get_slice("embedding")
        for name, key in SELECTIONS.items():
            assert np.array_equal(lazy[key], embedding[key]), name
            region = lambda key=key: ckpt.restore(["embedding"], regions={"embedding": key})["embedding"]  # noqa: E731
            assert np.array_equal(region(), embedding[key]), name
            row = {
                "gpuckpt_ms": best_ms(args.repeat, lambda key=key: lazy[key]),
                "restore_regions_ms": best_ms(args.repeat, region),
                "memmap_floor_ms": best_ms(args.repeat, lambda key=key: np.array(mapped[key])),
            }
            if tf_reader is not None:
                whole_then_index = lambda key=key: tf_reader.get_tensor("embedding")[key]  # noqa: E731
                row["tensorflow_ms"] = best_ms(max(1, args.repeat // 5), whole_then_index)
            row["vs_floor"] = row["gpuckpt_ms"] / row["memmap_floor_ms"]
            row["restore_regions_vs_get_slice"] = row["restore_regions_ms"] / row["gpuckpt_ms"]
            if "tensorflow_ms" in row:
                row["speedup_vs_tensorflow"] = row["tensorflow_ms"] / row["gpuckpt_ms"]
            rows[name] = row
            extra = f"   TF {row['tensorflow_ms']:9.3f} ms ({row['speedup_vs_tensorflow']:7.1f}x)" if tf_reader else ""
            print(
                f"{name:28s} gpuckpt {row['gpuckpt_ms']:9.3f} ms   floor {row['memmap_floor_ms']:9.3f} ms "
                f"({row['vs_floor']:6.1f}x the floor)   regions {row['restore_regions_vs_get_slice']:4.2f}x{extra}"
            )
    results["selections"] = rows
    write_results(results, args.out, "slice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
