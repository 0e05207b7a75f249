#!/usr/bin/env bash
# The proxy benchmark. In one run, interleaved round by round, it loads three targets with
# `tools/call echo` at concurrency 1, 8 and 32:
#   direct    — the fixture MCP server over HTTP, no proxy
#   yardstick — a minimal JSON-parsing hyper pass-through proxy (bench/src/bin/yardstick.rs)
#   tollgate  — the gateway with billing off (`tollgate wrap --free --remote-url`) in front of the same fixture
#   billed    — the gateway with billing on: every call authenticated, priced, reserved, settled, ledgered
#   hooks     — billed, plus two webhook destinations (a sink that answers 200) receiving every usage event
# plus tollgate in front of a stdio fixture child (one shared child) at c=32.
# Prints a Markdown table of medians over ROUNDS runs (default 3) of SECS seconds (default 5) each.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
# Which targets to load (all by default); e.g. TARGETS="direct yardstick tollgate" for the proxy path.
TARGETS=${TARGETS:-"direct yardstick tollgate billed hooks"}

cargo build --release --locked -p tollgate -p tollgate-bench >&2
bin=target/release
work=$(mktemp -d)
source bench/lib.sh
trap finish EXIT

fixture=$(start fixture "$bin/tollgate-fixture" --http 127.0.0.1:0)
yardstick=$(start yardstick "$bin/yardstick" --upstream "$fixture")
tollgate=$(start tollgate "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 --remote-url "$fixture")
tollgate_stdio=$(start tollgate-stdio "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 -- "$bin/tollgate-fixture" --stdio)
# The full billing chain (key lookup, reserve, forward, settle, durable ledger row) on a fresh database.
admin_key="bench-admin-key-$RANDOM$RANDOM"
billed=$(TOLLGATE_ADMIN_KEY=$admin_key start tollgate-billed "$bin/tollgate" --log-level warn wrap --listen 127.0.0.1:0 \
  --data-dir "$work/data" --remote-url "$fixture")
# The same, with two webhook destinations (issue 5: delivery must not slow /mcp).
sink=$(start sink "$bin/sink")
cat >"$work/hooks.toml" <<TOML
[upstream]
url = "$fixture"
[billing]
admin_key = "$admin_key"
data_dir = "$work/hooks-data"
[[webhooks]]
name = "one"
url = "${sink}hook"
secret = "bench-webhook-secret-0123456789"
allow_networks = ["127.0.0.0/8"]
[[webhooks]]
name = "two"
url = "${sink}other"
secret = "bench-webhook-secret-9876543210"
allow_networks = ["127.0.0.0/8"]
TOML
hooks=$(start tollgate-hooks "$bin/tollgate" --log-level warn serve --config "$work/hooks.toml" --listen 127.0.0.1:0)
sleep 1
api_key=$(new_key "$billed" "$admin_key")
hooks_key=$(new_key "$hooks" "$admin_key")

results="$work/results.jsonl"
orders=("direct yardstick tollgate billed hooks" "yardstick tollgate billed hooks direct" "tollgate billed hooks direct yardstick")
for round in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round so that no target always runs right after another.
  order=${orders[$(( (round - 1) % 3 ))]}
  for c in $CONCURRENCY; do
    for target in $order; do
      [[ " $TARGETS " == *" $target "* ]] || continue
      headers=()
      case $target in
        direct) url=$fixture ;;
        yardstick) url=$yardstick ;;
        tollgate) url=$tollgate ;;
        billed) url=$billed; headers=(--header "x-api-key: $api_key") ;;
        hooks) url=$hooks; headers=(--header "x-api-key: $hooks_key") ;;
      esac
      "$bin/loadgen" --url "$url" --concurrency "$c" --seconds "$SECS" --label "$target" "${headers[@]}" >>"$results"
      echo "round $round c=$c $target: $(tail -1 "$results")" >&2
    done
  done
  "$bin/loadgen" --url "$tollgate_stdio" --concurrency 32 --seconds "$SECS" --label "tollgate-stdio" >>"$results"
  echo "round $round c=32 tollgate-stdio: $(tail -1 "$results")" >&2
done

# Every usage event reached both destinations (delivered, nothing pending or dead).
sleep 2
curl -sf "${hooks%/mcp}/admin/webhooks" -H "x-admin-key: $admin_key" | python3 -c '
import json, sys
for d in json.load(sys.stdin)["destinations"]:
    print("webhook %s: delivered %s, pending %s, dead letters %s, failed attempts %s"
          % (d["name"], d["delivered"], d["pending"], d["deadLetters"], d["failedAttempts"]), file=sys.stderr)
'

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault((r["label"], r["concurrency"]), []).append(r)
med = {k: {f: statistics.median(x[f] for x in v) for f in ("rps", "p50_us", "p99_us", "errors")} for k, v in groups.items()}
print("| target | c | calls/s | p50 µs | p99 µs | errors | p50 vs yardstick | calls/s vs yardstick | calls/s vs direct |")
print("|---|---|---|---|---|---|---|---|---|")
for (label, c) in sorted(med, key=lambda k: (k[1], ["direct", "yardstick", "tollgate", "billed", "hooks", "tollgate-stdio"].index(k[0]))):
    m = med[(label, c)]
    y = med.get(("yardstick", c)); d = med.get(("direct", c))
    vs_y = f"{m['p50_us'] - y['p50_us']:+.1f} µs" if y else ""
    tp_y = f"{100 * m['rps'] / y['rps']:.0f} %" if y else ""
    tp_d = f"{100 * m['rps'] / d['rps']:.0f} %" if d else ""
    print(f"| {label} | {c} | {m['rps']:.0f} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['errors']:.0f} | {vs_y} | {tp_y} | {tp_d} |")
print()
print("| billing chain vs billing off (tollgate) | c | p50 added | calls/s kept |")
print("|---|---|---|---|")
for label in ("billed", "hooks"):
    for c in sorted({k[1] for k in med if k[0] == label}):
        b = med[(label, c)]; t = med.get(("tollgate", c))
        if t:
            print(f"| {label} | {c} | {b['p50_us'] - t['p50_us']:+.1f} µs | {100 * b['rps'] / t['rps']:.0f} % |")
PY
