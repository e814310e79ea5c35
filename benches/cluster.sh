#!/usr/bin/env bash
# Cross-node throughput and latency of a 3-node ternmq cluster (publishers on node a,
# subscribers on node b) against a single node, on this machine (docs/benchmarks.md,
# "Cluster"). Needs nats-server and python3. DUR=seconds per run (default 5).
#
# Prints one line per run: setup, scenario, QoS, messages received per second, latency
# p50/p99, lost, duplicates, and the CPU time per received message of the ternmq process(es)
# and of the nats-servers (from /proc).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --bin ternmq --example loadgen
DUR=${DUR:-5}
LG=target/release/examples/loadgen
work=$(mktemp -d)
pids=()
stop() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null || true
  pids=()
}
trap 'stop; rm -rf "$work"' EXIT

limits='[session]
max_inflight_messages = 100
max_queued_messages = 100000
[mqtt]
receive_maximum = 100'

wait_port() {
  for _ in $(seq 1 300); do
    (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}

# CPU seconds (user + system) of the given processes.
cpu() {
  local total=0 pid
  for pid in "$@"; do
    [[ -r /proc/$pid/stat ]] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}

run() { # <label> <scenario> <qos> <ternmq pids> <nats pids> <loadgen args...>
  local label=$1 scenario=$2 qos=$3 tpids=$4 npids=$5
  shift 5
  local extra=()
  [[ $scenario == latency ]] && extra=(--rate 5000)
  local t0 n0 out
  t0=$(cpu $tpids)
  n0=$(cpu $npids)
  out=$("$LG" "$scenario" --qos "$qos" --clients 10 --duration "$DUR" "${extra[@]}" "$@" | tail -n 1)
  python3 - "$label" "$scenario" "$qos" "$t0" "$(cpu $tpids)" "$n0" "$(cpu $npids)" "$(getconf CLK_TCK)" "$out" <<'PY'
import json, sys
label, scenario, qos, t0, t1, n0, n1, tck, line = sys.argv[1:]
r = json.loads(line)
got = max(r["unique"], 1)
per = lambda a, b: (int(b) - int(a)) / int(tck) / got * 1e6
print(f'{label:7} {scenario:8} q{qos} {r["receive_rate"]:>11,.0f} msg/s  p50 {r["p50_us"]:>6} µs  p99 {r["p99_us"]:>7} µs  '
      f'lost {r["lost"]} dup {r["duplicates"]}  cpu/msg ternmq {per(t0, t1):6.1f} µs  nats {per(n0, n1):6.1f} µs')
PY
}

runs() { # <label> <ternmq pids> <nats pids> <loadgen args...>
  local label=$1 tpids=$2 npids=$3
  shift 3
  for qos in 0 1; do
    for scenario in fan-in fan-out p2p latency; do
      run "$label" "$scenario" "$qos" "$tpids" "$npids" "$@"
    done
  done
}

# One node.
cat >"$work/single.toml" <<CONF
[[listeners]]
type = "tcp"
bind = "127.0.0.1:18830"
allow_anonymous = true
$limits
CONF
target/release/ternmq --config "$work/single.toml" >"$work/single.log" 2>&1 &
single=$!
pids+=($single)
wait_port 18830
runs single "$single" "" --port 18830
stop

# Three nodes: publishers on a (1883), subscribers on b (1884).
DATA="$work/cluster" NODE_TOML="$limits" TERNMQ=target/release/ternmq examples/cluster/run.sh >"$work/cluster.log" 2>&1 &
runner=$!
pids+=($runner)
for port in 1883 1884 1885; do wait_port "$port"; done
children=$(pgrep -P "$runner" | tr '\n' ' ')
tpids="" npids=""
for pid in $children; do
  case $(cat "/proc/$pid/comm") in
    ternmq) tpids+="$pid " ;;
    nats-server) npids+="$pid " ;;
  esac
done
runs cluster "$tpids" "$npids" --port 1883 --sub-port 1884 --settle-ms 500
