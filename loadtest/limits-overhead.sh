#!/usr/bin/env bash
# What metrics and limits cost when limits never bind. Three relays on the
# same files, same workload, alternating ROUNDS times:
#   off      [metrics] enabled = false, no limits
#   metrics  metrics on (the default), no limits
#   on       metrics on, and a policy and total cap far above the traffic
#            (every request carries an agent id drawn from AGENT_IDS, so
#            requests go through identity, policy match, agent state, buckets
#            and pacing)
# Prints medians and the ratios against "off", for throughput and for the
# server's CPU time per request (steadier than throughput on shared cores:
# it does not move with how the load generator is scheduled).
#
#   loadtest/limits-overhead.sh                       # 100,000 agent ids: the worst case
#   AGENT_IDS=256 WORKLOADS=small loadtest/limits-overhead.sh   # one agent per connection
#
#   loadtest/limits-overhead.sh            # needs wrk, nginx, curl, a release build
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-5}
AGENT_IDS=${AGENT_IDS:-100000}
WORKLOADS=${WORKLOADS:-small,large}
BIN=${BIN:-target/release/patchrelay}
for t in wrk curl "$BIN"; do command -v "$t" >/dev/null 2>&1 || { echo "missing: $t" >&2; exit 2; }; done

work=$(mktemp -d /tmp/patchrelay-limits.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$work/in/small/1" "$work/in/large/1"
head -c 4096 /dev/urandom > "$work/in/small/1/small.bin"
head -c $((24 << 20)) /dev/urandom > "$work/in/large/1/large.bin"
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
small=$(sha256sum "$work/in/small/1/small.bin" | cut -d' ' -f1)
large=$(sha256sum "$work/in/large/1/large.bin" | cut -d' ' -f1)
oport=$(free_port)
printf '[server]\nlisten = "127.0.0.1:%s"\n[origin]\nrepository = "%s"\n[log]\nlevel = "warn"\n' "$oport" "$work/repo" > "$work/origin.toml"
"$BIN" serve --config "$work/origin.toml" >/dev/null 2>&1 & pids+=($!)

port=""
start_relay() { # name extra; sets $port (not a $(...): the server would hold its pipe open)
  port=$(free_port)
  printf '[server]\nlisten = "127.0.0.1:%s"\n[storage]\ndir = "%s"\n[[upstream]]\nurl = "http://127.0.0.1:%s"\n[trust]\npublic_key = "%s"\n[log]\nlevel = "warn"\n%s\n' \
    "$port" "$work/$1" "$oport" "$pub" "$2" > "$work/$1.toml"
  "$BIN" serve --config "$work/$1.toml" >/dev/null 2>&1 & pids+=($!)
  for i in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf -o /dev/null "http://127.0.0.1:$port/v1/objects/$small"; curl -sf -o /dev/null "http://127.0.0.1:$port/v1/objects/$large"
}
start_relay off $'[metrics]\nenabled = false\n'; off=$port; offpid=${pids[-1]}
start_relay metrics ""; met=$port; metpid=${pids[-1]}
start_relay on $'[limits]\nidentity = "header"\ntotal_rate = "100GiB/s"\n[[limits.policy]]\nname = "fleet"\nrate = "50GiB/s"\nmax_concurrent = 1000\n'; on=$port; onpid=${pids[-1]}

# Every request an agent id, so per-agent state is created and looked up.
cat > "$work/ids.lua" <<LUA
request = function()
  return wrk.format(nil, nil, { ["X-Agent-Id"] = "agent-" .. math.random(1, $AGENT_IDS) })
end
LUA
run() { wrk -t2 -c"$2" -d"${DURATION}s" -s "$work/ids.lua" "$1" 2>&1 | awk '/Requests\/sec/ {r=$2} /Transfer\/sec/ {v=$2; u=v; gsub(/[0-9.]/,"",u); sub(/[A-Za-z]+$/,"",v); m=(u=="GB")?1024:(u=="MB")?1:(u=="KB")?1/1024:1/1048576; t=v*m} END {print r, t}'; }
# The server's CPU time (user + system, in clock ticks) so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One run against one relay: appends its figure to $work/<cfg> and its CPU
# microseconds per request to $work/<cfg>.cpu.
measure() { # cfg port pid path conns field
  local t0 t1 out
  t0=$(ticks "$3"); out=$(run "http://127.0.0.1:$2$4" "$5"); t1=$(ticks "$3")
  echo "$out" | awk -v f="$6" '{print $f}' >> "$work/$1"
  echo "$out" | awk -v d="$DURATION" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" '{printf "%.2f\n", t / hz * 1e6 / ($1 * d)}' >> "$work/$1.cpu"
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN{printf "%.3f", x/y}'; }
echo; echo "agent ids drawn from $AGENT_IDS"
printf '%-32s %10s %10s %10s %9s %9s\n' "workload (median of $ROUNDS)" off metrics "metrics+limits" "met/off" "all/off"
cpu_rows=()
for w in "small|4KiB object, 256 conns, req/s|/v1/objects/$small|256|1" "large|24MiB object, 16 conns, MB/s|/v1/objects/$large|16|2"; do
  IFS='|' read -r name label path conns field <<<"$w"
  case ",$WORKLOADS," in *",$name,"*) ;; *) continue;; esac
  : > "$work/a"; : > "$work/b"; : > "$work/c"; : > "$work/a.cpu"; : > "$work/b.cpu"; : > "$work/c.cpu"
  for r in $(seq "$ROUNDS"); do
    # The order rotates round by round, so a drift in the machine does not
    # always fall on the same configuration.
    order=("a $off $offpid" "b $met $metpid" "c $on $onpid")
    for i in 0 1 2; do
      read -r cfg p pid <<<"${order[$(( (i + r) % 3 ))]}"
      measure "$cfg" "$p" "$pid" "$path" "$conns" "$field"
    done
  done
  a=$(median < "$work/a"); b=$(median < "$work/b"); c=$(median < "$work/c")
  printf '%-32s %10s %10s %10s %9s %9s\n' "$label" "$a" "$b" "$c" "$(ratio "$b" "$a")" "$(ratio "$c" "$a")"
  a=$(median < "$work/a.cpu"); b=$(median < "$work/b.cpu"); c=$(median < "$work/c.cpu")
  cpu_rows+=("$(printf '%-32s %10s %10s %10s %9s %9s' "$name: server CPU us/request" "$a" "$b" "$c" "$(ratio "$b" "$a")" "$(ratio "$c" "$a")")")
done
printf '%s\n' "${cpu_rows[@]}"
