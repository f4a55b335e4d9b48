#!/usr/bin/env bash
# NCCL and pinned-staging transport on one GPU (issue 14).
#   scripts/gpu-transport.sh build   build bin/gpu/nccl.test, bin/gpu/cudastage.test and bin/glmtopo here (CGO off, no CUDA needed)
#   scripts/gpu-transport.sh run     on the GPU host, from the repository root: results under $OUT (default out/gpu)
#   scripts/gpu-transport.sh         build, then run when a GPU is visible
# The run:
#   1. NCCL bindings: one-rank communicator self send/recv (10 KB … 64 MiB), an init whose second rank never comes (aborted at its deadline).
#   2. TCP link with page-locked staging, device → wire → device, bytes checked.
#   3. Under the CUDA MPS daemon (two contexts on one GPU would time-slice): two processes, each with its own NCCL_HOSTID,
#      form a two-rank communicator (unique id over the authenticated TCP link), exchange 10 KB … 64 MiB and verify; an
#      oversized message fails on both sides within the deadline; a peer killed after announcing a message leaves the
#      receiver with an error (communicator aborted), not a hang.
#   4. glmtopo bench transport between two processes: tcp, tcp-pinned and nccl links beside raw TCP, 10 KB … 64 MiB (--json).
# Every step has a timeout; the whole run stays under 150 s (about 40 s when nothing hangs). Run it from the
# repository root with bin/gpu/nccl.test, bin/gpu/cudastage.test and bin/glmtopo present (scripts/gpu-session.sh
# pack builds them); $OUT may be absolute or relative (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=0
BIN=bin/gpu
SIZES=${SIZES:-10000,164000,2600000,16M,64M}

build() {
	mkdir -p "$BIN"
	# Stripped (-s -w): the three must fit a 64 MiB copy to the GPU host.
	go test -c -ldflags='-s -w' -o "$BIN/nccl.test" ./transport/nccl || return 1
	go test -c -ldflags='-s -w' -o "$BIN/cudastage.test" ./transport/cudastage || return 1
	go build -ldflags='-s -w' -o bin/glmtopo ./cmd/glmtopo || return 1
	echo "built $BIN/nccl.test $BIN/cudastage.test bin/glmtopo"
}

run() {
	# shellcheck source=scripts/gpu-lib.sh
	. scripts/gpu-lib.sh
	local t0=$SECONDS
	: >"$OUT/summary.txt"
	for b in "$BIN/nccl.test" "$BIN/cudastage.test" bin/glmtopo; do
		[ -x "$b" ] || { echo "missing $b: build it with scripts/gpu-session.sh pack (or $0 build)" | tee -a "$OUT/summary.txt"; return 1; }
	done
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
	local rc=0
	(cd transport/nccl && timeout 30 "../../$BIN/nccl.test" -test.v -test.count=1 \
		-test.run 'TestSelfSendRecv|TestInitTimesOut|TestInitDeadline|TestWaitAbortsAtDeadline|TestEnv|TestTransportTaken|TestUniqueID') >"$OUT/nccl-one-rank.log" 2>&1 || rc=1
	echo "nccl one-rank tests rc=$rc: $(grep -c -- '--- PASS' "$OUT/nccl-one-rank.log") passed, $(grep -c -- '--- FAIL' "$OUT/nccl-one-rank.log") failed ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	grep -E 'self send/recv|NCCL [0-9]|missing rank|--- FAIL' "$OUT/nccl-one-rank.log" | tee -a "$OUT/summary.txt"
	(cd transport/cudastage && timeout 20 "../../$BIN/cudastage.test" -test.v -test.count=1) >"$OUT/pinned-tcp.log" 2>&1 || rc=1
	echo "pinned TCP link test: $(grep -c -- '--- PASS' "$OUT/pinned-tcp.log") passed, $(grep -c -- '--- FAIL' "$OUT/pinned-tcp.log") failed ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	grep -E 'device→TCP→device' "$OUT/pinned-tcp.log" | tee -a "$OUT/summary.txt"

	start_mps
	trap stop_mps EXIT
	(cd transport/nccl && NCCL_HOSTID=glmtopo-rank0 timeout 40 "../../$BIN/nccl.test" -test.v -test.count=1 -test.run '^(TestTwoRankLink|TestPeerKilledMidMessage)$') >"$OUT/nccl-two-rank.log" 2>&1 || rc=1
	echo "nccl two-rank tests: $(grep -c -- '--- PASS' "$OUT/nccl-two-rank.log") passed, $(grep -c -- '--- FAIL' "$OUT/nccl-two-rank.log") failed ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	grep -E 'rank 1 → 0|oversized|after the kill|--- FAIL' "$OUT/nccl-two-rank.log" | tee -a "$OUT/summary.txt"

	rm -f "$OUT/bench.key"
	bin/glmtopo node cluster-key --out "$OUT/bench.key" >/dev/null
	local port=${PORT:-29517}
	# One round per size; streaming capped at 2000 messages (10 KB) or 256 MB per size and link.
	local opts=(--cluster-key-file "$OUT/bench.key" --nccl on --timeout 45s)
	NCCL_HOSTID=glmtopo-bench-a timeout 50 bin/glmtopo bench transport --listen "127.0.0.1:$port" "${opts[@]}" >"$OUT/bench-server.log" 2>&1 &
	local server=$!
	NCCL_HOSTID=glmtopo-bench-b timeout 50 bin/glmtopo bench transport --peer "127.0.0.1:$port" "${opts[@]}" \
		--sizes "$SIZES" --rounds "${ROUNDS:-1}" --stream-bytes 256M --max-messages 2000 --json >"$OUT/bench-transport.json" 2>"$OUT/bench-client.log" || rc=1
	wait "$server" || rc=1
	echo "bench transport done ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	grep -h 'nccl transport taken' "$OUT/bench-server.log" "$OUT/bench-client.log" | tee -a "$OUT/summary.txt"
	tee -a "$OUT/summary.txt" <"$OUT/bench-transport.json"
	stop_mps
	echo "gpu-transport rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
	return $rc
}

# shellcheck source=scripts/gpu-main.sh
. scripts/gpu-main.sh
gpu_main gpu-transport.sh "$BIN and bin/glmtopo" "$@"
