#!/usr/bin/env bash
# Cross-node throughput and latency of a 3-node ternmq cluster (publishers on node a,
# subscribers on node b) against a single node, on this machine (docs/benchmarks.md,
# "Cluster"). Needs nats-server. Prints the loadgen lines; DUR=seconds per run (5).
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
  for _ in $(seq 1 200); do
    (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}

runs() { # <label> <loadgen args...>
  local label=$1
  shift
  for qos in 0 1; do
    for scenario in fan-in fan-out p2p; do
      echo "== $label $scenario q$qos"
      "$LG" "$scenario" --qos "$qos" --clients 10 --duration "$DUR" "$@" | tail -n 2 | head -n 1
    done
    echo "== $label latency q$qos"
    "$LG" latency --qos "$qos" --clients 10 --rate 5000 --duration "$DUR" "$@" | tail -n 2 | head -n 1
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
pids+=($!)
wait_port 18830
runs single --port 18830
stop

# Three nodes: publishers on a (1883), subscribers on b (1884).
DATA="$work/cluster" NODE_TOML="$limits" TERNMQ=target/release/ternmq examples/cluster/run.sh >"$work/cluster.log" 2>&1 &
pids+=($!)
for port in 1883 1884 1885; do wait_port "$port"; done
runs cluster --port 1883 --sub-port 1884 --settle-ms 500
