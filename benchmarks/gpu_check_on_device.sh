#!/usr/bin/env bash
# The GPU check as one prepared run on a lent GPU machine (issue 14): the CUDA-only tests, then
# benchmarks/gpu_check.py, each figure also written under $OUT (default: ./gpu_check_out).
#
# The lent machines' image holds PyTorch with CUDA, pytest, scikit-learn, numpy, pandas, but not fedsafe's
# own dependencies (opacus, flwr, ray, flwr-datasets, datasets, ...): bring them as wheels for its Python
# (3.12) in .whl/ (see the lent machine's README), and name .whl in the run's carry. Without flwr/ray the
# federation part cannot run: pass --skip-federation through GPU_CHECK_ARGS, and the step-time part
# (PyTorch and Opacus only) still runs.
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
# fedsafe's role folders import as fedsafe.*: an install maps them (no index, no build isolation: offline)
"$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
    || { echo "gpu_check_on_device: pip install -e . failed, see install.log"; tail -3 "$OUT/install.log"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

# The tests that skip without CUDA: seeded DP noise, bf16 DP rounds and server evaluation on the GPU.
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
    tests/test_device_handling.py tests/test_precision.py -k "cuda" 2>&1 | tee "$OUT/cuda_tests.log" | tail -15

timeout 330 "$PYTHON" benchmarks/gpu_check.py --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
