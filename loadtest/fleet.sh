#!/usr/bin/env bash
# A fleet of update agents against the demo's relay (origin <- relay on
# loopback, a critical pattern component with versions 171-175, a patch and an
# installer). Each agent polls the manifest, asks for a plan when behind,
# downloads the steps (deltas or the full file), cuts some downloads part way
# and resumes them with Range + If-Range, and checks every step's SHA-256.
#
#   loadtest/fleet.sh                              # 5,000 agents for 60 s, 3 processes
#   AGENTS=15000 PROCESSES=3 loadtest/fleet.sh     # spread over processes: 20,000 fds each at most
#   RATE=500 loadtest/fleet.sh                     # open loop: 500 new agents a second
#
# Prints the merged JSON report: requests, bytes, latency percentiles, errors by
# kind, corrupt deliveries (must be 0) and Jain's fairness over agents.
#
# Needs: curl, python3, and release builds:
#   cargo build --release && cargo build --release -p patchrelay-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-5000}
RATE=${RATE:-}
DURATION=${DURATION:-60}
POLL=${POLL:-5}
PROCESSES=${PROCESSES:-3}
BIN=${BIN:-target/release/patchrelay}
LOAD=${LOAD:-target/release/patchrelay-load}
for t in curl python3 "$BIN" "$LOAD"; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing: $t" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/patchrelay-fleet.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

PATCHRELAY_LOG=warn "$BIN" demo --dir "$work/demo" --port "$port" >"$work/demo.log" 2>&1 & pids+=($!)
for i in $(seq 200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "demo relay not ready:"; cat "$work/demo.log"; exit 1; }
# Let the relay precompute its deltas for the critical pattern first.
sleep 3

mode=(--agents "$AGENTS")
[ -n "$RATE" ] && mode=(--rate "$RATE")
"$LOAD" fleet --target "127.0.0.1:$port" --component engine-pattern "${mode[@]}" \
  --duration "$DURATION" --poll "$POLL" --processes "$PROCESSES"
echo
echo "machine: $(nproc) cores, $(uname -r)"
