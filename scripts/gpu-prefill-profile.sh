#!/usr/bin/env bash
# Where a prefill step's time goes on one GPU: the per-operation profile of
# `bench step --profile` and ncu's per-kernel durations of one prefill step.
#   MODEL=synth:glm-4.5-air-fp8 LAYERS=2 PREFILL=8192 FLAGS=--fast-gemm scripts/gpu-prefill-profile.sh
# (after scripts/gpu-test.sh build)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
M=${MODEL:-synth:glm-4.5-air-fp8}
L=${LAYERS:-2}
P=${PREFILL:-8192}
F=${FLAGS:-}
tag=$(echo "$M-$L-$P$F" | tr ':/, -' '_____')
# shellcheck disable=SC2086
bin/gpu/benchstep --model "$M" --layers "$L" --batch 1 --context 16 --prefill "$P" --iters 2 --warmup 1 --cuda-graph=false --profile $F 2>&1 | tee "$OUT/pprofile-$tag.txt"
if command -v ncu >/dev/null && [ -n "${NCU:-1}" ]; then
	# shellcheck disable=SC2086
	timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
		-k 'regex:^(?!fill_|read_probe).*' \
		bin/gpu/benchstep --model "$M" --layers "$L" --batch 1 --context 16 --prefill "$P" --iters 1 --warmup 0 --cuda-graph=false $F \
		>"$OUT/pncu-$tag.csv" 2>"$OUT/pncu-$tag.err"
	python3 - "$OUT/pncu-$tag.csv" <<'PY' | tee "$OUT/pncu-$tag.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
tot = collections.OrderedDict()
n = 0; s = 0.0
for r in rows:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    name = r[ki].split("(")[0][:60]
    n += 1; s += v
    t = tot.setdefault(name, [0, 0.0]); t[0] += 1; t[1] += v
print("kernels:", n, "total ms:", s / 1e6)
for k, (c, v) in sorted(tot.items(), key=lambda x: -x[1][1])[:40]:
    print(f"{k:60s} {c:5d} {v/1e6:9.3f} ms {v/1e3/c:9.1f} us/call")
PY
fi
