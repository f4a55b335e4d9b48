#!/usr/bin/env bash
# One device call that runs several GPU scripts on binaries built here.
#   scripts/gpu-session.sh pack              here: build every GPU binary (CGO off, stripped) into .gpu/bin.tgz
#   scripts/gpu-session.sh run S1 [S2 ...]   on the GPU host (carry .gpu): unpack, run each scripts/S.sh run-step,
#                                            logs of all of them packed into $OUT/logs.tgz (the device returns 8 files)
# S is one of: kvfp8 fp8twin transport collective mtp memplan pipeline pipelinemps (under the MPS daemon) pipelinenccl (rows over NCCL, under MPS) tpone (issue 17: one-rank communicator) ranks (issue 17: the rank group on the device, two ranks on one GPU) suite (suite: every GPU test of kernels/cuda and parallel).
set -uo pipefail
cd "$(dirname "$0")/.."

pack() {
	export CGO_ENABLED=0
	local b=bin/gpu f="-ldflags=-s -w"
	mkdir -p "$b" .gpu
	go test -c "$f" -o "$b/cuda.test" ./kernels/cuda &&
		go test -c "$f" -o "$b/parallel.test" ./parallel &&
		go test -c "$f" -o "$b/nccl.test" ./transport/nccl &&
		go test -c "$f" -o "$b/cudastage.test" ./transport/cudastage &&
		go build "$f" -o "$b/benchstep" ./bench/step/internal/benchstep &&
		go test -c "$f" -o "$b/benchstep.test" ./bench/step &&
		go build "$f" -o bin/glmtopo ./cmd/glmtopo || return 1
	cp bin/glmtopo "$b/glmtopo"
	tar -czf .gpu/bin.tgz bin/glmtopo "$b"/{cuda.test,parallel.test,nccl.test,cudastage.test,benchstep,benchstep.test} &&
		ls -la .gpu/bin.tgz
}

run() {
	tar -xzf .gpu/bin.tgz && cp bin/glmtopo bin/gpu/glmtopo || { echo "no .gpu/bin.tgz: carry .gpu"; return 1; }
	local final=${OUT:-out/gpu}
	local top=/tmp/gpu-session
	mkdir -p "$top"
	nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$top/gpu.txt"
	echo "commit $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files" | tee -a "$top/gpu.txt"
	local rc=0 s t0
	for s in "$@"; do
		t0=$SECONDS
		echo "=== $s"
		export OUT=$top/$s
		mkdir -p "$OUT"
		case $s in
		kvfp8) bash scripts/gpu-kvfp8.sh ;;
		fp8twin) (cd kernels/cuda && timeout 300 ../../bin/gpu/cuda.test -test.count=1 -test.v \
			-test.run 'TestFP8AttentionTwin|TestFP8FlashAttentionTwin|TestFP8KVWriteTwin' >"$OUT/fp8twin.log" 2>&1; echo "rc=$?";
			grep -E -- '^(--- |    --- )(PASS|FAIL)' "$OUT/fp8twin.log" | head -40) ;;
		transport) bash scripts/gpu-transport.sh run ;;
		collective) bash scripts/gpu-collective.sh run ;;
		mtp) bash scripts/gpu-mtp.sh run ;;
		pipeline) bash scripts/gpu-pipeline.sh run ;;
		pipelinemps) MPS=1 bash scripts/gpu-pipeline.sh run ;;
		pipelinenccl) LINK=nccl bash scripts/gpu-pipeline.sh run ;;
		memplan) bash scripts/gpu-memplan.sh ;;
		tpone) bash scripts/gpu-tpone.sh ;;
		ranks) bash scripts/gpu-ranks.sh ;;
		suite) (. scripts/gpu-lib.sh && gpu_tests) ;;
		*) echo "unknown step $s" ;;
		esac || rc=1
		echo "=== $s done in $((SECONDS - t0)) s"
	done
	tar -czf "$final/logs.tgz" -C "$top" . 2>/dev/null
	return $rc
}

case "${1:-}" in
pack) pack ;;
run) shift; run "$@" ;;
*) sed -n 2,6p "$0"; exit 2 ;;
esac
