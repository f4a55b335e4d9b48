#!/usr/bin/env bash
# Issue 13's acceptance on one H200: a memory plan that holds.
#
# From the repository root on the GPU host, with bin/glmtopo built here by
#   CGO_ENABLED=0 go build -o bin/glmtopo ./cmd/glmtopo
# it runs, for GLM-4.5-Air-FP8 (dummy weights, all 46 layers) and for
# GLM-4.5-FP8 cut by --hf-overrides to the layers `glmtopo plan` says one
# H200 holds:
#   1. glmtopo serve --max-model-len 9216 --max-num-seqs 16 and no other memory
#      flag but --kv-cache-dtype (KV_DTYPE, default fp8: a bf16 cache of 16 ×
#      9216 tokens does not fit beside Air's 105 GiB of weights at the default
#      --gpu-memory-utilization 0.9; `glmtopo plan` below shows it), capturing
#      the engine's printed memory plan;
#   2. the recipe's benchmark (16 × 8000-token prompts, 1000 outputs, all at
#      once, --ignore-eos) while nvidia-smi samples memory.used every 200 ms
#      and /metrics is polled for the requests running at once;
#   3. steady-state decode at batch 8 and 16 (128-token prompts, 256 outputs);
#   4. glmtopo plan for the same setup (1x1xH200): per-GPU memory, and each
#      component (weights, activations, KV cache), against the engine's
#      plan, and decode TPOT (calibrated by `glmtopo bench step
#      --calibration-out`) against the measured TPOT at batch 8 and 16. The
#      planner's --runtime-reserve-gib is the engine's measured runtime plus
#      its reserve (Air's, for choosing GLM-4.5's layers before it runs).
# Everything lands under $OUT (default out/gpu); summary.txt has the numbers.
# Time: about 4 minutes (two model loads, two recipe runs, four short ones).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-lib.sh
G=${GLMTOPO:-bin/glmtopo}
KVD=${KV_DTYPE:-fp8}
PORT=${PORT:-8011}
URL=http://127.0.0.1:$PORT
SUM=$OUT/summary.txt
T0=$(date +%s)
: >"$SUM"
say() { echo "$*" | tee -a "$SUM"; }
elapsed() { echo $(($(date +%s) - T0)); }

[ -x "$G" ] || { echo "no $G: build it with CGO_ENABLED=0 go build -o bin/glmtopo ./cmd/glmtopo"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# The byte-level tokenizer of the tiny preset (GLM-4.5's special tokens; its
# ids are valid for every GLM vocabulary) makes random prompts token-exact.
TOK=$OUT/tok
[ -f "$TOK/tokenizer.json" ] || "$G" model synth --preset tiny --out "$TOK" >"$OUT/tok.log" 2>&1 || { cat "$OUT/tok.log"; exit 1; }

# Calibration for the planner's cost model: the engine's own decode and
# prefill efficiencies on this GPU (4 layers of Air-FP8, ~30 s).
timeout 120 "$G" bench step --model synth:glm-4.5-air-fp8 --layers 4 --batch 8,16 --context 256 --prefill 2048 \
	--iters 5 --calibration-out "$OUT/calibration.yaml" >"$OUT/benchstep.log" 2>&1 ||
	echo "bench step failed (rc $?); plans use the catalog's efficiencies" | tee -a "$SUM"
CAL=()
[ -s "$OUT/calibration.yaml" ] && CAL=(--calibration "$OUT/calibration.yaml")

health() { # wait up to $1 s for the server; fail early if it died
	local pid=$2
	for _ in $(seq "$1"); do
		curl -sf "$URL/health" >/dev/null 2>&1 && return 0
		kill -0 "$pid" 2>/dev/null || return 1
		sleep 1
	done
	return 1
}

poll_running() { # max of glmtopo:num_requests_running + waiting-in-prefill, 2 per second
	local max=0 v
	while :; do
		v=$(curl -sf "$URL/metrics" 2>/dev/null | awk '/^glmtopo:num_requests_running/ {print int($2)}')
		[ -n "$v" ] && [ "$v" -gt "$max" ] && max=$v && echo "$max" >"$1"
		sleep 0.5
	done
}

bench() { # SECONDS NAME ARGS...: one bench serve run, its summary lines into the summary
	local limit=$1 name=$2
	shift 2
	timeout "$limit" "$G" bench serve --base-url "$URL" --dataset-name random --tokenizer "$TOK" --ignore-eos --seed 1 \
		--disable-tqdm --save-result --result-dir "$OUT" --result-filename "$name.json" "$@" >"$OUT/$name.log" 2>&1
	say "  [$name] rc=$? $*"
	grep -E "Successful requests|Failed requests|Output token throughput|Mean TTFT|Median TTFT|Mean TPOT|Median TPOT|P99 ITL|Mean ITL" "$OUT/$name.log" |
		sed 's/^/    /' | tee -a "$SUM"
}

# itl_sum_count: the server's inter-token latency histogram (sum in s, count):
# every generated token counts, whatever text it decodes to. The dummy
# models' tokens are mostly ids the tiny tokenizer has no text for, so the
# client's per-chunk TTFT/TPOT/ITL are not the engine's; this is.
itl_sum_count() {
	curl -sf "$URL/metrics" | awk '/^glmtopo:inter_token_latency_seconds_sum/ {s = $2} /^glmtopo:inter_token_latency_seconds_count/ {c = $2} END {print s, c}'
}

# decode_tpot SECONDS NAME ARGS...: a bench run whose steady-state TPOT (ms) is the
# mean of the server's inter-token latencies during it.
decode_tpot() {
	local limit=$1 name=$2 before after
	shift 2
	before=$(itl_sum_count)
	bench "$limit" "$name" "$@"
	after=$(itl_sum_count)
	echo "$before $after" | awk '{ if ($4 > $2) printf "%.3f\n", 1000 * ($3 - $1) / ($4 - $2) }' >"$OUT/$name.tpot"
	say "    server-side TPOT (mean inter-token latency): $(cat "$OUT/$name.tpot") ms"
}

mean_tpot() { cat "$OUT/$1.tpot" 2>/dev/null; }

# engine_gib NAME TERM: a term of the engine's printed plan in GiB
# ("weights 104.83 GiB", "runtime 812.0 MiB", "KV cache: 17.1 GiB").
engine_gib() {
	grep -m1 -o "$2:\{0,1\} [0-9.]* [GM]iB" "$OUT/$1-serve.log" |
		awk '{v = $(NF-1); if ($NF == "MiB") v /= 1024; printf "%.4f", v}'
}

# RT: the planner's runtime + reserve, from the engine's measured plan.
RT=()
set_runtime() {
	local rt rs
	rt=$(engine_gib "$1" runtime)
	rs=$(engine_gib "$1" reserve)
	[ -n "$rt" ] && [ -n "$rs" ] && RT=(--runtime-reserve-gib "$(awk -v a="$rt" -v b="$rs" 'BEGIN {printf "%.3f", a + b}')")
}

# run NAME SERVE-ARGS...: serve, the recipe, steady-state decode at 8 and 16.
run() {
	local name=$1
	shift
	say ""
	say "== $name: glmtopo serve $* --max-model-len 9216 --max-num-seqs 16 --kv-cache-dtype $KVD   (t=$(elapsed)s)"
	"$G" serve --load-format dummy --device cuda --max-model-len 9216 --max-num-seqs 16 --kv-cache-dtype "$KVD" \
		--port "$PORT" --tokenizer "$TOK" --served-model-name "$name" "$@" >"$OUT/$name-serve.log" 2>&1 &
	local srv=$!
	if ! health 240 "$srv"; then
		say "  server did not come up:"
		tail -20 "$OUT/$name-serve.log" | tee -a "$SUM"
		kill "$srv" 2>/dev/null
		wait "$srv" 2>/dev/null
		return 1
	fi
	say "  engine's memory plan:"
	grep -E "memory plan|KV cache:|Maximum concurrency" "$OUT/$name-serve.log" | sed -e 's/^.*msg="\{0,1\}/    /' -e 's/"$//' | tee -a "$SUM"
	nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/$name-nvsmi.csv" &
	local smi=$!
	poll_running "$OUT/$name-running.txt" &
	local poll=$!
	if [ -z "${TPOT_ONLY:-}" ]; then
		decode_tpot 200 "$name-recipe" --random-input-len 8000 --random-output-len 1000 --num-prompts 16 --request-rate 10000
	fi
	kill "$poll" 2>/dev/null
	decode_tpot 90 "$name-decode8" --random-input-len 128 --random-output-len 512 --num-prompts 8 --request-rate inf
	decode_tpot 90 "$name-decode16" --random-input-len 128 --random-output-len 512 --num-prompts 16 --request-rate inf
	kill "$smi" 2>/dev/null
	curl -sf "$URL/metrics" | grep -E "^glmtopo:(memory_plan_bytes|num_gpu_blocks|kv_cache_tokens|max_concurrency|max_num_batched_tokens|device_allocations_after_warmup)" \
		>"$OUT/$name-metrics.txt"
	kill "$srv" 2>/dev/null
	wait "$srv" 2>/dev/null
	local peak total
	peak=$(sort -n "$OUT/$name-nvsmi.csv" | tail -1)
	total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
	say "  requests running at once (max polled): $(cat "$OUT/$name-running.txt" 2>/dev/null || echo '?')"
	say "  NVML peak memory.used during the benchmarks: ${peak} MiB of ${total} MiB; 0.9 × total = $((total * 9 / 10)) MiB: $([ "${peak:-0}" -le $((total * 9 / 10)) ] && echo within || echo OVER)"
	say "  /metrics:"
	sed 's/^/    /' "$OUT/$name-metrics.txt" | tee -a "$SUM"
}

# plan_cmp NAME PLAN-ARGS...: the planner's memory for the engine's setup
# (MTP on, as the engine loads it) and its TPOT at batch 8 and 16 (no MTP
# speculation, 128-token prompts, 256 outputs: as the decode runs).
plan_cmp() {
	local name=$1
	shift
	"$G" plan --hosts 1x1xH200 --max-model-len 9216 --max-num-seqs 16 --max-num-batched-tokens 2048 --kv-cache-dtype "$KVD" \
		--output yaml "${CAL[@]}" "${RT[@]}" "$@" >"$OUT/$name-plan.yaml" 2>&1
	say "  planner (glmtopo plan $* --hosts 1x1xH200 --kv-cache-dtype $KVD ${RT[*]}):"
	awk '/^memory:/ {m=1} /^experts:/ {m=0} m && /(total|budget|weights_total|kv_cache|activations|graphs|reserve):/ {
		printf "    %-14s %9.2f GiB\n", $1, $2 / 2^30; if ($1 != "total:" && $1 != "budget:") sum += $2 }
		END {printf "    %-14s %9.2f GiB (weights + kv pool + activations + graphs + reserve)\n", "planned:", sum / 2^30}' \
		"$OUT/$name-plan.yaml" | tee -a "$SUM"
	grep -E "kv_tokens|max_concurrency" "$OUT/$name-plan.yaml" | head -2 | sed 's/^ */    /' | tee -a "$SUM"
	local engine
	engine=$(grep -o "planned total [0-9.]* GiB" "$OUT/$name-serve.log" | head -1 | awk '{print $3}')
	[ -n "$engine" ] && awk -v e="$engine" '/^memory:/ {m=1} /^experts:/ {m=0}
		m && /(weights_total|kv_cache|activations|graphs|reserve):/ {s += $2}
		END {p = s / 2^30; printf "    per-GPU memory: engine %.2f GiB, planner %.2f GiB: %+.2f%%\n", e, p, 100 * (p - e) / e}' \
		"$OUT/$name-plan.yaml" | tee -a "$SUM"
	# Component by component (the runtime term is what differed).
	local ew ea ek
	ew=$(engine_gib "$name" weights)
	ea=$(engine_gib "$name" activations)
	ek=$(engine_gib "$name" "KV cache")
	awk -v ew="$ew" -v ea="$ea" -v ek="$ek" '/^memory:/ {m=1} /^experts:/ {m=0}
		m && $1 == "weights_total:" {w = $2 / 2^30} m && $1 == "activations:" {a = $2 / 2^30} m && $1 == "kv_cache:" {k = $2 / 2^30}
		function row(n, e, p) { if (e > 0) printf "    %-12s engine %7.2f GiB, planner %7.2f GiB: %+.1f%%\n", n, e, p, 100 * (p - e) / e }
		END {row("weights", ew, w); row("activations", ea, a); row("KV cache", ek, k)}' "$OUT/$name-plan.yaml" | tee -a "$SUM"
	for b in 8 16; do
		"$G" plan --hosts 1x1xH200 --max-model-len 9216 --max-num-seqs "$b" --max-num-batched-tokens 2048 --kv-cache-dtype "$KVD" \
			--num-speculative-tokens 0 --input-len 128 --output-len 256 "${CAL[@]}" "${RT[@]}" "$@" >"$OUT/$name-plan-b$b.txt" 2>&1
		local pred meas
		pred=$(grep -o "TPOT [0-9.]* ms" "$OUT/$name-plan-b$b.txt" | head -1 | awk '{print $2}')
		meas=$(mean_tpot "$name-decode$b")
		if [ -n "$pred" ] && [ -n "$meas" ]; then
			awk -v p="$pred" -v m="$meas" -v b="$b" 'BEGIN {printf "    TPOT at batch %d: predicted %.2f ms, measured %.2f ms: %+.1f%% (target ±15%%)\n", b, p, m, 100 * (p - m) / m}' | tee -a "$SUM"
		else
			say "    TPOT at batch $b: predicted '${pred}' measured '${meas}' (see $name-plan-b$b.txt, $name-decode$b.log)"
		fi
	done
}

# For reference: what the planner says of a bf16 cache for Air.
"$G" plan --model glm-4.5-air-fp8 --hosts 1x1xH200 --max-model-len 9216 --max-num-seqs 16 --max-num-batched-tokens 2048 \
	>"$OUT/air-plan-bf16.txt" 2>&1
say "bf16 KV cache for Air (glmtopo plan): $(head -1 "$OUT/air-plan-bf16.txt")"

run air --model glm-4.5-air-fp8
set_runtime air
plan_cmp air --model glm-4.5-air-fp8

# The most GLM-4.5-FP8 layers one H200 holds at this setup, by the planner,
# with one sequence of margin (17 × 9216 tokens of cache) for the planner's
# error against the engine's profiled activations.
N=${GLM45_LAYERS:-}
if [ -z "$N" ]; then
	for n in $(seq 34 -1 16); do
		if "$G" plan --model glm-4.5-fp8 --hf-overrides "{\"num_hidden_layers\": $n}" --hosts 1x1xH200 --max-model-len 9216 \
			--max-num-seqs 17 --max-num-batched-tokens 2048 --kv-cache-dtype "$KVD" "${RT[@]}" >/dev/null 2>&1; then
			N=$n
			break
		fi
	done
fi
if [ -n "${AIR_ONLY:-}" ]; then
	say "done in $(elapsed) s (AIR_ONLY: GLM-4.5-FP8 not run); logs under $OUT"
	exit 0
fi
say ""
say "GLM-4.5-FP8 on one H200: $N layers (the most the planner fits with 17 sequences of cache)"
run glm45 --model glm-4.5-fp8 --hf-overrides "{\"num_hidden_layers\": $N}"
set_runtime glm45
plan_cmp glm45 --model glm-4.5-fp8 --hf-overrides "{\"num_hidden_layers\": $N}"
say ""
say "done in $(elapsed) s; logs under $OUT"
