"""The ``gpuckpt`` command (also ``python -m gpuckpt``).

    gpuckpt ls PATH [--filter REGEX] [--json]      tensors: name, dtype, shape, bytes, shard, kind
    gpuckpt inspect PATH [--json]                  header, data files, object graph, .meta summary
    gpuckpt verify PATH                            every checksum; exit 3 naming damaged tensors
    gpuckpt restore PATH [--device cpu] [...]      restore everything, with a timing breakdown
    gpuckpt bench PATH [--repeat N] [--json]       warm and cold restore against the baselines here
    gpuckpt merge OUT SRC[=MAP] ... [...]          one checkpoint from several (MAP: old:new,...)
    gpuckpt convert PATH OUT.safetensors [--preset albert|bert|electra|gpt2 | --map FILE]

Without arguments it lists and restores the small Keras checkpoint bundled with the package.
Exit codes: 0 success; 1 an error (one line; the traceback with --debug); 2 bad usage (also a
bad regular expression, dtype or device); 3 ``verify`` found damaged tensors or data files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from . import CheckpointError, CheckpointExistsError, InvalidArgumentError
from . import open as open_checkpoint
from .checkpoint import Checkpoint
from .dtypes import DataType
from .format.meta import MetaGraphSummary, find_meta, read_meta
from .format.object_graph import OBJECT_GRAPH_KEY
from .host.shards import drop_from_page_cache

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "keras_adam")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3
DEVICE_FORMS = "cpu, cuda, cuda:N or auto"


# -- formatting -------------------------------------------------------------------------------------
def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _rate(nbytes: float, seconds: float) -> str:
    """Throughput in the decimal unit that keeps the figure readable: GB/s, MB/s, kB/s or B/s."""
    if seconds <= 0:
        return "- B/s"
    rate = nbytes / seconds
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.2f} {unit}"
    return f"{rate:.0f} B/s"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


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


# -- argument types: a bad value is bad usage (exit 2), reported by argparse ------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number (at least 1)")
    return value


def _device(text: str) -> str:
    if text in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected {DEVICE_FORMS}")


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


def _cast(text: str) -> tuple[str, str]:
    """``REGEX=DTYPE`` (split at the last ``=``: a dtype has none), both checked here."""
    from .casting import dtype_chooser

    pattern, sep, dtype = text.rpartition("=")
    if not sep or not pattern or not dtype:
        raise argparse.ArgumentTypeError(f"{text!r} is not REGEX=DTYPE (e.g. 'model/.*=bfloat16')")
    _regex(pattern)
    try:
        dtype_chooser({pattern: dtype})
    except (TypeError, ValueError, re.error) as exc:  # InvalidArgumentError is both
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return pattern, dtype


def _source(text: str) -> tuple[str, dict[str, str] | None]:
    """``PATH`` or ``PATH=old:new,old_scope/:new_scope/``."""
    if os.path.exists(text) or os.path.exists(text + ".index"):
        return text, None  # a path that itself contains "="
    path, sep, mapping = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r} names no checkpoint before '='")
    if not sep:
        return path, None
    pairs: dict[str, str] = {}
    for item in mapping.split(","):
        old, colon, new = item.partition(":")
        if not colon or not old or not new:
            raise argparse.ArgumentTypeError(f"bad assignment map item {item!r} in {text!r}; expected old:new")
        if old in pairs:
            raise argparse.ArgumentTypeError(f"{old!r} is mapped twice in {text!r} ({pairs[old]!r} and {new!r})")
        pairs[old] = new
    return path, pairs


# -- ls, inspect ------------------------------------------------------------------------------------
def _rows(ckpt: Checkpoint, pattern: str | None) -> list[dict[str, Any]]:
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
    """One line a tensor, every column as wide as its widest value."""
    width = max((len(r["name"]) for r in rows), default=0)
    dtype_width = max((len(r["dtype"]) for r in rows), default=0)
    shape_width = max((len(str(r["shape"])) for r in rows), default=0)
    for r in rows:
        where = "partitioned" if r["partitioned"] else f"shard {r['shard']}"
        print(
            f"  {r['name']:<{width}}  {r['dtype']:<{dtype_width}}  {str(r['shape']):<{shape_width}}  "
            f"{_human(r['bytes']):>10}  {r['kind']:<14} {where}"
        )


def cmd_ls(args: argparse.Namespace) -> int:
    with open_checkpoint(args.path) as ckpt:
        rows = _rows(ckpt, args.filter)
        if args.json:
            print(json.dumps(rows, indent=1))
            return EXIT_OK
        print(f"{ckpt.prefix}: {len(rows)} of {_count(len(ckpt), 'tensor')}, {_human(sum(r['bytes'] for r in rows))}")
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
            f"  index {_human(index_bytes)}; {_count(len(ckpt), 'tensor')}, {_human(tensor_bytes)}; "
            f"{report['endianness']}-endian"
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


# -- verify -----------------------------------------------------------------------------------------
def _open_for_verify(path: str) -> tuple[Checkpoint, dict[int, int | None]]:
    """Open a checkpoint whose data files may be missing or short, for ``verify`` to report them.

    ``gpuckpt.open`` refuses such a checkpoint (every byte range is checked against its file at
    open); here the index is still validated in full, but each data file's size is recorded
    (None: missing) instead of checked, and every range is then checked tensor by tensor.
    """
    from .checkpoint import _default_threads, _read_index
    from .devices import CPU
    from .format.bundle import parse_index
    from .format.state import INDEX_SUFFIX, resolve_prefix
    from .host.shards import MissingShardError, ShardFiles
    from .options import RestoreOptions

    prefix = resolve_prefix(path)
    shards = ShardFiles(prefix)
    sizes: dict[int, int | None] = {}

    def recorded(shard_id: int, num_shards: int) -> int:
        try:
            sizes[shard_id] = shards.open_shard(shard_id, num_shards)
        except MissingShardError:
            sizes[shard_id] = None
        return sys.maxsize  # every range "fits": verify checks them against ``sizes``

    try:
        index = parse_index(_read_index(prefix + INDEX_SUFFIX), prefix + INDEX_SUFFIX, recorded)
    except BaseException:
        shards.close()
        raise
    return Checkpoint(prefix, index, shards, CPU, True, _default_threads(), RestoreOptions.from_env()), sizes


def _range_damage(ckpt: Checkpoint, name: str, sizes: dict[int, int | None]) -> str | None:
    """Why a tensor's bytes cannot be read (its data file missing or too short), or None."""
    entry = ckpt.index.tensors[name]
    parts = [ckpt.index.slice_entry(entry, s) for s in entry.slices] if entry.slices else [entry]
    files = ckpt.data_files()
    for part in parts:
        size = sizes.get(part.shard_id)
        file = files[part.shard_id]
        if part.shard_id in sizes and size is None:
            return f"data file {file!r} is missing"
        if size is not None and part.offset + part.size > size:
            return (
                f"data file {file!r} is {size} bytes, {part.offset + part.size - size} bytes short of this tensor's "
                f"bytes [{part.offset}, {part.offset + part.size})"
            )
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import FormatError

    try:
        ckpt, sizes = _open_for_verify(args.path)
    except FormatError as exc:  # the index itself is damaged
        print(f"DAMAGED index: {exc}", file=sys.stderr)
        print(f"{args.path}: the index is damaged; no tensor can be read")
        return EXIT_DAMAGED
    damaged: list[str] = []
    checked = 0
    with ckpt:
        bad_files = [
            f"{file} ({why})"
            for shard, file in enumerate(ckpt.data_files())
            if shard in sizes and (why := _short(ckpt, shard, sizes)) is not None
        ]
        progress = _progress(not args.quiet, "verify")
        total = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        for name in ckpt.keys():
            problem = _range_damage(ckpt, name, sizes)
            if problem is None:
                entry = ckpt.index.tensors[name]
                try:
                    if entry.dtype == DataType.DT_VARIANT and not entry.slices:
                        ckpt.read_raw(entry)  # no array to make, but its checksums are checked
                    else:
                        ckpt.get_tensor(name, verify=True)
                except CheckpointError as exc:
                    problem = str(exc)
            if problem is not None:
                damaged.append(name)
                print(f"DAMAGED {name}: {problem}", file=sys.stderr)
            checked += ckpt.info(name).nbytes
            if progress is not None:
                progress(checked, total)
        files = f"; damaged data files: {', '.join(bad_files)}" if bad_files else ""
        if damaged or bad_files:
            print(
                f"{ckpt.prefix}: {len(damaged)} of {_count(len(ckpt), 'tensor')} damaged: {', '.join(damaged)}{files}"
            )
            return EXIT_DAMAGED
        print(f"{ckpt.prefix}: all {_count(len(ckpt), 'tensor')} verified ({_human(total)})")
    return EXIT_OK


def _short(ckpt: Checkpoint, shard: int, sizes: dict[int, int | None]) -> str | None:
    """How a data file is damaged (missing, or shorter than the index needs), or None."""
    size = sizes[shard]
    if size is None:
        return "missing"
    needed = max(
        (
            part.offset + part.size
            for entry in ckpt.index.tensors.values()
            for part in ([ckpt.index.slice_entry(entry, s) for s in entry.slices] if entry.slices else [entry])
            if part.shard_id == shard
        ),
        default=0,
    )
    return f"{size} bytes, the index needs {needed}" if needed > size else None


# -- restore, bench ---------------------------------------------------------------------------------
def cmd_restore(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with open_checkpoint(args.path, device=args.device, verify=not args.no_verify, threads=args.threads) as ckpt:
        opened = time.perf_counter() - start
        if args.list:
            rows = _rows(ckpt, None)
            print(
                f"{ckpt.prefix}: {_count(len(rows), 'tensor')}, {_human(sum(r['bytes'] for r in rows))} "
                f"in {_count(ckpt.num_shards, 'data file')}"
            )
            _print_rows(rows)
        start = time.perf_counter()
        arrays = ckpt.restore(args.filter, progress=_progress(not args.quiet, "restore"))
        elapsed = time.perf_counter() - start
        total = sum(ckpt.info(n).nbytes for n in arrays)
        if not arrays and args.filter is not None:
            print(
                f"gpuckpt: error: --filter {args.filter!r} matches no tensor name (whole names; "
                f"{_count(len(ckpt), 'tensor')} in {ckpt.prefix}; 'gpuckpt ls' lists them)",
                file=sys.stderr,
            )
            return EXIT_ERROR
    checked = "not verified" if args.no_verify else "crc32c verified"
    print(
        f"opened in {_duration(opened)}; restored {_count(len(arrays), 'tensor')} ({_human(total)}) to {ckpt.device} "
        f"in {_duration(elapsed)} = {_rate(total, elapsed)}, {checked}"
    )
    return EXIT_OK


def _import_tensorflow() -> Any:
    """TensorFlow for the baseline, or None; quiet (its C++ log lines would go to stderr twice)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its notice is about numerics, none here
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    with open_checkpoint(args.path, device=args.device) as ckpt:
        files = [f for f in ckpt.data_files() if os.path.exists(f)] + [ckpt.prefix + ".index"]
        total = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        prefix, device = ckpt.prefix, ckpt.device

    def timed(fn: Callable[[], Any], cold: bool = False) -> float:
        best = float("inf")
        for _ in range(args.repeat):
            if cold:
                drop_from_page_cache(files)
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
    if drop_from_page_cache(files):
        results["cold_gpuckpt_s"] = timed(ours, cold=True)
        results["cold_read_floor_s"] = timed(floor, cold=True)
    tf = _import_tensorflow()
    if tf is not None:

        def theirs() -> None:
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)

        results["warm_tensorflow_s"] = timed(theirs)
    out: IO[str] = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    print(
        f"{prefix}: {_human(total)} in {_count(len(files) - 1, 'data file')}, best of {args.repeat}, device {device}",
        file=out,
    )
    for key, seconds in results.items():
        ratio = f"  ({seconds / results['warm_gpuckpt_s']:.2f}x gpuckpt warm)" if key != "warm_gpuckpt_s" else ""
        print(f"  {key[:-2]:<22} {_duration(seconds):>10}  {_rate(total, seconds):>11}{ratio}", file=out)
    if args.json:
        print(json.dumps({"prefix": prefix, "bytes": total, "device": device, "repeat": args.repeat, **results}))
    return EXIT_OK


# -- merge ------------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> int:
    from .format.state import latest_checkpoint
    from .merge import merge

    start = time.perf_counter()
    try:
        out = merge(
            args.out,
            args.sources,
            skip_optimizer=args.skip_optimizer,
            skip_counters=args.skip_counters,
            dtypes=dict(args.cast or []),
            max_shard_bytes=args.max_shard_bytes,
            update_state=args.update_state,
            overwrite=args.overwrite,
            progress=_progress(not args.quiet, "merge"),
        )
    except CheckpointExistsError:
        print(
            f"gpuckpt: error: a checkpoint already exists at {args.out!r} (pass --overwrite to replace it)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    directory = os.path.dirname(os.path.abspath(out))
    recorded = latest_checkpoint(directory) == os.path.abspath(out)
    with open_checkpoint(out) as ckpt:
        print(
            f"{out}: {_count(len(ckpt), 'tensor')} from {_count(len(args.sources), 'checkpoint')} "
            f"in {_duration(time.perf_counter() - start)}"
            + (f"; the latest in {os.path.join(directory, 'checkpoint')}" if recorded else "")
        )
    return EXIT_OK


# -- convert ----------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """A checkpoint, renamed by a preset or a rules file, as a safetensors file (or a torch state dict)."""
    from .mapping import NameMap, convert
    from .writer import write_atomically

    if os.path.exists(args.out) and not args.overwrite:
        print(f"gpuckpt: error: {args.out!r} exists (pass --overwrite to replace it)", file=sys.stderr)
        return EXIT_ERROR
    mapping = NameMap.from_file(args.map) if args.map else args.preset
    start = time.perf_counter()
    with open_checkpoint(args.path) as ckpt:
        if args.out.endswith((".pt", ".pth", ".bin")):
            try:
                import torch

                from .torch import state_dict
            except ImportError:
                print(
                    "gpuckpt: error: writing a PyTorch state dict needs torch (pip install gpuckpt[torch])",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            tensors, result = state_dict(ckpt, mapping, allow_unmapped=args.allow_unmapped)
            write_atomically(args.out, lambda f: torch.save(tensors, f))
        else:
            result = convert(ckpt, args.out, mapping, allow_unmapped=args.allow_unmapped, overwrite=args.overwrite)
    for name in result.unmapped:
        print(f"gpuckpt: left out (no rule maps it): {name}", file=sys.stderr)
    print(
        f"{args.out}: {_count(len(result.written), 'tensor')} in {_duration(time.perf_counter() - start)}; "
        f"{len(result.skipped)} skipped (optimizer state, counters), {len(result.unmapped)} unmapped left out"
    )
    return EXIT_OK


def cmd_default(args: argparse.Namespace) -> int:
    args.path, args.list = SAMPLE, True
    return cmd_restore(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuckpt",
        description=(__doc__ or "").replace("``", ""),  # the docstring's reStructuredText quoting
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_default, device="cpu", threads=None, no_verify=False, filter=None)
    sub = parser.add_subparsers(title="commands")
    path_help = "a checkpoint: prefix, PREFIX.index, directory with a checkpoint state file, or SavedModel"
    device_help = f"{DEVICE_FORMS} (default cpu)"

    p = sub.add_parser("ls", help="list tensors")
    p.add_argument("path", help=path_help)
    p.add_argument("--filter", "-e", type=_regex, metavar="REGEX", help="only names this regular expression finds")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="header, data files, object graph, .meta summary")
    p.add_argument("path", help=path_help)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every tensor's checksum and every data file; exit 3 on damage")
    p.add_argument("path", help=path_help)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="restore every tensor and report the time")
    p.add_argument("path", help=path_help)
    p.add_argument("--device", type=_device, default="cpu", help=device_help)
    p.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="reader threads (default min(4, cores))"
    )
    p.add_argument("--no-verify", action="store_true", help="skip crc32c checks")
    p.add_argument(
        "--filter",
        "-e",
        type=_regex,
        metavar="REGEX",
        help="only names this regular expression matches whole; exit 1 when it matches none",
    )
    p.add_argument("--list", action="store_true", help="list the tensors first")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("bench", help="restore latency and throughput, warm and cold, against baselines")
    p.add_argument("path", help=path_help)
    p.add_argument("--device", type=_device, default="cpu", help=device_help)
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=3,
        metavar="N",
        help="runs of each timing; the best is shown (default 3)",
    )
    p.add_argument(
        "--json", action="store_true", help="stdout is one JSON document of the figures (the table goes to stderr)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("merge", help="write one checkpoint from several")
    p.add_argument("out", help="output prefix, e.g. merged/ckpt")
    p.add_argument(
        "sources",
        nargs="+",
        type=_source,
        metavar="SRC[=MAP]",
        help="a checkpoint, optionally with an assignment map old:new,old_scope/:new_scope/",
    )
    p.add_argument("--skip-optimizer", action="store_true", help="leave out optimizer slots and state")
    p.add_argument("--skip-counters", action="store_true", help="leave out save counters and global steps")
    p.add_argument(
        "--cast",
        action="append",
        type=_cast,
        metavar="REGEX=DTYPE",
        help="cast floating tensors whose new name "
        "matches REGEX (whole name) to DTYPE, e.g. 'model/.*=bfloat16'; repeatable",
    )
    p.add_argument(
        "--max-shard-bytes", type=_positive_int, default=None, metavar="N", help="start a new data file past N bytes"
    )
    p.add_argument(
        "--update-state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record OUT as the latest checkpoint in its directory's checkpoint state file (default: when the "
        "directory is new or empty, or already has one)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="write a checkpoint, renamed for another framework, as safetensors")
    p.add_argument("path", help=path_help)
    p.add_argument("out", help="OUT.safetensors (or OUT.pt / .pth / .bin: a PyTorch state dict, needs torch)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--preset",
        choices=["albert", "bert", "electra", "gpt2"],
        help="the names transformers gives the original release",
    )
    how.add_argument("--map", metavar="FILE", help="a JSON rules file (see gpuckpt.mapping)")
    p.add_argument(
        "--allow-unmapped",
        action="store_true",
        help="leave out names no rule maps (listed on stderr) instead of exit 2",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad usage (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not hasattr(args, "list"):
        args.list = False
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("gpuckpt: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError, TypeError) as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"gpuckpt: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidArgumentError) else EXIT_ERROR
    except Exception as exc:  # a bug here: still one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"gpuckpt: internal error: {type(exc).__name__}: {exc} (--debug shows the traceback; please report it)",
            file=sys.stderr,
        )
        return EXIT_ERROR
