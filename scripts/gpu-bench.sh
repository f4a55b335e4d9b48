#!/usr/bin/env bash
# The step benchmarks of docs/performance.md, on one GPU (run after `scripts/gpu-test.sh build`).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
B=bin/gpu/benchstep
run() {
	local name=$1
	shift
	echo "== glmtopo bench step $*" | tee -a "$OUT/bench.txt"
	timeout ${BENCH_TIMEOUT:-200} "$B" "$@" --json >"$OUT/$name.json" 2>>"$OUT/bench-stderr.log"
	local rc=$?
	python3 - "$OUT/$name.json" <<'PY' | tee -a "$OUT/bench.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  (no report:", e, ")"); sys.exit(0)
print(f"  {r['device']}: HBM read {r['hbm_read_bytes_per_s']/1e9:.0f} GB/s, GEMM {r['gemm_bf16_flop_per_s']/1e12:.0f} TFLOP/s, weights {r['weight_bytes']/2**30:.1f} GiB, wide GEMM {r['wide_gemm']}, prefill attention {r.get('prefill_attention', '?')}")
for x in r['results']:
    fl = max(x['bytes_floor_s'], x['flops_floor_s'])
    print(f"  {x['phase']:8s} B={x['batch']:3d} ctx={x['context']:5d} T={x['tokens']:5d} eager {x['eager_step_s']*1e3:9.3f} ms graph {x.get('graph_step_s',0)*1e3:9.3f} ms wall {x['wall_s']*1e3:9.3f} ms floor {fl*1e3:8.3f} ms ({x['floor_bytes']/1e9:.2f} GB, {x['flops']/1e12:.2f} TFLOP) -> {100*x['efficiency']:5.1f}% experts/layer {x['distinct_experts_per_moe_layer']:.1f}")
PY
	return $rc
}
run air-bf16 --model synth:glm-4.5-air --layers ${AIR_LAYERS:-4} --batch 1,16,64 --context 4096 --prefill ${PREFILL:-8192}
run air-fp8 --model synth:glm-4.5-air-fp8 --layers ${AIR_FP8_LAYERS:-8} --batch 1,16,64 --context 4096 --prefill ${PREFILL:-8192}
run glm45-fp8 --model synth:glm-4.5-fp8 --layers ${GLM_LAYERS:-6} --batch 1,16,64 --context 4096 --prefill ${PREFILL:-8192}
