#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one device call. Its time is short (15 minutes per
# session, the machine's start included), so the whole script stays under GPU_SESSION_BUDGET_S
# (330 s) and a fixed rerun still fits; give the device call timeout_s=420.
#
# Here, first:    ../shared/tools/device-prep crc32c protobuf ml_dtypes
#                 (its default list lacks ml_dtypes; the image's protobuf predates the gencode's 7.35.1)
# Then the device tool's run, carry [".whl"]:   bash tools/gpu_session.sh
# Then commit what comes back to benchmarks/results/ (README: gpu-<device>.json, -device.txt, -summary.txt).
#
# Steps, each under `timeout` (seconds: its cap, or less when the budget is nearly spent):
#   1. device record (nvidia-smi, driver, PCIe link, Python packages, CuPy, CUDA)   ~10 s, caps 15+15+15+30
#   2. the carried wheels into a --target dir; a failure is recorded and the session goes on   cap 40
#   3. preflight: CUDA usable, the kernels load (fatbin and NVRTC), one small restore and one
#      dtype= conversion bit-exact against the host; stops the session with its reason   ~20 s, cap 75
#   4. tests/test_gpu.py and tests/test_gpu_frameworks.py (torch, JAX) on the real GPU (never on the
#      CuPy double), junit XML   ~70 s, cap 110
#   5. benchmarks/restore_gpu.py (SIZE_GB, 4 by default), its JSON rewritten after every stage   rest
#   6. summary.txt: PASS, or FAIL with every reason; the script's exit status is 0 only on PASS
# $OUT receives 7 files, no folders (the tool brings back 8 files at most):
#   device.txt preflight.log gpu-tests.xml gpu-tests.log gpu.json bench.log summary.txt
#
# Variables: OUT (default /tmp/gpuckpt-out), SIZE_GB, GPU_SESSION_PYTHON (default python3),
# GPU_SESSION_SKIP_WHEELS=1, GPU_SESSION_BUDGET_S, GPU_SESSION_WORK (scratch, default /tmp/gpuckpt-session),
# GPU_SESSION_TESTS (default "tests/test_gpu.py tests/test_gpu_frameworks.py"; a rerun may narrow
# it: "tests/test_gpu.py -k oom").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-/tmp/gpuckpt-out}
PY=${GPU_SESSION_PYTHON:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-330}
SIZE_GB=${SIZE_GB:-4}
WORK=${GPU_SESSION_WORK:-/tmp/gpuckpt-session}
read -ra GPU_TESTS <<<"${GPU_SESSION_TESTS:-tests/test_gpu.py tests/test_gpu_frameworks.py}"  # pytest arguments, split on spaces, no globbing
SITE=$WORK/site
mkdir -p "$OUT" "$WORK" || exit 2
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DEVICE=$OUT/device.txt PREFLIGHT=$OUT/preflight.log SUMMARY=$OUT/summary.txt
# This script's files only, from an earlier run into the same $OUT (the device tool empties it anyway):
# a stale junit report or gpu.json must never be read as this run's.
for name in device.txt preflight.log gpu-tests.xml gpu-tests.log gpu.json gpu.json.part bench.log summary.txt; do
    rm -f "${OUT:?}/$name"
done
SECONDS=0

# step NAME CAP LOG COMMAND...: COMMAND under `timeout`, its output appended to LOG and shown; RC is
# its exit status (124: timed out, 125: not run, the budget being spent). The last 15 s of the
# budget are kept for the summary.
limit_for() {
    local limit=$((BUDGET - SECONDS - 15))
    ((limit > $1)) && limit=$1
    echo "$limit"
}
step() {
    local name=$1 cap=$2 log=$3 limit
    shift 3
    limit=$(limit_for "$cap")
    if ((limit < 5)); then
        echo "== $name: not run, the session's ${BUDGET} s budget is spent" | tee -a "$log"
        RC=125
        return
    fi
    echo "== $name (at ${SECONDS} s, limit ${limit} s)" | tee -a "$log"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
    RC=${PIPESTATUS[0]}
    if ((RC == 124 || RC == 137)); then echo "== $name: TIMED OUT after ${limit} s" | tee -a "$log"; fi
    echo "== $name: exit $RC (at ${SECONDS} s)" >>"$log"
}

# 1. The device, before anything can fail.
{
    echo "# gpuckpt GPU session, device record, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo 2>/dev/null) memory"
    if commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
        echo "source: $commit, $(git -C "$ROOT" status --short 2>/dev/null | wc -l) paths changed"
    else
        echo "source: no git metadata here"
    fi
    echo "carried wheels: $(ls .whl 2>/dev/null | tr '\n' ' ')"
} | tee "$DEVICE"
query=name,driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max
step "nvidia-smi query" 15 "$DEVICE" nvidia-smi "--query-gpu=index,$query,memory.total,compute_cap,clocks.max.sm,power.limit" --format=csv
if ((RC == 127)); then
    echo "nvidia-smi: not found" | tee -a "$DEVICE"
else
    ((RC == 0)) || step "nvidia-smi query, fewer fields" 15 "$DEVICE" nvidia-smi "--query-gpu=$query,memory.total" --format=csv
    step "nvidia-smi" 15 "$DEVICE" nvidia-smi
fi
step "python, packages, CuPy and CUDA" 30 "$DEVICE" "$PY" tools/gpu_preflight.py record

# 2. The carried wheels (crc32c, protobuf >= 7.35.1, ml_dtypes), in front of the image's packages.
shopt -s nullglob
wheels=(.whl/*.whl)
if [[ -n ${GPU_SESSION_SKIP_WHEELS:-} ]]; then
    WHEELS="skipped (GPU_SESSION_SKIP_WHEELS)"
elif ((${#wheels[@]} == 0)); then
    WHEELS="NONE CARRIED: run ../shared/tools/device-prep crc32c protobuf ml_dtypes here and carry [\".whl\"]"
else
    step "install the carried wheels" 40 "$DEVICE" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    if ((RC == 0)); then
        WHEELS="installed: ${wheels[*]}"
    else  # two versions of one package, or one wheel that does not fit: the others one by one
        failed=()
        for wheel in "${wheels[@]}"; do
            step "install $wheel alone" 20 "$DEVICE" "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$SITE" "$wheel"
            ((RC == 0)) || failed+=("$wheel")
        done
        WHEELS="INSTALL FAILED for ${failed[*]:-none alone} (all at once: see device.txt); going on with the rest and the image's packages"
    fi
fi
echo "wheels: $WHEELS" | tee -a "$DEVICE"
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
step "requirements" 20 "$DEVICE" "$PY" tools/gpu_preflight.py requirements

# 3. Preflight: stop early, with the reason, when the GPU cannot be used.
step "preflight" 75 "$PREFLIGHT" "$PY" tools/gpu_preflight.py preflight --work-dir "$WORK" --deadline-s 60
PREFLIGHT_RC=$RC
if ((RC != 0)) && ! grep -q '^PREFLIGHT FAILED' "$PREFLIGHT"; then
    echo "PREFLIGHT FAILED: the preflight did not finish (exit $RC; the last '...' line above is where it was)" |
        tee -a "$PREFLIGHT"
fi

TESTS_RC="" BENCH_RC=""
if ((PREFLIGHT_RC == 0)); then
    # 4. The GPU tests, on the GPU: tests/test_gpu.py and tests/test_gpu_frameworks.py (the
    #    *_gpu_double.py modules are the double's own).
    timeout_flag=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=30)
    # No test starts in the step's last 35 s (a test's own limit is 30 s), so pytest writes its
    # junit report before the step's limit.
    export GPU_SESSION_TESTS_DEADLINE_S=$(($(limit_for 110) - 35))
    step "GPU tests" 110 "$OUT/gpu-tests.log" "$PY" tools/gpu_preflight.py pytest -q -ra -p no:cacheprovider \
        --durations=10 ${timeout_flag[@]+"${timeout_flag[@]}"} --junitxml="$OUT/gpu-tests.xml" "${GPU_TESTS[@]}"
    TESTS_RC=$RC

    # 5. The benchmark: whatever budget is left, gpu.json rewritten after every stage.
    step "benchmark" 200 "$OUT/bench.log" "$PY" benchmarks/restore_gpu.py --size-gb "$SIZE_GB" --repeat 3 \
        --work-dir "$WORK/bench" --out "$OUT/gpu.json"
    BENCH_RC=$RC
fi

# 6. The verdict.
timeout 15 "$PY" tools/gpu_preflight.py summary --out "$OUT" --preflight-rc "$PREFLIGHT_RC" \
    --tests-rc "$TESTS_RC" --bench-rc "$BENCH_RC" --wheels "$WHEELS" >"$SUMMARY" 2>&1
STATUS=$?
if ((STATUS > 1)); then
    {
        echo "wheels: $WHEELS"
        grep -h '^PREFLIGHT' "$PREFLIGHT"
        echo "FAIL: the summary could not be made (exit $STATUS): preflight $PREFLIGHT_RC, tests ${TESTS_RC:-not run}, benchmark ${BENCH_RC:-not run}"
        echo "GPU SESSION: FAIL"
    } >>"$SUMMARY"
fi
echo "== summary (after ${SECONDS} s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' '))"
cat "$SUMMARY"
((STATUS == 0))
