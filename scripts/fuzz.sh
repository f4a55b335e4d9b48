#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a short time ($1, default 3s each).
set -euo pipefail
t=${1:-3s}
cd "$(dirname "$0")/.."
found=0
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    found=$((found+1))
    echo "fuzz $pkg $target ($t)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$t" "$pkg" >/tmp/fuzz.$$.log 2>&1 || { cat /tmp/fuzz.$$.log; exit 1; }
    tail -1 /tmp/fuzz.$$.log
  done
done
echo "fuzz: $found targets"
