#!/usr/bin/env bash
# Sweep the tensor-core GEMV's compile-time knobs (GLMTOPO_CUDA_DEFINES) on decode steps.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
for defs in "" "MMA_MINB_BF16=4" "MMA_MINB_BF16=2" "MMA_U1=8" "MMA_U2=4 MMA_MINB_BF16=2" "MMA_FP8_UMUL=1 MMA_MINB_FP8=3" "MMA_FP8_UMUL=1 MMA_MINB_FP8=4" "MMA_FP8_UMUL=2 MMA_MINB_FP8=3"; do
	for m in synth:glm-4.5-air synth:glm-4.5-air-fp8; do
		r=$(GLMTOPO_CUDA_DEFINES="$defs" timeout 100 bin/gpu/benchstep --model $m --layers 2 --batch 1,16,64 --context 4096 --prefill 0 --iters 5 --cuda-graph=false 2>/dev/null | awk '$1=="decode"{printf "B%s %s%% ", $2, $10}')
		echo "[$defs] $m: $r"
	done
done
