#!/usr/bin/env bash
# A/B of where the wide e4m3 GEMV starts (after scripts/gpu-test.sh build):
# GPU tests, then the fp8 decode rows with it from 9 tokens and from 17 (the default).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
gpu_tests
for ml in synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
	m=${ml%:*} l=${ml##*:}
	for min in 9 17; do
		echo "== $m --wide-gemv-min-tokens $min"
		timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1,16,64 --context 4096 --prefill 0 --wide-gemv-min-tokens $min 2>/dev/null | grep -E "^(decode|measured)"
	done
done
