#!/usr/bin/env bash
# One GPU call for a development round (after `scripts/gpu-test.sh build`):
# every GPU test, the decode step benchmarks, and an A/B of the same binary
# with the flags in AB_FLAGS (default --no-pdl). ROUND_PROFILE=1 adds ncu per kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
gpu_tests
PREFILL=${PREFILL:-0} BENCH_TIMEOUT=120 scripts/gpu-bench.sh 2>&1 | grep -v "^  device"
for ml in synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
	m=${ml%:*} l=${ml##*:}
	for flag in ${AB_FLAGS:---no-pdl}; do
		echo "== A/B $flag $m"
		timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 1,16,64 --context 4096 --prefill 0 $flag 2>/dev/null | grep -E "^decode"
	done
done
if [ "${ROUND_PROFILE:-0}" = 1 ]; then BATCH=${PROFILE_BATCH:-1} scripts/gpu-profile.sh 2>&1 | grep -v "^  " | head -40; fi
