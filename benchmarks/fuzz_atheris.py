"""Coverage-guided fuzzing (atheris + libFuzzer) of every parser fuzz_parsers.py mutates blindly.

    python benchmarks/fuzz_atheris.py [--seconds 60 | --runs N] [--target NAME] [--failures DIR]

Each input's first byte picks the target (table, index, strings, state, meta, saved_model,
object_graph); the rest is handed to the parser. The seed corpus is fuzz_parsers.py's: the
TF-written fixtures and small built bundles. libFuzzer keeps inputs that reach new code, so it
gets past checksums and length prefixes that blind mutation rarely survives.

A failure is anything but ``CheckpointError``: another exception, a crash, an input running past
5 s (a hang), or an allocation beyond the memory cap (the address space is limited to what the
process already uses plus 1 GiB, so an index that makes the parser allocate gigabytes fails with
MemoryError). The fuzzer runs in a child process; this one reports inputs tried, coverage and the
failing inputs saved to --failures, and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

HEADROOM_BYTES = 1 << 30  # address space beyond the fuzzer's own: no input justifies more
TIMEOUT_SECONDS = 5


def _write_corpus(directory: str, target_names: list[str]) -> None:
    import fuzz_parsers

    for name, samples in fuzz_parsers.seeds().items():
        if name not in target_names:
            continue
        tag = fuzz_parsers.TARGET_NAMES.index(name)
        for number, sample in enumerate(samples):
            with open(os.path.join(directory, f"{name}-{number}"), "wb") as f:
                f.write(bytes([tag]) + sample)


def _target_names(target: str, all_names: list[str]) -> list[str]:
    return all_names if target == "all" else [target]


def _child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["gpuckpt"]):
        import fuzz_parsers
    from gpuckpt.errors import CheckpointError

    targets = [fuzz_parsers.TARGETS[name] for name in _target_names(target, fuzz_parsers.TARGET_NAMES)]

    def one_input(data: bytes) -> None:
        if not data:
            return
        try:
            targets[data[0] % len(targets)](data[1:])
        except CheckpointError:
            pass  # the expected outcome for damaged input; anything else propagates: a failure

    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/statm") as f:
        used = max(used, int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE"))
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM_BYTES, resource.RLIM_INFINITY))
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=None, help="stop after this many inputs (instead of --seconds)")
    parser.add_argument("--target", default="all", help="one parser, or all (default)")
    parser.add_argument("--failures", default=os.path.join(ROOT, ".fuzz-failures"))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # gpuckpt must not be imported before atheris instruments it
        _child(args.target, args.child)
        return 0

    import fuzz_parsers

    if args.target != "all" and args.target not in fuzz_parsers.TARGET_NAMES:
        parser.error(f"--target must be all or one of {', '.join(fuzz_parsers.TARGET_NAMES)}")
    names = _target_names(args.target, fuzz_parsers.TARGET_NAMES)

    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[dev]' (Linux x86-64, Python 3.11-3.13)", file=sys.stderr)
        return 2
    os.makedirs(args.failures, exist_ok=True)
    with tempfile.TemporaryDirectory() as corpus:
        _write_corpus(corpus, names)
        stop = [f"-runs={args.runs}"] if args.runs is not None else [f"-max_total_time={args.seconds}"]
        libfuzzer = [
            corpus,
            *stop,
            f"-timeout={TIMEOUT_SECONDS}",
            "-rss_limit_mb=0",  # the address-space limit set in the child is the memory check
            "-print_final_stats=1",
            f"-artifact_prefix={os.path.join(os.path.abspath(args.failures), '')}",
        ]
        command = [sys.executable, os.path.abspath(__file__), "--target", args.target, "--child", *libfuzzer]
        child = subprocess.run(command, capture_output=True, text=True, cwd=args.failures)
    log = child.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    coverage = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    failures = re.findall(r"Test unit written to (\S+)", log)
    print(f"targets: {', '.join(names)}")
    print(f"inputs tried: {runs[-1] if runs else 'unknown'}")
    if coverage:
        edges, features, corpus_size = coverage[-1]
        print(f"coverage: {edges} edges, {features} features, corpus of {corpus_size} inputs")
    if child.returncode != 0 or failures:
        print(f"FAILED (exit {child.returncode}); inputs saved: {', '.join(failures) or 'none'}")
        tail = log.strip().splitlines()[-40:]
        print("\n".join(tail))
        return 1
    print("failures: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
