#!/usr/bin/env bash
# A/B of kernel tuning macros (GLMTOPO_CUDA_DEFINES) on decode steps, same
# binary (after scripts/gpu-test.sh build):
#   SWEEP="WG_ILP=4;WG_ILP=8" MODELS="synth:glm-4.5-air-fp8:8" BATCH=1,16,64 scripts/gpu-define-sweep.sh
# A variant that fails to load prints no rows (SG_STAGES=4 does: the gate/up
# kernels' static rings pass 48 KB).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
IFS=';' read -r -a variants <<<"${SWEEP:-WG_ILP=4;WG_ILP=8}"
for ml in ${MODELS:-synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6}; do
	m=${ml%:*} l=${ml##*:}
	for d in "${variants[@]}"; do
		echo "== $m $d" | tee -a "$OUT/sweep.txt"
		GLMTOPO_CUDA_DEFINES="$d" timeout 150 bin/gpu/benchstep --model "$m" --layers "$l" --batch "${BATCH:-1,16,64}" \
			--context 4096 --prefill 0 2>/dev/null | grep -E "^decode" | tee -a "$OUT/sweep.txt"
	done
done
