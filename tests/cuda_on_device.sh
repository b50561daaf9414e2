#!/usr/bin/env bash
# Run the torch adapter's GPU tests (tests/test_torch_cuda.py) on a machine that has
# a CUDA build of torch but cannot install packages (no network): the project's
# other dependencies travel as wheels.
#
#   bash tests/cuda_on_device.sh prepare   # here, with pip access: wheels into .whl/ (git-ignored)
#   bash tests/cuda_on_device.sh run       # there, from the repository root, with .whl/ copied along
#
# "run" fails, never skips, when torch sees no CUDA device (DEEPFS_REQUIRE_CUDA=1).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the GPU machine's python3
WHEELS=(trio==0.35.0 outcome sniffio lmdb pyeclib==1.8.0 crc32c)  # what a CUDA image usually lacks

case "${1:-}" in
prepare)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
run)
    site=${SITE:-/tmp/deepfs-site}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
    DEEPFS_REQUIRE_CUDA=1 python3 -m pytest -q -p no:cacheprovider tests/test_torch_cuda.py "${@:2}"
    ;;
*)
    echo "usage: $0 prepare|run [pytest args]" >&2
    exit 2
    ;;
esac
