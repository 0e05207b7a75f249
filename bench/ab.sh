#!/usr/bin/env bash
# A/B of gateway builds, in one run: a billing-off gateway (this tree's release build) and one
# gateway per NAME=BINARY given — billed, each on a fresh database with one key; or, with FREE=1,
# billing off too, beside the yardstick — all in front of one fixture. Each of ROUNDS rounds
# (default 3) at each of CONC (default "1 32") is one load generator moving its load from target
# to target every SLICE seconds (default 0.5) until each has had SECS seconds (default 10), the
# order rotated each round. Prints medians, and each target against billing off (the median over
# rounds of each round's own ratio).
#   bench/ab.sh "before=/tmp/tollgate-before after=target/release/tollgate"
#   FREE=1 CONC=32 bench/ab.sh "before=/tmp/tollgate-before after=target/release/tollgate"
# EXTRA: more arguments for the named gateways (e.g. EXTRA="--price 2").
# HOOKS: names (of those given) whose gateways also deliver every usage event to two webhook
#   destinations on a sink, as bench/run.sh's `hooks` does (EXTRA does not apply to them):
#   CONC=32 HOOKS="h-before h-after" bench/ab.sh "billed=target/release/tollgate h-before=/tmp/a h-after=target/release/tollgate"
#   Their batch size: HOOKS_BATCH, or HOOKS_BATCH_<name> (dashes as underscores) for one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; SLICE=${SLICE:-0.5}; CONC=${CONC:-"1 32"}
cargo build --release --locked -p tollgate -p tollgate-bench >&2
bin=target/release
work=$(mktemp -d)
source bench/lib.sh
trap finish EXIT
admin_key="bench-admin-key-$RANDOM$RANDOM"
fixture=$(start fixture "$bin/tollgate-fixture" --http 127.0.0.1:0)
declare -A url key
names=(free)
url[free]=$(start free "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 --remote-url "$fixture")
if [ -n "${FREE:-}" ]; then
  names+=(yardstick)
  url[yardstick]=$(start yardstick "$bin/yardstick" --upstream "$fixture")
fi
if [ -n "${HOOKS:-}" ]; then sink=$(start sink "$bin/sink"); fi
for spec in $1; do
  n=${spec%%=*}; names+=("$n")
  if [[ " ${HOOKS:-} " == *" $n "* ]]; then
    batch="HOOKS_BATCH_${n//-/_}"
    HOOKS_BATCH=${!batch:-${HOOKS_BATCH:-}} hooks_config "$fixture" "$sink" "$admin_key" "$work/$n-data" >"$work/$n.toml"
    url[$n]=$(start "$n" "${spec#*=}" --log-level warn serve --config "$work/$n.toml" --listen 127.0.0.1:0)
    key[$n]=$(new_key "${url[$n]}" "$admin_key")
  elif [ -n "${FREE:-}" ]; then
    # shellcheck disable=SC2086
    url[$n]=$(start "$n" "${spec#*=}" --log-level warn wrap --free --listen 127.0.0.1:0 --remote-url "$fixture" ${EXTRA:-})
  else
    # shellcheck disable=SC2086
    url[$n]=$(TOLLGATE_ADMIN_KEY=$admin_key start "$n" "${spec#*=}" --log-level warn wrap --listen 127.0.0.1:0 \
      --data-dir "$work/$n-data" --remote-url "$fixture" ${EXTRA:-})
    key[$n]=$(new_key "${url[$n]}" "$admin_key")
  fi
done
results="$work/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONC; do
    args=()
    k=$((r % ${#names[@]}))
    for n in "${names[@]:$k}" "${names[@]:0:$k}"; do
      args+=(--target "$n=${url[$n]}")
      [ -n "${key[$n]:-}" ] && args+=(--target-header "$n=x-api-key: ${key[$n]}")
    done
    quiet
    "$bin/loadgen" "${args[@]}" --concurrency "$c" --seconds "$SECS" --slice "$SLICE" | sed "s/^{/{\"round\":$r,/" >>"$results"
  done
done
python3 - "$results" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["round"], r["concurrency"], r["label"]): r for r in rows}
runs = collections.defaultdict(list)
for r in rows:
    runs[(r["concurrency"], r["label"])].append(r)
print("| target | c | calls/s | p50 µs | p99 µs | p50 over billing off | calls/s kept | kept, per round |")
print("|---|---|---|---|---|---|---|---|")
for (c, label), v in sorted(runs.items()):
    base = [by[(r["round"], c, "free")] for r in v]
    kept = [100 * r["rps"] / b["rps"] for r, b in zip(v, base)]
    added = [r["p50_us"] - b["p50_us"] for r, b in zip(v, base)]
    print(f"| {label} | {c} | {statistics.median(x['rps'] for x in v):.0f} | {statistics.median(x['p50_us'] for x in v):.1f} "
          f"| {statistics.median(x['p99_us'] for x in v):.1f} | {statistics.median(added):+.1f} µs | {statistics.median(kept):.0f} % "
          f"| {', '.join(f'{k:.0f}' for k in kept)} |")
PY
