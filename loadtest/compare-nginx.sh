#!/usr/bin/env bash
# Side-by-side throughput: nginx and a patchrelay relay serving the same
# published tree, the relay with every object already cached. Runs each
# workload against both, alternating, ROUNDS times, and prints medians and
# relay/nginx ratios. These machines are noisy: compare within one run only.
#
#   loadtest/compare-nginx.sh                 # defaults below
#   DURATION=20 ROUNDS=5 loadtest/compare-nginx.sh
#
# Needs: wrk, nginx, curl, and a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-$(nproc)}
BIN=${BIN:-target/release/patchrelay}
NGINX=${NGINX:-/usr/sbin/nginx}

for t in wrk curl "$NGINX" "$BIN"; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing: $t (apt-get install wrk nginx-light curl; cargo build --release)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/patchrelay-compare.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A published tree with a 4 KiB and a 24 MiB object.
mkdir -p "$work/in/small/1" "$work/in/large/1"
head -c 4096 /dev/urandom > "$work/in/small/1/small.bin"
head -c $((24 << 20)) /dev/urandom > "$work/in/large/1/large.bin"
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
small=$(sha256sum "$work/in/small/1/small.bin" | cut -d' ' -f1)
large=$(sha256sum "$work/in/large/1/large.bin" | cut -d' ' -f1)

# nginx as fast as it gets on loopback here: sendfile off, large output buffers.
nport=$(free_port)
cat > "$work/nginx.conf" <<CONF
$( [ "$(id -u)" -eq 0 ] && echo "user root;" )
daemon off;
worker_processes $WORKERS;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 20000; }
http {
  access_log off;
  sendfile off;
  output_buffers 2 1m;
  keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  default_type application/octet-stream;
  server { listen 127.0.0.1:$nport backlog=4096; root $work/repo; }
}
CONF
"$NGINX" -c "$work/nginx.conf" -e "$work/nginx-error.log" & pids+=($!)

rport=$(free_port)
cat > "$work/relay.toml" <<CONF
[server]
listen = "127.0.0.1:$rport"
workers = $WORKERS
[storage]
dir = "$work/relay"
[[upstream]]
url = "http://127.0.0.1:$nport"
[trust]
public_key = "$pub"
[log]
level = "warn"
CONF
"$BIN" serve --config "$work/relay.toml" 2>"$work/relay.log" & rpid=$!; pids+=($rpid)

for i in $(seq 100); do curl -sf "http://127.0.0.1:$rport/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$rport/readyz" >/dev/null || { echo "relay did not become ready:"; cat "$work/relay.log"; exit 1; }
idle_rss=$(awk '/VmRSS/ {print $2}' /proc/$rpid/status)
# Warm the relay's cache (each object pulled through once) and check the bytes.
for s in $small $large; do
  got=$(curl -sf "http://127.0.0.1:$rport/v1/objects/$s" | sha256sum | cut -d' ' -f1)
  [ "$got" = "$s" ] || { echo "relay served wrong bytes for $s" >&2; exit 1; }
done

# wrk prints "Requests/sec: N" and "Transfer/sec: N{B,KB,MB,GB}".
run() { # url connections -> "req/s MB/s"
  wrk -t2 -c"$2" -d"${DURATION}s" --latency "$1" 2>&1 | awk '
    /Requests\/sec/ {r=$2}
    /Transfer\/sec/ {v=$2; u=v; gsub(/[0-9.]/,"",u); sub(/[A-Za-z]+$/,"",v);
      m=(u=="GB")?1024:(u=="MB")?1:(u=="KB")?1/1024:1/1048576; t=v*m}
    /Non-2xx/ {bad=$NF}
    END {printf "%.0f %.1f %s\n", r, t, (bad==""?0:bad)}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }

printf '\n%-34s %14s %14s %8s\n' "workload (median of $ROUNDS x ${DURATION}s)" nginx patchrelay ratio
for w in "4KiB object, 256 conns, req/s|/v1/objects/$small|256|1" "24MiB object, 16 conns, MB/s|/v1/objects/$large|16|2"; do
  IFS='|' read -r label path conns field <<<"$w"
  : > "$work/n.txt"; : > "$work/r.txt"
  for round in $(seq "$ROUNDS"); do
    run "http://127.0.0.1:$nport$path" "$conns" | awk -v f="$field" '{print $f; if ($3 != 0) print "non-2xx: " $3 > "/dev/stderr"}' >> "$work/n.txt"
    run "http://127.0.0.1:$rport$path" "$conns" | awk -v f="$field" '{print $f; if ($3 != 0) print "non-2xx: " $3 > "/dev/stderr"}' >> "$work/r.txt"
  done
  n=$(median < "$work/n.txt"); r=$(median < "$work/r.txt")
  printf '%-34s %14s %14s %8s\n' "$label" "$n" "$r" "$(awk -v a="$r" -v b="$n" 'BEGIN{printf "%.2fx", a/b}')"
done
loaded_rss=$(awk '/VmRSS/ {print $2}' /proc/$rpid/status)
printf '\nrelay RSS: %s KiB idle (after first sync), %s KiB after the runs; binary %s bytes\n' \
  "$idle_rss" "$loaded_rss" "$(stat -c %s "$BIN")"
echo "machine: $(nproc) cores, $(uname -r), $(nginx -v 2>&1 | cut -d/ -f2), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
