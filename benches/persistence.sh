#!/usr/bin/env bash
# QoS 1 delivery to persistent sessions (Clean Session 0) per durability mode: ternmq with
# sync = always, interval and never, ternmq in memory (persistence off), and mosquitto with
# `persistence true`, on the same load generator (docs/benchmarks.md, "Persistence").
#
#   benches/persistence.sh            # 3 rounds, 10 s per run
#   benches/persistence.sh --quick    # 1 round, 3 s per run
#
# Options: --rounds N, --duration S, --only REGEX (scenario names), --out DIR (keeps
# configs, logs, data directories and results; default a fresh /tmp/ternmq-persist.*).
#
# Needs: cargo, python3, mosquitto (installed with apt-get when missing). Brokers listen
# on 127.0.0.1:18840-18844; the data directories are in --out, so put it on the disk to
# measure (a tmpfs /tmp makes fsync free).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3
DURATION=10
ONLY=""
OUT=""
INFLIGHT=100
QUEUED=100000

die() {
  echo "persistence.sh: $*" >&2
  exit 2
}

while (($#)); do
  case $1 in
  --quick) ROUNDS=1 DURATION=3 ;;
  --rounds) ROUNDS=${2:?} && shift ;;
  --duration) DURATION=${2:?} && shift ;;
  --only) ONLY=${2:?} && shift ;;
  --out) OUT=${2:?} && shift ;;
  -h | --help)
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

# name | loadgen arguments (port, pid, duration and label are added per run)
SCENARIOS=(
  "p2p-q1|p2p --qos 1 --clients 100 --persistent"
  "fanin-q1|fan-in --qos 1 --clients 100 --persistent"
  "latency-q1|latency --qos 1 --clients 10 --rate 5000 --persistent"
)
BROKERS="memory always interval never mosquitto"

OUT=${OUT:-$(mktemp -d /tmp/ternmq-persist.XXXXXX)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

echo "== building ternmq and the load generator (release, $TARGET)"
(cd "$ROOT" && cargo build --release --bin ternmq --example loadgen)
TERNMQ=$TARGET/release/ternmq
LOADGEN=$TARGET/release/examples/loadgen
if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
  echo "== installing mosquitto"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

declare -A PID PORT
PORT=([memory]=18840 [always]=18841 [interval]=18842 [never]=18843 [mosquitto]=18844)

for b in memory always interval never; do
  enabled=true
  [[ $b == memory ]] && enabled=false
  mkdir -p "$OUT/$b"
  cat >"$OUT/$b.toml" <<EOF
log_level = "warn"
[[listeners]]
type = "tcp"
bind = "127.0.0.1:${PORT[$b]}"
allow_anonymous = true
[mqtt]
receive_maximum = $INFLIGHT
[session]
max_inflight_messages = $INFLIGHT
max_queued_messages = $QUEUED
[persistence]
enabled = $enabled
dir = "$OUT/$b/data"
sync = "${b/memory/interval}"
EOF
done

# mosquitto keeps everything in memory and writes it all out at autosave_interval (1800 s
# by default) and at shutdown: between those, a crash loses everything since the last save.
mkdir -p "$OUT/mosquitto"
cat >"$OUT/mosquitto.conf" <<EOF
listener ${PORT[mosquitto]} 127.0.0.1
allow_anonymous true
persistence true
persistence_location $OUT/mosquitto/
max_inflight_messages $INFLIGHT
max_queued_messages $QUEUED
set_tcp_nodelay true
sys_interval 0
log_dest stderr
log_type error
log_type warning
EOF

cleanup() {
  local b
  for b in "${!PID[@]}"; do
    kill "${PID[$b]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_broker() {
  local b=$1
  listening "${PORT[$b]}" && die "port ${PORT[$b]} (for $b) is already in use"
  case $b in
  mosquitto) "$MOSQUITTO" -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 & ;;
  *) "$TERNMQ" --config "$OUT/$b.toml" >"$OUT/$b.log" 2>&1 & ;;
  esac
  PID[$b]=$!
  for _ in $(seq 100); do
    listening "${PORT[$b]}" && return 0
    kill -0 "${PID[$b]}" 2>/dev/null || die "$b exited at start: $(tail -5 "$OUT/$b.log")"
    sleep 0.1
  done
  die "$b does not listen on ${PORT[$b]}"
}

written() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }

for b in $BROKERS; do
  start_broker "$b"
done
sleep 1

{
  echo "{\"type\":\"meta\",\"date\":\"$(date -u +%Y-%m-%dT%H:%MZ)\",\"commit\":\"$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\","
  echo "\"cores\":$(nproc),\"cpu\":\"$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)\","
  echo "\"filesystem\":\"$(df -T "$OUT" | awk 'NR==2 {print $2}')\","
  echo "\"load_before\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"rounds\":$ROUNDS,\"duration\":$DURATION,"
  echo "\"mosquitto\":\"$("$MOSQUITTO" -h 2>/dev/null | head -1 | sed 's/ (.*//')\"}"
} | tr -d '\n' >>"$RESULTS"
echo >>"$RESULTS"

echo "== results: $RESULTS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
for round in $(seq "$ROUNDS"); do
  for entry in "${SCENARIOS[@]}"; do
    name=${entry%%|*}
    [[ -n $ONLY && ! $name =~ $ONLY ]] && continue
    for b in $BROKERS; do
      kill -0 "${PID[$b]}" 2>/dev/null || die "$b died; see $OUT/$b.log"
      before=$(written "${PID[$b]}")
      # shellcheck disable=SC2086 # the scenario's arguments, split on purpose
      line=$("$LOADGEN" ${entry#*|} --port "${PORT[$b]}" --pid "${PID[$b]}" \
        --duration "$DURATION" --label "$b|$round|$name" 2>>"$OUT/loadgen.err") || true
      after=$(written "${PID[$b]}")
      json=$(grep '^{' <<<"$line" || echo "{\"label\":\"$b|$round|$name\",\"ok\":false}")
      echo "${json%\}},\"written_bytes\":$((after - before))}" >>"$RESULTS"
      printf 'round %s %-10s %-9s %s (wrote %s B)\n' "$round" "$name" "$b" "$(head -1 <<<"$line")" "$((after - before))"
    done
  done
done
echo "{\"type\":\"end\",\"load_after\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$RESULTS"

echo
python3 - "$RESULTS" <<'EOF' | tee "$OUT/table.md"
import json, statistics, sys
from collections import defaultdict

runs, meta, end = defaultdict(list), {}, {}
for line in open(sys.argv[1], encoding="utf-8"):
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        continue
    if r.get("type") == "meta":
        meta = r
    elif r.get("type") == "end":
        end = r
    elif r.get("label", "").count("|") == 2:
        broker, _, name = r["label"].split("|")
        runs[(name, broker)].append(r)

def med(rs, key):
    v = [r.get(key) for r in rs if r.get(key) is not None]
    return statistics.median(v) if v else None

def rate(v):
    return "–" if v is None else (f"{v / 1e3:.1f} k" if v >= 1e3 else f"{v:.0f}")

def us(v):
    return "–" if v is None else (f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms")

names = {"memory": "ternmq, in memory", "always": "ternmq, `always`", "interval": "ternmq, `interval`",
         "never": "ternmq, `never`", "mosquitto": "mosquitto, `persistence true`"}
print(f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}, {meta.get('cores', '?')} cores, "
      f"{meta.get('filesystem', '?')}, {meta.get('mosquitto', '')}; load {meta.get('load_before', '?')} "
      f"before, {end.get('load_after', '?')} after; median of {meta.get('rounds', '?')} rounds of "
      f"{meta.get('duration', '?')} s")
for name in sorted({n for n, _ in runs}):
    print(f"\n{name} (persistent subscribers):\n")
    print("| broker | received msg/s | p50 | p99 | bytes written per message | failed runs |")
    print("|---|---|---|---|---|---|")
    for b in ["memory", "always", "interval", "never", "mosquitto"]:
        rs = runs.get((name, b), [])
        if not rs:
            continue
        per = [r["written_bytes"] / r["received"] for r in rs if r.get("received")]
        failed = sum(1 for r in rs if not r.get("ok"))
        print(f"| {names[b]} | {rate(med(rs, 'receive_rate'))} | {us(med(rs, 'p50_us'))} | "
              f"{us(med(rs, 'p99_us'))} | {statistics.median(per) if per else 0:.0f} | {failed} |")
EOF
echo
echo "== configs, logs, data and results kept in $OUT"
