#!/usr/bin/env bash
# One GPU call for a round's record: every GPU test, the step benchmarks of
# docs/perf-cuda.md (JSON) and the prefill rows with --fast-gemm. Run after
# `scripts/gpu-test.sh build`.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 GLMTOPO_CUDA_CACHE=${GLMTOPO_CUDA_CACHE:-/tmp/glmtopo-cuda-cache}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
(cd kernels/cuda && timeout 200 ../../bin/gpu/cuda.test -test.count=1 -test.v >"$OUT/cuda-tests.log" 2>&1)
echo "cuda tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/cuda-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/cuda-tests.log")"
(cd parallel && timeout 120 ../bin/gpu/parallel.test -test.count=1 -test.v >"$OUT/parallel-tests.log" 2>&1)
echo "parallel tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/parallel-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/parallel-tests.log")"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120} scripts/gpu-bench.sh
for ml in synth:glm-4.5-air:4 synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
	m=${ml%:*} l=${ml##*:}
	echo "== $m layers $l --fast-gemm (prefill only)" | tee -a "$OUT/fast.txt"
	timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1 --prefill 8192 --fast-gemm 2>/dev/null | grep -E "^(prefill|measured)" | tee -a "$OUT/fast.txt"
done
