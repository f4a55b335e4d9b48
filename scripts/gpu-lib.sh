# Sourced by the GPU scripts (run on the GPU host, from the repository root,
# after `scripts/gpu-test.sh build`): environment and the test runs.
export NCCL_NVLS_ENABLE=0 GLMTOPO_CUDA_CACHE=${GLMTOPO_CUDA_CACHE:-/tmp/glmtopo-cuda-cache}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
mkdir -p "$OUT"

# gpu_tests runs every GPU test of kernels/cuda and parallel (PARALLEL_RUN
# filters the latter, default GPU) and prints the counts and any failures.
gpu_tests() {
	(cd kernels/cuda && timeout 420 ../../bin/gpu/cuda.test -test.count=1 -test.v >"$OUT/cuda-tests.log" 2>&1)
	echo "cuda tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/cuda-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/cuda-tests.log")"
	grep -B8 -- "--- FAIL" "$OUT/cuda-tests.log" | head -60
	(cd parallel && timeout 300 ../bin/gpu/parallel.test -test.count=1 -test.v -test.run "${PARALLEL_RUN:-GPU}" >"$OUT/parallel-tests.log" 2>&1)
	echo "parallel tests rc=$? passed=$(grep -c -- '--- PASS' "$OUT/parallel-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/parallel-tests.log")"
	grep -B8 -- "--- FAIL" "$OUT/parallel-tests.log" | head -30
}
