#!/usr/bin/env bash
# Everything to run on a lent GPU machine, in one call and offline: build and import the CUDA
# extension for this GPU, the GPU tests, `fastgen check`, the quick benchmark (FULL=1: the
# whole suite) with the measured backend order, `fastgen profile` of SANA, the SD 1.5 UNet and
# StyleGAN2 and, where compute-sanitizer exists, memcheck and racecheck over the CUDA tests.
#
# Writes under $OUT (default $TMPDIR/fastgen-gpu-check): gpu_check.log (every step's full
# output under a header; one file, since the device tool returns at most 8), summary.txt (step,
# exit code, seconds, appended as each step ends so a killed run keeps it), results/ (the
# benchmark JSON, CSV and plots) and profiles/<model>/ (traces and summary.json). Then, on the
# development machine: `fastgen bench order RESULTS.json --write` records the "auto" order.
# A failing step does not stop the others; the exit code is 1 if any failed.
#
# Environment:
#   PYTHON              interpreter with torch and triton (default python3)
#   FULL=1              the whole benchmark suite instead of --quick
#   SANITIZE=0          skip the compute-sanitizer steps (the slowest)
#   STEPS="a b"         run only these steps (names as in summary.txt), e.g. to split the work
#                       over several calls of a 10-minute limit
#   STEP_TIMEOUT        seconds before a step is killed (default 900)
#   FASTGEN_CUDA_ARCHS  SASS target (default: this GPU's, 90a on Hopper)
#   FASTGEN_COMMIT      the commit being measured, for a copy of the tree without .git
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-${TMPDIR:-/tmp}/fastgen-gpu-check}"
PYTHON="${PYTHON:-python3}"
FULL="${FULL:-0}"
SANITIZE="${SANITIZE:-1}"
STEPS="${STEPS:-}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
mkdir -p "$OUT"
: > "$LOG"
printf '%-12s %5s %8s\n' step exit seconds > "$SUMMARY"
# Nothing can be downloaded there: make pip fail fast instead of retrying an index.
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1

failed=0

selected() {
    [[ -z "$STEPS" || " $STEPS " == *" $1 "* ]]
}

# step NAME COMMAND...: run COMMAND with its output appended to $LOG, record its exit code and
# duration in $SUMMARY, and on failure print the end of its output.
step() {
    local name="$1"
    shift
    selected "$name" || return 0
    local offset started rc
    offset=$(wc -c < "$LOG")
    started=$SECONDS
    printf '\n===== %s (%s): %s\n' "$name" "$(date -u +%H:%M:%S)" "$*" >> "$LOG"
    echo "== $name: $*"
    timeout --kill-after=30 "$STEP_TIMEOUT" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%-12s %5s %8s\n' "$name" "$rc" "$((SECONDS - started))" >> "$SUMMARY"
    if [[ "$rc" -ne 0 ]]; then
        failed=1
        echo "!! $name exited $rc$([[ "$rc" -eq 124 ]] && echo " (timed out)"); the end of its output:"
        tail -c +"$((offset + 1))" "$LOG" | tail -n 40
    fi
}

skip_step() {
    if selected "$1"; then
        printf '%-12s %5s %8s  %s\n' "$1" "-" "-" "skipped: $2" >> "$SUMMARY"
    fi
}

# Hopper needs the "a" target for wgmma/setmaxnreg; other chips take their plain SASS.
capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
case "$capability" in
    90 | "") default_archs=90a ;;
    *) default_archs="$capability" ;;
esac
ARCHS="${FASTGEN_CUDA_ARCHS:-$default_archs}"

if command -v fastgen > /dev/null; then
    FASTGEN=(fastgen)
else
    FASTGEN=("$PYTHON" -m fastgen.cli)
fi

sanitizer=$(command -v compute-sanitizer || true)
if [[ -z "$sanitizer" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
    sanitizer=/usr/local/cuda/bin/compute-sanitizer
fi

bench_args=(--quick)
[[ "$FULL" == 1 ]] && bench_args=()

step gpu nvidia-smi
step versions "$PYTHON" -c 'import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("triton", triton.__version__, "|", torch.cuda.get_device_name(0))'
step install env FASTGEN_CUDA_ARCHS="$ARCHS" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
step import_C "$PYTHON" -c 'import fastgen._C as C; print("fastgen._C from", C.__file__)'
step info "${FASTGEN[@]}" info
step pytest_gpu "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
step check "${FASTGEN[@]}" check
step bench "${FASTGEN[@]}" bench "${bench_args[@]}" --out "$OUT/results"
if compgen -G "$OUT/results/*.json" > /dev/null; then
    latest="$(ls -t "$OUT"/results/*.json | head -n 1)"
    step order "${FASTGEN[@]}" bench order "$latest"
    step headline "${FASTGEN[@]}" bench headline "$latest"
else
    skip_step order "no benchmark result file"
    skip_step headline "no benchmark result file"
fi
for model in sana ldm_unet stylegan2; do
    step "profile_$model" "${FASTGEN[@]}" profile "$model" --out "$OUT/profiles/$model"
done
if [[ "$SANITIZE" != 1 ]]; then
    skip_step memcheck "SANITIZE=$SANITIZE"
    skip_step racecheck "SANITIZE=$SANITIZE"
elif [[ -z "$sanitizer" ]]; then
    skip_step memcheck "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    skip_step racecheck "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a neighbour inside a cached block.
    for tool in memcheck racecheck; do
        step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
            "$PYTHON" -m pytest -m gpu -k cuda -q -x -p no:cacheprovider
    done
fi

echo
echo "===== summary (full output in $LOG)"
cat "$SUMMARY"
if compgen -G "$OUT/results/*" > /dev/null; then
    echo "results: $(ls "$OUT/results")"
fi
exit "$failed"
