#!/usr/bin/env bash
# The test command's check that a benchmark program still runs (at a small size, in seconds): it must exit 0 and
# print a line matching each pattern given before `--` (extended regular expressions). Its output is shown.
#   check_runs.sh PATTERN... -- PROGRAM ARGS...
set -uo pipefail
patterns=()
while (($#)) && [[ $1 != -- ]]; do patterns+=("$1"); shift; done
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if ((rc != 0)); then echo "check_runs: $1 exited with $rc" >&2; exit 1; fi
for p in "${patterns[@]}"; do
  grep -Eq -- "$p" <<< "$out" || { echo "check_runs: no line of $1's output matches '$p'" >&2; exit 1; }
done
