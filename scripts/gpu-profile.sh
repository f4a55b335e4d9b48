#!/usr/bin/env bash
# Where a decode step's time goes on one GPU: the per-operation profile of
# `bench step --profile` and ncu's per-kernel durations of one eager step.
#   MODEL=synth:glm-4.5-air-fp8 LAYERS=2 BATCH=1 scripts/gpu-profile.sh   (after scripts/gpu-test.sh build)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
M=${MODEL:-synth:glm-4.5-air-fp8}
L=${LAYERS:-2}
B=${BATCH:-1}
tag=$(echo "$M-$L-$B" | tr ':/,' '___')
bin/gpu/benchstep --model "$M" --layers "$L" --batch "$B" --context 4096 --prefill 0 --profile 2>&1 | tee "$OUT/profile-$tag.txt"
if command -v ncu >/dev/null; then
	# One eager step (no graph), every kernel timed by ncu; fills and probes skipped.
	timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
		-k 'regex:^(?!fill_|read_probe).*' \
		bin/gpu/benchstep --model "$M" --layers "$L" --batch "$B" --context 4096 --prefill 0 --iters 1 --warmup 0 --cuda-graph=false \
		>"$OUT/ncu-$tag.csv" 2>"$OUT/ncu-$tag.err"
	python3 - "$OUT/ncu-$tag.csv" <<'PY' | tee "$OUT/ncu-$tag.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi, ni = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("ID")
tot = collections.OrderedDict()
seq = []
for r in rows:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    name = r[ki].split("(")[0]
    seq.append((name, v))
    t = tot.setdefault(name, [0, 0.0]); t[0] += 1; t[1] += v
print("kernels:", len(seq), "total us:", sum(v for _, v in seq) / 1e3)
for n, (c, v) in sorted(tot.items(), key=lambda x: -x[1][1]):
    print(f"{n:40s} {c:5d} {v/1e3:10.1f} us {v/1e3/c:8.2f} us/call")
print("--- last 80 kernels in order")
for n, v in seq[-80:]:
    print(f"  {n:40s} {v/1e3:8.2f} us")
PY
fi
