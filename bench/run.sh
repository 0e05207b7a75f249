#!/usr/bin/env bash
# The proxy benchmark. In one run it loads these targets with `tools/call echo` at concurrency 1, 8
# and 32, interleaved: one load generator moves its load from target to target every SLICE seconds
# (default 0.5), until each has had SECS seconds (default 10):
#   direct    — the fixture MCP server over HTTP, no proxy
#   yardstick — a minimal JSON-parsing hyper pass-through proxy (bench/src/bin/yardstick.rs)
#   yardstick-pc — the same, one single-threaded runtime per core (`--per-core`), as Tollgate runs
#   tollgate  — the gateway with billing off (`tollgate wrap --free --remote-url`) in front of the same fixture
#   billed    — the gateway with billing on: every call authenticated, priced, reserved, settled, ledgered
#   hooks     — billed, plus two webhook destinations (a sink that answers 200) receiving every usage event
# plus tollgate in front of a stdio fixture child (one shared child) at c=32.
# Prints Markdown tables of medians over ROUNDS rounds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
# The load moves to the next target every SLICE seconds (see bench/src/bin/loadgen.rs).
SLICE=${SLICE:-0.5}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
# Which targets to load (all by default); e.g. TARGETS="direct yardstick tollgate" for the proxy path.
TARGETS=${TARGETS:-"direct yardstick yardstick-pc tollgate billed hooks"}

cargo build --release --locked -p tollgate -p tollgate-bench >&2
bin=target/release
work=$(mktemp -d)
source bench/lib.sh
trap finish EXIT

fixture=$(start fixture "$bin/tollgate-fixture" --http 127.0.0.1:0)
yardstick=$(start yardstick "$bin/yardstick" --upstream "$fixture")
yardstick_pc=$(start yardstick-pc "$bin/yardstick" --per-core "$(nproc)" --upstream "$fixture")
tollgate=$(start tollgate "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 --remote-url "$fixture")
tollgate_stdio=$(start tollgate-stdio "$bin/tollgate" --log-level warn wrap --free --listen 127.0.0.1:0 -- "$bin/tollgate-fixture" --stdio)
# The full billing chain (key lookup, reserve, forward, settle, durable ledger row) on a fresh database.
admin_key="bench-admin-key-$RANDOM$RANDOM"
billed=$(TOLLGATE_ADMIN_KEY=$admin_key start tollgate-billed "$bin/tollgate" --log-level warn wrap --listen 127.0.0.1:0 \
  --data-dir "$work/data" --remote-url "$fixture")
# The same, with two webhook destinations (issue 5: delivery must not slow /mcp).
sink=$(start sink "$bin/sink")
hooks_config "$fixture" "$sink" "$admin_key" >"$work/hooks.toml"
hooks=$(start tollgate-hooks "$bin/tollgate" --log-level warn serve --config "$work/hooks.toml" --listen 127.0.0.1:0)
sleep 1
api_key=$(new_key "$billed" "$admin_key")
hooks_key=$(new_key "$hooks" "$admin_key")

results="$work/results.jsonl"
targets=(direct yardstick yardstick-pc tollgate billed hooks)
declare -A url=([direct]=$fixture [yardstick]=$yardstick [yardstick-pc]=$yardstick_pc [tollgate]=$tollgate [billed]=$billed [hooks]=$hooks)
declare -A key=([billed]=$api_key [hooks]=$hooks_key)
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    # One load generator per concurrency and round, moving the load from target to target every
    # SLICE seconds (the order rotated each pass and each round), until each has had SECS seconds.
    args=()
    for k in "${!targets[@]}"; do
      target=${targets[$(( (k + round - 1) % ${#targets[@]} ))]}
      [[ " $TARGETS " == *" $target "* ]] || continue
      args+=(--target "$target=${url[$target]}")
      [ -n "${key[$target]:-}" ] && args+=(--target-header "$target=x-api-key: ${key[$target]}")
    done
    quiet
    "$bin/loadgen" "${args[@]}" --concurrency "$c" --seconds "$SECS" --slice "$SLICE" | sed "s/^{/{\"round\":$round,/" | tee -a "$results" >&2
  done
  quiet
  "$bin/loadgen" --url "$tollgate_stdio" --concurrency 32 --seconds "$SECS" --label "tollgate-stdio" |
    sed "s/^{/{\"round\":$round,/" | tee -a "$results" >&2
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
by = {(r["round"], r["label"], r["concurrency"]): r for r in rows}
groups = {}
for r in rows:
    groups.setdefault((r["label"], r["concurrency"]), []).append(r)
med = {k: {f: statistics.median(x[f] for x in v) for f in ("rps", "p50_us", "p99_us", "errors")} for k, v in groups.items()}

def vs(label, base, c, fn):
    """The median over rounds of fn(target's row, base's row), each pair from the same round."""
    vals = [fn(r, by[(r["round"], base, c)]) for r in groups[(label, c)] if (r["round"], base, c) in by]
    return statistics.median(vals) if vals else None

def show(v, fmt):
    return fmt.format(v) if v is not None else ""

print("| target | c | calls/s | p50 µs | p99 µs | errors | p50 vs yardstick | p99 vs yardstick | calls/s vs yardstick | calls/s vs direct |")
print("|---|---|---|---|---|---|---|---|---|---|")
order = ["direct", "yardstick", "yardstick-pc", "tollgate", "billed", "hooks", "tollgate-stdio"]
for (label, c) in sorted(med, key=lambda k: (k[1], order.index(k[0]))):
    m = med[(label, c)]
    p50_y = vs(label, "yardstick", c, lambda r, b: r["p50_us"] - b["p50_us"])
    p99_y = vs(label, "yardstick", c, lambda r, b: r["p99_us"] - b["p99_us"])
    tp_y = vs(label, "yardstick", c, lambda r, b: 100 * r["rps"] / b["rps"])
    tp_d = vs(label, "direct", c, lambda r, b: 100 * r["rps"] / b["rps"])
    print(f"| {label} | {c} | {m['rps']:.0f} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['errors']:.0f} | "
          f"{show(p50_y, '{:+.1f} µs')} | {show(p99_y, '{:+.0f} µs')} | {show(tp_y, '{:.0f} %')} | {show(tp_d, '{:.0f} %')} |")
print()
print("| tollgate vs yardstick-pc | c | p50 | p99 | calls/s |")
print("|---|---|---|---|---|")
for c in sorted({k[1] for k in med if k[0] == "yardstick-pc"}):
    if ("tollgate", c) in med:
        p50 = vs("tollgate", "yardstick-pc", c, lambda r, b: r["p50_us"] - b["p50_us"])
        p99 = vs("tollgate", "yardstick-pc", c, lambda r, b: r["p99_us"] - b["p99_us"])
        tp = vs("tollgate", "yardstick-pc", c, lambda r, b: 100 * r["rps"] / b["rps"])
        print(f"| tollgate | {c} | {p50:+.1f} µs | {p99:+.0f} µs | {tp:.0f} % |")
print()
print("| billing chain vs billing off (tollgate) | c | p50 added | calls/s kept |")
print("|---|---|---|---|")
for label in ("billed", "hooks"):
    for c in sorted({k[1] for k in med if k[0] == label}):
        p50 = vs(label, "tollgate", c, lambda r, b: r["p50_us"] - b["p50_us"])
        kept = vs(label, "tollgate", c, lambda r, b: 100 * r["rps"] / b["rps"])
        if p50 is not None:
            print(f"| {label} | {c} | {p50:+.1f} µs | {kept:.0f} % |")
print()
print("Differences and ratios are medians over the rounds of each round's own pair (measured interleaved).")
PY
