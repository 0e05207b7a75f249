#!/usr/bin/env bash
# A/B of builds of the billing chain, in one run: a billing-off gateway (this tree's release build)
# and one billed gateway per NAME=BINARY given, each on a fresh database with one key, all in front
# of one fixture; ROUNDS rounds (default 3) of SECS seconds (default 4) at each of CONC (default
# "1 32"), the order rotated each round. Prints medians and each target against billing off.
#   bench/ab.sh "before=/tmp/tollgate-before after=target/release/tollgate"
# EXTRA: more arguments for the billed gateways (e.g. EXTRA="--price 2").
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-4}; CONC=${CONC:-"1 32"}
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
key[free]=""
for spec in $1; do
  n=${spec%%=*}; names+=("$n")
  # shellcheck disable=SC2086
  url[$n]=$(TOLLGATE_ADMIN_KEY=$admin_key start "$n" "${spec#*=}" --log-level warn wrap --listen 127.0.0.1:0 \
    --data-dir "$work/$n-data" --remote-url "$fixture" ${EXTRA:-})
  key[$n]=$(new_key "${url[$n]}" "$admin_key")
done
results="$work/results.jsonl"
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONC; do
    k=$((r % ${#names[@]}))
    for n in "${names[@]:$k}" "${names[@]:0:$k}"; do
      headers=(); [ -n "${key[$n]}" ] && headers=(--header "x-api-key: ${key[$n]}")
      "$bin/loadgen" --url "${url[$n]}" --concurrency "$c" --seconds "$SECS" --label "$n" "${headers[@]}" >>"$results"
    done
  done
done
python3 - "$results" <<'PY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs[(j["concurrency"], j["label"])].append(j)
med = {k: (statistics.median(x["rps"] for x in v), statistics.median(x["p50_us"] for x in v),
           statistics.median(x["p99_us"] for x in v)) for k, v in runs.items()}
print("| target | c | calls/s | p50 µs | p99 µs | p50 over billing off | calls/s kept |")
print("|---|---|---|---|---|---|---|")
for (c, label), (rps, p50, p99) in sorted(med.items()):
    base = med[(c, "free")]
    print(f"| {label} | {c} | {rps:.0f} | {p50:.1f} | {p99:.1f} | {p50 - base[1]:+.1f} µs | {100 * rps / base[0]:.0f} % |")
PY
