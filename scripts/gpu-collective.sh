#!/usr/bin/env bash
# NCCL collectives on one GPU (issue 17): bindings' tests and glmtopo bench collective.
#   scripts/gpu-collective.sh build   build bin/gpu/nccl.test and bin/glmtopo here (CGO off, no CUDA needed)
#   scripts/gpu-collective.sh run     on the GPU host, from the repository root: results under $OUT (default out/gpu)
#   scripts/gpu-collective.sh         build, then run when a GPU is visible
# The run:
#   1. One rank: all-reduce (f32, bf16, in and out of place, 20 MiB), all-gather, reduce-scatter, all-to-all-v and the
#      tensor all-reducer on a one-rank communicator leave the data intact; an all-reduce captured in a CUDA graph of
#      a cuda.Backend replays; the CPU-side checks (argument validation, the calls as NCCL sees them) run beside them.
#   2. Under the CUDA MPS daemon: two processes, each with its own NCCL_HOSTID, run every collective on a two-rank
#      communicator; both compare the results with the CPU's.
#   3. glmtopo bench collective --ranks 1 and --ranks 2 (decode batch 1 … 64 and a 2048-token prefill chunk, bf16,
#      hidden 5120): p50/p99, algbw and busbw as nccl-tests defines them (--json and the table).
# Every step has a timeout; the whole run stays under 8 minutes (about 1 when nothing hangs).
set -uo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=0
BIN=bin/gpu

build() {
	mkdir -p "$BIN"
	go test -c -ldflags='-s -w' -o "$BIN/nccl.test" ./transport/nccl || return 1
	go build -ldflags='-s -w' -o bin/glmtopo ./cmd/glmtopo || return 1
	echo "built $BIN/nccl.test bin/glmtopo"
}

# tests NAME TIMEOUT PATTERN [ENV...]: run nccl.test's tests matching PATTERN into $OUT/NAME.log.
tests() {
	local name=$1 limit=$2 pattern=$3
	shift 3
	(cd transport/nccl && env "$@" timeout "$limit" "../../$BIN/nccl.test" -test.v -test.count=1 -test.run "$pattern") >"$OUT/$name.log" 2>&1
	local r=$?
	echo "$name rc=$r: $(grep -c -- '--- PASS' "$OUT/$name.log") passed, $(grep -c -- '--- SKIP' "$OUT/$name.log") skipped, $(grep -c -- '--- FAIL' "$OUT/$name.log") failed" | tee -a "$OUT/summary.txt"
	grep -E -- ' ok \(|--- (FAIL|SKIP)|^\s+\S+_test.go:[0-9]+: |NCCL WARN' "$OUT/$name.log" | head -40 | tee -a "$OUT/summary.txt"
	return $r
}

# bench RANKS: glmtopo bench collective on RANKS ranks, JSON and table.
bench() {
	local n=$1 r
	timeout 150 bin/glmtopo bench collective --ranks "$n" --timeout 140s --json >"$OUT/bench-collective-$n.json" 2>"$OUT/bench-collective-$n.log"
	r=$?
	echo "bench collective --ranks $n rc=$r" | tee -a "$OUT/summary.txt"
	grep -iE 'warning|error|glmtopo bench' "$OUT/bench-collective-$n.log" | head -10 | tee -a "$OUT/summary.txt"
	[ $r = 0 ] && python3 - "$OUT/bench-collective-$n.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
v = d["nccl_version"]
print(f'{d["ranks"]} ranks on GPUs {d["devices"]} shared={d["shared_gpu"]} mps={d["mps"]} NCCL {v//10000}.{v//100%100}.{v%100} {d["dtype"]}')
print(f'{"collective":15} {"phase":8} {"batch":>6} {"bytes":>10} {"p50 us":>9} {"p99 us":>9} {"algbw":>8} {"busbw":>8} {"queued us":>9} {"q busbw":>8}')
for r in d["results"]:
    print(f'{r["op"]:15} {r["phase"]:8} {r["batch"]:6d} {r["size_bytes"]:10d} {r["p50_us"]:9.1f} {r["p99_us"]:9.1f} '
          f'{r["algbw_gbps"]:8.2f} {r["busbw_gbps"]:8.2f} {r["queued_us"]:9.1f} {r["queued_busbw_gbps"]:8.2f}')
PY
	return $r
}

run() {
	# shellcheck source=scripts/gpu-lib.sh
	. scripts/gpu-lib.sh
	local t0=$SECONDS rc=0
	: >"$OUT/summary.txt"
	for b in "$BIN/nccl.test" bin/glmtopo; do
		[ -x "$b" ] || { echo "missing $b: build it with scripts/gpu-session.sh pack (or $0 build)" | tee -a "$OUT/summary.txt"; return 1; }
	done
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
	# NCCL_DEBUG=WARN: NCCL's own reason for a failed init lands in the log (a one-rank init answered
	# "internal error" in an earlier run).
	tests coll-one-rank 240 'TestCollectivesOneRank|TestCollectiveInGraph|TestCheckCollectives|TestCheckAllToAllV|TestCollectivesReachNCCL|TestCollectiveLaunchDeadline|TestTensorAllReducer' \
		NCCL_DEBUG="${NCCL_DEBUG:-WARN}" || rc=1
	echo "($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	bench 1 || rc=1

	start_mps
	trap stop_mps EXIT
	tests coll-two-rank 120 '^TestCollectivesTwoRanks$' NCCL_HOSTID=glmtopo-coll-rank0 NCCL_DEBUG="${NCCL_DEBUG:-WARN}" || rc=1
	echo "($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
	bench 2 || rc=1
	stop_mps
	echo "gpu-collective rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
	return $rc
}

# shellcheck source=scripts/gpu-main.sh
. scripts/gpu-main.sh
gpu_main gpu-collective.sh "$BIN/nccl.test and bin/glmtopo" "$@"
