#!/usr/bin/env bash
# The GPU check as one prepared run on a lent GPU machine (issue 14): benchmarks/gpu_check.py first (the
# figures), then benchmarks/dp_overhead.py on the GPU (each family's fastest Opacus mode there), then the
# CUDA-only tests, each output also written under $OUT (default: ./gpu_check_out). At most 9 minutes.
#
# The lent machines' image holds PyTorch with CUDA, pytest, scikit-learn, numpy, pandas, pyarrow, rich, but
# not fedsafe's own dependencies (opacus, flwr, ray, flwr-datasets, datasets, captum, ...): bring them for its
# Python (3.12) in .whl/ (benchmarks/gpu_check_wheels.sh fills it), and name .whl in the run's carry. Ray's wheel
# (70 MiB) alone is over the 64 MiB a run carries: it travels as .whl/ray-site.tar.xz, the wheel unpacked
# without its Java jars, its dashboard's web build and RLlib (26 MiB), and is unpacked beside the wheels.
# Without flwr/ray the federation part cannot run: pass --skip-federation through GPU_CHECK_ARGS, and the
# step-time part (PyTorch and Opacus only) still runs.
#
#   bash benchmarks/gpu_check_on_device.sh                      # everything
#   GPU_CHECK_ARGS=--skip-federation bash benchmarks/gpu_check_on_device.sh
set -u
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check_on_device: the carried wheels did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .whl/ray-site.tar.xz ]; then
    tar xJf .whl/ray-site.tar.xz -C /tmp/site || { echo "gpu_check_on_device: ray-site.tar.xz did not unpack"; exit 1; }
fi
# fedsafe's role folders import as fedsafe.*: an install maps them (no index, no build isolation: offline)
"$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
    || { echo "gpu_check_on_device: pip install -e . failed, see install.log"; tail -3 "$OUT/install.log"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

# Stop at once (seconds, not minutes of device time) if the stack does not import.
"$PYTHON" -c "import fedsafe.client.app, opacus, flwr, ray; print('opacus', opacus.__version__, 'flwr', flwr.__version__ if hasattr(flwr, '__version__') else '?', 'ray', ray.__version__)" \
    || { echo "gpu_check_on_device: fedsafe's stack does not import"; exit 1; }

timeout 300 "$PYTHON" benchmarks/gpu_check.py --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}

# Which Opacus mode is fastest for each built-in family on this GPU (models declare theirs from CPU timings).
timeout 90 "$PYTHON" benchmarks/dp_overhead.py --device cuda --rounds 10 2>&1 | tee "$OUT/dp_overhead_cuda.log"

# The tests that skip without CUDA: seeded DP noise, bf16 DP rounds and server evaluation on the GPU.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
    tests/test_device_handling.py tests/test_precision.py -k "cuda" 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
tests=${PIPESTATUS[0]}
exit $(( status != 0 ? status : tests ))
