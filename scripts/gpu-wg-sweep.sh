#!/usr/bin/env bash
# A/B of the wide e4m3 GEMV's tuning macros at batch 64 (after scripts/gpu-test.sh build).
export NCCL_NVLS_ENABLE=0 GLMTOPO_CUDA_CACHE=/tmp/glmtopo-cuda-cache
for ml in synth:glm-4.5-air-fp8:8 synth:glm-4.5-fp8:6; do
  m=${ml%:*} l=${ml##*:}
  for d in "WG_ILP=4" "WG_ILP=8"; do
    echo "== $m $d"
    GLMTOPO_CUDA_DEFINES="$d" timeout 120 bin/gpu/benchstep --model "$m" --layers "$l" --batch 64 --context 4096 --prefill 0 2>/dev/null | grep -E "^decode"
  done
done
