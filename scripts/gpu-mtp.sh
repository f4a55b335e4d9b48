#!/usr/bin/env bash
# MTP speculative decoding on one GPU (issue 16).
#   scripts/gpu-mtp.sh build   here (no GPU, CGO off): bin/gpu/{parallel.test,benchstep,glmtopo}
#   scripts/gpu-mtp.sh run     on the GPU host, from the repository root; logs and JSON under $OUT (out/gpu)
# run does three things:
#   1. the GPU tests TestSpecDecodeOnGPU (tiny fixture: N=1,2 with the MTP layer's drafts and with the CPU
#      reference's, equal to the CPU reference up to its first near tie; verify steps replay decode graphs) and
#      TestSpecAirFP8DummyOnGPU (Air-FP8 shapes, 4 layers of random weights: MTP on N=1,3 equal to off up to
#      the first near tie);
#   2. `bench step --speculative-tokens N` for GLM-4.5-Air-FP8 and GLM-4.5-FP8 shapes at batch 1/16/64: the
#      verify step (batch × (N+1) rows) and the MTP draft passes beside the plain decode step, and tokens/s at
#      acceptance 0.6/0.8/0.9 (the numbers for docs/performance.md);
#   3. greedy identity through the CLI: `glmtopo generate --load-format dummy --hf-overrides` on Air-FP8 cut to
#      4 layers, MTP off and on (both flag spellings), token lists compared (a difference is reported with its
#      index: test 2 of step 1 says whether it lies past a near tie).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=bin/gpu

build() {
	export CGO_ENABLED=0
	mkdir -p "$BIN"
	go test -c -o "$BIN/parallel.test" ./parallel || return 1
	go build -o "$BIN/benchstep" ./bench/step/internal/benchstep || return 1
	go build -o "$BIN/glmtopo" ./cmd/glmtopo || return 1
	echo "built $BIN/parallel.test $BIN/benchstep $BIN/glmtopo"
}

bench() {
	local name=$1
	shift
	echo "== glmtopo bench step $*" | tee -a "$OUT/mtp-bench.txt"
	timeout "${BENCH_TIMEOUT:-420}" "$BIN/benchstep" "$@" --json >"$OUT/$name.json" 2>>"$OUT/mtp-bench-stderr.log"
	local rc=$?
	python3 - "$OUT/$name.json" <<'PY' | tee -a "$OUT/mtp-bench.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("  (no report:", e, ")"); sys.exit(0)
print(f"  {r['device']}: {r['model']}, {r['layers']} layers built")
for x in r.get('speculative', []):
    proj = "  ".join(f"a={p['acceptance']:.1f}: {p['tokens_per_s']:.0f} tok/s, {p['full_depth_speedup']:.2f}x" for p in x['projected'])
    print(f"  B={x['batch']:3d} N={x['speculative_tokens']} decode {x['decode_step_s']*1e3:8.3f} ms  verify {x['verify_step_s']*1e3:8.3f} ms "
          f"(eager {x['verify_eager_s']*1e3:.3f}, graph {x.get('verify_graph_s', 0)*1e3:.3f})  draft {x['draft_s']*1e3:7.3f} ms  "
          f"ratio {x['step_ratio']:.2f}x (full depth {x['full_depth_step_ratio']:.2f}x)  {proj}")
PY
	return $rc
}

ids() { # the "ids" list of a generate --json output
	python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ids"])' "$1" 2>/dev/null || echo "(no output)"
}

run() {
	. scripts/gpu-lib.sh
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/mtp-gpu.txt"
	local rc=0

	echo "== 1. GPU tests"
	(cd parallel && timeout 600 "../$BIN/parallel.test" -test.v -test.count=1 -test.run 'TestSpec.*OnGPU' >"$OUT/mtp-tests.log" 2>&1)
	local trc=$?
	echo "spec GPU tests rc=$trc passed=$(grep -c -- '--- PASS' "$OUT/mtp-tests.log") failed=$(grep -c -- '--- FAIL' "$OUT/mtp-tests.log")"
	grep -E -- '--- (PASS|FAIL)|spec_gpu_test' "$OUT/mtp-tests.log" | head -60
	[ $trc = 0 ] || rc=1

	echo "== 2. bench step --speculative-tokens"
	for n in 1 3; do
		bench "mtp-air-fp8-n$n" --model synth:glm-4.5-air-fp8 --layers "${AIR_FP8_LAYERS:-8}" --batch 1,16,64 --context 4096 --prefill 0 --speculative-tokens "$n" || rc=1
	done
	bench mtp-glm45-fp8-n1 --model synth:glm-4.5-fp8 --layers "${GLM_LAYERS:-6}" --batch 1,16,64 --context 4096 --prefill 0 --speculative-tokens 1 || rc=1

	echo "== 3. greedy identity through the CLI (Air-FP8 dummy, 4 layers)"
	local common=(generate --model glm-4.5-air-fp8 --load-format dummy --hf-overrides '{"num_hidden_layers":4}' --device cuda
		--max-new-tokens 48 --ignore-eos --json)
	for prompt in 1 17,3000,52,9001,77 100,200,300,400,500,600,700,800,900,1000,1100,1200; do
		timeout 300 "$BIN/glmtopo" "${common[@]}" --prompt-ids "$prompt" >"$OUT/mtp-off.json" 2>>"$OUT/mtp-cli.log"
		timeout 300 "$BIN/glmtopo" "${common[@]}" --prompt-ids "$prompt" --speculative-config '{"method":"mtp","num_speculative_tokens":1}' >"$OUT/mtp-n1.json" 2>>"$OUT/mtp-cli.log"
		timeout 300 "$BIN/glmtopo" "${common[@]}" --prompt-ids "$prompt" --speculative-config.method mtp --speculative-config.num_speculative_tokens 3 >"$OUT/mtp-n3.json" 2>>"$OUT/mtp-cli.log"
		local off n1 n3
		off=$(ids "$OUT/mtp-off.json") n1=$(ids "$OUT/mtp-n1.json") n3=$(ids "$OUT/mtp-n3.json")
		if [ "$off" = "$n1" ] && [ "$off" = "$n3" ]; then
			echo "prompt $prompt: MTP off, N=1, N=3 identical (48 tokens)"
		else
			python3 - "$off" "$n1" "$n3" "$prompt" <<'PY'
import ast, sys
off, n1, n3 = (ast.literal_eval(a) if a.startswith('[') else [] for a in sys.argv[1:4])
for name, got in (("N=1", n1), ("N=3", n3)):
    k = next((i for i, (a, b) in enumerate(zip(off, got)) if a != b), min(len(off), len(got)))
    print(f"prompt {sys.argv[4]}: {name} first differs from MTP off at token {k} of {len(off)} (see TestSpecAirFP8DummyOnGPU for near ties)")
PY
		fi
	done
	return $rc
}

case "${1:-}" in
build) build ;;
run) run ;;
*) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
