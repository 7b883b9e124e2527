"""The ``gpuckpt`` command (also ``python -m gpuckpt``).

    gpuckpt ls PATH [--filter REGEX] [--json]      tensors: name, dtype, shape, bytes, shard, kind
    gpuckpt inspect PATH [--json]                  header, data files, object graph, .meta summary
    gpuckpt verify PATH                            every checksum; exit 3 naming damaged tensors
    gpuckpt restore PATH [--device cpu] [...]      restore everything, with a timing breakdown
    gpuckpt bench PATH [--repeat N]                warm and cold restore against the baselines here
    gpuckpt merge OUT SRC[=MAP] ... [...]          one checkpoint from several (MAP: old:new,...)

Without arguments it lists and restores the small Keras checkpoint bundled with the package.
Exit codes: 0 success; 1 an error (one line; the traceback with --debug); 2 bad usage;
3 ``verify`` found damaged tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import CheckpointError
from . import open as open_checkpoint
from .checkpoint import Checkpoint
from .format.meta import MetaGraphSummary, find_meta, read_meta
from .format.object_graph import OBJECT_GRAPH_KEY

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "keras_adam")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _progress(enabled: bool, label: str) -> Callable[[int, int], None] | None:
    """A one-line progress bar on a terminal's stderr; nothing when not attached to one."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r{label} [{bar:<30}] {fraction:4.0%} {_human(done)}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _rows(ckpt: Checkpoint, pattern: str | None) -> list[dict[str, Any]]:
    import re

    regex = re.compile(pattern) if pattern else None
    rows = []
    for name in ckpt.keys():
        if regex is not None and not regex.search(name):
            continue
        info = ckpt.info(name)
        rows.append(
            {
                "name": name,
                "dtype": info.tf_dtype,
                "shape": list(info.shape),
                "bytes": info.nbytes,
                "shard": info.shard_id,
                "partitioned": info.partitioned,
                "kind": ckpt.kind(name).value,
            }
        )
    return rows


def _print_rows(rows: list[dict[str, Any]]) -> None:
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        where = "partitioned" if r["partitioned"] else f"shard {r['shard']}"
        print(
            f"  {r['name']:<{width}}  {r['dtype']:<10} {str(r['shape']):<16} {_human(r['bytes']):>10}  "
            f"{r['kind']:<14} {where}"
        )


def cmd_ls(args: argparse.Namespace) -> int:
    with open_checkpoint(args.path) as ckpt:
        rows = _rows(ckpt, args.filter)
        if args.json:
            print(json.dumps(rows, indent=1))
            return EXIT_OK
        print(f"{ckpt.prefix}: {len(rows)} of {len(ckpt)} tensors, {_human(sum(r['bytes'] for r in rows))}")
        _print_rows(rows)
    return EXIT_OK


def _object_tree(ckpt: Checkpoint) -> list[str]:
    """The object graph as an indented tree of object paths; each attribute with its key."""
    tree: dict[str, Any] = {}
    for key, attribute in ckpt.objects().items():
        node = tree
        for part in attribute.object_path.split("/"):
            node = node.setdefault(part, {})
        node.setdefault("", []).append(f"[{attribute.kind.value}] {attribute.attribute} -> {key}")
    lines: list[str] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        for name in sorted(k for k in node if k):
            child = node[name]
            lines.append("  " * depth + name + ("  " + "; ".join(child[""]) if "" in child else ""))
            walk(child, depth + 1)

    walk(tree, 0)
    return lines


def _meta_lines(summary: MetaGraphSummary) -> list[str]:
    top = ", ".join(f"{op} {n}" for op, n in list(summary.ops.items())[:8])
    scopes = ", ".join(f"{s} {n}" for s, n in list(summary.scopes.items())[:8])
    lines = [
        f"  tags {list(summary.tags)}, TensorFlow {summary.tensorflow_version or '?'}",
        f"  {summary.node_count} nodes: {top}",
        f"  top-level scopes: {scopes}",
        f"  {len(summary.variables)} variables, {summary.function_count} functions, "
        f"{len(summary.collections)} collections, {len(summary.signatures)} signatures",
        "  bytes: " + ", ".join(f"{k} {_human(v)}" for k, v in summary.part_bytes.items() if v),
    ]
    if summary.saver:
        lines.append("  saver: " + ", ".join(f"{k}={v}" for k, v in summary.saver.items()))
    for name, signature in summary.signatures.items():
        lines.append(f"  signature {name}: {signature['inputs']} -> {signature['outputs']}")
    for base, copies in summary.repeated_imports.items():
        lines.append(f"  imported again: {base} -> {', '.join(copies)}")
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_checkpoint(args.path) as ckpt:
        shards: list[dict[str, Any]] = []
        for path in ckpt.data_files():
            shards.append({"file": path, "bytes": os.path.getsize(path) if os.path.exists(path) else None})
        meta_path = find_meta(ckpt.prefix)
        metas = read_meta(meta_path) if meta_path else []
        index_bytes = os.path.getsize(ckpt.prefix + ".index")
        tensor_bytes = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        report: dict[str, Any] = {
            "prefix": ckpt.prefix,
            "index_bytes": index_bytes,
            "num_shards": ckpt.num_shards,
            "endianness": "big" if ckpt.big_endian else "little",
            "tensors": len(ckpt),
            "tensor_bytes": tensor_bytes,
            "data_files": shards,
            "object_based": OBJECT_GRAPH_KEY in ckpt,
            "meta_file": meta_path,
        }
        if args.json:
            report["objects"] = {k: [a.object_path, a.kind.value] for k, a in ckpt.objects().items()}
            report["meta"] = [summary_as_dict(s) for s in metas]
            print(json.dumps(report, indent=1, default=str))
            return EXIT_OK
        print(f"{report['prefix']}")
        print(
            f"  index {_human(index_bytes)}; {len(ckpt)} tensors, {_human(tensor_bytes)}; {report['endianness']}-endian"
        )
        for shard in shards:
            size = "MISSING" if shard["bytes"] is None else _human(shard["bytes"])
            print(f"  {os.path.basename(shard['file'])}  {size}")
        if report["object_based"]:
            print("object graph:")
            for line in _object_tree(ckpt):
                print("  " + line)
        for summary in metas:
            print(f"graph ({meta_path}):")
            for line in _meta_lines(summary):
                print(line)
    return EXIT_OK


def summary_as_dict(summary: MetaGraphSummary) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(summary)
    data["variables"] = [dataclasses.asdict(v) for v in summary.variables]
    return data


def cmd_verify(args: argparse.Namespace) -> int:
    damaged: list[str] = []
    checked = 0
    with open_checkpoint(args.path) as ckpt:
        progress = _progress(not args.quiet, "verify")
        total = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        for name in ckpt.keys():
            try:
                ckpt.get_tensor(name, verify=True)
            except CheckpointError as exc:
                damaged.append(name)
                print(f"DAMAGED {name}: {exc}", file=sys.stderr)
            checked += ckpt.info(name).nbytes
            if progress is not None:
                progress(checked, total)
        if damaged:
            print(f"{ckpt.prefix}: {len(damaged)} of {len(ckpt)} tensors damaged: {', '.join(damaged)}")
            return EXIT_DAMAGED
        print(f"{ckpt.prefix}: all {len(ckpt)} tensors verified ({_human(total)})")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with open_checkpoint(args.path, device=args.device, verify=not args.no_verify, threads=args.threads) as ckpt:
        opened = time.perf_counter() - start
        if args.list:
            rows = _rows(ckpt, None)
            print(
                f"{ckpt.prefix}: {len(rows)} tensors, {_human(sum(r['bytes'] for r in rows))} "
                f"in {ckpt.num_shards} data file(s)"
            )
            _print_rows(rows)
        start = time.perf_counter()
        arrays = ckpt.restore(args.filter, progress=_progress(not args.quiet, "restore"))
        elapsed = time.perf_counter() - start
        total = sum(ckpt.info(n).nbytes for n in arrays)
    rate = total / elapsed / 1e9 if elapsed > 0 else float("inf")
    checked = "not verified" if args.no_verify else "crc32c verified"
    print(
        f"opened in {opened * 1e3:.1f} ms; restored {len(arrays)} tensors ({_human(total)}) to {ckpt.device} "
        f"in {elapsed * 1e3:.1f} ms = {rate:.2f} GB/s, {checked}"
    )
    return EXIT_OK


def _evict(paths: list[str]) -> bool:
    """Drop files from the page cache (posix_fadvise DONTNEED); False where that is impossible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    with open_checkpoint(args.path) as ckpt:
        files = [f for f in ckpt.data_files() if os.path.exists(f)] + [ckpt.prefix + ".index"]
        total = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        prefix = ckpt.prefix

    def timed(fn: Callable[[], Any], cold: bool = False) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            if cold:
                _evict(files)
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    def ours() -> None:
        with open_checkpoint(prefix, device=args.device) as c:
            arrays = c.restore([n for n in c.keys() if c.device == "cpu" or c.info(n).tf_dtype != "string"])
            if c.device != "cpu":  # device work is asynchronous: wait for every tensor before stopping the clock
                import cupy

                cupy.cuda.runtime.deviceSynchronize()
            del arrays

    largest = max((os.path.getsize(p) for p in files[:-1]), default=0)
    buffer = memoryview(np.ones(largest, np.uint8))  # type: ignore[arg-type]  # faulted in once, outside the timing

    def floor() -> None:  # the raw read: every data file into memory, 4 MiB at a time, one thread
        for path in files[:-1]:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.path.getsize(path)
                for offset in range(0, size, 4 << 20):
                    os.preadv(fd, [buffer[offset : min(size, offset + (4 << 20))]], offset)
            finally:
                os.close(fd)

    results = {"warm_gpuckpt_s": timed(ours), "warm_read_floor_s": timed(floor)}
    if _evict(files):
        results["cold_gpuckpt_s"] = timed(ours, cold=True)
        results["cold_read_floor_s"] = timed(floor, cold=True)
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        def theirs() -> None:
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)

        results["warm_tensorflow_s"] = timed(theirs)
    except ImportError:
        pass
    print(f"{prefix}: {_human(total)} in {len(files) - 1} data file(s), best of {args.repeat}, device {args.device}")
    for key, seconds in results.items():
        ratio = f"  ({seconds / results['warm_gpuckpt_s']:.2f}x gpuckpt warm)" if key != "warm_gpuckpt_s" else ""
        print(f"  {key[:-2]:<22} {seconds * 1e3:9.1f} ms  {total / seconds / 1e9:6.2f} GB/s{ratio}")
    if args.json:
        print(json.dumps({"prefix": prefix, "bytes": total, **results}))
    return EXIT_OK


def _parse_source(text: str) -> tuple[str, dict[str, str] | None]:
    path, sep, mapping = text.partition("=")
    if not sep:
        return path, None
    pairs = {}
    for item in mapping.split(","):
        old, colon, new = item.partition(":")
        if not colon or not old or not new:
            raise argparse.ArgumentTypeError(f"bad assignment map item {item!r}; expected old:new")
        pairs[old] = new
    return path, pairs


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    casts = {}
    for item in args.cast or []:
        pattern, sep, dtype = item.rpartition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"bad --cast {item!r}; expected REGEX=DTYPE")
        casts[pattern] = dtype
    start = time.perf_counter()
    out = merge(
        args.out,
        [_parse_source(s) for s in args.sources],
        skip_optimizer=args.skip_optimizer,
        skip_counters=args.skip_counters,
        dtypes=casts,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
        progress=_progress(not args.quiet, "merge"),
    )
    with open_checkpoint(out) as ckpt:
        print(
            f"{out}: {len(ckpt)} tensors from {len(args.sources)} checkpoint(s) "
            f"in {(time.perf_counter() - start) * 1e3:.1f} ms"
        )
    return EXIT_OK


def cmd_default(args: argparse.Namespace) -> int:
    args.path, args.list = SAMPLE, True
    return cmd_restore(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_default, device="cpu", threads=None, no_verify=False, filter=None)
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("ls", help="list tensors")
    p.add_argument("path")
    p.add_argument("--filter", "-e", help="only names matching this regular expression")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="header, data files, object graph, .meta summary")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every tensor's checksum")
    p.add_argument("path")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="restore every tensor and report the time")
    p.add_argument("path")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="reader threads (default min(4, cores))")
    p.add_argument("--no-verify", action="store_true", help="skip crc32c checks")
    p.add_argument("--filter", "-e", help="only names matching this regular expression (whole name)")
    p.add_argument("--list", action="store_true", help="list the tensors first")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("bench", help="restore latency and throughput, warm and cold, against baselines")
    p.add_argument("path")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("merge", help="write one checkpoint from several")
    p.add_argument("out", help="output prefix")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SRC[=MAP]",
        help="a checkpoint, optionally with an assignment map old:new,old_scope/:new_scope/",
    )
    p.add_argument("--skip-optimizer", action="store_true", help="leave out optimizer slots and state")
    p.add_argument("--skip-counters", action="store_true", help="leave out save counters and global steps")
    p.add_argument("--cast", action="append", metavar="REGEX=DTYPE", help="cast matching floating tensors")
    p.add_argument("--max-shard-bytes", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "list"):
        args.list = False
    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, argparse.ArgumentTypeError) as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"gpuckpt: error: {message}", file=sys.stderr)
        return EXIT_ERROR
