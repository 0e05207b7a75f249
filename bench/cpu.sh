#!/usr/bin/env bash
# CPU per call, by thread: a billing-off and a billed gateway in front of one fixture, each loaded
# at concurrency C (default 32) for SECS seconds (default 6) after a 2 s warm-up; prints each
# gateway thread group's CPU time (from /proc) divided by the calls answered. PERF=1 also records
# the gateway with perf (call graphs) into /tmp/perf-free.data and /tmp/perf-billed.data.
# PERF_ARGS: perf's call-graph options instead of `--call-graph dwarf,16384` (" " for none: a
#   flat profile, which perturbs the gateway far less).
# BILLED_BIN: another build to run as the billed gateway (an A/B of one change's CPU cost).
# HOOKS=1: a billed gateway and the same with two webhook destinations (bench/run.sh's `hooks`),
#   which also shows the webhook sink's CPU; what delivering usage events costs a call.
#   C=1 bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tollgate -p tollgate-bench >&2
bin=target/release
work=$(mktemp -d)
source bench/lib.sh
trap finish EXIT
C=${C:-32}; SECS=${SECS:-6}
admin_key="bench-admin-key-$RANDOM$RANDOM"
fixture=$(start fixture "$bin/tollgate-fixture" --http 127.0.0.1:0)
free=$(start free "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 --remote-url "$fixture")
billed=$(TOLLGATE_ADMIN_KEY=$admin_key start billed "${BILLED_BIN:-$bin/tollgate}" --log-level warn wrap \
  --listen 127.0.0.1:0 --data-dir "$work/data" --remote-url "$fixture")
key=$(new_key "$billed" "$admin_key")
names="free billed"
if [ -n "${HOOKS:-}" ]; then
  names="billed hooks"
  sink=$(start sink "$bin/sink")
  hooks_config "$fixture" "$sink" "$admin_key" >"$work/hooks.toml"
  hooks=$(start hooks "${BILLED_BIN:-$bin/tollgate}" --log-level warn serve --config "$work/hooks.toml" --listen 127.0.0.1:0)
  hooks_key=$(new_key "$hooks" "$admin_key")
fi
# CPU ticks (USER_HZ: 100 a second, 10,000 us each) per thread name, summed over the threads of process $1.
threads() {
  for t in /proc/"$1"/task/*; do
    local c s
    c=$(cat "$t/comm"); s=$(cat "$t/stat"); s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "$c $(( ${12} + ${13} ))"
  done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort
}
# The gateway's threads, and the sink's (named sink-*) when it runs.
sample() {
  {
    threads "$1"
    if [ -f "$work/sink.pid" ]; then threads "$(cat "$work/sink.pid")" | sed 's/^/sink-/'; fi
  } | sort
}
for n in $names; do
  pid=$(cat "$work/$n.pid")
  url=$free; h=()
  if [ "$n" = billed ]; then url=$billed; h=(--header "x-api-key: $key"); fi
  if [ "$n" = hooks ]; then url=$hooks; h=(--header "x-api-key: $hooks_key"); fi
  quiet
  "$bin/loadgen" --url "$url" --concurrency "$C" --seconds 2 --label warm "${h[@]}" >/dev/null
  sample "$pid" >"$work/before"
  if [ -n "${PERF:-}" ]; then
    # PERF_ARGS split into words on purpose (see above).
    # shellcheck disable=SC2086
    perf record ${PERF_ARGS:---call-graph dwarf,16384} -F 999 -o "/tmp/perf-$n.data" -p "$pid" -- sleep "$SECS" >/dev/null 2>&1 &
  fi
  out=$("$bin/loadgen" --url "$url" --concurrency "$C" --seconds "$SECS" --label "$n" "${h[@]}")
  wait || true
  sample "$pid" >"$work/after"
  calls=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  echo "$n: $out"
  join "$work/before" "$work/after" | awk -v calls="$calls" '
    {d = ($3 - $2) * 10000 / calls; if (d > 0.05) printf "  %-20s %.1f us/call\n", $1, d; tot += d}
    END {printf "  total                %.1f us/call\n", tot}'
done
