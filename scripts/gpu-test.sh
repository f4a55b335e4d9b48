#!/usr/bin/env bash
# GPU tests and the step benchmark.
#   scripts/gpu-test.sh build   build the GPU test binaries (kernels/cuda, parallel) and the bench CLI into bin/gpu (CGO off, no CUDA needed)
#   scripts/gpu-test.sh run     run them on this machine's GPU, logs under $OUT (default out/gpu)
#   scripts/gpu-test.sh         build, then run when a GPU is visible (else say how to run elsewhere)
# To run on a remote GPU host: copy the repository with bin/gpu to it and call `scripts/gpu-test.sh run` there.
set -uo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=0 NCCL_NVLS_ENABLE=0
BIN=bin/gpu
OUT=${OUT:-out/gpu}
BENCH_ARGS=${BENCH_ARGS:-}

build() {
	mkdir -p "$BIN"
	go test -c -o "$BIN/cuda.test" ./kernels/cuda || return 1
	go test -c -o "$BIN/parallel.test" ./parallel || return 1
	go build -o "$BIN/benchstep" ./bench/step/internal/benchstep || return 1
	echo "built $BIN/cuda.test $BIN/parallel.test $BIN/benchstep"
}

run() {
	mkdir -p "$OUT"
	export GLMTOPO_CUDA_CACHE=${GLMTOPO_CUDA_CACHE:-/tmp/glmtopo-cuda-cache}
	nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
	local rc=0
	(cd kernels/cuda && "../../$BIN/cuda.test" -test.v -test.count=1 -test.timeout=300s ${TEST_ARGS:-}) 2>&1 | tee "$OUT/tests.log"
	rc=${PIPESTATUS[0]}
	# The engine's GPU tests (decode graphs against eager and the CPU reference).
	(cd parallel && "../$BIN/parallel.test" -test.v -test.count=1 -test.timeout=300s -test.run GPU) 2>&1 | tee "$OUT/parallel-tests.log"
	[ "${PIPESTATUS[0]}" = 0 ] || rc=1
	if [ -n "$BENCH_ARGS" ]; then
		# shellcheck disable=SC2086
		"$BIN/benchstep" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" || rc=1
	fi
	return $rc
}

# shellcheck source=scripts/gpu-main.sh
. scripts/gpu-main.sh
gpu_main gpu-test.sh "$BIN" "$@"
