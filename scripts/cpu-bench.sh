#!/usr/bin/env bash
# The planner's CPU prediction beside `glmtopo bench serve` (issue 15): the
# two-daemon CPU cluster of `make run` (head [0,2) + stage [2,4) of the tiny
# model on loopback) and one `glmtopo serve` process of the same model, each
# benchmarked at the concurrencies given, each run printed with the plan's
# prediction beside it.
#   CONCURRENCIES="1 4 16" bash scripts/cpu-bench.sh [BIN] [WORKDIR]
set -euo pipefail
bin=${1:-bin/glmtopo}
work=${2:-.cache/cpu-bench}
read -r -a concs <<<"${CONCURRENCIES:-1 4 16}"
port=${PORT:-18400}
in=${INPUT_LEN:-128} out=${OUTPUT_LEN:-32} n=${NUM_PROMPTS:-64}
model="$work/tiny"
mkdir -p "$work"
[[ -f "$model/config.json" ]] || "$bin" model synth --preset tiny --seed 1 --out "$model" >/dev/null
# Before every run: calibrate the CPU (other jobs on the machine change what
# the kernels get from minute to minute), plan, then benchmark with the
# plan's prediction printed beside the measurement.
bench() { # label stages
  for c in "${concs[@]}"; do
    "$bin" plan --calibrate-cpu --cpu-calibration "$work/cpu-calibration.yaml" 2>/dev/null
    "$bin" plan --model "$model" --cpu-stages "$2" --cpu-calibration "$work/cpu-calibration.yaml" \
      --input-len "$in" --output-len "$out" --output json --out "$work/plan-cpu$2.json"
    echo "== $1, --max-concurrency $c (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$bin" bench serve --port "$port" --model tiny --dataset-name random --random-input-len "$in" \
      --random-output-len "$out" --num-prompts "$n" --max-concurrency "$c" --disable-tqdm \
      --predict-from-plan "$work/plan-cpu$2.json" --label "$1"
  done
}
wait_health() {
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0; sleep 0.1; done
  return 1
}

# Two daemons on loopback, as `make run` starts them.
state="$work/cluster"
rm -rf "$state" && mkdir -p "$state"
"$bin" node cluster-key --out "$state/cluster.key" >/dev/null
peers=127.0.0.1:$((port + 100)),127.0.0.1:$((port + 101))
pids=()
for i in 0 1; do
  "$bin" node --state-dir "$state/host$i" --name "host$i" --cluster-key-file "$state/cluster.key" \
    --listen "127.0.0.1:$((port + 100 + i))" --peers "$peers" --mdns=false --model "$model" --expect 2 \
    --heartbeat-interval 200ms --data-listen "127.0.0.1:$((port + 200 + i))" \
    --host 127.0.0.1 --port "$port" --served-model-name tiny >"$state/host$i.log" 2>&1 &
  pids+=($!)
done
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap stop EXIT
wait_health || { tail -20 "$state"/host*.log; exit 1; }
bench "two-stages" 2
stop

"$bin" serve --model "$model" --host 127.0.0.1 --port "$port" --served-model-name tiny >"$work/serve.log" 2>&1 &
pids+=($!)
wait_health || { tail -20 "$work/serve.log"; exit 1; }
bench "one-process" 1
