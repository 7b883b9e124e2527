"""Mutation fuzzer for every parser: the sorted table, the bundle index (header, entries, slices),
string tensors, the ``checkpoint`` state file and ``.meta``/``saved_model.pb`` graphs; and, as the
``restore`` target, a damaged index over real data files driven through every read path.

    python benchmarks/fuzz_parsers.py [--seconds 60 | --count N] [--seed S] [--failures DIR]

Seeds are real files (the TF-written fixtures) and small bundles built here. Each input is a seed
with random damage (bit flips, byte overwrites, truncations, insertions, splices). A parser may
accept an input or raise a ``CheckpointError``; any other exception is a failure, and the input
is saved to --failures. Prints inputs tried per target and the failures; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import sys
import tempfile
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
from gpuckpt.format.table import build_table, parse_table  # noqa: E402
from gpuckpt.format.varint import VarintError, decode_varint, encode_varint  # noqa: E402
from gpuckpt.host.strings import decode_strings, encode_strings  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "data")
SHARD_BYTES = 1 << 20  # every shard "exists" with this size for the index parser


def _read(*parts: str) -> bytes:
    with open(os.path.join(FIXTURES, *parts), "rb") as f:
        return f.read()


def encode_records(items: list[tuple[bytes, bytes]]) -> bytes:
    """Table contents as varint-length-prefixed keys and values, so mutations land in the entries."""
    return b"".join(encode_varint(len(k)) + k + encode_varint(len(v)) + v for k, v in items)


def decode_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The records of :func:`encode_records`, sorted and unique by key, up to the first malformed one."""
    records: dict[bytes, bytes] = {}
    position = 0
    try:
        while position < len(data):
            length, position = decode_varint(data, position, len(data))
            key, position = data[position : position + length], position + length
            length, position = decode_varint(data, position, len(data))
            records[key] = data[position : position + length]
            position += length
    except VarintError:
        pass
    return sorted(records.items())


class RestoreTarget:
    """An index over fixed data files (a small bundle written once) whose *contents* are the input
    (header and entries as :func:`encode_records`): it is built into a table with valid block
    checksums, so damage reaches the entries rather than stopping at a block's crc32c. Then it is
    opened, restored with and without verification and on the host stand-in device, and every
    tensor is sliced."""

    def __init__(self) -> None:
        self.prefix = ""
        self.seed_index = b""

    def setup(self) -> None:
        if self.prefix:
            return
        import gpuckpt

        folder = tempfile.mkdtemp(prefix="gpuckpt-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        atexit.register(shutil.rmtree, folder, True)
        self.prefix = os.path.join(folder, "ckpt")
        full = np.arange(24, dtype=np.float64).reshape(6, 4)
        tensors = {
            "f32": np.linspace(-1, 1, 300, dtype=np.float32).reshape(3, 100),
            "i8": np.arange(-5, 5, dtype=np.int8),
            "s": np.array([b"ab", b"", b"x" * 70], dtype=object),
            "part": gpuckpt.Partitioned(
                full.shape, [((slice(0, 2), slice(None)), full[:2]), ((slice(2, 6), slice(None)), full[2:])]
            ),
            "scalar": np.float16(3.5),
        }
        gpuckpt.save(self.prefix, tensors, max_shard_bytes=512)
        with open(self.prefix + ".index", "rb") as f:
            self.seed_index = encode_records(parse_table(f.read(), "seed.index"))

    def __call__(self, data: bytes) -> None:
        import gpuckpt
        from gpuckpt.device import HostDevice

        self.setup()
        with open(self.prefix + ".index", "wb") as f:
            f.write(build_table(decode_records(data)))
        with gpuckpt.open(self.prefix) as ckpt:
            ckpt.restore()
            ckpt.restore(verify=False, threads=2)
            ckpt.restore(device=HostDevice())
            for name in ckpt.keys():
                ckpt.get_slice(name)[...]


RESTORE = RestoreTarget()


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
    from conftest import EXPECTED  # tests/ is on sys.path; its loader reads expected.pkl under numpy 1.x too

    graph = EXPECTED["keras_adam/ckpt-2"]["tensors"]["_CHECKPOINTABLE_OBJECT_GRAPH"]
    RESTORE.setup()
    return {
        "restore": [RESTORE.seed_index],
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
    "restore": RESTORE,
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
