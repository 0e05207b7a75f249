# Shared by the benchmark scripts (sourced; they set $work, a scratch directory).

# start NAME CMD... : runs CMD in the background and prints the URL it announces on stdout
# ("listening on http://..."), waiting up to two minutes (a million-key gateway loads for seconds).
# It runs in a $(...) subshell, so the pid goes to $work/NAME.pid for cleanup.
start() {
  local name=$1; shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  echo $! >"$work/$name.pid"
  for _ in $(seq 1 1200); do
    if grep -qs "listening on " "$work/$name.out"; then
      grep -o "http://[^ ]*" "$work/$name.out" | head -1
      return
    fi
    sleep 0.1
  done
  echo "$name did not start:" >&2; cat "$work/$name.err" >&2; exit 1
}

# Stops everything start() started.
stop_all() { for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; true; }

# Stops everything and deletes the scratch directory (databases, journals and logs: hundreds of MB
# a run), unless KEEP=1 asks to keep it for a look. The scripts trap it on exit.
finish() {
  stop_all
  if [ -n "${KEEP:-}" ]; then echo "scratch directory kept: $work" >&2; else rm -rf "$work"; fi
}

# new_key MCP_URL ADMIN_KEY : creates a key with 10^12 credits on that gateway and prints its secret.
new_key() {
  curl -sf -X POST "${1%/mcp}/admin/keys" -H "x-admin-key: $2" -H 'content-type: application/json' \
    -d '{"name":"bench","credits":1000000000000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

# quiet : waits (up to 10 s) until the machine has been at least 90 % idle for 0.2 s, so that the
# last measurement's after-work (a gateway's writer committing, a checkpoint, webhook deliveries
# catching up) does not run inside the next one.
cpu_idle_total() { awk '/^cpu /{print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
quiet() {
  local a b
  for _ in $(seq 1 50); do
    a=$(cpu_idle_total); sleep 0.2; b=$(cpu_idle_total)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x); split(b, y); exit !((y[1] - x[1]) >= 0.9 * (y[2] - x[2])) }' && return
  done
  true
}

# hooks_config FIXTURE_URL SINK_URL ADMIN_KEY [DATA_DIR] : the config of a billed gateway in front
# of the fixture with two webhook destinations on the sink (`hooks` in bench/run.sh and
# bench/cpu.sh), its database in DATA_DIR (default $work/hooks-data). HOOKS_BATCH: each
# destination's batch_size (the gateway's default, 100, if unset).
hooks_config() {
  local batch=${HOOKS_BATCH:+batch_size = $HOOKS_BATCH}
  cat <<TOML
[upstream]
url = "$1"
[billing]
admin_key = "$3"
data_dir = "${4:-$work/hooks-data}"
[[webhooks]]
name = "one"
url = "${2}hook"
secret = "bench-webhook-secret-0123456789"
allow_networks = ["127.0.0.0/8"]
$batch
[[webhooks]]
name = "two"
url = "${2}other"
secret = "bench-webhook-secret-9876543210"
allow_networks = ["127.0.0.0/8"]
$batch
TOML
}
