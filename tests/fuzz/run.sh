#!/usr/bin/env bash
# Runs fedlora's libFuzzer targets: tests/fuzz/run.sh SECONDS [TARGET...] gives each target (all six by default:
# safetensors peft_config tokenizer dataset config engine) an equal share of SECONDS, one after another, and prints
# per target the executions, the coverage (libFuzzer's cov: edges, ft: features) and the corpus size. Builds the
# targets first (clang, ASan + UBSan, in build-fuzz/) unless FEDLORA_FUZZ_BUILD names a finished build;
# tests/fuzz/run.sh --build-only only builds them.
# Each target starts from its committed seeds (tests/fuzz/corpus/<target>/, which also hold every crash input found
# so far, as regressions) and keeps what it finds in <build>/corpus/<target>/. A crash, a leak, a UBSan report, an
# input slower than 10 s or past 2 GB fails the run; the input is saved as <build>/crashes/<target>-… — add it to
# the committed corpus, with the fix.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:?usage: tests/fuzz/run.sh SECONDS [TARGET...] | --build-only}
shift
targets=("$@")
((${#targets[@]})) || targets=(safetensors peft_config tokenizer dataset config engine)
build=${FEDLORA_FUZZ_BUILD:-build-fuzz}
if [[ -z ${FEDLORA_FUZZ_BUILD:-} ]]; then
  command -v clang++ > /dev/null || { echo "fuzz: clang++ is missing (Debian packages clang, libclang-rt-14-dev)" >&2; exit 2; }
  [[ -f $build/build.ninja ]] ||
    cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" -DFEDLORA_FUZZ=ON -DFEDLORA_BUILD_TESTS=OFF \
      -DFEDLORA_BUILD_BENCHMARKS=OFF -DCMAKE_UNITY_BUILD=ON > /dev/null
  cmake --build "$build" --target fuzzers
fi
[[ $seconds != --build-only ]] || exit 0
per=$((seconds / ${#targets[@]}))
((per > 0)) || per=1
mkdir -p "$build/crashes"
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export ASAN_OPTIONS=detect_leaks=1
failed=()
for t in "${targets[@]}"; do
  work=$build/corpus/$t
  mkdir -p "$work"
  log=$build/fuzz-$t.log
  rc=0
  "$build/bin/${t}_fuzzer" "$work" "tests/fuzz/corpus/$t" -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$build/crashes/$t-" > "$log" 2>&1 || rc=$?
  runs=$(grep -aoP '^stat::number_of_executed_units:\s*\K\d+' "$log" || echo 0)
  done_line=$(grep -aE '^#[0-9]+\s+DONE' "$log" | tail -n 1 || true)
  cov=$(grep -aoP 'cov: \K\d+' <<< "$done_line" || echo '?')
  ft=$(grep -aoP 'ft: \K\d+' <<< "$done_line" || echo '?')
  corpus=$(find "$work" -type f | wc -l)
  printf 'fuzz %-12s %4d s  %10s runs  cov %5s  ft %6s  corpus %5d  %s\n' "$t" "$per" "$runs" "$cov" "$ft" \
    "$corpus" "$( ((rc == 0)) && echo ok || echo "FAILED (exit $rc; $log)")"
  if ((rc != 0)); then
    failed+=("$t")
    grep -aE 'ERROR|runtime error|invariant broken|Test unit written' "$log" | head -n 5 >&2
  fi
done
((${#failed[@]} == 0)) || { echo "fuzz: failed: ${failed[*]}" >&2; exit 1; }
