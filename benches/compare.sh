#!/usr/bin/env bash
# Runs the load generator against ternmq, mosquitto and rumqttd on this machine and
# prints a markdown table (docs/benchmarks.md explains it).
#
#   benches/compare.sh            # full: 3 rounds, 10 s per run, 10,000 idle connections
#   benches/compare.sh --quick    # 1 round, 3 s per run, 2,000 idle connections
#
# Options: --rounds N, --duration S, --idle N (connections), --brokers "ternmq mosquitto",
# ("ternmq-observed" is ternmq with $SYS every second and /metrics scraped every second,
# for measuring their overhead: --brokers "ternmq ternmq-observed"; "ternmq-base" is the
# ternmq binary at $TERNMQ_BASE, e.g. a build of main, for before/after comparisons:
# --brokers "ternmq ternmq-base"; "ternmq-1t" is ternmq on one worker thread),
# --only REGEX (scenario names, e.g. 'fanin|p2p'), --out DIR (keeps configs, logs and
# results there; default a fresh /tmp/ternmq-bench.* directory).
#
# Needs: cargo, python3; installs mosquitto (apt-get) and rumqttd (cargo install, into
# ${TERNMQ_BENCH_CACHE:-~/.cache/ternmq-bench}) when missing. Builds in release into
# ${CARGO_TARGET_DIR:-target}. Brokers listen on 127.0.0.1:18830-18835.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3
DURATION=10
IDLE=10000
IDLE_HOLD=3
BROKERS="ternmq mosquitto rumqttd"
ONLY=""
OUT=""
RUMQTTD_VERSION=0.20.0
# Outgoing QoS 1/2 window per client, the same for all three (rumqttd's is fixed at 100).
INFLIGHT=100
QUEUED=100000

die() {
  echo "compare.sh: $*" >&2
  exit 2
}

while (($#)); do
  case $1 in
  --quick) ROUNDS=1 DURATION=3 IDLE=2000 IDLE_HOLD=1 ;;
  --rounds) ROUNDS=${2:?} && shift ;;
  --duration) DURATION=${2:?} && shift ;;
  --idle) IDLE=${2:?} && shift ;;
  --brokers) BROKERS=${2:?} && shift ;;
  --only) ONLY=${2:?} && shift ;;
  --out) OUT=${2:?} && shift ;;
  -h | --help)
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

# name | loadgen arguments (port, pid, duration and label are added per run)
SCENARIOS=(
  "fanin-q0|fan-in --qos 0 --clients 100"
  "fanin-q1|fan-in --qos 1 --clients 100"
  "fanout-q0|fan-out --qos 0 --clients 100"
  "fanout-q1|fan-out --qos 1 --clients 100"
  "p2p-q0|p2p --qos 0 --clients 100"
  "p2p-q1|p2p --qos 1 --clients 100"
  "p2p-q2|p2p --qos 2 --clients 10"
  "latency-q0|latency --qos 0 --clients 10 --rate 5000"
  "latency-q1|latency --qos 1 --clients 10 --rate 5000"
  # 8 publishers, each at most 1,000 messages ahead of the one subscriber, one message
  # per write as client libraries do; and 50 pairs the same way (issue 12's shapes).
  "fanin8-q0|fan-in --qos 0 --clients 8 --window 1000 --batch 1"
  "fanin8-q1|fan-in --qos 1 --clients 8 --window 1000 --batch 1"
  "p2p50-q1|p2p --qos 1 --clients 50 --batch 1"
  # A second latency point, near mosquitto's saturation.
  "latency50k-q0|latency --qos 0 --clients 10 --rate 50000"
  "latency50k-q1|latency --qos 1 --clients 10 --rate 50000"
  # 10,000 devices (QoS 1 telemetry, 10 command subscriptions each), 100 dashboards on
  # wildcards: saturation, then half of the publish rate it reached (@HALF@). A global
  # dashboard's queue holds up to 10,000 × 5 messages at saturation: seconds, not stalls.
  # One message per write, as a device sends it: the paced run at half the rate then
  # costs the broker what the saturated one did per message.
  "iot-sat|iot --qos 1 --clients 10000 --window 5 --batch 1 --stall 30"
  "iot-half|iot --qos 1 --clients 10000 --window 5 --batch 1 --stall 30 --rate @HALF@"
)
# Idle runs last, each on a freshly started broker: memory a process kept from earlier
# load (allocator caches) would otherwise hide what connections cost.
IDLE_ARGS="idle --clients $IDLE"

OUT=${OUT:-$(mktemp -d /tmp/ternmq-bench.XXXXXX)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
CACHE=${TERNMQ_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ternmq-bench}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

# 10,000 connections need as many descriptors in the generator and in each broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < IDLE + 200)); then
  echo "compare.sh: open-file limit $(ulimit -n) is below $IDLE connections; lowering" >&2
  IDLE=$(($(ulimit -n) - 200))
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

echo "== building ternmq and the load generator (release, $TARGET)"
(cd "$ROOT" && cargo build --release --bin ternmq --example loadgen)
TERNMQ=$TARGET/release/ternmq
LOADGEN=$TARGET/release/examples/loadgen
if [[ " $BROKERS " == *" ternmq-base "* && ! -x ${TERNMQ_BASE:-} ]]; then
  die "ternmq-base needs TERNMQ_BASE=path/to/another/ternmq binary"
fi

need_broker() { [[ " $BROKERS " == *" $1 "* ]]; }

MOSQUITTO=""
if need_broker mosquitto; then
  if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
    echo "== installing mosquitto"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto
  fi
  MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi

RUMQTTD=""
if need_broker rumqttd; then
  RUMQTTD=$CACHE/rumqttd/bin/rumqttd
  if [[ ! -x $RUMQTTD ]]; then
    echo "== installing rumqttd $RUMQTTD_VERSION into $CACHE/rumqttd (a few minutes)"
    # Not --locked: its lock file pins metrics 0.22.1, which newer compilers reject.
    cargo install rumqttd --version "$RUMQTTD_VERSION" --no-default-features \
      --root "$CACHE/rumqttd"
  fi
fi

cat >"$OUT/ternmq.toml" <<EOF
log_level = "warn"
sys_interval = 0
[[listeners]]
type = "tcp"
bind = "127.0.0.1:18830"
allow_anonymous = true
[mqtt]
receive_maximum = $INFLIGHT
[session]
max_inflight_messages = $INFLIGHT
max_queued_messages = $QUEUED
EOF

# The same with everything that watches it on: $SYS every second, and an admin listener
# whose /metrics is scraped every second while the broker runs.
ADMIN_PORT=18839
ADMIN_TOKEN=bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
sed -e 's/^sys_interval = 0/sys_interval = 1/' -e 's/18830/18833/' "$OUT/ternmq.toml" >"$OUT/ternmq-observed.toml"
cat >>"$OUT/ternmq-observed.toml" <<EOF
[[listeners]]
type = "admin"
bind = "127.0.0.1:$ADMIN_PORT"
token = "$ADMIN_TOKEN"
EOF

# Another ternmq binary (TERNMQ_BASE) with the same settings, and ternmq on one thread.
sed -e 's/18830/18834/' "$OUT/ternmq.toml" >"$OUT/ternmq-base.toml"
sed -e 's/18830/18835/' "$OUT/ternmq.toml" >"$OUT/ternmq-1t.toml"

cat >"$OUT/mosquitto.conf" <<EOF
listener 18831 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages $INFLIGHT
max_queued_messages $QUEUED
set_tcp_nodelay true
sys_interval 0
log_dest stderr
log_type error
log_type warning
EOF

# rumqttd keeps a commit log per filter: 10 segments of 10 MiB (the sample config has
# 100 MiB ones) bound its memory to 100 MiB per filter.
cat >"$OUT/rumqttd.toml" <<EOF
id = 0
[router]
id = 0
max_connections = 30000
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:18832"
next_connection_delay_ms = 0
  [v4.1.connections]
  connection_timeout_ms = 60000
  max_payload_size = 20480
  max_inflight_count = $INFLIGHT
  dynamic_filters = true
EOF

declare -A PID PORT
PORT=([ternmq]=18830 [mosquitto]=18831 [rumqttd]=18832 [ternmq-observed]=18833
  [ternmq-base]=18834 [ternmq-1t]=18835)
SCRAPER=""

cleanup() {
  local b
  [[ -n $SCRAPER ]] && kill "$SCRAPER" 2>/dev/null
  for b in "${!PID[@]}"; do
    kill "${PID[$b]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

stop_broker() {
  local b=$1
  if [[ $b == ternmq-observed && -n $SCRAPER ]]; then
    kill "$SCRAPER" 2>/dev/null || true
    wait "$SCRAPER" 2>/dev/null || true
    SCRAPER=""
  fi
  kill "${PID[$b]}" 2>/dev/null || true
  wait "${PID[$b]}" 2>/dev/null || true
  unset "PID[$b]"
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_broker() {
  local b=$1
  if listening "${PORT[$b]}"; then
    die "port ${PORT[$b]} (for $b) is already in use: stop whatever listens there"
  fi
  case $b in
  ternmq) "$TERNMQ" --config "$OUT/ternmq.toml" >"$OUT/ternmq.log" 2>&1 & ;;
  ternmq-observed) "$TERNMQ" --config "$OUT/ternmq-observed.toml" >"$OUT/ternmq-observed.log" 2>&1 & ;;
  ternmq-base) "$TERNMQ_BASE" --config "$OUT/ternmq-base.toml" >"$OUT/ternmq-base.log" 2>&1 & ;;
  ternmq-1t) TOKIO_WORKER_THREADS=1 "$TERNMQ" --config "$OUT/ternmq-1t.toml" >"$OUT/ternmq-1t.log" 2>&1 & ;;
  mosquitto) "$MOSQUITTO" -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 & ;;
  rumqttd) "$RUMQTTD" -q -c "$OUT/rumqttd.toml" >"$OUT/rumqttd.log" 2>&1 & ;;
  *) die "unknown broker $b" ;;
  esac
  PID[$b]=$!
  for _ in $(seq 100); do
    if listening "${PORT[$b]}"; then
      [[ $b == ternmq-observed ]] && start_scraper "${PID[$b]}"
      return 0
    fi
    kill -0 "${PID[$b]}" 2>/dev/null || die "$b exited at start: $(tail -5 "$OUT/$b.log")"
    sleep 0.1
  done
  die "$b does not listen on ${PORT[$b]}"
}

# Scrapes ternmq-observed's /metrics every second (as Prometheus would) while it runs.
start_scraper() {
  local pid=$1
  (
    while kill -0 "$pid" 2>/dev/null; do
      curl -sf -o /dev/null -H "Authorization: Bearer $ADMIN_TOKEN" \
        "http://127.0.0.1:$ADMIN_PORT/metrics" || echo "scrape failed" >>"$OUT/scrape.err"
      sleep 1
    done
  ) &
  SCRAPER=$!
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

for b in $BROKERS; do
  start_broker "$b"
done
sleep 1
for b in $BROKERS; do
  echo "{\"type\":\"rss\",\"broker\":\"$b\",\"round\":0,\"rss_kb\":$(rss_kb "${PID[$b]}")}" >>"$RESULTS"
done

versions() {
  local v
  v="ternmq $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  [[ -n $MOSQUITTO ]] && v+="; $("$MOSQUITTO" -h 2>/dev/null | head -1 | sed 's/ (.*//')"
  [[ -n $RUMQTTD ]] && v+="; rumqttd $RUMQTTD_VERSION"
  echo "$v"
}

{
  echo "{\"type\":\"meta\",\"date\":\"$(date -u +%Y-%m-%dT%H:%MZ)\",\"commit\":\"$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\","
  echo "\"cores\":$(nproc),\"memory_gib\":$(awk '/MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo),"
  echo "\"cpu\":\"$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)\","
  echo "\"load_before\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"rounds\":$ROUNDS,\"duration\":$DURATION,"
  echo "\"versions\":\"$(versions)\",\"inflight\":$INFLIGHT,\"queued\":$QUEUED}"
} | tr -d '\n' >>"$RESULTS"
echo >>"$RESULTS"

# run_one BROKER ROUND NAME DURATION ARGS...: one loadgen run, its JSON line kept.
run_one() {
  local b=$1 round=$2 name=$3 duration=$4 line human json
  shift 4
  kill -0 "${PID[$b]}" 2>/dev/null || die "$b died; see $OUT/$b.log"
  line=$("$LOADGEN" "$@" --port "${PORT[$b]}" --pid "${PID[$b]}" --duration "$duration" \
    --label "$b|$round|$name" 2>>"$OUT/loadgen.err") || true
  human=$(head -1 <<<"$line")
  json=$(grep '^{' <<<"$line" || true)
  if [[ -z $json ]]; then
    json="{\"label\":\"$b|$round|$name\",\"ok\":false,\"error\":\"no result; see loadgen.err\"}"
    human="(no result: $(tail -1 "$OUT/loadgen.err"))"
  fi
  echo "$json" >>"$RESULTS"
  LAST_JSON=$json
  printf 'round %s %-10s %-9s %s\n' "$round" "$name" "$b" "$human"
}

# Half of the publish rate in a JSON result (0 if none).
half_rate() {
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(int((r.get("publish_rate") or 0) / 2) if r.get("ok") else 0)' "$1" 2>/dev/null || echo 0
}
declare -A HALF
LAST_JSON=""

echo "== results: $RESULTS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
for round in $(seq "$ROUNDS"); do
  for entry in "${SCENARIOS[@]}"; do
    name=${entry%%|*}
    [[ -n $ONLY && ! $name =~ $ONLY ]] && continue
    for b in $BROKERS; do
      # rumqttd 0.20 delivered nothing in iot-sat (10,000 devices; "no-connection id .. is
      # already gone" in its log) and then kept a core busy for minutes, skewing every run
      # after it: left out of the IoT scenario.
      if [[ $b == rumqttd && $name == iot-* ]]; then
        echo "round $round $name $b: skipped (see the comment in compare.sh)"
        continue
      fi
      args=${entry#*|}
      if [[ $args == *@HALF@* ]]; then
        if ((${HALF[$b]:-0} == 0)); then
          echo "round $round $name $b: skipped (no saturation run to halve)"
          continue
        fi
        args=${args//@HALF@/${HALF[$b]}}
      fi
      # shellcheck disable=SC2086 # the scenario's arguments, split on purpose
      run_one "$b" "$round" "$name" "$DURATION" $args
      [[ $name == iot-sat ]] && HALF[$b]=$(half_rate "$LAST_JSON")
    done
  done
  sleep 2
  for b in $BROKERS; do
    echo "{\"type\":\"rss\",\"broker\":\"$b\",\"round\":$round,\"rss_kb\":$(rss_kb "${PID[$b]}")}" >>"$RESULTS"
  done
done

if [[ -z $ONLY || idle =~ $ONLY ]]; then
  for round in $(seq "$ROUNDS"); do
    for b in $BROKERS; do
      stop_broker "$b"
      start_broker "$b"
      sleep 1
      # shellcheck disable=SC2086
      run_one "$b" "$round" idle "$IDLE_HOLD" $IDLE_ARGS
    done
  done
fi
echo "{\"type\":\"end\",\"load_after\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$RESULTS"

echo
python3 "$ROOT/benches/report.py" "$RESULTS" | tee "$OUT/table.md"
echo
echo "== configs, logs and results kept in $OUT"
