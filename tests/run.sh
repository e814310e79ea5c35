#!/usr/bin/env bash
# ternmq's test suite, as the README gives it: installs the tools the tests drive (when
# missing), then runs every test target.
#
#   tests/run.sh                     # everything: cargo test --all-targets
#   tests/run.sh --test mosquitto    # with arguments: cargo test <arguments>
#
# Installing uses apt-get (Debian/Ubuntu), through sudo when not root. A tool that cannot
# be installed stops the run with a non-zero exit. The tests check for the tools too: under
# CI=true a missing one fails them instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Commands the tests run, and the Debian package providing each.
missing_commands=()
missing_packages=()

# need <command> <debian package>: install <package> unless <command> is on PATH.
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    missing_commands+=("$1")
    missing_packages+=("$2")
  fi
}

need mosquitto_pub mosquitto-clients # tests/mosquitto.rs
need mosquitto_sub mosquitto-clients
need stdbuf coreutils # line-buffers mosquitto_sub's output
need openssl openssl   # src/transport/tls.rs tests: the docs' test-CA recipe and s_client
need curl curl         # tests/http.rs: SSE with curl -N, HTTP/2 over TLS
need mosquitto_passwd mosquitto # password files in mosquitto's format (security::password, tests/cli.rs, tests/security.rs)
# The mosquitto broker itself (tests/security.rs runs the same acl_file in it): same
# package, in /usr/sbin, which a user's PATH may not hold.
if [[ ! -x /usr/sbin/mosquitto ]] && ! command -v mosquitto >/dev/null 2>&1; then
  missing_commands+=(mosquitto)
  missing_packages+=(mosquitto)
fi
need prlimit util-linux # tests/security.rs: the broker binary with a low open-file limit
need chromium chromium # tests/websocket.rs browser test: headless Chromium driven by playwright-core
need node nodejs       # tests/browser/run.js (playwright-core wants Node >= 20)
need npm npm
need nats-server nats-server # tests/cluster.rs: a 3-server NATS cluster with JetStream
need promtool prometheus # tests/observe.rs: checks /metrics with Prometheus's own checker

install_missing() {
  ((${#missing_packages[@]})) || return 0
  local packages
  mapfile -t packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)
  echo "tests/run.sh: not found: ${missing_commands[*]}; installing: ${packages[*]}"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "tests/run.sh: not root and no sudo: install ${packages[*]} yourself" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: no apt-get: install ${packages[*]} yourself" >&2
    exit 1
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${packages[@]}"
  local cmd
  for cmd in "${missing_commands[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$cmd ]]; then
      echo "tests/run.sh: $cmd is still missing after installing ${packages[*]}" >&2
      exit 1
    fi
  done
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "tests/run.sh: cargo not found: install Rust (https://rustup.rs)" >&2
  exit 1
fi
install_missing

# The browser test's npm packages (playwright-core, mqtt.js), as tests/browser/package-lock.json pins them.
echo "+ (cd tests/browser && npm ci)"
(cd tests/browser && npm ci --no-audit --no-fund)

# --all-targets: unit tests, integration tests (tests/*.rs), benches and examples built
# and run as tests. The library has no doc examples yet: add `cargo test --doc` with them.
args=("$@")
((${#args[@]})) || args=(--all-targets)
echo "+ cargo test ${args[*]}"
cargo test "${args[@]}"
