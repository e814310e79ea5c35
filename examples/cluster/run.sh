#!/usr/bin/env bash
# A 3-node ternmq cluster on one machine, with one command (docs/cluster.md): three
# nats-servers with JetStream, clustered with each other, and three ternmq nodes.
#
#   examples/cluster/run.sh            # runs until Ctrl-C
#
# MQTT on 127.0.0.1:1883 (node a), 1884 (b), 1885 (c); NATS clients on 4222-4224, NATS
# routes on 6222-6224. State and logs under ./cluster-data (DATA=... to move it); delete
# that directory to start afresh. TERNMQ=path/to/ternmq to use another binary (default:
# target/release/ternmq, built if missing). NODE_TOML=... adds lines to every node's
# configuration (benches/cluster.sh sets the benchmark limits with it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DATA=$(mkdir -p "${DATA:-cluster-data}" && cd "${DATA:-cluster-data}" && pwd)
BIN=${TERNMQ:-target/release/ternmq}
if ! command -v nats-server >/dev/null 2>&1; then
  echo "nats-server not found: apt-get install nats-server" >&2
  exit 1
fi
[[ -x $BIN ]] || cargo build --release --bin ternmq

pids=()
stop() {
  trap - EXIT INT TERM
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
}
trap stop EXIT INT TERM

routes="nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224"
for i in 0 1 2; do
  cat >"$DATA/nats$i.conf" <<CONF
server_name: nats$i
listen: 127.0.0.1:$((4222 + i))
jetstream { store_dir: "$DATA/nats$i" }
cluster { name: ternmq-demo, listen: 127.0.0.1:$((6222 + i)), routes: [$routes] }
CONF
  nats-server -c "$DATA/nats$i.conf" >"$DATA/nats$i.log" 2>&1 &
  pids+=($!)
done

nodes=(a b c)
for i in 0 1 2; do
  node=${nodes[$i]}
  # Each node lists every NATS server, its own first.
  urls=()
  for j in 0 1 2; do urls+=("\"nats://127.0.0.1:$((4222 + (i + j) % 3))\""); done
  cat >"$DATA/$node.toml" <<CONF
[[listeners]]
type = "tcp"
bind = "127.0.0.1:$((1883 + i))"
allow_anonymous = true

[cluster]
name = "demo"
node = "$node"
nats = [$(IFS=,; echo "${urls[*]}")]
replicas = 3
${NODE_TOML:-}
CONF
  # A node waits (and retries) until JetStream has elected its leaders.
  "$BIN" --config "$DATA/$node.toml" >"$DATA/$node.log" 2>&1 &
  pids+=($!)
done

echo "ternmq cluster: MQTT on 127.0.0.1:1883 (a), :1884 (b), :1885 (c); logs in $DATA"
echo "try: mosquitto_sub -p 1884 -t 'demo/#' -v   and   mosquitto_pub -p 1883 -t demo/1 -m hello"
echo "Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process ended; stopping the cluster (see the logs in $DATA)" >&2
