#!/usr/bin/env bash
# A/B of where the wide e4m3 GEMV starts (after scripts/gpu-test.sh build):
# GPU tests, then the fp8 decode rows at its default (9 tokens) and at 17.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 GLMTOPO_CUDA_CACHE=${GLMTOPO_CUDA_CACHE:-/tmp/glmtopo-cuda-cache}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
(cd kernels/cuda && timeout 240 ../../bin/gpu/cuda.test -test.count=1 -test.v >"$OUT/cuda-tests.log" 2>&1)
echo "cuda tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/cuda-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/cuda-tests.log")"
grep -B8 -- "--- FAIL" "$OUT/cuda-tests.log" | head -40
(cd parallel && timeout 120 ../bin/gpu/parallel.test -test.count=1 -test.v -test.run GPU >"$OUT/parallel-tests.log" 2>&1)
echo "parallel tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/parallel-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/parallel-tests.log")"
for ml in synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
	m=${ml%:*} l=${ml##*:}
	for min in 0 17; do
		echo "== $m --wide-gemv-min-tokens $min"
		timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1,16,64 --context 4096 --prefill 0 --wide-gemv-min-tokens $min 2>/dev/null | grep -E "^(decode|measured)"
	done
done
