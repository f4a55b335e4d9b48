#!/usr/bin/env bash
# Decode A/B on one GPU: the streamed GEMV kernels against the block ones
# (--block-gemv), same binary, same card, one run each (after `scripts/gpu-test.sh build`).
#   MODELS="synth:glm-4.5-air:4 synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6" scripts/gpu-ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
B=bin/gpu/benchstep
for ml in ${MODELS:-synth:glm-4.5-air:4 synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6}; do
	m=${ml%:*} l=${ml##*:}
	for v in "" --block-gemv; do
		echo "== $m layers $l $v" | tee -a "$OUT/ab.txt"
		timeout ${BENCH_TIMEOUT:-200} "$B" --model "$m" --layers "$l" --batch ${BATCH:-1,16,64} --context 4096 \
			--prefill ${PREFILL:-0} $v ${EXTRA:-} 2>>"$OUT/ab-stderr.log" | grep -E "^(decode|prefill|measured)" | tee -a "$OUT/ab.txt"
	done
done
