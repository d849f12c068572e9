#!/usr/bin/env bash
# 1,000 agents ask at the same moment for one object nobody has cached, behind
# a throttled upstream (the fill takes about FILL_SECONDS). Run against a
# patchrelay relay, then against nginx proxy_cache with proxy_cache_lock on
# (the usual alternative), same upstream, same machine, same run. Reports
# upstream requests for the object, waiters' first-byte latency, and fill time.
#
#   loadtest/fill-storm.sh                      # 1000 agents, 64 MiB, ~8 s fill
#   AGENTS=200 SIZE_MIB=24 loadtest/fill-storm.sh
#
# Needs: nginx, curl, and release builds:
#   cargo build --release && cargo build --release -p patchrelay-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-1000}
SIZE_MIB=${SIZE_MIB:-64}
FILL_SECONDS=${FILL_SECONDS:-8}
BIN=${BIN:-target/release/patchrelay}
LOAD=${LOAD:-target/release/patchrelay-load}
NGINX=${NGINX:-/usr/sbin/nginx}
for t in curl "$NGINX" "$BIN" "$LOAD"; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing: $t" >&2; exit 2; }
done
[ "$(ulimit -n)" -ge $((AGENTS * 3)) ] || ulimit -n $((AGENTS * 3)) 2>/dev/null || true

work=$(mktemp -d /tmp/patchrelay-storm.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
user=$( [ "$(id -u)" -eq 0 ] && echo "user root;" || true )

mkdir -p "$work/in/installer/1"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$work/in/installer/1/installer.bin"
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
sha=$(sha256sum "$work/in/installer/1/installer.bin" | cut -d' ' -f1)
rate=$(( (SIZE_MIB << 20) / FILL_SECONDS ))

# The upstream: a static tree behind nginx, throttled per connection.
up=$(free_port)
cat > "$work/upstream.conf" <<CONF
$user
daemon off; master_process off; worker_processes 1;
pid $work/up.pid; error_log $work/up-error.log;
events { worker_connections 8192; }
http {
  log_format t '"\$request" \$status \$body_bytes_sent';
  access_log $work/upstream-access.log t;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$up backlog=4096; root $work/repo; limit_rate $rate; }
}
CONF
"$NGINX" -c "$work/upstream.conf" & pids+=($!)

# patchrelay, relaying the upstream.
rport=$(free_port)
cat > "$work/relay.toml" <<CONF
[server]
listen = "127.0.0.1:$rport"
# 1,000 agents from one loopback address are the load, not abuse.
max_connections_per_address = 0
[storage]
dir = "$work/relay"
[[upstream]]
url = "http://127.0.0.1:$up"
[trust]
public_key = "$pub"
[log]
level = "warn"
CONF
"$BIN" serve --config "$work/relay.toml" 2>"$work/relay.log" & pids+=($!)

# nginx proxy_cache, relaying the same upstream, with the cache lock on (defaults otherwise).
pport=$(free_port)
cat > "$work/proxy.conf" <<CONF
$user
daemon off; worker_processes $(nproc);
pid $work/proxy.pid; error_log $work/proxy-error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work/ptmp; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  proxy_cache_path $work/pcache levels=1:2 keys_zone=pc:10m max_size=4g inactive=1h use_temp_path=off;
  server {
    listen 127.0.0.1:$pport backlog=4096;
    location / {
      proxy_pass http://127.0.0.1:$up;
      proxy_http_version 1.1;
      proxy_cache pc;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
    }
  }
}
CONF
mkdir -p "$work/ptmp"
"$NGINX" -c "$work/proxy.conf" & pids+=($!)

for i in $(seq 100); do curl -sf "http://127.0.0.1:$rport/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$rport/readyz" >/dev/null || { echo "relay not ready"; cat "$work/relay.log"; exit 1; }

count() { grep -c "/v1/objects/$sha" "$work/upstream-access.log" 2>/dev/null || true; }
storm() { "$LOAD" storm --target "127.0.0.1:$1" --path "/v1/objects/$sha" --agents "$AGENTS" --sha256 "$sha" --timeout 600; }

before=$(count); r=$(storm "$rport"); sleep 1; r_up=$(( $(count) - before ))
before=$(count); n=$(storm "$pport"); sleep 1; n_up=$(( $(count) - before ))

row() { # name json upstream_requests
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
name, j, up = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
fb, tt = j["first_byte_ms"], j["total_ms"]
bad = sum(j["errors"].values())
rd = j["first_read_ms"]
print(f'{name:<34} {up:>9} {fb["p50"]:>10.0f} {fb["p99"]:>10.0f} {rd["p50"]:>10.0f} {tt["min"]:>10.0f} {tt["p50"]:>10.0f} {tt["max"]:>10.0f} {j["ok"]:>6} {bad:>6} {j["corrupt"]:>7}')
PY
}
echo
echo "$AGENTS agents, one uncached ${SIZE_MIB} MiB object, upstream throttled to $((rate / 1024)) KiB/s per connection (fill ~${FILL_SECONDS}s)"
printf '%-34s %9s %10s %10s %10s %10s %10s %10s %6s %6s %7s\n' "" "upstream" "first-byte" "first-byte" "read" "done min" "done p50" "done max" "ok" "errors" "corrupt"
printf '%-34s %9s %10s %10s %10s %10s %10s %10s %6s %6s %7s\n' "" "requests" "p50 ms" "p99 ms" "p50 ms" "ms" "ms" "ms" "" "" ""
row "patchrelay" "$r" "$r_up"
row "nginx proxy_cache, cache_lock on" "$n" "$n_up"
echo "(first-byte: when the first body byte reached each agent's socket, by the kernel's receive stamp;"
echo " read: when the load generator, sharing these cores with the servers, got round to reading it."
echo " done min ~ the fill time: no agent can finish before the object has arrived)"
echo "machine: $(nproc) cores, $(uname -r), nginx $($NGINX -v 2>&1 | cut -d/ -f2)"
