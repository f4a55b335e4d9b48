#!/usr/bin/env bash
# `make run`: the main job on the embedded default model — synthesize the tiny
# GLM-4.5-architecture checkpoint (once, into the cache), serve it with the
# OpenAI-compatible API on the CPU engine, and send it a few requests.
set -euo pipefail
bin=${1:-bin/glmtopo}
cache=${2:-.cache}
port=${PORT:-18000}
model="$cache/models/tiny"
if [[ ! -f "$model/config.json" ]]; then
  echo "== synthesizing the tiny GLM-4.5-architecture model into $model"
  "$bin" model synth --preset tiny --seed 1 --out "$model"
fi
echo "== model"
"$bin" model inspect "$model"

# A local cluster of two daemons on loopback: discovery, membership and an agreed plan.
state="$cache/cluster"
rm -rf "$state" && mkdir -p "$state"
"$bin" node cluster-key --out "$state/cluster.key" >/dev/null
peers=127.0.0.1:$((port + 100)),127.0.0.1:$((port + 101))
pids=()
for i in 0 1; do
  "$bin" node --state-dir "$state/host$i" --name "host$i" --cluster-key-file "$state/cluster.key" \
    --listen "127.0.0.1:$((port + 100 + i))" --peers "$peers" --mdns=false --model "$model" --expect 2 \
    --heartbeat-interval 200ms --data-listen "127.0.0.1:$((port + 200 + i))" \
    --host 127.0.0.1 --port "$port" --served-model-name tiny \
    --enable-auto-tool-choice --tool-call-parser glm45 --reasoning-parser glm45 >"$state/host$i.log" 2>&1 &
  pids+=($!)
done
stop_cluster() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; }
trap stop_cluster EXIT
echo
echo "== local cluster: two glmtopo node daemons on loopback"
for _ in $(seq 1 100); do
  "$bin" status --state-dir "$state/host0" --json 2>/dev/null | grep -q '"state": "active"' && break
  sleep 0.1
done
"$bin" status --state-dir "$state/host0"
echo "(each daemon runs its stage of the active plan: the head stage serves the API, the other runs its layers)"

echo
echo "== the head daemon serves the OpenAI API on port $port through the two-stage pipeline"
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail -20 "$state"/host*.log; exit 1; }
api() {
  local path=$1 body=${2:-}
  echo; echo "$ curl $path $body"
  if [[ -n $body ]]; then curl -sS "http://127.0.0.1:$port$path" -H "Content-Type: application/json" -d "$body"; else curl -sS "http://127.0.0.1:$port$path"; fi
  echo
}
api /v1/models
api /v1/chat/completions '{"model":"tiny","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16,"seed":1}'
api /v1/completions '{"model":"tiny","prompt":"The capital of France is","max_tokens":8,"temperature":0}'
api /v1/chat/completions '{"model":"tiny","messages":[{"role":"user","content":"Stream, please."}],"max_tokens":6,"stream":true,"stream_options":{"include_usage":true}}'
api /tokenize '{"model":"tiny","prompt":"Hello, world!"}'
echo
echo "== the model's weights are random, so its text is noise; the API, tokenizer, chat template and engine are real."
echo "== daemon logs: $state/host0.log, $state/host1.log"
