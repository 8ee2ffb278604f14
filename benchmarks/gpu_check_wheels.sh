#!/usr/bin/env bash
# Fills .whl/ with what benchmarks/gpu_check_on_device.sh needs on a lent GPU machine (Python 3.12, its own
# PyTorch with CUDA, numpy, pandas, pyarrow, scikit-learn, rich, seaborn, ... but none of fedsafe's own
# dependencies), run here where pip reaches the registry; then call the device tool with carry [".whl"] and
# the command `bash benchmarks/gpu_check_on_device.sh`.
#
# The list is the dependency closure of opacus, flwr[simulation,dp], flwr-datasets and captum less what that
# image already holds (its package list: /work/.library/device/KINDS.md), plus grpcio and protobuf at the
# versions Flower was tested with here. Ray's wheel (70 MiB) is over the 64 MiB one run may carry, so it
# travels unpacked as a tarball without its Java jars, its dashboard's web build and RLlib (26 MiB; fedsafe
# starts Ray without the dashboard). Checked on 2026-11-27 in a Python 3.12 environment holding only the
# image's packages: the on-device script ran to its end (`GPU_CHECK_ARGS="--device cpu --quick"`).
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64)
WHEELS=(
    opacus==1.6.0 flwr==1.41.0 flwr-datasets==0.6.1 datasets==4.8.5 captum==0.9.0 dp-accounting==0.6.0
    grpcio==1.85.3 grpcio-health-checking==1.81.1 protobuf==6.33.6 cryptography==50.0.2 cffi==2.0.0 pycparser==3.0
    pycryptodome==3.24.1 iterators==0.0.2 tomli==2.5.0 tomli-w==1.2.0 dill==0.4.1 multiprocess==0.70.19
    dm-tree==0.1.10 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 fastapi==0.138.2
    starlette==1.3.1 uvicorn==0.49.0 websockets==17.4 watchfiles==1.3.0 python-dotenv==1.2.2 httptools==0.9.0
    alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9 prompt-toolkit==3.0.52 wcwidth==0.7.0
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
if [ ! -f .whl/ray-site.tar.xz ]; then
    unpacked=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$unpacked" ray==2.55.1
    # unzip keeps the executable bits of Ray's gcs_server and raylet (python's zipfile drops them)
    (cd "$unpacked" && unzip -q ray-*.whl && rm ray-*.whl && test -x ray/core/src/ray/raylet/raylet \
        && rm -rf ray/jars ray/dashboard/client/build ray/rllib && tar cf - . | xz -T0 -6 > ray-site.tar.xz)
    mv "$unpacked/ray-site.tar.xz" .whl/ && rm -rf "$unpacked"
fi
du -sh .whl
