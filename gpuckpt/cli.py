"""``python -m gpuckpt [PATH]``: list a checkpoint's tensors, restore them all, report time and GB/s.

Without PATH it runs on the small Keras checkpoint bundled with the package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import CheckpointError
from . import open as open_checkpoint

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "keras_adam")


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return str(nbytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "path",
        nargs="?",
        default=SAMPLE,
        help="prefix, .index file, checkpoint directory or SavedModel (default: bundled sample)",
    )
    parser.add_argument("--threads", type=int, default=None, help="reader threads (default: min(4, cores))")
    parser.add_argument("--no-verify", action="store_true", help="skip crc32c verification")
    parser.add_argument("--quiet", action="store_true", help="do not list the tensors")
    args = parser.parse_args(argv)

    try:
        start = time.perf_counter()
        with open_checkpoint(args.path, verify=not args.no_verify, threads=args.threads) as ckpt:
            opened = time.perf_counter() - start
            infos = [ckpt.info(name) for name in ckpt.keys()]
            total = sum(i.nbytes for i in infos)
            print(f"{ckpt.prefix}: {len(infos)} tensors, {_human(total)} in {ckpt.num_shards} data file(s)")
            if not args.quiet:
                width = max((len(i.name) for i in infos), default=0)
                for i in infos:
                    where = "partitioned" if i.partitioned else f"shard {i.shard_id}"
                    print(
                        f"  {i.name:<{width}}  {i.tf_dtype:<10} {str(list(i.shape)):<16} {_human(i.nbytes):>10}  "
                        f"{ckpt.kind(i.name).value:<14} {where}"
                    )
            start = time.perf_counter()
            arrays = ckpt.restore()
            elapsed = time.perf_counter() - start
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    restored = sum(a.nbytes for a in arrays.values() if a.dtype != object)
    rate = total / elapsed / 1e9 if elapsed > 0 else float("inf")
    verified = "not verified" if args.no_verify else "crc32c verified"
    print(
        f"opened in {opened * 1e3:.1f} ms; restored {len(arrays)} tensors ({_human(restored)} numeric) to the host "
        f"in {elapsed * 1e3:.1f} ms = {rate:.2f} GB/s, {verified}"
    )
    return 0
