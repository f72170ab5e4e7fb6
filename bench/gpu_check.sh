#!/usr/bin/env bash
# What to run on a lent GPU machine, offline, in tiers: each tier is one command that fits in
# 8 minutes on an H100, so that the machine's start, one re-run and the hand-back fit in a
# 15-minute session. Run verify first, then measure; the deep tiers the next time a GPU is lent.
#
#   bash bench/gpu_check.sh verify|measure|deep-tests|deep-sanitize|deep-profile
#
# Prepared on the development machine first (bench/prepare_gpu_artifacts.sh, a few minutes):
# .gpu/ holds the CUDA extension built for the GPU machine's Python (cp312) and sm_90a, and a
# Triton cache precompiled for its Triton (3.6.0) and sm_90 (`fastgen precompile`). Carry .gpu.
# Without it every tier still runs, building the extension and compiling every kernel there.
#
# Budgets, in seconds, from the compiles counted by `fastgen precompile` (one compile for sm_90
# costs about 0.65 CPU-s; the GPU machine has 16 cores) and the per-step limits below:
#   every tier starts with setup: gpu 15 + install 90 + triton_cache 30 + info 30 = 165 at most
#     (about 40 when the carried artifacts import: no compiling).
#   the carried cache: 787 variants (check and bench-quick's op cases; 461 s on 2 cores to
#     build), so neither compiles there when the key matches (verify's cache_report says).
#   verify   165 + check 120 + smoke 150 + cache_report 15 = 450
#     check: every implementation of every op, its Triton variants all precompiled;
#     smoke: `pytest -m gpu --gpu-smoke -n 16`: 217 of the 2,753 gpu tests, each test once per
#     dtype, backend and op, with torch.compile(fullgraph) and CUDA-graph capture of every op;
#     its variants compile there, a few per test at most: 217 x 3 x 0.65 s / 16 cores = 26 s.
#   measure  165 + bench 270 + order 15 + headline 15 = 465
#     bench: `fastgen bench --quick`, every fastgen implementation, eager and the SDPA peers;
#     torch.compile only for the cases COMPILE_CASES selects (one fwd case of 6 ops instead
#     of 89 cold compiles of seconds to a minute each); the op kernels are precompiled, the
#     model benchmarks' kernels compile there (their eager layers are too slow to precompile
#     on a CPU at full size).
#   deep-tests     165 + pytest_gpu 300 = 465 (all 2,753 gpu tests, -n 16)
#   deep-sanitize  165 + memcheck 150 + racecheck 150 = 465 (over `fastgen check --backend cuda`)
#   deep-profile   165 + 3 profiles x 95 = 450 (SANA, the SD 1.5 UNet, StyleGAN2)
# A step past its limit is killed and recorded as exit 124; the tier goes on.
#
# Writes under $OUT (default $TMPDIR/fastgen-gpu-check), at most 8 files since the device tool
# returns no more: summary.txt (step, exit code, seconds; appended as each step ends, so a
# command cut off still returns what finished), gpu_check.log (every step's output), and per
# tier its results (check.txt; results.json / results.csv / plots.tar / order.txt / headline.md;
# profiles.tar.xz). Then, on the development machine, commit them under bench/results/<gpu>/,
# record the measured "auto" order with `fastgen bench order results.json --write` and the
# README's headline with `fastgen bench headline results.json --readme README.md`.
#
# Environment:
#   PYTHON          interpreter with torch and triton (default python3)
#   ARTIFACTS       the prepared folder (default .gpu)
#   TRITON_CACHE_DIR  where the precompiled cache is installed (default $TMPDIR/fastgen-triton-cache)
#   COMPILE_CASES   regex of the benchmark cases that get a torch.compile baseline
#   FASTGEN_COMMIT  the commit being measured, for a copy of the tree without .git
#   DRY_RUN=1       on a machine without a GPU (CI): every GPU command is echoed instead of run,
#                   the rest (argument handling, artifact install, summary, packing) runs for
#                   real; DRY_RUN_RESULTS=FILE stands in for the benchmark's result file
set -u -o pipefail
cd "$(dirname "$0")/.."

TIER="${1:-}"
case "$TIER" in
    verify | measure | deep-tests | deep-sanitize | deep-profile) ;;
    *)
        echo "usage: bash bench/gpu_check.sh verify|measure|deep-tests|deep-sanitize|deep-profile" >&2
        exit 2
        ;;
esac

OUT="${OUT:-${TMPDIR:-/tmp}/fastgen-gpu-check}"
PYTHON="${PYTHON:-python3}"
ARTIFACTS="${ARTIFACTS:-.gpu}"
DRY_RUN="${DRY_RUN:-0}"
# One headline case of six op families: each cold torch.compile costs seconds to a minute.
COMPILE_CASES="${COMPILE_CASES:-^(linear_attention B1 N4096|cross_attention SD1\.5 B4 Lq4096 Lkv77|ada_group_norm ADM B32 C512|trms2d B1 C128 1024px|filtered_lrelu B4 C128 512px|vq_nearest VAR B64) .*fwd$}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/fastgen-triton-cache}"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
: > "$LOG"
printf '%-14s %5s %8s %6s\n' step exit seconds limit > "$SUMMARY"
# Nothing can be downloaded there: make pip fail fast instead of retrying an index.
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
[[ "$DRY_RUN" == 1 ]] && echo "gpu_check: DRY RUN: GPU commands are echoed, not run"

failed=0
FASTGEN=("$PYTHON" -m fastgen.cli)
export PYTHON ARTIFACTS

# run LIMIT NAME [--gpu] COMMAND...: COMMAND with its output appended to $LOG, its exit code
# and duration recorded in $SUMMARY, killed after LIMIT seconds. --gpu: echoed in a dry run.
run() {
    local limit="$1" name="$2" offset started rc
    shift 2
    if [[ "$1" == --gpu ]]; then
        shift
        [[ "$DRY_RUN" == 1 ]] && set -- echo "[dry run] $*"
    fi
    offset=$(wc -c < "$LOG")
    started=$SECONDS
    printf '\n===== %s (%s): %s\n' "$name" "$(date -u +%H:%M:%S)" "$*" >> "$LOG"
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%-14s %5s %8s %6s\n' "$name" "$rc" "$((SECONDS - started))" "$limit" >> "$SUMMARY"
    if [[ "$rc" -ne 0 ]]; then
        failed=1
        echo "!! $name exited $rc$([[ "$rc" -eq 124 ]] && echo " (timed out)"); the end of its output:"
        tail -c +"$((offset + 1))" "$LOG" | tail -n 30
    fi
}

skip() {
    printf '%-14s %5s %8s %6s  skipped: %s\n' "$1" "-" "-" "-" "$2" >> "$SUMMARY"
}

# The extension from $ARTIFACTS when it imports here, else built here for this GPU.
install_fastgen() {
    FASTGEN_SKIP_CUDA=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . || return
    local built
    built=$(ls "$ARTIFACTS"/_C.cpython-*.so 2> /dev/null | head -n 1)
    if [[ -n "$built" ]]; then
        cp "$built" fastgen/
        if "$PYTHON" -c 'import fastgen._C'; then
            echo "fastgen._C: the carried $(basename "$built")"
            return 0
        fi
        echo "fastgen._C: the carried $(basename "$built") does not import here; building it"
        rm -f "fastgen/$(basename "$built")"
    fi
    capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
    # Hopper needs the "a" target for wgmma/setmaxnreg; other chips take their plain SASS.
    [[ "$capability" == 90 ]] && capability=90a
    FASTGEN_CUDA_ARCHS="$capability" "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e .
}

install_triton_cache() {
    local archive
    archive=$(ls "$ARTIFACTS"/triton-cache-*.tar.xz 2> /dev/null | head -n 1)
    if [[ -z "$archive" ]]; then
        echo "no precompiled Triton cache in $ARTIFACTS: every kernel compiles here"
        return 0
    fi
    "$PYTHON" -m fastgen.cli precompile install "$archive" --cache-dir "$TRITON_CACHE_DIR"
}

cache_entries() {
    find "$TRITON_CACHE_DIR" -name '__grp__*.json' 2> /dev/null | wc -l
}

# Steps run under `timeout`, which starts programs: the functions go through bash.
export -f install_fastgen install_triton_cache cache_entries

# ---- setup, in every tier ----------------------------------------------------------------
run 15 gpu --gpu nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
run 90 install --gpu bash -c install_fastgen
run 30 triton_cache bash -c install_triton_cache
run 30 info "${FASTGEN[@]}" info
export entries_before=$(cache_entries)

# ---- the tier ----------------------------------------------------------------------------
case "$TIER" in
    verify)
        run 120 check --gpu sh -c "\"\$@\" > '$OUT/check.txt'" - "${FASTGEN[@]}" check
        run 150 smoke --gpu "$PYTHON" -m pytest -m gpu --gpu-smoke -n 16 -q -p no:cacheprovider
        # Kernels the carried cache lacked: compiled here, each a finding for the precompile.
        run 15 cache_report bash -c 'echo "$(($(cache_entries) - entries_before)) kernel variants compiled here (not in the carried cache)"'
        ;;
    measure)
        run 270 bench --gpu "${FASTGEN[@]}" bench --quick --compile-filter "$COMPILE_CASES" --out "$OUT/bench"
        results="$(ls -t "$OUT"/bench/*.json 2> /dev/null | head -n 1)"
        [[ "$DRY_RUN" == 1 && -n "${DRY_RUN_RESULTS:-}" ]] && mkdir -p "$OUT/bench" && cp "$DRY_RUN_RESULTS" "$OUT/bench/" \
            && results="$OUT/bench/$(basename "$DRY_RUN_RESULTS")"
        if [[ -n "$results" ]]; then
            cp "$results" "$OUT/results.json"
            cp "${results%.json}.csv" "$OUT/results.csv" 2> /dev/null
            run 15 order sh -c "\"\$@\" > '$OUT/order.txt'" - "${FASTGEN[@]}" bench order "$OUT/results.json"
            run 15 headline sh -c "\"\$@\" > '$OUT/headline.md'" - "${FASTGEN[@]}" bench headline "$OUT/results.json"
            if compgen -G "$OUT/bench/*.png" > /dev/null; then
                tar cf "$OUT/plots.tar" -C "$OUT/bench" $(cd "$OUT/bench" && ls ./*.png)
            fi
        else
            skip order "no benchmark result file"
            skip headline "no benchmark result file"
        fi
        rm -rf "$OUT/bench"
        ;;
    deep-tests)
        run 300 pytest_gpu --gpu "$PYTHON" -m pytest -m gpu -n 16 -q -p no:cacheprovider
        ;;
    deep-sanitize)
        sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        # Without the caching allocator every tensor is its own allocation, so memcheck sees an
        # access past a tensor's end instead of landing in a neighbour inside a cached block.
        for tool in memcheck racecheck; do
            run 150 "$tool" --gpu env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" \
                --error-exitcode 1 "${FASTGEN[@]}" check --backend cuda
        done
        ;;
    deep-profile)
        for model in sana ldm_unet stylegan2; do
            run 95 "profile_$model" --gpu "${FASTGEN[@]}" profile "$model" --out "$OUT/profiles/$model"
        done
        [[ -d "$OUT/profiles" ]] && tar cJf "$OUT/profiles.tar.xz" -C "$OUT" profiles && rm -rf "$OUT/profiles"
        ;;
esac

{
    echo "commit ${FASTGEN_COMMIT:-$(git rev-parse HEAD 2> /dev/null || echo unknown)}  tier $TIER  dry_run $DRY_RUN"
} >> "$SUMMARY"
echo
echo "===== $TIER summary (full output in $LOG)"
cat "$SUMMARY"
exit "$failed"
