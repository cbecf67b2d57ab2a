#!/usr/bin/env bash
# The GPU proving ground in one command (a machine with torch, triton and transformers installed, no network):
#
#     OUT=/path/to/results bash benchmarks/gpu_suite.sh
#
# Every step writes into $OUT (default benchmarks/results/gpu) and the suite goes on after a failing step;
# the exit status is the number of failed steps.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
failed=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the status
    local name=$1
    shift
    echo "== $name: $*"
    local began=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name exit=$status seconds=$((SECONDS - began))" | tee -a "$OUT/steps.txt"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

pip install --no-deps -e . >"$OUT/install.log" 2>&1 || { echo "install failed"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
    git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} >"$OUT/environment.txt" 2>&1

# 1. The whole test suite on CUDA, gpu-marked cases included.
step tests python -m pytest -q -rs --junitxml="$OUT/tests.xml"
# 2. compute-sanitizer over every kernel on a small case.
if command -v compute-sanitizer >/dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu_checks.py kernels
    step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/gpu_checks.py kernels
else
    echo "compute-sanitizer not found: memcheck/racecheck skipped" | tee -a "$OUT/steps.txt"
fi
# 3. No host sync inside a round.
step syncs python benchmarks/gpu_checks.py syncs
# 4. Kernel microbenchmarks (eager reference, torch.compile, Triton, device-to-device copy).
for op in sampling verify translate ngram; do
    step "bench_$op" python -m pytest -q "benchmarks/bench_$op.py" --benchmark-only \
        --benchmark-json="$OUT/bench_$op.json" --benchmark-columns=min,median,mean,rounds
done
# 5. End-to-end against transformers on the zoo, and the cascade trade-off.
step e2e python benchmarks/e2e.py --out "$OUT"
step cascades python -m omnidraft_fast.cli cascade-sweep --out "$OUT"
step online python benchmarks/online.py --out "$OUT"
# 6. The benchmark zoo (EVALUATION.md; needs ../shared/tokenizers), end to end on each pair; the scale shapes.
step train_bench python -m omnidraft_fast.zoo.train_bench --out "$OUT/zoo"
for pair in llama3 qwen3; do
    if [ -d "$OUT/zoo/$pair/target" ]; then
        step "e2e_$pair" python benchmarks/e2e.py --pair "$OUT/zoo/$pair" --out "$OUT"
        step "online_$pair" python benchmarks/online.py --pair "$OUT/zoo/$pair" --out "$OUT"
    fi
done
step scale python benchmarks/scale.py --preset llama3-8b --trace "$OUT/scale-trace.json" --out "$OUT"
echo "failed steps: $failed (details in $OUT/*.log)"
exit "$failed"
