#!/usr/bin/env bash
# Device sampling: the twin tests and the benchmark (device vs CPU sampler).
#   scripts/gpu-sample.sh   (after scripts/gpu-test.sh build)
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-lib.sh
(cd kernels/cuda && timeout 200 ../../bin/gpu/cuda.test -test.count=1 -test.v -test.run 'TestSampleTwin|TestArgmaxTwin' 2>&1 | tail -40)
(cd kernels/cuda && timeout 200 ../../bin/gpu/cuda.test -test.run XXX -test.bench Sample -test.benchtime 20x 2>&1 | tail -20) | tee "$OUT/bench-sample.txt"
