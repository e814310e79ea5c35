#!/usr/bin/env bash
# SSE fan-out next to MQTT fan-out on one ternmq (docs/benchmarks.md, "SSE fan-out"):
# 1 publisher (MQTT) -> 100 subscribers, over MQTT and over Server-Sent Events, at QoS 0
# and 1; then the broker's memory per idle SSE stream and per held long poll.
#
#   benches/sse.sh [--rounds N] [--duration S] [--clients N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=3 duration=10 clients=100
while (($#)); do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    *) echo "usage: benches/sse.sh [--rounds N] [--duration S] [--clients N]" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-target}
cargo build --release --bin ternmq --example loadgen
out=$(mktemp -d)
cat > "$out/broker.toml" <<TOML
log_level = "warn"
[[listeners]]
type = "tcp"
bind = "127.0.0.1:18830"
allow_anonymous = true
[[listeners]]
type = "http"
bind = "127.0.0.1:18880"
allow_anonymous = true
[session]
max_inflight_messages = 100
max_queued_messages = 100000
TOML
"$target/release/ternmq" --config "$out/broker.toml" > "$out/broker.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true' EXIT
sleep 0.5
echo "results in $out; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
  for qos in 0 1; do
    for via in mqtt sse; do
      extra=()
      [[ $via == sse ]] && extra=(--sse-port 18880)
      "$target/release/examples/loadgen" fan-out --port 18830 --qos "$qos" --clients "$clients" \
        --duration "$duration" --pid "$broker" --label "$via-q$qos" "${extra[@]}" \
        | tee -a "$out/results.txt" | grep -v '^{' || true
    done
  done
done
python3 benches/sse_idle.py --port 18880 --pid "$broker" --clients 1000 | tee -a "$out/results.txt"
