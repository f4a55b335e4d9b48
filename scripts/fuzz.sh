#!/usr/bin/env bash
# Runs every Go fuzz target in the module briefly: $1 is go test's -fuzztime (default 20000x:
# a count of executions, not a duration, so a slow machine cannot hit the fuzzer's deadline).
set -euo pipefail
t=${1:-20000x}
cd "$(dirname "$0")/.."
found=0
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    found=$((found+1))
    echo "fuzz $pkg $target ($t)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$t" "$pkg" >/tmp/fuzz.$$.log 2>&1 || { cat /tmp/fuzz.$$.log; exit 1; }
    # Record what ran: the fuzzer's last progress line (executions, corpus) and the verdict.
    grep '^fuzz: elapsed' /tmp/fuzz.$$.log | tail -1 || true
    tail -1 /tmp/fuzz.$$.log
  done
done
echo "fuzz: $found targets"
