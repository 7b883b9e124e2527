"""Host conversion benchmark: ``dtype=`` conversions by the project's rule against numpy's
``astype`` (which follows whatever the installed numpy/ml_dtypes do) and a memcpy floor.

    python benchmarks/convert_host.py [--mb 64] [--repeat 5] [--out FILE]

For each conversion the kernels implement from a 16-, 32- or 64-bit type, converts --mb of
normally distributed values (checked first against astype where both follow the same rule), best
of --repeat; prints GB/s of input and the ratios. Results go to benchmarks/results/convert-<machine>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from report import machine_info, write_results  # noqa: E402

from gpuckpt.dtypes import numpy_dtype  # noqa: E402
from gpuckpt.host.convert import KERNEL_TYPE_NAMES, conversion_names, reference_convert  # noqa: E402


def best(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64, help="input size of each conversion, in MB")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best is kept")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/convert-<machine>.json)")
    parser.add_argument("--machine", help="name of this machine in the result file name")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.mb <= 0:
        parser.error("--repeat must be at least 1 and --mb positive")
    values = np.random.default_rng(0).standard_normal(int(args.mb * 1e6) // 2)
    rows = {}
    for kernel in conversion_names():
        source, target = kernel.split("_to_")
        if source.startswith("f8"):
            continue  # 8-bit sources are table lookups, as 16-bit ones are
        array = values.astype(numpy_dtype(KERNEL_TYPE_NAMES[source]))
        array = array[: int(args.mb * 1e6) // array.itemsize]
        target_type = numpy_dtype(KERNEL_TYPE_NAMES[target])
        ours = reference_convert(kernel, array)
        theirs = array.astype(target_type)
        # ml_dtypes before 0.7 rounds float64 to bfloat16 through float32 (twice): not the same rule
        if kernel != "f64_to_bf16":
            assert ours.tobytes() == theirs.tobytes(), f"{kernel}: differs from astype on normal values"
        destination = np.empty_like(array)
        floor = best(lambda a=array, d=destination: np.copyto(d, a), args.repeat)
        ours_s = best(lambda a=array, k=kernel: reference_convert(k, a), args.repeat)
        astype_s = best(lambda a=array, t=target_type: a.astype(t), args.repeat)
        rows[kernel] = {
            "gb_per_s": array.nbytes / ours_s / 1e9,
            "astype_gb_per_s": array.nbytes / astype_s / 1e9,
            "memcpy_floor_gb_per_s": array.nbytes / floor / 1e9,
            "ours_over_astype_time": ours_s / astype_s,
            "ours_over_floor_time": ours_s / floor,
        }
        row = rows[kernel]
        print(
            f"{kernel:12s} {row['gb_per_s']:6.2f} GB/s  astype {row['astype_gb_per_s']:6.2f}  "
            f"memcpy {row['memcpy_floor_gb_per_s']:6.2f}  time vs astype {row['ours_over_astype_time']:5.2f}x  "
            f"vs floor {row['ours_over_floor_time']:5.2f}x",
            flush=True,
        )
    results = {"machine": machine_info(), "input_mb": args.mb, "repeat": args.repeat, "conversions": rows}
    print("results:", write_results(results, args.out, "convert", args.machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
