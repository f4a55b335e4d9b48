#!/usr/bin/env bash
# One GPU call for a round's record: every GPU test, the step benchmarks of
# docs/perf-cuda.md (JSON) and the prefill rows with exact GEMMs
# (--fast-gemm=false: activations as two bf16 halves). Run after
# `scripts/gpu-test.sh build`.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
PARALLEL_RUN=. gpu_tests
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120} scripts/gpu-bench.sh
for ml in synth:glm-4.5-air:4 synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
	m=${ml%:*} l=${ml##*:}
	echo "== $m layers $l --fast-gemm=false (prefill only)" | tee -a "$OUT/exact.txt"
	timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1 --prefill 8192 --fast-gemm=false 2>/dev/null | grep -E "^(prefill|measured)" | tee -a "$OUT/exact.txt"
done
(cd kernels/cuda && timeout 200 ../../bin/gpu/cuda.test -test.run XXX -test.bench Sample -test.benchtime 20x 2>&1 | grep Benchmark) | tee "$OUT/bench-sample.txt"
