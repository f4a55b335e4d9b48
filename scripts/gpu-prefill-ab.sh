#!/usr/bin/env bash
# Prefill A/B on one GPU (run after `scripts/gpu-test.sh build`): the same
# prefill step with the prefill attention kernel per q head
# (--no-flash-attention) or per GQA group (default), with hi+lo (default) or
# single bf16 activations in the wide GEMMs (--fast-gemm), then a
# per-operation profile. A binary at $BASE (say, built from an older commit)
# is timed first as the baseline, on the same GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
B=bin/gpu/benchstep
BASE=${BASE:-}
for model in ${MODELS:-synth:glm-4.5-air}; do
	P="--model $model --layers ${LAYERS:-4} --batch 1 --context 4096 --prefill ${PREFILL:-8192} --cuda-graph=false"
	if [ -n "$BASE" ] && [ -x "$BASE" ]; then
		echo "== baseline $BASE $P" | tee -a "$OUT/prefill-ab.txt"
		# shellcheck disable=SC2086
		timeout ${BENCH_TIMEOUT:-120} "$BASE" $P 2>>"$OUT/bench-stderr.log" | tee -a "$OUT/prefill-ab.txt"
	fi
	for v in "--no-flash-attention" "" "--fast-gemm"; do
		echo "== benchstep $P $v" | tee -a "$OUT/prefill-ab.txt"
		# shellcheck disable=SC2086
		timeout ${BENCH_TIMEOUT:-120} "$B" $P $v 2>>"$OUT/bench-stderr.log" | tee -a "$OUT/prefill-ab.txt"
	done
done
# shellcheck disable=SC2086
timeout ${BENCH_TIMEOUT:-120} "$B" --model synth:glm-4.5-air --layers 2 --batch 1 --prefill ${PREFILL:-8192} --cuda-graph=false --profile \
	>"$OUT/profile.txt" 2>&1
