#!/usr/bin/env bash
# Issue 17 on one GPU: the rank group whose rank 0 is the engine's backend
# (residual broadcast over NCCL, decode graphs with the NCCL calls
# captured), and two NCCL ranks in one process on this GPU, each an emulated
# host (its own UTS namespace and libnccl copy: root), over NET/Socket.
#   1. transport/nccl: broadcast, staged all-to-all-v, blocking comms, two
#      ranks in one process;
#   2. kernels/cuda: the EPLB replica mask against its CPU twin, in a graph;
#   3. parallel: TestRanksNCCLOnGPU (rank layouts against the plain engine)
#      and TestRankGroupDecodeTimesOnGPU (one-rank group vs plain at batch
#      1/16/64, graphs on).
# Run by `scripts/gpu-session.sh run ranks` (binaries from its pack step).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
rc=0
id -u
(cd transport/nccl && timeout 240 env -u NCCL_HOSTID ../../bin/gpu/nccl.test -test.count=1 -test.v \
	-test.run '^(TestCollectivesOneRank|TestCollectiveInGraph|TestHostLibrariesOneGPU|TestCollectivesTwoRanksOneProcess|TestSelfSendRecvBlocking|TestSelfSendRecv)$' \
	>"$OUT/ranks-nccl.log" 2>&1) || rc=1
echo "nccl rc=$rc passed=$(grep -c -- '--- PASS' "$OUT/ranks-nccl.log") failed=$(grep -c -- '--- FAIL' "$OUT/ranks-nccl.log")"
grep -E -- '--- (FAIL|SKIP)|NCCL WARN|blocking|µs|us/' "$OUT/ranks-nccl.log" | head -30
(cd kernels/cuda && timeout 120 ../../bin/gpu/cuda.test -test.count=1 -test.v \
	-test.run '^(TestMaskReplicasTwin|TestMaskReplicasGraph|TestMaskReplicasRejectsBadShapes|TestKernelsCompile)$' >"$OUT/ranks-cuda.log" 2>&1) || rc=1
echo "cuda replica mask rc=$rc passed=$(grep -c -- '--- PASS' "$OUT/ranks-cuda.log") failed=$(grep -c -- '--- FAIL' "$OUT/ranks-cuda.log")"
# The engine's rank group runs one rank here: two ranks of one process on one
# GPU share its CUDA context, and the driver's implicit context
# synchronisations (cuMemAlloc, lazy kernel loads) then wait for the other
# rank's spinning NCCL kernel, which waits for this rank (seen here: a
# deadlock in cuMemAlloc). GPUs of their own, each with its own context,
# avoid that coupling; two ranks run on the several-GPU machines.
(cd parallel && timeout 420 ../bin/gpu/parallel.test -test.count=1 -test.v \
	-test.run '^(TestRanksNCCLOnGPU|TestRankGroupDecodeTimesOnGPU)$' >"$OUT/ranks-parallel.log" 2>&1) || rc=1
echo "parallel rc=$rc passed=$(grep -c -- '--- PASS' "$OUT/ranks-parallel.log") failed=$(grep -c -- '--- FAIL' "$OUT/ranks-parallel.log")"
grep -E -- '--- (PASS|FAIL|SKIP)|ranks_gpu_test|ranks_device_gpu_test|NCCL WARN|panic' "$OUT/ranks-parallel.log" | head -80
exit $rc
