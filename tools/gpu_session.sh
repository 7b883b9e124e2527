#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one device call (its time is short: 30 minutes).
#
# Here, first:   ../shared/tools/device-prep crc32c ml_dtypes protobuf
# Then the device tool's run, carrying [".whl"]:   bash tools/gpu_session.sh
#
# Writes under $OUT: device.txt (GPU, driver, PCIe link, CuPy), gpu-tests.log (tests/test_gpu.py),
# gpu.json and gpu-bench.log (benchmarks/restore_gpu.py).
# Commit what comes back to benchmarks/results/ with the device named.
set -uo pipefail
OUT=${OUT:-/tmp/gpuckpt-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total \
    --format=csv | tee "$OUT/device.txt"
python3 -c "import cupy; print('cupy', cupy.__version__)" | tee -a "$OUT/device.txt"

# test_gpu.py alone: the other test modules need hypothesis and TensorFlow, which the machine lacks.
timeout 240 python3 -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 benchmarks/restore_gpu.py --size-gb "${SIZE_GB:-4}" --repeat 3 --work-dir /tmp/bench \
    --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu-bench.log"
