#!/usr/bin/env bash
# The docker-compose simulation run for real. Builds fedlora's image from deploy/Dockerfile (with --prebuilt DIR, its
# `prebuilt` stage around the programs already built in DIR, as the test suite does: the image's own compile is ten
# minutes of the test command's budget), brings up a federation of three clients made by deploy/compose.sh under a
# project name of its own, and checks that:
#   - a client container killed mid-run is survived: its round closes without it (the quorum, 0.67 of 3, is 2), the
#     next round waits for it without starting, saying what it waits for in the log and the status call;
#   - SIGUSR1 exports the latest version mid-run;
#   - brought back with `up -d`, the client rejoins and takes part again, and every round closes;
#   - the final export is what `fedlora summary` reports: its version is the run's last round, and the held-out loss
#     of the exported adapter, computed again by `fedlora eval`, is the summary's last loss;
#   - `down -v` leaves no container, volume or network of the project behind.
# Needs a Docker engine (deploy/docker_engine.sh starts one as root). Without one it says so, checks that the compose
# files parse (`docker-compose config`) and exits 77, which CTest reports as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
prebuilt=
if [[ ${1:-} == --prebuilt ]]; then
  prebuilt=${2:?--prebuilt needs the directory holding fedlora, fedlora-server and fedlora-client}
fi
say() { echo "compose test: $*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fedlora-compose.XXXXXX")
out=$work/out
project=fedloratest$$
rounds=5
bash deploy/compose.sh --clients 3 --method lora-fair --rounds "$rounds" --out "$out" --port none --client-timeout 15 \
  --local-steps 100 > "$work/federation.yml"
dc() { docker-compose --project-name "$project" --project-directory deploy -f "$work/federation.yml" "$@"; }
docker-compose -f deploy/docker-compose.yml config -q
dc config -q
if ! docker info > /dev/null 2>&1; then
  say "SKIPPED: no Docker engine answers (as root, bash deploy/docker_engine.sh starts one); only checked that" \
    "deploy/docker-compose.yml and a deploy/compose.sh file parse"
  rm -rf "$work"
  exit 77
fi

finish() {
  local rc=$?
  if ((rc != 0)); then
    say "FAILED; the coordinator's log ends:"
    dc logs --no-color --tail 40 coordinator >&2 || true
  fi
  dc down -v --remove-orphans > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap finish EXIT
fail() { say "FAILED: $*"; exit 1; }
# wait_until SECONDS WHAT COMMAND...: runs COMMAND twice a second until it succeeds.
wait_until() {
  local limit=$1 what=$2 end=$((SECONDS + $1))
  shift 2
  until "$@"; do
    ((SECONDS < end)) || fail "no $what within $limit s"
    sleep 0.5
  done
}
closed() { [[ -f $out/state/metrics.jsonl ]] && wc -l < "$out/state/metrics.jsonl" || echo 0; }
at_least() { (($(closed) >= $1)); }
# The ids that uploaded in round N (the keys of its metrics line's bytes_up).
uploaders() { sed -n "$1p" "$out/state/metrics.jsonl" | grep -o '"bytes_up":{[^}]*}' | grep -o '"client-[0-9]*"' | tr -d '"'; }
logged() { dc logs --no-color coordinator 2> /dev/null | grep -- "$1" > /dev/null; }  # not -q: no SIGPIPE
# in_image PROGRAM ARGS...: runs one of the image's programs on the project's network, with the client volumes and
# the output directory.
in_image() { dc run --rm --no-deps -T -v "$out:/out" --entrypoint "$1" client-1 "${@:2}"; }
creds=(--coordinator coordinator:50051 --ca /certs/ca.pem --cert /certs/client-1.pem --key /certs/client-1.key)

start=$SECONDS
if [[ -n $prebuilt ]]; then
  mkdir -p "$work/context/bin" "$work/context/deploy"
  cp "$prebuilt"/{fedlora,fedlora-server,fedlora-client} "$work/context/bin/"
  cp deploy/make_certs.sh "$work/context/deploy/"
  docker build -q --target prebuilt -t fedlora:latest -f deploy/Dockerfile "$work/context" > /dev/null
  say "image built around the programs of $prebuilt in $((SECONDS - start)) s"
else
  dc build
  say "image built from deploy/Dockerfile in $((SECONDS - start)) s"
fi
t=$SECONDS
dc up -d coordinator client-1 client-2 client-3
wait_until 300 "first round" at_least 1
say "round 1 closed $((SECONDS - t)) s after up; killing client-3"
dc kill client-3
# A round after the kill closes with the other two (the quorum; client-3 silent past its 15 s timeout). If client-3
# had uploaded its current round before the kill, that is the next one.
killed_at=$(closed)
without_3() { at_least $((killed_at + 1)) && [[ $(uploaders "$(closed)" | xargs) == "client-1 client-2" ]]; }
wait_until 120 "round closed by client-1 and client-2 alone" without_3
round=$(closed)
say "round $round closed with client-1 and client-2 only"
wait_until 60 "log line saying what the next round waits for" logged "waits for 3 live clients"
status=$(in_image fedlora-client "${creds[@]}" --status)
grep -q "waits for 3 live clients" <<< "$status" || fail "the status does not say what the run waits for: $status"
cohorts=$(dc logs --no-color coordinator | grep -c "cohort of")
sleep 10
(($(closed) == round)) || fail "a round closed while client-3 was dead"
(($(dc logs --no-color coordinator | grep -c "cohort of") == cohorts)) || fail "a round started while it was waiting"
say "waiting, as the status says; no round started in 10 s"

dc kill -s SIGUSR1 coordinator
version_of() { grep -o '"version": *[0-9]*' "$1" 2> /dev/null | grep -o '[0-9]*$'; }
exported() { [[ $(version_of "$out/state/export/version.json") == "$round" ]]; }
wait_until 60 "export of version $round after SIGUSR1" exported
say "SIGUSR1 exported version $round mid-run"

dc up -d client-3
coordinator=$(dc ps -q coordinator)
state() { docker inspect -f "{{.State.$1}}" "$coordinator"; }
ended() { [[ $(state Status) == exited ]]; }
wait_until 300 "end of the run" ended
code=$(state ExitCode)
((code == 0)) || fail "the coordinator exited with $code"
(($(closed) == rounds)) || fail "$(closed) of $rounds rounds closed"
uploaders "$rounds" | grep -x client-3 > /dev/null || fail "client-3 did not take part again after it rejoined"
say "client-3 rejoined; all $rounds rounds closed in $((SECONDS - t)) s"

dc run --rm --no-deps -T summary || fail "the summary job failed"
row=$(grep -m1 '^lora-fair' "$out/summary.txt")
read -r _ summary_rounds first _ last _ <<< "$row"
((summary_rounds == rounds)) || fail "the summary reports $summary_rounds rounds: $row"
exported_version=$(version_of "$out/state/export/version.json")
((exported_version == rounds)) || fail "the export holds version $exported_version, the run has $rounds"
eval=$(in_image fedlora eval --model /work/model --adapter /out/state/export/global --data /work/data/test.jsonl \
  --max-length 256 --json | tail -n1)
loss=$(grep -o '"loss":[0-9.e+-]*' <<< "$eval" | cut -d: -f2)
awk -v a="$loss" -v b="$last" 'BEGIN { exit !(a - b < 6e-5 && b - a < 6e-5) }' \
  || fail "the exported adapter's held-out loss is $loss, the summary's last is $last"
say "summary: $rounds rounds, held-out loss $first -> $last; the export (version $exported_version) evaluates to $loss"

dc down -v --remove-orphans
filter=label=com.docker.compose.project=$project
left=$(docker ps --all -q --filter "$filter"; docker volume ls -q --filter "$filter"; docker network ls -q --filter "$filter")
[[ -z $left ]] || fail "down -v left containers, volumes or networks behind: $(xargs <<< "$left")"
say "down -v left nothing behind; passed in $((SECONDS - start)) s"
