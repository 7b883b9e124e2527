"""GPU restore benchmark: gpuckpt against the pinned-copy floor and the baselines, in one run.

    python benchmarks/restore_gpu.py [--size-gb 4] [--tensors 300] [--repeat 3] [--out FILE]

Writes (with gpuckpt.save, cached under --work-dir) a checkpoint of mixed fp32/bf16/fp16 tensors,
checks the device restore against the host restore bit for bit, then times on one GPU:

* floor: one pinned host-to-device copy of the same byte count (CUDA events);
* gpuckpt ``restore(device="cuda")`` from a warm page cache, verified and not, and verified with
  ``single_allocation`` (one device allocation carved into every tensor);
* ``gpuckpt.torch.load_into`` of every tensor into a module's existing CUDA buffers, in place
  (``out=`` through DLPack), against the verified device restore of the same bytes, where torch
  has CUDA (issue 11's target: within 1.1x);
* naive: host ``get_tensor`` then ``cupy.asarray`` per tensor (bfloat16 as its bytes where CuPy
  cannot hold it: NumPy < 2.1.2);
* ``safetensors.torch.load_file(device="cuda")`` of the same tensors, where torch and safetensors
  are installed;
* cold cache (files evicted with posix_fadvise) against the raw file read speed.

Reports GB/s and ratios, peak host memory growth against the staging size, the device and its PCIe
link, and writes a JSON file (default benchmarks/results/gpu-<device>.json). The file is rewritten
after every stage, with ``stages_done``, each stage's wall time in ``stage_seconds`` and
``complete`` false until the last: a run stopped at its time limit (tools/gpu_session.sh) still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from report import machine_info, write_results  # noqa: E402
from restore_host import large_arrays  # noqa: E402

import gpuckpt  # noqa: E402
from gpuckpt.host.shards import drop_from_page_cache  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples resident memory every few milliseconds while a block runs."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.003):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.base


def best_of(repeat, fn):
    import cupy

    times = []
    for _ in range(repeat):
        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()
        start = time.perf_counter()
        fn()
        cupy.cuda.runtime.deviceSynchronize()  # timing boundary only; the pipeline itself never does this
        times.append(time.perf_counter() - start)
    return min(times)


def make_checkpoint(prefix: str, size_gb: float, count: int) -> None:
    """The host benchmark's mixed fp32/bf16/fp16 tensors at this size, saved once."""
    if not os.path.exists(prefix + ".index"):
        gpuckpt.save(prefix, large_arrays(size_gb * 1024, count))


def torch_load_into(prefix: str, repeat: int, device: str = "cuda") -> dict:
    """``gpuckpt.torch.load_into`` of every tensor into a module whose buffers (one per tensor,
    its shape and type) live on ``device``, timed as the restores are; the values checked against
    the host restore first, and the buffers' memory checked unchanged (in place). A failure is
    recorded, never fatal: the stages after it still run."""
    try:
        import torch

        import gpuckpt.torch as gt
    except ImportError as exc:
        return {"torch_load_into_s": None, "torch_load_into_error": f"not measured: {exc}"}
    if device == "cuda" and not torch.cuda.is_available():
        return {"torch_load_into_s": None, "torch_load_into_error": "not measured: torch has no CUDA here"}
    try:
        return {"torch_load_into_s": _time_load_into(torch, gt, prefix, repeat, device)}
    except Exception as exc:  # torch's CUDA or the path itself: recorded, the rest still runs
        return {"torch_load_into_s": None, "torch_load_into_error": f"{type(exc).__name__}: {exc}"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()  # the module's buffers, freed with _time_load_into's frame


def _time_load_into(torch, gt, prefix: str, repeat: int, device: str) -> float:  # type: ignore[no-untyped-def]
    module = torch.nn.Module()
    with gpuckpt.open(prefix) as ckpt:
        names = ckpt.keys()
        mapping = {name: f"t{i}" for i, name in enumerate(names)}
        for name, target in mapping.items():
            info = ckpt.info(name)
            module.register_buffer(target, torch.empty(info.shape, dtype=gt.torch_dtype(info.dtype), device=device))
        pointers = {target: getattr(module, target).data_ptr() for target in mapping.values()}
        gt.load_into(module, ckpt, mapping)
        for name in names[:5]:
            got = getattr(module, mapping[name]).cpu()
            got = got.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()])
            assert got.numpy().tobytes() == ckpt.get_tensor(name).tobytes(), name
    seconds = best_of(repeat, lambda: gt.load_into(module, prefix, mapping))
    moved = [target for target, pointer in pointers.items() if getattr(module, target).data_ptr() != pointer]
    assert not moved, f"load_into replaced the memory of {moved[:3]}"
    return seconds


def device_description() -> dict:
    query = "name,pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,memory.total,driver_version"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        return dict(zip(query.split(","), [v.strip() for v in line.split(",")], strict=False))
    except (OSError, subprocess.CalledProcessError, IndexError):
        import cupy

        return {"name": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(os.path.dirname(HERE), ".bench"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import cupy

    results = {
        "device": device_description(),
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "complete": False,
        "stages_done": [],
        "stage_seconds": {},
    }
    stage_start = [time.perf_counter()]

    def done(stage: str) -> None:
        """``stage`` is measured: record its wall time and rewrite the JSON with what is known."""
        now = time.perf_counter()
        results["stages_done"].append(stage)
        results["stage_seconds"][stage] = round(now - stage_start[0], 3)
        stage_start[0] = now
        if "bytes" in results:  # GB/s of every time measured so far
            results.update(
                {k[:-2] + "_GBps": results["bytes"] / v / 1e9 for k, v in results.items() if k.endswith("_s") and v}
            )
        # Written aside, then renamed: a run killed at its time limit never leaves half a file.
        path = write_results(
            results, args.out and args.out + ".part", "gpu", machine=results["device"].get("name", "gpu")
        )
        if args.out:
            os.replace(path, args.out)
        print(f"stage {stage}: {results['stage_seconds'][stage]:.1f} s", flush=True)

    done("start")
    prefix = os.path.join(args.work_dir, f"gpu-{args.size_gb:g}gb-{args.tensors}t", "ckpt")
    make_checkpoint(prefix, args.size_gb, args.tensors)
    done("checkpoint_written")
    with gpuckpt.open(prefix) as ckpt:
        files = ckpt.data_files() + [prefix + ".index"]
        total = sum(ckpt.info(n).nbytes for n in ckpt.keys())
        names = ckpt.keys()
        host = ckpt.restore(names[:5])
        device = ckpt.restore(names[:5], device="cuda")
        for name in names[:5]:
            assert cupy.asnumpy(device[name]).tobytes() == host[name].tobytes(), name
        del host, device
        options = ckpt.options

    for path in files:  # warm the page cache
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass

    pinned = cupy.cuda.alloc_pinned_memory(total)
    staging = np.frombuffer(pinned, np.uint8, total)
    staging[:] = 1
    target = cupy.empty(total, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)

    def floor():
        cupy.cuda.runtime.memcpyAsync(
            target.data.ptr, staging.ctypes.data, total, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
        )
        stream.synchronize()

    def restore(verify, **option):
        def run():
            with gpuckpt.open(prefix, verify=verify, options=gpuckpt.RestoreOptions.from_env(**option)) as c:
                return c.restore(device="cuda")

        return run

    from gpuckpt.cuda import cuda_device

    held = cuda_device(0).array_dtype  # bfloat16 goes as its bytes where CuPy cannot hold it

    def upload(array: np.ndarray):  # type: ignore[no-untyped-def]
        return cupy.asarray(array.view(held(array.dtype)))

    def naive():
        with gpuckpt.open(prefix) as c:
            return {n: upload(c.get_tensor(n)) for n in c.keys()}

    results.update({"bytes": total, "tensors": len(names), "staging_bytes": options.staging_bytes})
    done("checked_and_warm")
    results["floor_pinned_h2d_s"] = best_of(args.repeat, floor)
    done("floor")
    target = cupy.empty(0, cupy.uint8)  # give the floor's device buffer back before the restores
    with PeakMemory() as peak:
        results["gpuckpt_verified_s"] = best_of(args.repeat, restore(True))
    results["peak_host_growth_bytes"] = peak.growth
    done("verified")
    results["gpuckpt_unverified_s"] = best_of(args.repeat, restore(False))
    done("unverified")
    # One device allocation carved into every tensor, against one cudaMalloc per tensor (the pool
    # is emptied before each run, as in a fresh process).
    results["gpuckpt_verified_single_allocation_s"] = best_of(args.repeat, restore(True, single_allocation=True))
    done("single_allocation")
    results.update(torch_load_into(prefix, args.repeat))
    done("torch_load_into")
    results["naive_s"] = best_of(1, naive)
    done("naive")
    try:
        import safetensors.torch
        import torch

        st_path = prefix + ".safetensors"
        if not os.path.exists(st_path):
            with gpuckpt.open(prefix) as c:
                tensors = {}
                for n in c.keys():
                    array = c.get_tensor(n)
                    raw = torch.from_numpy(
                        array.view(f"u{array.dtype.itemsize}").view(np.int16 if array.dtype.itemsize == 2 else np.int32)
                    )
                    tensors[n] = raw.view(
                        {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(array.dtype.name, torch.float32)
                    )
            safetensors.torch.save_file(tensors, st_path)
            del tensors
        with open(st_path, "rb") as f:
            while f.read(64 << 20):
                pass
        results["safetensors_s"] = best_of(args.repeat, lambda: safetensors.torch.load_file(st_path, device="cuda"))
    except ImportError:
        results["safetensors_s"] = None
    except Exception as exc:  # a baseline that breaks (torch's CUDA, disk space) must not lose the rest
        results["safetensors_s"] = None
        results["safetensors_error"] = f"{type(exc).__name__}: {exc}"
    done("safetensors")

    def cold():
        drop_from_page_cache(files)
        restore(True)()

    def raw_read():
        drop_from_page_cache(files)
        for path in files[:-1]:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(memoryview(staging)[: 64 << 20]):
                    pass

    results["cold_gpuckpt_s"] = best_of(1, cold)
    done("cold")
    results["cold_raw_read_s"] = best_of(1, raw_read)
    done("cold_raw_read")

    gbps = {k[:-2] + "_GBps": total / v / 1e9 for k, v in results.items() if k.endswith("_s") and v}
    results.update(gbps)
    floor_s = results["floor_pinned_h2d_s"]
    results["ratios"] = {
        "unverified_vs_floor": floor_s / results["gpuckpt_unverified_s"],
        "verified_vs_floor": floor_s / results["gpuckpt_verified_s"],
        "verified_single_allocation_vs_floor": floor_s / results["gpuckpt_verified_single_allocation_s"],
        "torch_load_into_vs_verified_restore": (results["torch_load_into_s"] / results["gpuckpt_verified_s"])
        if results["torch_load_into_s"]
        else None,
        "speedup_vs_naive": results["naive_s"] / results["gpuckpt_verified_s"],
        "speedup_vs_safetensors": (results["safetensors_s"] / results["gpuckpt_verified_s"])
        if results["safetensors_s"]
        else None,
        "cold_vs_raw_read": results["cold_raw_read_s"] / results["cold_gpuckpt_s"],
        "host_growth_vs_staging": peak.growth / options.staging_bytes,
    }
    results["complete"] = True
    done("ratios")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
