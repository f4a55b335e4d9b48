#!/usr/bin/env bash
# Prefill rows only (8192 tokens): each model of docs/perf-cuda.md with the
# bf16 activations in the GEMMs (the default) and the exact hi+lo halves
# (--fast-gemm=false). Run after `scripts/gpu-test.sh build`.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
for ml in ${PREFILL_MODELS:-synth:glm-4.5-air:4 synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6}; do
	m=${ml%:*} l=${ml##*:}
	for flag in "" --fast-gemm=false; do
		echo "== $m layers $l $flag" | tee -a "$OUT/prefill.txt"
		# shellcheck disable=SC2086
		timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1 --context 16 --prefill 8192 --cuda-graph=false $flag 2>/dev/null |
			grep -E "^(prefill|measured)" | tee -a "$OUT/prefill.txt"
	done
done
