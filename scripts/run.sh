#!/usr/bin/env bash
# `make run`: the main job on the embedded default model — synthesize the tiny
# GLM-4.5-architecture checkpoint (once, into the cache) and generate from it.
set -euo pipefail
bin=${1:-bin/glmtopo}
cache=${2:-.cache}
model="$cache/models/tiny"
if [[ ! -f "$model/config.json" ]]; then
  echo "== synthesizing the tiny GLM-4.5-architecture model into $model"
  "$bin" model synth --preset tiny --seed 1 --out "$model"
fi
echo "== model"
"$bin" model inspect "$model"
echo
echo "== greedy generation on the CPU engine"
"$bin" generate --model "$model" --prompt-ids 1005,1007,1010,198,39,477,332,1011 --max-new-tokens 24 --temperature 0 --ignore-eos --json
