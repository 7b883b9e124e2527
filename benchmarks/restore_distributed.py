"""gpuckpt.distributed.restore on N ranks of a gloo group over loopback: each rank its own shards,
read once and share, and every rank reading everything; bytes read per rank and wall time, from a
cold page cache and a warm one, all measured in the same run.

    python benchmarks/restore_distributed.py [--ranks 4] [--size-mb 1024] [--repeat 3] [--threads 1]
                                             [--modes own,once,...] [--machine NAME] [--out PATH]

The checkpoint is a transformer's tensor-parallel layout in float32 (written once by
``gpuckpt.save``, cached under .bench/): an embedding split by rows, per layer a fused qkv and an
MLP up projection split by columns, the attention output and MLP down projections split by rows
(Megatron's column- and row-parallel linears), LayerNorm scales and biases replicated. The modes:

* ``own``: ``restore(shardings=...)``: each rank reads its pieces (``restore(regions=)``), and the
  replicated tensors whole;
* ``own_shared``: the same with ``replicated="once"``: the replicated tensors read once and broadcast;
* ``once``: ``restore(mode="once")``: each tensor read by one rank (balanced by bytes) and
  broadcast; every rank ends with every tensor;
* ``once_sharded``: ``restore(shardings=..., mode="once")``: each tensor read whole by one rank,
  which sends every other rank its pieces alone (point to point); every rank ends with its pieces;
* ``all``: ``restore()`` with no shardings: every rank reads every tensor (what N independent
  restores do; the baseline).

Correctness first: one untimed round of each mode, where every rank compares each tensor it got
with the same region read by a second, single-process ``Checkpoint`` (bit for bit). Then --repeat
rounds, each timing the modes in turn (so load from other processes falls on all alike),
each mode cold then warm. Cold: rank 0 drops the data files from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``; the resident fraction after it, by ``fincore`` where it is
installed, is recorded) between two barriers. Wall time: from the barrier before the restore to
the barrier after it, so the slowest rank decides. Bytes per rank: the restore's own report
(``DistributedRestore.bytes_read``).

--modes runs some of the modes only: ``once`` and ``all`` leave every rank holding the whole
checkpoint, so N ranks of a checkpoint need N times its size in memory (4 ranks of 4 GiB do not fit
24 GiB with ``once``'s broadcast buffers beside them).

Results go to benchmarks/results/distributed-<machine>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

MODES = ("own", "own_shared", "once", "once_sharded", "all")


def shapes(size_mb: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of about ``size_mb`` MiB of float32."""
    d = 1024 if size_mb >= 256 else 128
    vocab = 32 * d
    per_layer = 12 * d * d * 4
    layers = max(1, round((size_mb * (1 << 20) - vocab * d * 4) / per_layer))
    out = {"embedding": (vocab, d)}
    for layer in range(layers):
        scope = f"layer_{layer:02d}"
        out[f"{scope}/attention/qkv/kernel"] = (d, 3 * d)
        out[f"{scope}/attention/out/kernel"] = (d, d)
        out[f"{scope}/mlp/up/kernel"] = (d, 4 * d)
        out[f"{scope}/mlp/down/kernel"] = (4 * d, d)
        out[f"{scope}/norm_1/scale"] = (d,)
        out[f"{scope}/norm_2/scale"] = (d,)
        out[f"{scope}/mlp/down/bias"] = (d,)
    return out


def shardings():  # type: ignore[no-untyped-def]
    from gpuckpt.distributed import Split

    return {
        "embedding": Split(0),
        r".*/(qkv|up)/kernel": Split(1),
        r".*/(out|down)/kernel": Split(0),
    }


def ensure_checkpoint(work_dir: str, size_mb: int) -> str:
    import gpuckpt

    prefix = os.path.join(work_dir, f"distributed-{size_mb}mb", "model.ckpt-1")
    if os.path.exists(prefix + ".index"):
        return prefix
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(3)
    tensors = {name: rng.random(shape, dtype=np.float32) for name, shape in shapes(size_mb).items()}
    return gpuckpt.save(prefix, tensors)


def evict(files: list[str]) -> float | None:
    """Drop the files' pages from the page cache; the fraction still resident (fincore), if known."""
    from gpuckpt.host.shards import drop_from_page_cache

    drop_from_page_cache(files)
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    resident = sum(int(x) for x in out[0::2])
    size = sum(int(x) for x in out[1::2])
    return resident / size if size else 0.0


def _bits(tensor) -> bytes:  # type: ignore[no-untyped-def]
    if tensor.numel() == 0:
        return b""
    return tensor.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()


def worker(rank: int, world: int, port: int, config_path: str) -> None:
    import torch.distributed as dist

    import gpuckpt
    import gpuckpt.distributed as gd

    with open(config_path, "rb") as f:
        config = pickle.load(f)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    prefix, threads = config["prefix"], config["threads"]
    with gpuckpt.open(prefix) as probe:
        files = probe.data_files()
    specs = shardings()

    def run(mode: str):  # type: ignore[no-untyped-def]
        if mode == "own":
            return gd.restore(prefix, shardings=specs, threads=threads, timeout=600)
        if mode == "own_shared":
            return gd.restore(prefix, shardings=specs, replicated="once", threads=threads, timeout=600)
        if mode == "once":
            return gd.restore(prefix, mode="once", threads=threads, timeout=600)
        if mode == "once_sharded":
            return gd.restore(prefix, shardings=specs, mode="once", threads=threads, timeout=600)
        return gd.restore(prefix, threads=threads, timeout=600)

    # correctness first: every tensor, on every rank, against a single-process read of its region
    with gpuckpt.open(prefix) as reference:
        for mode in config["modes"]:
            got = run(mode)
            for name, tensor in got.tensors.items():
                region = got.regions[name]
                expected = reference.get_tensor(name, region=region) if region is not None else reference[name]
                assert _bits(tensor) == np.ascontiguousarray(expected).tobytes(), (mode, rank, name)
            del got
            gc.collect()
    timings: dict[str, dict[str, list[float]]] = {m: {"cold": [], "warm": []} for m in config["modes"]}
    reads: dict[str, dict[int, dict[str, int]]] = {}
    resident: list[float | None] = []
    for _ in range(config["repeat"]):
        for mode in config["modes"]:
            for cache in ("cold", "warm"):
                dist.barrier()
                if cache == "cold" and rank == 0:
                    resident.append(evict(files))
                dist.barrier()
                started = time.perf_counter()
                got = run(mode)
                dist.barrier()
                timings[mode][cache].append(time.perf_counter() - started)
                reads[mode] = got.bytes_read
                del got
                gc.collect()
    if rank == 0:
        with open(config["out"], "wb") as f:
            pickle.dump({"timings": timings, "bytes_read": reads, "resident_after_evict": resident}, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(args, prefix: str) -> dict:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        config_path, out = os.path.join(tmp, "config.pkl"), os.path.join(tmp, "out.pkl")
        with open(config_path, "wb") as f:
            config = {"prefix": prefix, "threads": args.threads, "repeat": args.repeat, "modes": args.modes, "out": out}
            pickle.dump(config, f)
        store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60)
        )
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(rank), str(args.ranks), str(store.port), config_path],
                env=env,
            )
            for rank in range(args.ranks)
        ]
        try:
            codes = [proc.wait(timeout=args.timeout_s) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if codes != [0] * args.ranks:
            raise SystemExit(f"workers exited {codes}")
        with open(out, "rb") as f:
            return pickle.load(f)


def summarize(raw: dict, data_bytes: int, ranks: int) -> dict:
    modes = {}
    for mode in raw["timings"]:
        per_rank = {r: sum(files.values()) for r, files in raw["bytes_read"][mode].items()}
        total = sum(per_rank.values())
        modes[mode] = {
            "bytes_read_per_rank": per_rank,
            "bytes_read_total": total,
            "read_over_checkpoint": total / data_bytes,
            "max_rank_over_checkpoint": max(per_rank.values()) / data_bytes,
            **{
                f"{cache}_s": {
                    "best": min(raw["timings"][mode][cache]),
                    "median": statistics.median(raw["timings"][mode][cache]),
                    "all": raw["timings"][mode][cache],
                }
                for cache in ("cold", "warm")
            },
        }
    return modes


def _modes(text: str) -> list[str]:
    chosen = [mode for mode in text.split(",") if mode]
    unknown = sorted(set(chosen) - set(MODES))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="reader threads per rank")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument("--machine", default=None, help="names the results file (default: the host name)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, port, config_path = args.worker
        worker(int(rank), int(world), int(port), config_path)
        return 0

    from report import machine_info, write_results

    import gpuckpt

    prefix = ensure_checkpoint(args.work_dir, args.size_mb)
    with gpuckpt.open(prefix) as ckpt:
        data_bytes = sum(os.path.getsize(f) for f in ckpt.data_files())
        tensors = len(ckpt)
    started = time.perf_counter()
    raw = spawn(args, prefix)
    modes = summarize(raw, data_bytes, args.ranks)
    import torch

    results = {
        "benchmark": "restore_distributed",
        "machine": machine_info(),
        "torch": torch.__version__,
        "backend": "gloo over loopback",
        "ranks": args.ranks,
        "threads_per_rank": args.threads,
        "repeat": args.repeat,
        "modes_run": args.modes,
        "checkpoint": {"bytes": data_bytes, "tensors": tensors, "size_mb": args.size_mb},
        "resident_after_evict": raw["resident_after_evict"],
        "modes": modes,
        "seconds_total": time.perf_counter() - started,
    }
    path = write_results(results, args.out, "distributed", args.machine)
    mib = 1 << 20
    print(f"{args.ranks} ranks, checkpoint {data_bytes / mib:.0f} MiB in {tensors} tensors -> {path}")
    print(f"{'mode':12} {'max rank MiB':>12} {'total MiB':>10} {'total/ckpt':>10} {'cold s':>8} {'warm s':>8}")
    for mode, row in modes.items():
        print(
            f"{mode:12} {max(row['bytes_read_per_rank'].values()) / mib:12.1f} {row['bytes_read_total'] / mib:10.1f} "
            f"{row['read_over_checkpoint']:10.2f} {row['cold_s']['best']:8.3f} {row['warm_s']['best']:8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
