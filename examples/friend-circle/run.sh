#!/usr/bin/env bash
# Starts the friend-circle example: ternmq (http listener on 127.0.0.1:8080) and the app
# server (http://127.0.0.1:3000). Ctrl-C stops both.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."
command -v node >/dev/null || { echo "run.sh: Node.js (>= 20) is needed" >&2; exit 1; }
[[ -d "$here/node_modules/mqtt" ]] || (cd "$here" && npm ci --no-audit --no-fund)
cargo build --release
./target/release/ternmq --config "$here/broker.toml" &
broker=$!
trap 'kill "$broker" 2>/dev/null' EXIT
node "$here/server.js"
