#!/usr/bin/env bash
# Two pipeline stages as two processes on one GPU (issue 15).
#   scripts/gpu-pipeline.sh build   build bin/gpu/parallel.test here (CGO off, no CUDA needed)
#   scripts/gpu-pipeline.sh run     on the GPU host, from the repository root: results under $OUT (default out/gpu)
#   scripts/gpu-pipeline.sh         build, then run when a GPU is visible
# The run: GLM-4.5-Air-FP8 dummy weights with LAYERS layers (default 8), batch 64 greedy, eager steps:
#   once in one process, then as a head (layers [0,L/2), embedding, lm_head, MTP) in the test process and an executor
#   stage ([L/2,L)) in a second process joined by a TCP link on loopback (f32 hidden rows, host staging), first with
#   one micro-batch in flight, then with two (MICRO=1,2). Greedy tokens must match up to each request's first near tie (found decoding it alone in one process); in $OUT/pipeline.log: decode and
#   overall tok/s against one process, and per ring step the round trip, the head's and the stage's bubble (time idle
#   waiting for rows) against the stage's compute, and the one-way latency of a header-only hop. Run with and without the MPS daemon (MPS=1 starts it) to see the two contexts' time-slicing.
# LINK=nccl: the same run with the rows in device memory over NCCL (ncclSend/ncclRecv, a two-rank communicator per
#   ring hop, headers on the TCP links); it starts the MPS daemon (two contexts on one GPU would time-slice) and gives
#   each process its own NCCL_HOSTID (this one here, the stage process its own from the test) so that NCCL takes two
#   ranks on one GPU. Its log is $OUT/pipeline-nccl.log; NCCL's INIT/NET log (which transport it took) goes to /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=0
BIN=bin/gpu

build() {
	mkdir -p "$BIN"
	go test -c -ldflags='-s -w' -o "$BIN/parallel.test" ./parallel || return 1
	echo "built $BIN/parallel.test"
}

run() {
	# shellcheck source=scripts/gpu-lib.sh
	. scripts/gpu-lib.sh
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
	local link=${LINK:-tcp} log=$OUT/pipeline.log
	local -a env=(GLMTOPO_PIPE_LINK="$link")
	if [ "$link" = nccl ]; then
		MPS=1
		log=$OUT/pipeline-nccl.log
		env+=(NCCL_HOSTID="${NCCL_HOSTID:-glmtopo-pipeline-head}" NCCL_NVLS_ENABLE=0)
	fi
	[ "${MPS:-0}" = 1 ] && start_mps
	# At most 150 s: one-process run, each request decoded alone up to its first near tie, then a two-process run per MICRO entry (default "1,2" micro-batches in flight).
	(cd parallel && env "${env[@]}" GLMTOPO_PIPE_LAYERS=${LAYERS:-8} GLMTOPO_PIPE_MICRO=${MICRO:-1,2} timeout 150 "../$BIN/parallel.test" \
		-test.v -test.count=1 -test.timeout=148s -test.run '^TestPipelineGPUTwoProcesses$') >"$log" 2>&1
	local rc=$?
	stop_mps
	# Decode tok/s one process vs two (target >= 80%), then per ring step: round trip, head and stage bubble, stage
	# compute, and the header-only hop latency.
	grep -E -- '--- (PASS|FAIL|SKIP)|tok/s|per step|differ|diverge|near tie|lockstep|deterministic|nccl|panic|Error' "$log" | cut -c1-400
	echo "gpu-pipeline link=$link rc=$rc"
	return $rc
}

# shellcheck source=scripts/gpu-main.sh
. scripts/gpu-main.sh
gpu_main gpu-pipeline.sh "bin/gpu" "$@"
