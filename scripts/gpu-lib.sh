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

# start_mps starts the CUDA MPS daemon unless one runs (two processes' contexts
# on one GPU would otherwise time-slice); stop_mps stops it if start_mps did.
# Both log to $OUT/summary.txt.
mps_started=0
start_mps() {
	if ! command -v nvidia-cuda-mps-control >/dev/null; then
		echo "no nvidia-cuda-mps-control: the two processes will time-slice (expect ms, not µs)" | tee -a "$OUT/summary.txt"
		return
	fi
	if echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
		echo "MPS daemon already running (left as it is)" | tee -a "$OUT/summary.txt"
		return
	fi
	nvidia-cuda-mps-control -d && mps_started=1 && echo "MPS daemon started" | tee -a "$OUT/summary.txt"
}

stop_mps() {
	if [ "$mps_started" = 1 ]; then
		echo quit | nvidia-cuda-mps-control && echo "MPS daemon stopped" | tee -a "$OUT/summary.txt"
		mps_started=0
	fi
}
