#!/usr/bin/env bash
# Node loss on a two-daemon pipeline on loopback (issue 15), on the tiny model and the CPU engine:
# the daemons plan two stages and run them; a long stream is open when the non-head daemon is
# SIGKILLed. Checks: the stream ends with an error event and [DONE] within 5 s; a new request gets
# 503 with Retry-After; the cluster says degraded; the member restarts, a new plan epoch starts and
# the head serves again without being restarted.
#   scripts/node-loss.sh [bin/glmtopo] [.cache]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-bin/glmtopo}
cache=${2:-.cache}
port=${PORT:-18500}
state=$(mktemp -d)
model="$cache/models/tiny"
[[ -f "$model/config.json" ]] || "$bin" model synth --preset tiny --seed 1 --out "$model" >/dev/null
"$bin" node cluster-key --out "$state/key" >/dev/null
peers=127.0.0.1:$((port + 100)),127.0.0.1:$((port + 101))
pids=(0 0)
start() {
	"$bin" node --state-dir "$state/h$1" --name "h$1" --cluster-key-file "$state/key" --listen "127.0.0.1:$((port + 100 + $1))" \
		--peers "$peers" --mdns=false --model "$model" --expect 2 --heartbeat-interval 200ms \
		--data-listen "127.0.0.1:$((port + 200 + $1))" --host 127.0.0.1 --port "$port" --served-model-name tiny >>"$state/h$1.log" 2>&1 &
	pids[$1]=$!
}
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$state"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; tail -5 "$state"/h*.log; exit 1; }
now() { date +%s.%N; }
start 0
start 1
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || fail "the head never served"
head=0
grep -q "msg=serving" "$state/h1.log" && head=1
victim=$((1 - head))
echo "head: h$head; killing h$victim mid-stream"
curl -sS -N "http://127.0.0.1:$port/v1/completions" -H "Content-Type: application/json" \
	-d '{"model":"tiny","prompt":"Hi","max_tokens":4000,"stream":true,"ignore_eos":true}' >"$state/stream.txt" 2>&1 &
client=$!
sleep 1
killed=$(now)
kill -9 "${pids[$victim]}"
wait "${pids[$victim]}" 2>/dev/null
wait "$client"
took=$(echo "$(now) - $killed" | bc)
echo "the open stream ended ${took}s after the kill"
(($(echo "$took < 5" | bc))) || fail "the stream took ${took}s to end"
grep -q '"error"' "$state/stream.txt" && tail -c 20 "$state/stream.txt" | grep -q '\[DONE\]' || fail "no error event then [DONE]: $(tail -c 300 "$state/stream.txt")"
hdrs=$(curl -s -o /dev/null -D - "http://127.0.0.1:$port/v1/completions" -H "Content-Type: application/json" -d '{"model":"tiny","prompt":"x","max_tokens":3}')
echo "$hdrs" | grep -q "503" && echo "$hdrs" | grep -qi "Retry-After" || fail "a new request got: $hdrs"
echo "a new request: 503 with Retry-After"
for _ in $(seq 1 50); do "$bin" status --state-dir "$state/h$head" 2>/dev/null | grep -q "cluster: degraded" && break; sleep 0.1; done
"$bin" status --state-dir "$state/h$head" | grep "cluster:" | grep -q degraded || fail "status is not degraded"
"$bin" status --state-dir "$state/h$head" --json | tr -d ' \n' | grep -q '"state":"down"' || fail "status --json lists no stage down"
echo "status: degraded (the lost host's stage: down)"
restarted=$(now)
start "$victim"
code=0
for _ in $(seq 1 200); do
	code=$(curl -s -o /dev/null -w "%{http_code}" "http://127.0.0.1:$port/v1/completions" -H "Content-Type: application/json" \
		-d '{"model":"tiny","prompt":"The capital of France is","max_tokens":8,"temperature":0}')
	[ "$code" = 200 ] && break
	sleep 0.2
done
[ "$code" = 200 ] || fail "serving did not resume after the restart"
"$bin" status --state-dir "$state/h$head" --json | tr -d ' \n' | grep -q '"state":"down"' && fail "a stage still down after the restart"
echo "serving resumed $(echo "$(now) - $restarted" | bc)s after the restart, $("$bin" status --state-dir "$state/h$head" | grep 'plan epoch')"
echo "node-loss: ok"
