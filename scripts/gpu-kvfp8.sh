#!/usr/bin/env bash
# The e4m3 KV cache (--kv-cache-dtype fp8) on the GPU: the write and
# attention twins (decode, prefill tiles, attention_flash), the bf16/f32
# attention twins it must not have changed, the engine on the tiny fixtures,
# then decode and prefill attention timings, bf16 against e4m3.
#   scripts/gpu-kvfp8.sh   (after scripts/gpu-test.sh build)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
(cd kernels/cuda && timeout 540 ../../bin/gpu/cuda.test -test.count=1 -test.v \
	-test.run 'TestKernelsCompile|TestKVCacheKinds|TestFP8KVWriteTwin|TestFP8AttentionTwin|TestFP8FlashAttentionTwin|TestAttentionTwin|TestFlashAttentionTwin|TestGoldenFixturesOnGPU' \
	>"$OUT/kvfp8-cuda-tests.log" 2>&1)
echo "cuda tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/kvfp8-cuda-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/kvfp8-cuda-tests.log")"
grep -B8 -- "--- FAIL" "$OUT/kvfp8-cuda-tests.log" | head -60
(cd parallel && timeout 300 ../bin/gpu/parallel.test -test.count=1 -test.v -test.run 'TestFP8KVCacheOnGPU|TestDecodeGraphsOnGPU' \
	>"$OUT/kvfp8-parallel-tests.log" 2>&1)
echo "parallel tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/kvfp8-parallel-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/kvfp8-parallel-tests.log")"
grep -E -- "--- FAIL|steps: median" -B2 "$OUT/kvfp8-parallel-tests.log" | head -40
(cd kernels/cuda && timeout 240 ../../bin/gpu/cuda.test -test.run XXX -test.bench 'DecodeAttentionAir|PrefillAttentionAir' \
	-test.benchtime 20x 2>&1 | grep -E 'Benchmark|ok|FAIL') | tee "$OUT/bench-kvfp8.txt"
