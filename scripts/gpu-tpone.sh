#!/usr/bin/env bash
# Issue 17's one-GPU acceptance: the engine through a one-rank NCCL
# communicator (TensorAllReducer of world size 1) gives the plain engine's
# greedy tokens bit for bit, and costs ≤ 3% over the plain path at batch
# 1/16/64 with CUDA graphs (bench step times both in alternating rounds);
# and the rank group on CUDA (TestRanksNCCLOnGPU: one rank with a one-rank
# communicator from tp.NCCL, TP 2 / EP 2 on this GPU with in-process sums,
# and TP 2 / EP 2 over NCCL where two GPUs or more are visible).
# Run by `scripts/gpu-session.sh run tpone` (binaries from its pack step).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} # NVLink multicast off unless the caller says otherwise
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
rc=0
(cd parallel && timeout 300 ../bin/gpu/parallel.test -test.count=1 -test.v -test.run 'TestOneRankNCCLOnGPU|TestOneRankComm|TestRanksNCCLOnGPU' \
	>"$OUT/tpone-tests.log" 2>&1) || rc=1
timeout 300 bin/gpu/benchstep.test -test.count=1 -test.v -test.run 'TestOneRankBenchOnGPU' >>"$OUT/tpone-tests.log" 2>&1 || rc=1
echo "one-rank tests rc=$rc passed=$(grep -c -- '--- PASS' "$OUT/tpone-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/tpone-tests.log")"
grep -E -- '--- FAIL|--- SKIP|one-rank NCCL|comm_gpu_test|ranks_gpu_test|tp_gpu_test' "$OUT/tpone-tests.log" | head -20
timeout 400 bin/gpu/glmtopo bench step --model synth:glm-4.5-air-fp8 --load-format dummy --layers 4 --batch 1,16,64 \
	--prefill 0 --tensor-parallel-size 1 --cuda-graph --json >"$OUT/tpone-step.json" 2>"$OUT/tpone-step.log" || {
	rc=1
	tail -5 "$OUT/tpone-step.log"
}
# batch, plain and one-rank graph step times, overhead and the 3% verdict per decode batch.
grep -E '"(phase|batch|plain_graph_step_s|graph_step_s|overhead|within_budget)"' "$OUT/tpone-step.json" | tr -d ' \n' |
	sed 's/"phase"/\n"phase"/g'
echo
if grep -q '"within_budget": false' "$OUT/tpone-step.json"; then
	echo "one-rank communicator over the 3% budget"
	rc=1
fi
# The command on this host's GPUs (rank r on GPU r, NCCL): greedy tokens as one GPU's.
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ]; then
	gen() { timeout 120 bin/gpu/glmtopo generate --device cuda --model testdata/glm4moe/tiny/model --prompt-ids 5,17,300,2 \
		--max-new-tokens 8 --json --fast-gemm=false "$@" 2>>"$OUT/tpone-generate.log"; }
	want=$(gen) || rc=1
	for flags in "--tensor-parallel-size 2" "--tensor-parallel-size 2 --enable-expert-parallel"; do
		# shellcheck disable=SC2086
		got=$(gen $flags) || rc=1
		if [ "$got" = "$want" ]; then echo "generate $flags: tokens as one GPU's"; else echo "generate $flags: $got, one GPU: $want"; rc=1; fi
	done
else
	echo "generate --tensor-parallel-size 2 on cuda: skipped, $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') GPU(s) here"
fi
# The floor on 4 GPUs (predicted: this host has one).
timeout 120 bin/gpu/glmtopo bench step --model synth:glm-4.5-air-fp8 --layers 4 --batch 1,16,64 \
	--tensor-parallel-size 4 --enable-expert-parallel --floor-only 2>>"$OUT/tpone-step.log" | tee "$OUT/tpone-floor4.txt" || rc=1
exit $rc
