"""gpuckpt.torch.load_into on the host, against restore() + load_state_dict, restore() alone and the
memory-copy floor, all measured in the same run.

    python benchmarks/load_into.py [--layers 16] [--d-model 1024] [--vocab 65536] [--context 1024]
                                   [--repeat 5] [--writer auto|tensorflow|gpuckpt] [--machine NAME]

The model is a GPT-2-shaped transformer (token and position embeddings; per layer two LayerNorms,
a fused qkv projection, the attention output projection and a 4x MLP; a final LayerNorm), float32,
~1 GiB at the defaults (270 M parameters in 196 tensors). Its checkpoint holds the module's own
``state_dict()`` names, so ``load_into`` needs no mapping and every tensor takes the direct path
(read straight into the parameter's storage). The checkpoint is written once, cached under
.bench/, in a new process: by TensorFlow (``SaveV2``, the bytes any TF saver writes) where it is
installed, else by ``gpuckpt.save``; so TensorFlow is never imported into the timing process.

Correctness first: ``load_into`` into a zeroed module must leave every parameter equal bit for bit
to ``restore()``'s array, with every ``data_ptr()`` unchanged; the baseline must leave the same.
Then, with the page cache warm (dropped and read once in order, as a first read from disk leaves
it), best of --repeat (the medians are recorded too) after one warm-up round, the figures timed
in turn round after round (so load from other processes on a shared machine falls on all of them
alike):

* (a) ``gpuckpt.torch.load_into(module, ckpt)``, verified (crc32c, the default) and not;
* (b) baseline: ``module.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.restore().items()})``;
* (c) ``ckpt.restore()`` alone (new arrays, nothing loaded anywhere), verified and not;
* (d) floors: one single-threaded memcpy of the mapped, page-cached data file into memory already
  faulted in (``np.copyto``), and the same by ``preadv`` in 4 MiB pieces (how gpuckpt reads).

Peak extra host memory of (a), (b) and (c): each in a new process that builds the module and
faults its memory in, opens the checkpoint, then runs the call once. The extra is the peak
resident set during the call less the resident set before it: ``VmHWM`` of /proc/self/status
after resetting it to the current RSS (``clear_refs`` 5). ``getrusage(RUSAGE_SELF).ru_maxrss`` is
recorded beside it, as a delta over the larger of the RSS and ru_maxrss before the call; it cannot
be reset, and a child started by ``vfork``/``exec`` begins with its parent's high-water mark, so
it can only under-count.

Results go to benchmarks/results/load-into-<machine>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from floors import CopyFloors  # noqa: E402
from report import machine_info, write_results  # noqa: E402

import gpuckpt  # noqa: E402

#: the issue's targets: load_into at most as slow as restore()+load_state_dict, within 1.2x of restore()
TARGET_OVER_BASELINE = 1.0
TARGET_OVER_RESTORE = 1.2


# -- the model -------------------------------------------------------------------------------------


def build_model(layers: int, d_model: int, vocab: int, context: int):
    """The GPT-2-shaped module, its memory allocated (on the meta device first, so nothing is
    initialised: the benchmark fills it) but not yet faulted in."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.proj = nn.Linear(4 * d_model, d_model)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(d_model)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(d_model)
            self.mlp = MLP()

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab, d_model)
            self.wpe = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d_model)

    with torch.device("meta"):
        model = Transformer()
    return model.to_empty(device="cpu").requires_grad_(False)


def model_shapes(args) -> dict[str, tuple[int, ...]]:
    model = build_model(args.layers, args.d_model, args.vocab, args.context)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def model_prefix(args) -> str:
    size = f"{args.layers}l-{args.d_model}d-{args.vocab}v-{args.context}c"
    return os.path.join(args.work_dir, f"load-into-{size}-{args.writer}", "ckpt")


# -- the checkpoint (written in a new process) -----------------------------------------------------


def child_write(args) -> int:
    """Write the checkpoint at --prefix: random float32 values in the module's shapes."""
    rng = np.random.default_rng(0)
    arrays = {
        name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        for name, shape in sorted(model_shapes(args).items())
    }
    tmp = args.prefix + ".tmp"
    writer = args.writer
    if writer == "auto":
        try:
            import tensorflow  # noqa: F401

            writer = "tensorflow"
        except ImportError:
            writer = "gpuckpt"
    if writer == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        names = list(arrays)
        tensors = [tf.constant(arrays.pop(n)) for n in names]
        tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        version = tf.__version__
    else:
        gpuckpt.save(tmp, arrays)
        version = getattr(gpuckpt, "__version__", "?")
    with open(args.prefix + ".writer.json", "w") as f:
        json.dump({"writer": writer, "version": version}, f)
    for suffix in (".data-00000-of-00001", ".index"):  # index last: the checkpoint exists once it does
        os.replace(tmp + suffix, args.prefix + suffix)
    return 0


def ensure_checkpoint(args) -> tuple[str, dict]:
    prefix = model_prefix(args)
    if not os.path.exists(prefix + ".index"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        run_child(args, "write", prefix)
    with open(prefix + ".writer.json") as f:
        return prefix, json.load(f)


def warm(prefix: str) -> None:
    """Bring the files into the page cache as a first read from disk leaves them: dropped, then
    read once in order (pages a process has just written can be slower to ``preadv`` from; see
    benchmarks/warm_start.py)."""
    for suffix in (".index", ".data-00000-of-00001"):
        with open(prefix + suffix, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while f.read(64 << 20):
                pass


def child_args(args, child: str, prefix: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--child", child, "--prefix", prefix]
    for flag in ("layers", "d_model", "vocab", "context", "writer"):
        command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return command


def run_child(args, child: str, prefix: str) -> dict | None:
    done = subprocess.run(child_args(args, child, prefix), capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"child {child} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


# -- the three calls -------------------------------------------------------------------------------


def calls(model, ckpt) -> dict:
    import torch

    import gpuckpt.torch as gtorch

    def baseline():
        model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.restore().items()})

    return {
        "load_into": lambda: gtorch.load_into(model, ckpt),
        "restore_load_state_dict": baseline,
        "restore": lambda: ckpt.restore(),
    }


# -- peak memory (in a new process) ----------------------------------------------------------------


def status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_memory(args) -> int:
    """Peak extra resident memory of one call (--call) into a module already in memory."""
    model = build_model(args.layers, args.d_model, args.vocab, args.context)
    for tensor in model.state_dict().values():
        tensor.zero_()  # faulted in: the model is resident before the call
    with gpuckpt.open(args.prefix) as ckpt:
        call = calls(model, ckpt)[args.call]
        gc.collect()
        rss_before = status_bytes("VmRSS")
        reset = reset_high_water()
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        call()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm_after = status_bytes("VmHWM")
    result = {
        "rss_before": rss_before,
        "ru_maxrss_extra": max(0, maxrss_after - max(maxrss_before, rss_before or 0)),
        "vmhwm_reset": reset,
    }
    if reset and hwm_after is not None and rss_before is not None:
        result["extra"] = hwm_after - rss_before
    else:
        result["extra"] = result["ru_maxrss_extra"]
    print(json.dumps(result))
    return 0


# -- timing ----------------------------------------------------------------------------------------


def interleaved(repeat: int, runs: dict) -> tuple[dict, dict]:
    """Best and median time of each of ``runs``, timed in turn, round after round, after one
    warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(repeat + 1):
        for name, fn in runs.items():
            gc.collect()
            start = time.perf_counter()
            fn()  # its result (arrays) is dropped before the next run
            if round_number:
                times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    return best, {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def same_bits(tensor, array: np.ndarray) -> bool:
    mine = tensor.detach().numpy()
    return mine.shape == array.shape and mine.dtype == array.dtype and mine.tobytes() == array.tobytes()


def check(model, ckpt) -> None:
    """load_into into a zeroed module equals restore() bit for bit, in the same storage; so does
    the baseline."""
    import torch

    import gpuckpt.torch as gtorch

    state = model.state_dict()
    pointers = {name: tensor.data_ptr() for name, tensor in state.items()}
    for tensor in state.values():
        tensor.zero_()
    report = gtorch.load_into(model, ckpt)
    expected = ckpt.restore()
    assert report.ok and sorted(expected) == sorted(state), report.describe()
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() == pointers[name], f"{name}: load_into replaced the storage"
        assert same_bits(tensor, expected[name]), f"{name}: load_into differs from restore()"
        tensor.zero_()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.restore().items()})
    for name, tensor in model.state_dict().items():
        assert same_bits(tensor, expected[name]), f"{name}: load_state_dict differs from restore()"


def in_process(args, prefix: str) -> dict:
    model = build_model(args.layers, args.d_model, args.vocab, args.context)
    data_path = prefix + ".data-00000-of-00001"
    size = os.path.getsize(data_path)

    import gpuckpt.torch as gtorch

    with CopyFloors(data_path) as floors, gpuckpt.open(prefix) as ckpt:
        check(model, ckpt)
        runs = calls(model, ckpt)
        nbytes = sum(t.nbytes for t in model.state_dict().values())
        seconds, medians = interleaved(
            args.repeat,
            {
                "load_into_s": runs["load_into"],
                "load_into_unverified_s": lambda: gtorch.load_into(model, ckpt, verify=False),
                "restore_load_state_dict_s": runs["restore_load_state_dict"],
                "restore_s": runs["restore"],
                "restore_unverified_s": lambda: ckpt.restore(verify=False),
                **floors.timings(),
            },
        )
        tensors = len(ckpt.keys())
    return {"tensors": tensors, "parameter_bytes": nbytes, "data_file_bytes": size, **seconds}, medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--writer", choices=("auto", "tensorflow", "gpuckpt"), default="auto")
    parser.add_argument("--work-dir", default=os.path.join(ROOT, ".bench"))
    parser.add_argument("--machine", default=None, help="names the results file (default: the host name)")
    parser.add_argument(
        "--out", default=None, help="JSON results path (default benchmarks/results/load-into-<machine>.json)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--call", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "write":
        return child_write(args)
    if args.child == "memory":
        return child_memory(args)

    import torch

    prefix, written_by = ensure_checkpoint(args)
    warm(prefix)
    results = {
        "machine": {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "args": vars(args),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "checkpoint": {"prefix": prefix, **written_by},
    }
    peak = {}
    for call in ("load_into", "restore_load_state_dict", "restore"):
        command = child_args(args, "memory", prefix) + ["--call", call]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"memory child {call} failed:\n{done.stdout}\n{done.stderr}")
        peak[call] = json.loads(done.stdout.strip().splitlines()[-1])
    timed, medians = in_process(args, prefix)
    results["seconds"] = timed  # the best of --repeat
    results["median_seconds"] = medians
    results["peak_extra_bytes"] = peak
    nbytes = timed["parameter_bytes"]
    results["gb_per_s"] = {k[:-2]: nbytes / v / 1e9 for k, v in timed.items() if k.endswith("_s")}
    over_baseline = timed["load_into_s"] / timed["restore_load_state_dict_s"]
    over_restore = timed["load_into_s"] / timed["restore_s"]
    results["ratios"] = {
        "load_into_over_restore_load_state_dict": over_baseline,
        "load_into_over_restore": over_restore,
        "load_into_over_floor_memcpy": timed["load_into_s"] / timed["floor_memcpy_prefaulted_s"],
        "restore_over_floor_memcpy": timed["restore_s"] / timed["floor_memcpy_prefaulted_s"],
        "load_into_unverified_over_restore_unverified": timed["load_into_unverified_s"] / timed["restore_unverified_s"],
        "peak_extra_load_into_over_parameter_bytes": peak["load_into"]["extra"] / nbytes,
        "peak_extra_baseline_over_parameter_bytes": peak["restore_load_state_dict"]["extra"] / nbytes,
    }
    results["targets"] = {
        f"load_into_over_restore_load_state_dict (<= {TARGET_OVER_BASELINE})": over_baseline <= TARGET_OVER_BASELINE,
        f"load_into_over_restore (<= {TARGET_OVER_RESTORE})": over_restore <= TARGET_OVER_RESTORE,
    }
    path = write_results(results, args.out, "load-into", args.machine)

    MiB = 1 << 20
    print(f"{timed['tensors']} tensors, {nbytes / MiB:.0f} MiB of float32 written by {written_by['writer']}")
    for name, value in timed.items():
        if name.endswith("_s"):
            print(
                f"  {name[:-2]:34s} {value * 1e3:9.1f} ms  {nbytes / value / 1e9:6.2f} GB/s"
                f"  (median {medians[name] * 1e3:7.1f} ms)"
            )
    for name, row in peak.items():
        print(
            f"  peak extra RSS, {name:23s} {row['extra'] / MiB:9.1f} MiB"
            f"  (ru_maxrss delta {row['ru_maxrss_extra'] / MiB:.1f} MiB)"
        )
    for name, value in results["ratios"].items():
        print(f"  {name:46s} {value:6.3f}")
    for name, met in results["targets"].items():
        print(f"  target {name}: {'met' if met else 'NOT met'}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
