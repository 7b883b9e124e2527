"""Mutation fuzzer for every parser: the sorted table, the bundle index (header, entries, slices),
string tensors, the ``checkpoint`` state file and ``.meta``/``saved_model.pb`` graphs.

    python benchmarks/fuzz_parsers.py [--seconds 60 | --count N] [--seed S] [--failures DIR]

Seeds are real files (the TF-written fixtures) and small bundles built here. Each input is a seed
with random damage (bit flips, byte overwrites, truncations, insertions, splices). A parser may
accept an input or raise a ``CheckpointError``; any other exception is a failure, and the input
is saved to --failures. Prints inputs tried per target and the failures; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402

from gpuckpt.errors import CheckpointError  # noqa: E402
from gpuckpt.format.bundle import parse_index  # noqa: E402
from gpuckpt.format.meta import parse_meta  # noqa: E402
from gpuckpt.format.object_graph import decode_object_graph  # noqa: E402
from gpuckpt.format.state import parse_state  # noqa: E402
from gpuckpt.format.table import parse_table  # noqa: E402
from gpuckpt.host.strings import decode_strings, encode_strings  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "data")
SHARD_BYTES = 1 << 20  # every shard "exists" with this size for the index parser


def _read(*parts: str) -> bytes:
    with open(os.path.join(FIXTURES, *parts), "rb") as f:
        return f.read()


def seeds() -> dict[str, list[bytes]]:
    from bundle_builder import make_bundle

    built = make_bundle({"a": np.arange(6, dtype=np.float32), "s": [b"xy", b"", b"z" * 200]}, num_shards=2)
    indexes = [
        _read("raw", "all_dtypes.index"),
        _read("tf1_partitioned", "model.ckpt-3.index"),
        _read("sharded", "model.ckpt-7.index"),
        _read("keras_adam", "ckpt-2.index"),
        built.index_bytes(),
    ]
    import pickle

    with open(os.path.join(FIXTURES, "expected.pkl"), "rb") as f:
        graph = pickle.load(f)["keras_adam/ckpt-2"]["tensors"]["_CHECKPOINTABLE_OBJECT_GRAPH"]
    return {
        "table": indexes,
        "index": indexes,
        "strings": [encode_strings([b"a", b"", b"q" * 300, bytes(range(256))])[0], encode_strings([])[0]],
        "state": [_read("keras_adam", "checkpoint"), _read("tf1_partitioned", "checkpoint")],
        "meta": [_read("tf1_partitioned", "model.ckpt-3.meta")],
        "saved_model": [_read("saved_model", "saved_model.pb")],
        "object_graph": [bytes(graph)],
    }


def _strings(data: bytes) -> None:
    """The first byte picks the element count, the second byte's low bit whether to verify (the
    CRC cannot match a mutated payload, so unverified decoding reaches the length checks)."""
    count = min(data[0] if data else 0, len(data))
    verify = len(data) > 1 and bool(data[1] & 1)
    decode_strings(data, count, (count,), False, 0, verify, ("fuzz.data", "s", 0))


TARGETS: dict[str, Callable[[bytes], object]] = {
    "table": lambda data: parse_table(data, "fuzz.index"),
    "index": lambda data: parse_index(data, "fuzz.index", lambda shard, num_shards: SHARD_BYTES),
    "strings": _strings,
    "state": lambda data: parse_state(data, "/fuzz", "/fuzz/checkpoint"),
    "meta": lambda data: parse_meta(data, "fuzz.meta"),
    "saved_model": lambda data: parse_meta(data, "saved_model.pb"),
    "object_graph": lambda data: decode_object_graph(data, "fuzz.index"),
}
TARGET_NAMES = list(TARGETS)


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        kind = rng.randrange(6)
        position = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:
            out[position] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[position] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == 2:
            del out[position:]
        elif kind == 3:
            out[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        elif kind == 4 and out:
            del out[position : position + rng.randrange(1, 16)]
        else:
            other = rng.choice(pool)
            start = rng.randrange(len(other)) if other else 0
            out[position:position] = other[start : start + rng.randrange(1, 64)]
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--count", type=int, default=None, help="inputs per target (instead of --seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failures", default=os.path.join(ROOT, ".fuzz-failures"))
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    corpus = seeds()
    pool = [s for group in corpus.values() for s in group]
    tried = dict.fromkeys(TARGETS, 0)
    rejected = dict.fromkeys(TARGETS, 0)
    failures: list[tuple[str, str]] = []
    deadline = time.monotonic() + args.seconds
    names = list(TARGETS)
    while True:
        if args.count is not None and all(tried[n] >= args.count for n in names):
            break
        if args.count is None and time.monotonic() > deadline:
            break
        name = names[sum(tried.values()) % len(names)]
        data = mutate(rng.choice(corpus[name]), rng, pool)
        tried[name] += 1
        try:
            TARGETS[name](data)
        except CheckpointError:
            rejected[name] += 1
        except Exception:  # anything but a CheckpointError is a bug
            os.makedirs(args.failures, exist_ok=True)
            path = os.path.join(args.failures, f"{name}-{len(failures)}.bin")
            with open(path, "wb") as f:
                f.write(data)
            failures.append((name, traceback.format_exc(limit=3)))
    for name in names:
        print(f"{name:<13} {tried[name]:>9} inputs, {rejected[name]:>9} refused with CheckpointError")
    print(f"{sum(tried.values())} inputs, {len(failures)} failures")
    for name, trace in failures[:5]:
        print(f"--- {name}\n{trace}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
