#!/usr/bin/env bash
# Chaos under load. 2,000 update agents (patchrelay-load fleet: poll, plan,
# download deltas or full files, cut and resume some, check every step's
# SHA-256) go through a relay whose upstream path misbehaves at random
# (patchrelay-load chaos-proxy: cuts, stalls, flipped bytes, 503s), while the
# relay is kill -9ed and restarted twice, and its store runs out of space
# once: the store is a tmpfs of its own (in a mount namespace a holder
# process keeps, so it survives the relay's restarts), filled by a stranger's
# file and then freed.
#
#   loadtest/chaos.sh                          # 2,000 agents, 120 s
#   AGENTS=500 DURATION=60 loadtest/chaos.sh
#   KEEP=1 loadtest/chaos.sh                   # keep the work directory (logs, store)
#
# Prints a JSON report: the agents' requests, errors by kind and corrupted
# deliveries (must be 0); objects lost from the cache (must be 0) and objects
# whose bytes no longer match their name (must be 0); upstream bytes against
# the ideal (every object the relay holds fetched once); the faults injected.
#
# Needs: python3, unshare and nsenter (util-linux), sha256sum, and release builds:
#   cargo build --release && cargo build --release -p patchrelay-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-2000}
DURATION=${DURATION:-120}
PROCESSES=${PROCESSES:-2}
STORE_MB=${STORE_MB:-160}
# Fault rates: per new upstream connection (503), per 16 KiB piece (the rest).
ERROR=${ERROR:-0.3}
CUT=${CUT:-0.002}
STALL=${STALL:-0.0005}
FLIP=${FLIP:-0.001}
BIN=${BIN:-target/release/patchrelay}
LOAD=${LOAD:-target/release/patchrelay-load}
for t in python3 unshare nsenter sha256sum "$BIN" "$LOAD"; do
  command -v "$t" >/dev/null 2>&1 || [ -x "$t" ] || { echo "missing: $t" >&2; exit 2; }
done
BIN=$(realpath "$BIN"); LOAD=$(realpath "$LOAD")
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/patchrelay-chaos.XXXXXX)
pids=()
relay_pid=""
holder=""
cleanup() {
  [ -n "$relay_pid" ] && kill -9 "$relay_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "$holder" ] && kill "$holder" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log() { echo "[$(date +%T)] $*" >&2; }

# A repository: a critical pattern with six releases (deltas between them),
# and a 24 MiB installer in two versions.
python3 - "$work/in" <<'EOF'
import os, random, sys
root = sys.argv[1]
def put(c, v, data, meta=None):
    d = os.path.join(root, c, v); os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"{c}-{v}.bin"), "wb").write(data)
    if meta: open(os.path.join(root, c, "component.toml"), "w").write(meta)
r = random.Random(7)
base = [f"sig {i:07d} {r.getrandbits(64):016x}\n".encode() for i in range(120_000)]
for v in range(1, 7):
    for _ in range(400):
        base[r.randrange(len(base))] = f"sig {r.randrange(10**7):07d} {r.getrandbits(64):016x} rev{v}\n".encode()
    put("engine", str(v), b"".join(base), 'kind = "pattern"\ncritical = true\n')
blob = bytearray(r.randbytes(24 << 20))
put("installer", "1", bytes(blob))
blob[5 << 20:(5 << 20) + 100_000] = r.randbytes(100_000)
put("installer", "2", bytes(blob))
EOF
"$BIN" keygen --secret "$work/key" > "$work/public" 2>/dev/null
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" --chunk-size 1MiB >/dev/null
public=$(cat "$work/public")

# The origin (keeping deltas), the chaos proxy in front of it, the relay behind.
oport=$(free_port); pport=$(free_port); rport=$(free_port)
cat > "$work/origin.toml" <<EOF
[server]
listen = "127.0.0.1:$oport"
[origin]
repository = "$work/repo"
[storage]
dir = "$work/origin-store"
[log]
level = "warn"
EOF
PATCHRELAY_LOG=warn "$BIN" serve --config "$work/origin.toml" >"$work/origin.log" 2>&1 & pids+=($!)
"$LOAD" chaos-proxy --listen "127.0.0.1:$pport" --upstream "127.0.0.1:$oport" --stats "$work/proxy.json" \
  --error "$ERROR" --cut "$CUT" --stall "$STALL" --flip "$FLIP" \
  >"$work/proxy.log" 2>&1 & pids+=($!)

store="$work/store"
mkdir -p "$store"
unshare --user --map-root-user --mount sh -c \
  "mount -t tmpfs -o size=${STORE_MB}m tmpfs '$store' && touch '$work/ns-ready' && exec sleep 100000" &
holder=$!
for _ in $(seq 100); do [ -e "$work/ns-ready" ] && break; sleep 0.05; done
[ -e "$work/ns-ready" ] || { echo "cannot mount a tmpfs in a user namespace (unshare --user --mount)" >&2; exit 2; }
in_ns() { nsenter --target "$holder" --user --mount --preserve-credentials "$@"; }

cat > "$work/relay.toml" <<EOF
[server]
listen = "127.0.0.1:$rport"
# The agents come from 8 loopback addresses: no per-address connection cap.
max_connections_per_address = 0
[storage]
dir = "$store"
[[upstream]]
url = "http://127.0.0.1:$pport"
name = "chaos"
read_timeout = "3s"
connect_timeout = "2s"
[trust]
public_key = "$public"
[sync]
interval = "30s"
[log]
level = "warn"
EOF
start_relay() {
  # nsenter execs the relay: $! is the relay itself (not a subshell).
  PATCHRELAY_LOG=warn nsenter --target "$holder" --user --mount --preserve-credentials \
    "$BIN" serve --config "$work/relay.toml" >>"$work/relay.log" 2>&1 &
  relay_pid=$!
  for _ in $(seq 300); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$rport/readyz', timeout=1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "relay not ready:" >&2; tail -20 "$work/relay.log" >&2; exit 1
}
objects() { in_ns sh -c "cd '$store/objects' 2>/dev/null && ls */ 2>/dev/null | grep -E '^[0-9a-f]{64}$' | sort" || true; }
start_relay
log "relay up; $AGENTS agents for ${DURATION}s"

"$LOAD" fleet --target "127.0.0.1:$rport" --component engine --agents "$AGENTS" --duration "$DURATION" \
  --poll 5 --processes "$PROCESSES" >"$work/fleet.json" 2>"$work/fleet.log" &
fleet=$!

step=$((DURATION / 6))
died=0
kill_relay() {
  if kill -0 "$relay_pid" 2>/dev/null; then kill -9 "$relay_pid"; else died=$((died + 1)); log "the relay had died!"; fi
  wait "$relay_pid" 2>/dev/null || true
}
# Downloads that need the store besides the fleet's: the installer's two
# versions (24 MiB each), one now and one while the disk is full.
installer() {
  python3 -c "import urllib.request, hashlib; print(hashlib.sha256(urllib.request.urlopen('http://127.0.0.1:$rport/v1/components/installer/versions/$1', timeout=120).read()).hexdigest())" 2>/dev/null || echo failed
}
sleep "$step"; log "kill -9 the relay (1 of 2)"; kill_relay
sleep 1; start_relay; log "relay back"
got1=$(installer 1)
sleep "$step"; log "fill the store's file system"
in_ns sh -c "dd if=/dev/zero of='$store/stranger' bs=1M status=none 2>/dev/null || true"
got2=$(installer 2); got2b=$(installer 2)
ready_full=$(python3 -c "import urllib.request,json; print(json.load(urllib.request.urlopen('http://127.0.0.1:$rport/readyz'))['status'])" 2>/dev/null || echo "?")
sleep "$step"; log "free it again (readyz said: $ready_full)"
in_ns rm -f "$store/stranger"
sleep "$step"; before=$(objects); log "kill -9 the relay (2 of 2), holding $(echo "$before" | grep -c . || true) objects"
kill_relay
sleep 1; start_relay; log "relay back"
wait "$fleet" || true
kill -0 "$relay_pid" 2>/dev/null || died=$((died + 1))
want1=$(sha256sum "$work/in/installer/1/installer-1.bin" | cut -d' ' -f1)
want2=$(sha256sum "$work/in/installer/2/installer-2.bin" | cut -d' ' -f1)
installer_bad=0
for g in "$got1:$want1" "$got2b:$want2"; do [ "${g%%:*}" = "${g##*:}" ] || installer_bad=$((installer_bad + 1)); done
after=$(objects)
lost=$(comm -23 <(echo "$before") <(echo "$after") | grep -c . || true)
bad=0
ideal=0
for sha in $after; do
  got=$(in_ns sha256sum "$store/objects/${sha:0:2}/$sha" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || bad=$((bad + 1))
  ideal=$((ideal + $(in_ns stat -c %s "$store/objects/${sha:0:2}/$sha")))
done
# The ideal also has the two installer downloads made while the disk was full:
# passed through, not stored, each fetched once.
ideal=$((ideal + 2 * $(stat -c %s "$work/in/installer/2/installer-2.bin")))
sleep 1.5
AGENTS=$AGENTS python3 - "$work/fleet.json" "$work/proxy.json" "$lost" "$bad" "$ideal" "$ready_full" "$died" "$installer_bad" "$got2" <<'EOF'
import json, os, sys
fleet = json.load(open(sys.argv[1]))
proxy = json.load(open(sys.argv[2]))
lost, bad, ideal, ready_full = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
died, installer_bad, first_when_full = int(sys.argv[7]), int(sys.argv[8]), sys.argv[9]
print(json.dumps({
    "agents": int(os.environ["AGENTS"]),
    "requests": fleet.get("requests"),
    "updates": fleet.get("updates"),
    "download_steps": fleet.get("steps"),
    "resumes": fleet.get("resumes"),
    "errors_by_kind": fleet.get("errors"),
    "corrupted_deliveries": fleet.get("corrupt"),
    "objects_lost_from_the_cache": lost,
    "objects_not_matching_their_name": bad,
    "readyz_while_the_disk_was_full": ready_full,
    "installer_downloads_not_whole_and_right": installer_bad,
    "first_installer_download_into_a_full_disk": "ok" if len(first_when_full) == 64 else first_when_full,
    "relay_deaths_not_ours": died,
    "upstream_bytes": proxy["upstream_bytes"],
    "ideal_bytes": ideal,
    "upstream_over_ideal": round(proxy["upstream_bytes"] / ideal, 3) if ideal else None,
    "faults_injected": proxy["faults"],
    "proxy_connections": proxy["connections"],
}, indent=1))
EOF
echo "machine: $(nproc) cores, $(uname -r)"
# What must be 0 is 0, or the run fails.
corrupt=$(python3 -c "import json; print(json.load(open('$work/fleet.json')).get('corrupt', 1))")
if [ "$corrupt" != 0 ] || [ "$lost" != 0 ] || [ "$bad" != 0 ] || [ "$died" != 0 ] || [ "$installer_bad" != 0 ]; then
  echo "FAILED: corrupt=$corrupt lost=$lost bad=$bad died=$died installer_bad=$installer_bad" >&2
  exit 1
fi
