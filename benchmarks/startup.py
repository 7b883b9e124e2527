"""Start-up benchmark: what a command-line call or a server's health check pays before any bytes.

    python benchmarks/startup.py [--repeat 15] [--out FILE]

Each figure is a fresh process, best of --repeat (the machine is shared and noisy):

* floor: ``python -c pass`` (the interpreter alone) and ``python -c "import numpy"`` (the one
  dependency every array pays for);
* ``import gpuckpt`` (targets: 0.15 s here), and the same with ml_dtypes imported too, which
  gpuckpt avoids until an array of one of its types is made;
* ``gpuckpt ls`` of the bundled sample (target: 0.3 s), and ``python -m gpuckpt`` (open and
  restore the sample);
* baseline, where TensorFlow is installed: ``tf.train.list_variables`` of the sample.

Prints each time and its ratio to the floors; results go to benchmarks/results/startup-<machine>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from report import machine_info, write_results  # noqa: E402

SAMPLE = os.path.join(ROOT, "gpuckpt", "samples", "keras_adam")
TARGETS = {"import gpuckpt": 0.15, "gpuckpt ls SAMPLE": 0.3}


def commands() -> dict[str, list[str]]:
    python = [sys.executable, "-c"]
    return {
        "python -c pass (floor)": python + ["pass"],
        "import numpy (floor)": python + ["import numpy"],
        "import gpuckpt": python + ["import gpuckpt"],
        "import gpuckpt, ml_dtypes": python + ["import gpuckpt, ml_dtypes"],
        "gpuckpt ls SAMPLE": python
        + ["import sys, gpuckpt.cli; sys.exit(gpuckpt.cli.main(['ls', sys.argv[1]]))", SAMPLE],
        "python -m gpuckpt (open + restore the sample)": [sys.executable, "-m", "gpuckpt"],
        "TensorFlow list_variables SAMPLE (baseline)": python
        + ["import sys, tensorflow as tf; tf.train.list_variables(sys.argv[1])", SAMPLE],
    }


def best_time(command: list[str], repeat: int) -> float | None:
    """Best wall time of ``command`` in a new process; None if it fails (TensorFlow missing)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            return None
        best = elapsed if best is None else min(best, elapsed)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs of each command; the best is kept")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/startup-<machine>.json)")
    parser.add_argument("--machine", help="name of this machine in the result file name")
    parser.add_argument("--skip-tf", action="store_true", help="leave out the TensorFlow baseline (~4 s a run)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    times = {}
    for label, command in commands().items():
        if args.skip_tf and "TensorFlow" in label:
            continue
        times[label] = best_time(command, min(args.repeat, 3) if "TensorFlow" in label else args.repeat)
        shown = "not available" if times[label] is None else f"{times[label] * 1000:8.1f} ms"
        print(f"{label:48s} {shown}", flush=True)
    floor = times["python -c pass (floor)"]
    assert floor is not None and times["import numpy (floor)"] is not None
    numpy_floor = times["import numpy (floor)"]
    print()
    for label, target in TARGETS.items():
        value = times[label]
        if value is None:
            print(f"{label}: failed")
            continue
        verdict = "meets" if value is not None and value <= target else "misses"
        print(f"{label}: {value:.3f} s, {verdict} the {target} s target; {value / numpy_floor:.2f}x import numpy")
    results = {
        "machine": machine_info(),
        "repeat": args.repeat,
        "seconds": times,
        "targets_seconds": TARGETS,
        "over_interpreter_floor": {k: None if v is None else v / floor for k, v in times.items()},
        "over_numpy_floor": {k: None if v is None else v / numpy_floor for k, v in times.items()},
    }
    print("results:", write_results(results, args.out, "startup", args.machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
