#!/usr/bin/env bash
# Prepare, on a development machine without a GPU, what bench/gpu_check.sh installs on the GPU
# machine instead of compiling there: .gpu/_C.cpython-312-*.so (the CUDA extension for that
# machine's Python and sm_90a) and .gpu/triton-cache-sm90.tar.xz (every Triton kernel variant
# of `fastgen check` and `fastgen bench --quick`'s op cases, compiled for sm_90 by that
# machine's Triton version and keyed for its Python's wheel). Then carry .gpu to the GPU run.
#
# It needs the registries once: a virtual environment with the GPU machine's Triton (the key
# covers Triton's sources, so the version must match) and that Triton's wheel for the target
# Python. About 10 minutes on 2 cores (the cache: ~1,000 variants at ~0.65 CPU-s each).
#
# Environment:
#   TRITON_VERSION  the GPU machine's Triton (default 3.6.0)
#   TARGET_PYTHON   an interpreter of the GPU machine's Python version, with its headers
#                   (default: python3.12 on PATH or under pyenv)
#   CUDA_ARCHS      SASS targets of the extension (default 90a); ARCH the Triton target (90)
#   ARTIFACTS       output folder (default .gpu; git ignores it)
#   PYTHON          fastgen's own environment's interpreter (default python3)
#   PREP            scratch folder for the environment and the wheel (default ${TMPDIR:-/tmp}/fastgen-gpu-prep)
set -euo pipefail
cd "$(dirname "$0")/.."

TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
CUDA_ARCHS="${CUDA_ARCHS:-90a}"
ARCH="${ARCH:-90}"
ARTIFACTS="${ARTIFACTS:-.gpu}"
PREP="${PREP:-${TMPDIR:-/tmp}/fastgen-gpu-prep}"
# The first python3.12 that runs (a pyenv shim may exist for a version that is not active).
find_target_python() {
    local candidate
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" --version > /dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
}
TARGET_PYTHON="${TARGET_PYTHON:-$(find_target_python)}"
if [[ -z "$TARGET_PYTHON" ]]; then
    echo "prepare_gpu_artifacts: no python3.12 found; set TARGET_PYTHON" >&2
    exit 2
fi
abi=$("$TARGET_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
mkdir -p "$ARTIFACTS" "$PREP"

# 1. The extension, for the target Python's ABI.
"${PYTHON:-python3}" -m fastgen.cli precompile extension --python "$TARGET_PYTHON" --cuda-archs "$CUDA_ARCHS" --out "$ARTIFACTS"

# 2. An environment with the target's Triton (and the CPU build of torch), and its wheel for
#    the target Python, whose libtriton hash goes into the cache key.
if [[ ! -x "$PREP/venv/bin/python" ]]; then
    python3 -m venv "$PREP/venv"
    "$PREP/venv/bin/pip" install -q torch==2.13.0 "triton==$TRITON_VERSION" numpy nvidia-ml-py pybind11 ninja
    FASTGEN_SKIP_CUDA=1 "$PREP/venv/bin/pip" install -q --no-build-isolation --no-deps -e .
fi
wheel=$(ls "$PREP"/wheels/triton-"$TRITON_VERSION"-cp"${abi/./}"-*.whl 2> /dev/null | head -n 1 || true)
if [[ -z "$wheel" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$abi" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$PREP/wheels" "triton==$TRITON_VERSION"
    wheel=$(ls "$PREP"/wheels/triton-"$TRITON_VERSION"-cp"${abi/./}"-*.whl | head -n 1)
fi

# 3. The Triton cache.
rm -rf "$PREP/cache"
"$PREP/venv/bin/python" -m fastgen.cli precompile build --workload check --workload bench-quick --arch "$ARCH" \
    --triton-wheel "$wheel" --cache-dir "$PREP/cache" --out "$ARTIFACTS/triton-cache-sm$ARCH.tar.xz"
ls -l "$ARTIFACTS"
