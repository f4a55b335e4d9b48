#!/usr/bin/env bash
# Nsight Compute's detail sections (speed of light, occupancy, warp stall
# reasons, memory) for the kernels of one eager decode step that match KERNELS:
#   MODEL=synth:glm-4.5-air-fp8 LAYERS=2 BATCH=1 KERNELS='regex:^sg_' scripts/gpu-ncu-detail.sh
# (after scripts/gpu-test.sh build)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
M=${MODEL:-synth:glm-4.5-air-fp8}
L=${LAYERS:-2}
B=${BATCH:-1}
tag=$(echo "$M-$L-$B" | tr ':/,' '___')
timeout 400 ncu --clock-control none -k "${KERNELS:-regex:^sg_}" -c "${COUNT:-12}" \
	--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
	--section MemoryWorkloadAnalysis --section SchedulerStats \
	bin/gpu/benchstep --model "$M" --layers "$L" --batch "$B" --context 4096 --prefill 0 --iters 1 --warmup 0 --cuda-graph=false \
	>"$OUT/ncu-detail-$tag.txt" 2>"$OUT/ncu-detail-$tag.err"
grep -E "^  [a-z_0-9]+\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Stall|Warp Cycles Per Issued|L2 Hit|Mem Busy|Max Bandwidth|Block Limit|Waves Per SM|Grid Size" "$OUT/ncu-detail-$tag.txt" | head -${LINES_OUT:-200}
