"""Build the shipped CUDA kernels: kernels/convert.fatbin and its manifest kernels/convert.fatbin.json.

    python tools/build_kernels.py            # rebuild both (after editing anything in kernels/)
    python tools/build_kernels.py --check    # exit 1 if the shipped binary does not match the sources

The fatbin holds machine code for every GPU architecture the package supports (sm_80 to the newest
nvcc knows, one binary per family that is binary-compatible within it) plus PTX of the newest, which
the driver compiles for GPUs newer still. It is loaded with ``cupy.RawModule(path=...)``, so a GPU
machine needs neither NVRTC nor the CUDA headers. nvcc is NVIDIA's wheel (``nvidia-cuda-nvcc``,
pinned in the dev extra, so the build is reproducible: the same nvcc gives the same bytes) or the
one on PATH. The manifest records the nvcc version, the architectures and the sha256 of the
expanded sources (every local #include inlined), so a test can tell a stale binary from a fresh one
even where nvcc is missing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
FATBIN = os.path.join(KERNELS, "convert.fatbin")
MANIFEST = FATBIN + ".json"
sys.path.insert(0, ROOT)

#: Machine code per compatible family (a cubin for sm_XY runs on sm_XZ with Z >= Y): Ampere (80,
#: and 86 for its consumer parts), Ada (89), Hopper (90), Blackwell (100 datacenter, 110 Thor, 120
#: consumer/workstation); PTX for the newest, compiled by the driver on anything later.
SASS_ARCHITECTURES = ("80", "86", "89", "90", "100", "110", "120")
PTX_ARCHITECTURE = "120"


def find_tool(name: str) -> str | None:
    """A CUDA toolkit program from NVIDIA's wheels (preferred: pinned) or PATH."""
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        found = sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))
        if found:
            return found[0]
    return shutil.which(name)


def nvcc_version(nvcc: str) -> str:
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return output.strip().splitlines()[-1]  # e.g. "Build cuda_13.5.r13.5/compiler.39125733_0"


def sources_sha256() -> str:
    from gpuckpt.kernel_sources import expanded_source

    return hashlib.sha256(expanded_source("convert.cu").encode()).hexdigest()


def nvcc_arguments() -> list[str]:
    arguments = ["-fatbin", "-Werror", "all-warnings", "-I", KERNELS]
    for arch in SASS_ARCHITECTURES:
        code = f"[sm_{arch},compute_{arch}]" if arch == PTX_ARCHITECTURE else f"sm_{arch}"
        arguments += ["-gencode", f"arch=compute_{arch},code={code}"]
    return arguments


def build(nvcc: str, out: str) -> None:
    subprocess.run([nvcc, *nvcc_arguments(), "-o", out, os.path.join(KERNELS, "convert.cu")], check=True)


def manifest(nvcc: str) -> dict:
    return {
        "nvcc": nvcc_version(nvcc),
        "sass": [f"sm_{a}" for a in SASS_ARCHITECTURES],
        "ptx": f"compute_{PTX_ARCHITECTURE}",
        "sources_sha256": sources_sha256(),
        "fatbin_sha256": _file_sha256(FATBIN) if os.path.exists(FATBIN) else None,
    }


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check(nvcc: str | None) -> list[str]:
    """What is wrong with the shipped binary (empty: it matches the sources)."""
    if not os.path.exists(FATBIN) or not os.path.exists(MANIFEST):
        return ["kernels/convert.fatbin or its manifest is missing: run python tools/build_kernels.py"]
    with open(MANIFEST) as f:
        recorded = json.load(f)
    problems = []
    if recorded["sources_sha256"] != sources_sha256():
        problems.append("kernels/ changed since convert.fatbin was built: run python tools/build_kernels.py")
    if recorded["fatbin_sha256"] != _file_sha256(FATBIN):
        problems.append("convert.fatbin is not the file its manifest describes")
    if nvcc is not None and not problems and nvcc_version(nvcc) == recorded["nvcc"]:
        with tempfile.TemporaryDirectory() as work:
            rebuilt = os.path.join(work, "convert.fatbin")
            build(nvcc, rebuilt)
            if _file_sha256(rebuilt) != recorded["fatbin_sha256"]:
                problems.append(f"the same nvcc ({recorded['nvcc']}) builds different bytes from these sources")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the shipped binary instead of building")
    args = parser.parse_args(argv)
    nvcc = find_tool("nvcc")
    if args.check:
        problems = check(nvcc)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if nvcc is None:
        print("nvcc not found: pip install -e '.[dev]' brings NVIDIA's nvcc wheel", file=sys.stderr)
        return 1
    build(nvcc, FATBIN)
    with open(MANIFEST, "w") as f:
        json.dump(manifest(nvcc), f, indent=2)
        f.write("\n")
    print(f"built {FATBIN} ({os.path.getsize(FATBIN)} bytes) with {nvcc_version(nvcc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
