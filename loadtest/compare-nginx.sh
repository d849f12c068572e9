#!/usr/bin/env bash
# patchrelay beside nginx on this machine, same files, same run, alternating:
#
#   1. cached 4 KiB object, 256 keep-alive connections      (wrk, req/s)
#   2. cached 24 MiB object, 16 connections                 (wrk, MB/s)
#   3. random 64 KiB ranges of a 256 MiB object, 64 conns   (wrk + Lua, req/s)
#   4. 19,000 slow agents (~10 KB/s each) for 60 s          (patchrelay-load slow:
#      errors, and server memory per connection)
#   5. HTTPS: cached 24 MiB object, 16 connections           (wrk, MB/s)
#   6. HTTPS: cached 4 KiB object, 256 keep-alive conns      (wrk, req/s)
#   7. HTTPS: new TLS handshakes, 4 KiB, Connection: close   (wrk, req/s = handshakes/s)
#   8. HTTPS: row 4's slow agents over TLS (SLOW_TLS_AGENTS, 5,000 by default)
#
# Rows 5-7: the same ECDSA P-256 certificate (made here by openssl) on both,
# TLS 1.3 only; nginx with its session cache and tickets on, as an expert
# runs it (neither server may skip a handshake that the other makes: wrk
# starts each new connection without resuming a session).
#
# nginx serves rows 1-3 the way it is fastest here (sendfile off, output_buffers
# 2 1m) and row 4 the way it uses least memory (sendfile on, small send
# buffers); the relay is the same binary throughout, its slow-agent instance
# with the same 16 KiB send-buffer cap as nginx. The relay serves from its cache
# (every object pulled through once before measuring).
#
#   loadtest/compare-nginx.sh                         # everything (~7 min)
#   ROWS=1,2 ROUNDS=5 DURATION=10 loadtest/compare-nginx.sh
#   SLOW_AGENTS=5000 loadtest/compare-nginx.sh        # a lighter row 4
#
# Needs: wrk, nginx, curl, python3, and release builds:
#   cargo build --release && cargo build --release -p patchrelay-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-1,2,3,4,5,6,7,8}
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-$(nproc)}
SLOW_AGENTS=${SLOW_AGENTS:-19000}
SLOW_SECONDS=${SLOW_SECONDS:-60}
SLOW_TLS_AGENTS=${SLOW_TLS_AGENTS:-5000}
BIN=${BIN:-target/release/patchrelay}
LOAD=${LOAD:-target/release/patchrelay-load}
NGINX=${NGINX:-/usr/sbin/nginx}
row() { case ",$ROWS," in *",$1,"*) return 0;; *) return 1;; esac; }

for t in wrk curl python3 openssl "$NGINX" "$BIN" "$LOAD"; do
  command -v "$t" >/dev/null 2>&1 || { echo "missing: $t (apt-get install wrk nginx-light curl; cargo build --release; cargo build --release -p patchrelay-loadtest)" >&2; exit 2; }
done
# 19,000 connections need as many descriptors in the client and each server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/patchrelay-compare.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
user=$( [ "$(id -u)" -eq 0 ] && echo "user root;" || true )

# A published tree: 4 KiB, 24 MiB and 256 MiB objects.
mkdir -p "$work/in/small/1" "$work/in/large/1" "$work/in/huge/1"
head -c 4096 /dev/urandom > "$work/in/small/1/small.bin"
head -c $((24 << 20)) /dev/urandom > "$work/in/large/1/large.bin"
head -c $((256 << 20)) /dev/urandom > "$work/in/huge/1/huge.bin"
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
small=$(sha256sum "$work/in/small/1/small.bin" | cut -d' ' -f1)
large=$(sha256sum "$work/in/large/1/large.bin" | cut -d' ' -f1)
huge=$(sha256sum "$work/in/huge/1/huge.bin" | cut -d' ' -f1)

# One certificate for both servers' HTTPS rows, from a CA the slow agents trust.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=compare-ca \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$work/tls.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
  -extfile "$work/tls.ext" -out "$work/tls.pem" 2>/dev/null
nport=$(free_port); nslow=$(free_port); ntls=$(free_port); ntslow=$(free_port)
cat > "$work/nginx.conf" <<CONF
$user
daemon off;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  default_type application/octet-stream;
  # Fastest here for throughput.
  server { listen 127.0.0.1:$nport backlog=4096; root $work/repo; sendfile off; output_buffers 2 1m; }
  # Least memory per slow connection.
  server { listen 127.0.0.1:$nslow backlog=4096 sndbuf=16k; root $work/repo; sendfile on; }
  # HTTPS: TLS 1.3, sessions cached; sendfile cannot help under TLS here.
  server { listen 127.0.0.1:$ntls ssl backlog=4096; root $work/repo; sendfile off; output_buffers 2 1m;
           ssl_certificate $work/tls.pem; ssl_certificate_key $work/tls.key; ssl_protocols TLSv1.3;
           ssl_session_cache shared:SSL:10m; ssl_session_tickets on; }
  # HTTPS, least memory per slow connection.
  server { listen 127.0.0.1:$ntslow ssl backlog=4096 sndbuf=16k; root $work/repo; sendfile on;
           ssl_certificate $work/tls.pem; ssl_certificate_key $work/tls.key; ssl_protocols TLSv1.3; }
}
CONF
"$NGINX" -c "$work/nginx.conf" -e "$work/nginx-error.log" & pids+=($!)

port=""
start_relay() { # name extra-toml; sets $port ($(...) would wait on the server's stdout)
  port=$(free_port)
  # The load comes from a few loopback addresses: no per-address connection cap.
  printf '[server]\nlisten = "127.0.0.1:%s"\nworkers = %s\nmax_connections_per_address = 0\n%s\n[storage]\ndir = "%s"\n[[upstream]]\nurl = "http://127.0.0.1:%s"\n[trust]\npublic_key = "%s"\n[log]\nlevel = "warn"\n' \
    "$port" "$WORKERS" "$2" "$work/$1" "$nport" "$pub" > "$work/$1.toml"
  "$BIN" serve --config "$work/$1.toml" >/dev/null 2>"$work/$1.log" & pids+=($!)
  local scheme=http; case "$2" in *server.tls*) scheme=https;; esac
  for i in $(seq 100); do curl -skf "$scheme://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -skf "$scheme://127.0.0.1:$port/readyz" >/dev/null || { echo "relay $1 not ready:"; cat "$work/$1.log"; exit 1; }
}
start_relay fast ""; rport=$port; rpid=${pids[-1]}
idle_rss=$(awk '/VmRSS/ {print $2}' /proc/$rpid/status)
# Pull every object through once, checking the bytes.
for s in $small $large $huge; do
  got=$(curl -sf "http://127.0.0.1:$rport/v1/objects/$s" | sha256sum | cut -d' ' -f1)
  [ "$got" = "$s" ] || { echo "relay served wrong bytes for $s" >&2; exit 1; }
done

cat > "$work/ranges.lua" <<LUA
local size = $((256 << 20))
request = function()
  local a = math.random(0, size - 65536)
  return wrk.format(nil, nil, { ["Range"] = "bytes=" .. a .. "-" .. (a + 65535) })
end
LUA
run() { # url connections [lua] [header] -> "req/s MB/s non2xx"
  local script=(); [ -n "${3:-}" ] && script=(-s "$3")
  local header=(); [ -n "${4:-}" ] && header=(-H "$4")
  wrk -t2 -c"$2" -d"${DURATION}s" "${script[@]}" "${header[@]}" "$1" 2>&1 | awk '
    /Requests\/sec/ {r=$2}
    /Transfer\/sec/ {v=$2; u=v; gsub(/[0-9.]/,"",u); sub(/[A-Za-z]+$/,"",v);
      m=(u=="GB")?1024:(u=="MB")?1:(u=="KB")?1/1024:1/1048576; t=v*m}
    /Non-2xx/ {bad=$NF}
    END {printf "%.0f %.1f %s\n", r, t, (bad==""?0:bad)}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
table=()
compare() { # label path conns field [lua] [nginx-base relay-base header]
  : > "$work/n.txt"; : > "$work/r.txt"
  local nb=${6:-http://127.0.0.1:$nport} rb=${7:-http://127.0.0.1:$rport}
  for round in $(seq "$ROUNDS"); do
    run "$nb$2" "$3" "${5:-}" "${8:-}" | awk -v f="$4" '{print $f; if ($3 != 0) print "nginx non-2xx: " $3 > "/dev/stderr"}' >> "$work/n.txt"
    run "$rb$2" "$3" "${5:-}" "${8:-}" | awk -v f="$4" '{print $f; if ($3 != 0) print "relay non-2xx: " $3 > "/dev/stderr"}' >> "$work/r.txt"
  done
  local n r; n=$(median < "$work/n.txt"); r=$(median < "$work/r.txt")
  table+=("$(printf '%-44s %12s %12s %8s' "$1" "$n" "$r" "$(awk -v a="$r" -v b="$n" 'BEGIN{printf "%.2fx", a/b}')")")
}
row 1 && compare "cached 4 KiB, 256 conns (req/s)" "/v1/objects/$small" 256 1
row 2 && compare "cached 24 MiB, 16 conns (MB/s)" "/v1/objects/$large" 16 2
row 3 && compare "64 KiB ranges of 256 MiB, 64 conns (req/s)" "/v1/objects/$huge" 64 1 "$work/ranges.lua"
busy_rss=$(awk '/VmRSS/ {print $2}' /proc/$rpid/status)

if row 5 || row 6 || row 7; then
  start_relay tls "$(printf '[server.tls]\ncert = "%s"\nkey = "%s"' "$work/tls.pem" "$work/tls.key")"; tport=$port
  for s in $small $large; do
    got=$(curl -skf "https://127.0.0.1:$tport/v1/objects/$s" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$s" ] || { echo "relay (TLS) served wrong bytes for $s" >&2; exit 1; }
  done
  nb="https://127.0.0.1:$ntls"; rb="https://127.0.0.1:$tport"
  row 5 && compare "HTTPS cached 24 MiB, 16 conns (MB/s)" "/v1/objects/$large" 16 2 "" "$nb" "$rb"
  row 6 && compare "HTTPS cached 4 KiB, 256 conns (req/s)" "/v1/objects/$small" 256 1 "" "$nb" "$rb"
  row 7 && compare "HTTPS new handshakes, 4 KiB, 64 conns (/s)" "/v1/objects/$small" 64 1 "" "$nb" "$rb" "Connection: close"
fi

nginx_pids=$(pgrep -f "nginx: worker process" -P "$(cat "$work/nginx.pid" 2>/dev/null || echo 1)" | paste -sd, || true)
[ -n "$nginx_pids" ] || nginx_pids=$(pgrep -f "$work/nginx.conf" | paste -sd,)
slow() { # port pids agents [--cacert ca]
  "$LOAD" slow --target "127.0.0.1:$1" --path "/v1/objects/$huge" --agents "$3" --rate 10000 \
    --duration "$SLOW_SECONDS" --ramp 15 --server-pids "$2" "${@:4}"; }
fmt() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); e=sum(d["errors"].values()); print("%d errors, %.1f KiB/conn" % (e, d["server_kib_per_connection"]))' "$1"; }
if row 4; then
  start_relay slow 'send_buffer = "16KiB"'; sport=$port; spid=${pids[-1]}
  curl -sf -o /dev/null "http://127.0.0.1:$sport/v1/objects/$huge"
  ns=$(slow "$nslow" "$nginx_pids" "$SLOW_AGENTS"); rs=$(slow "$sport" "$spid" "$SLOW_AGENTS")
  echo "nginx slow: $ns" >> "$work/slow.txt"; echo "relay slow: $rs" >> "$work/slow.txt"
  table+=("$(printf '%-44s %12s %12s' "$SLOW_AGENTS slow agents, ${SLOW_SECONDS}s (errors, memory)" "$(fmt "$ns")" "$(fmt "$rs")")")
fi
if row 8; then
  start_relay tslow "$(printf 'send_buffer = "16KiB"\n[server.tls]\ncert = "%s"\nkey = "%s"' "$work/tls.pem" "$work/tls.key")"
  tsport=$port; tspid=${pids[-1]}
  curl -skf -o /dev/null "https://127.0.0.1:$tsport/v1/objects/$huge"
  ns=$(slow "$ntslow" "$nginx_pids" "$SLOW_TLS_AGENTS" --cacert "$work/ca.pem")
  rs=$(slow "$tsport" "$tspid" "$SLOW_TLS_AGENTS" --cacert "$work/ca.pem")
  echo "nginx slow HTTPS: $ns" >> "$work/slow.txt"; echo "relay slow HTTPS: $rs" >> "$work/slow.txt"
  table+=("$(printf '%-44s %12s %12s' "HTTPS $SLOW_TLS_AGENTS slow agents, ${SLOW_SECONDS}s" "$(fmt "$ns")" "$(fmt "$rs")")")
fi

printf '\n%-44s %12s %12s %8s\n' "workload (median of $ROUNDS x ${DURATION}s)" nginx patchrelay ratio
printf '%s\n' "${table[@]}"
[ -f "$work/slow.txt" ] && { echo; cat "$work/slow.txt"; }
printf '\nrelay RSS: %s KiB idle, %s KiB after rows 1-3; binary %s bytes\n' "$idle_rss" "$busy_rss" "$(stat -c %s "$BIN")"
echo "machine: $(nproc) cores, $(uname -r), nginx $($NGINX -v 2>&1 | cut -d/ -f2), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
