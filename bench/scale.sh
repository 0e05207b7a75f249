#!/usr/bin/env bash
# The scale benchmark: the full billing chain with 10 keys and with 1,000,000 keys (and a
# 1,000,000-row request log), each seeded straight into a fresh database by bench/src/bin/seed.rs.
# For each: start-up time and resident memory, throughput and latency at c=32 (one key; medians of
# ROUNDS interleaved rounds, default 3). With a million keys: GET /admin/consumer-insights and
# GET /admin/system-health latency, and the proxy's p50/p99 at c=8 with and without those reports
# running back to back beside it. Each round also loads the million-key gateway with its calls
# spread over SPREAD keys (default 100,000; every call from the next, as that many consumers),
# which the one-key load does not show: what a commit writes per distinct key.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
KEYS=${KEYS:-1000000}
ROWS=${ROWS:-1000000}
SPREAD=${SPREAD:-100000}

cargo build --release --locked -p tollgate -p tollgate-bench >&2
bin=target/release
work=$(mktemp -d)
source bench/lib.sh
trap finish EXIT

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$(cat "$work/$1.pid")/status"; }

fixture=$(start fixture "$bin/tollgate-fixture" --http 127.0.0.1:0)
admin_key="bench-admin-key-$RANDOM$RANDOM"
results="$work/results.jsonl"
declare -A url

# Both gateways run side by side, and the c=32 load alternates between them round by round: single
# readings one after the other moved by ±20 % here, as much as the target's margin.
for n in 10 "$KEYS"; do
  rows=0; [ "$n" = "$KEYS" ] && rows=$ROWS
  known=16; [ "$n" = "$KEYS" ] && known=$SPREAD
  "$bin/seed" --data-dir "$work/d$n" --keys "$n" --requests "$rows" --known "$known" >&2
  t0=$(date +%s%N)
  url[$n]=$(TOLLGATE_ADMIN_KEY=$admin_key start "g$n" "$bin/tollgate" --log-level warn wrap --listen 127.0.0.1:0 \
    --data-dir "$work/d$n" --remote-url "$fixture")
  startup_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  sleep 1
  echo "{\"label\":\"memory\",\"keys\":$n,\"rows\":$rows,\"rss_mib\":$(rss_mib "g$n"),\"startup_ms\":$startup_ms}" >>"$results"
  tail -1 "$results" >&2
done
for round in $(seq 1 "$ROUNDS"); do
  order=(10 "$KEYS"); [ $((round % 2)) = 0 ] && order=("$KEYS" 10)
  for n in "${order[@]}"; do
    "$bin/loadgen" --url "${url[$n]}" --concurrency 32 --seconds "$SECS" --label "keys=$n" --header "x-api-key: tg_bench_0" >>"$results"
    tail -1 "$results" >&2
  done
  "$bin/loadgen" --url "${url[$KEYS]}" --concurrency 32 --seconds "$SECS" --label spread \
    --key-cycle "$SPREAD" --header "x-api-key: tg_bench_{n}" >>"$results"
  tail -1 "$results" >&2
done
kill "$(cat "$work/g10.pid")"; rm -f "$work/g10.pid"

# time_report LABEL REPORT : times one GET /admin/REPORT on the big gateway into the results.
time_report() {
  local t
  t=$(curl -sf -o /dev/null -w '%{time_total}' -H "x-admin-key: $admin_key" "$base/admin/$2")
  echo "{\"label\":\"$1\",\"report\":\"$2\",\"ms\":$(python3 -c "print($t*1000)")}" >>"$results"
}

# Reports alone, three times each (the first warms nothing: both read memory, not the log).
big=${url[$KEYS]}
base=${big%/mcp}
for report in consumer-insights system-health; do
  for i in 1 2 3; do
    time_report report "$report"
  done
done
"$bin/loadgen" --url "$big" --concurrency 8 --seconds "$SECS" --label "c8 quiet" --header "x-api-key: tg_bench_0" >>"$results"
"$bin/loadgen" --url "$big" --concurrency 8 --seconds "$SECS" --label "c8 with reports" --header "x-api-key: tg_bench_0" >>"$results" &
lg=$!
sleep 1.2
end=$(( $(date +%s) + SECS - 1 ))
while [ "$(date +%s)" -lt "$end" ]; do
  for report in consumer-insights system-health; do
    time_report "report under load" "$report"
  done
done
wait $lg

python3 - "$results" "$KEYS" "$SPREAD" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys, spread = sys.argv[2], int(sys.argv[3])
by = lambda label: [r for r in rows if r["label"] == label]
print("| keys | request-log rows | start-up | RSS | calls/s (c=32) | p50 µs | p99 µs |")
print("|---|---|---|---|---|---|---|")
med = lambda label, f: statistics.median(r[f] for r in by(label))
for m in by("memory"):
    l = f"keys={m['keys']}"
    print(f"| {m['keys']:,} | {m['rows']:,} | {m['startup_ms']} ms | {m['rss_mib']} MiB | {med(l, 'rps'):.0f} | {med(l, 'p50_us'):.0f} | {med(l, 'p99_us'):.0f} |")
small, big = by("keys=10"), by(f"keys={keys}")
ratios = ", ".join(f"{100 * b['rps'] / s['rps']:.0f} %" for s, b in zip(small, big))
print(f"\nThroughput at {int(keys):,} keys: {100 * med(f'keys={keys}', 'rps') / med('keys=10', 'rps'):.0f} % of that at 10 keys"
      f" (medians of {len(small)} rounds; round by round: {ratios}).")
sp = by("spread")
sp_ratios = ", ".join(f"{100 * b['rps'] / s['rps']:.0f} %" for s, b in zip(small, sp))
print(f"Calls spread over {spread:,} of the {int(keys):,} keys: {med('spread', 'rps'):.0f} calls/s, p50 {med('spread', 'p50_us'):.0f} µs,"
      f" {100 * med('spread', 'rps') / med('keys=10', 'rps'):.0f} % of one key at 10 keys (round by round: {sp_ratios}).\n")
print("| report | alone (median of 3) | beside c=8 load (median, max) |")
print("|---|---|---|")
for rep in ("consumer-insights", "system-health"):
    alone = [r["ms"] for r in by("report") if r["report"] == rep]
    loaded = [r["ms"] for r in by("report under load") if r["report"] == rep]
    print(f"| {rep} | {statistics.median(alone):.1f} ms | {statistics.median(loaded):.1f} ms, {max(loaded):.1f} ms |")
q, w = by("c8 quiet")[0], by("c8 with reports")[0]
print(f"\n| proxy at c=8 | calls/s | p50 µs | p99 µs |\n|---|---|---|---|")
print(f"| quiet | {q['rps']:.0f} | {q['p50_us']:.0f} | {q['p99_us']:.0f} |")
print(f"| reports running back to back | {w['rps']:.0f} | {w['p50_us']:.0f} | {w['p99_us']:.0f} |")
PY
