#!/usr/bin/env bash
# What metrics and limits cost when limits never bind, relay against relay on
# the same files and the same workload:
#   off      [metrics] enabled = false, no limits
#   metrics  metrics on (the default), no limits
#   on       metrics on, and a policy and total cap far above the traffic
#            (every request carries an agent id drawn from AGENT_IDS, so
#            requests go through identity, policy match, agent state, buckets
#            and pacing; all ids come from loopback, so the per-address cap
#            on ids is off: max_agents_per_address = 0)
#   off2     a second "off": the control, whose ratio to "off" is the noise of
#            the method itself
#   nofleet  metrics on, the fleet inventory off ([fleet] enabled = false);
#            against "metrics" (the default: fleet on), on the plans
#            workload, it is what the inventory costs a plan request:
#            REF=nofleet PAIRS=metrics WORKLOADS=plans loadtest/limits-overhead.sh
#
# How it measures on a noisy 2-core VM, where one relay measured alone gave
# 87,000 and 119,000 req/s in two 3 s runs a few seconds apart, with nothing
# else running: run the two relays being compared AT THE SAME TIME, each with
# one worker, both pinned to the same core (CPU 0), each loaded by its own wrk
# pinned to the other core (CPU 1), with enough connections to keep it always
# busy. The scheduler shares CPU 0 evenly between the two busy relays, and
# whatever the host does to that core's speed it does to both. Each relay's
# CPU time comes from /proc/<pid>/task/*/schedstat (nanoseconds), so the
# figure is the ratio of CPU time per request, which does not depend on the
# shares being exactly even; the throughput ratio is printed beside it.
#
# Every pair starts both its relays afresh (a process's own luck, such as where
# its memory lands, is drawn again each time instead of biasing every round the
# same way, and neither has served more than the other), warms them up
# together, and measures them. A round measures the pairs off|off2,
# off|metrics and off|on, in an order that rotates, and alternates which of a
# pair starts first. The figures are the medians of the rounds' ratios, with
# quartiles.
#
#   loadtest/limits-overhead.sh                                 # 100,000 agent ids, the worst case (~8 min)
#   AGENT_IDS=256 WORKLOADS=small loadtest/limits-overhead.sh   # one agent per connection
#   ROUNDS=15 DURATION=6 WORKLOADS=small loadtest/limits-overhead.sh
#   WORKERS=2 WORKLOADS=small loadtest/limits-overhead.sh      # see below
#
# The same method compares two builds: BASE_BIN is the reference relay
# ("base", default config, metrics on) and the current build's "metrics"
# relay is measured against it; the workloads are then docs/performance.md's
# rows 1 to 3 (4 KiB objects, 24 MiB objects, random 64 KiB ranges of a
# 256 MiB object):
#
#   BASE_BIN=/tmp/old/patchrelay loadtest/limits-overhead.sh    # (REF=base PAIRS=metrics WORKLOADS=small,large,ranges)
#
# WORKERS=2 (or more) gives each relay that many workers, and lets relays and
# wrk share every CPU: what one worker per relay cannot show (the agents'
# table and the total bucket written from two cores) is then in the figures,
# at the price of a noisier measurement, since wrk now competes with the
# relays. CPU per request stays each relay's own.
#
# Needs: wrk, curl, python3, taskset, 2 or more CPUs, a release build
# (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-7}
AGENT_IDS=${AGENT_IDS:-100000}
# Seconds of warm-up per pair: long enough to ask as every agent once.
WARMUP=${WARMUP:-$(( AGENT_IDS / 25000 + 2 ))}
WORKLOADS=${WORKLOADS:-small,large}
# Which relays to measure against "off" (off2 is the control).
PAIRS=${PAIRS:-off2,metrics,on}
BIN=${BIN:-target/release/patchrelay}
BASE_BIN=${BASE_BIN:-}
# The relay every pair is measured against.
REF=${REF:-off}
if [ -n "$BASE_BIN" ]; then
  REF=base; PAIRS=${PAIRS_BASE:-metrics}; WORKLOADS=${WORKLOADS_BASE:-small,large,ranges}; AGENT_IDS=1; WARMUP=2
fi
WORKERS=${WORKERS:-1}
if [ "$WORKERS" -gt 1 ]; then
  RELAY_CPUS=0-$(( $(nproc) - 1 )); LOAD_CPUS=$RELAY_CPUS
  placement="relays with $WORKERS workers each and wrk all on CPUs $RELAY_CPUS"
else
  RELAY_CPUS=0; LOAD_CPUS=1
  placement="relays with 1 worker each, both of a pair on CPU 0 at once, wrk on CPU 1"
fi
for t in wrk curl python3 taskset "$BIN"; do command -v "$t" >/dev/null 2>&1 || { echo "missing: $t" >&2; exit 2; }; done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs: relays on one, load on the other" >&2; exit 2; }

work=$(mktemp -d /tmp/patchrelay-limits.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$work/in/small/1" "$work/in/large/1" "$work/in/plan/1" "$work/in/plan/2"
seq 1 20000 > "$work/in/plan/1/plan.txt"; seq 1 20010 > "$work/in/plan/2/plan.txt"
head -c 4096 /dev/urandom > "$work/in/small/1/small.bin"
head -c $((24 << 20)) /dev/urandom > "$work/in/large/1/large.bin"
case ",$WORKLOADS," in *",ranges,"*) mkdir -p "$work/in/huge/1"; head -c $((256 << 20)) /dev/urandom > "$work/in/huge/1/huge.bin";; esac
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
small=$(sha256sum "$work/in/small/1/small.bin" | cut -d' ' -f1)
large=$(sha256sum "$work/in/large/1/large.bin" | cut -d' ' -f1)
huge=$( [ -e "$work/in/huge/1/huge.bin" ] && sha256sum "$work/in/huge/1/huge.bin" | cut -d' ' -f1 || true)
oport=$(free_port)
printf '[server]\nlisten = "127.0.0.1:%s"\n[origin]\nrepository = "%s"\n[log]\nlevel = "warn"\n' "$oport" "$work/repo" > "$work/origin.toml"
taskset -c 1 "$BIN" serve --config "$work/origin.toml" >/dev/null 2>&1 & pids+=($!)

declare -A extra=(
  [off]=$'[metrics]\nenabled = false\n'
  [off2]=$'[metrics]\nenabled = false\n'
  [metrics]=""
  [nofleet]=$'[fleet]\nenabled = false\n'
  [on]=$'[limits]\nidentity = "header"\ntotal_rate = "100GiB/s"\nmax_agents_per_address = 0\n[[limits.policy]]\nname = "fleet"\nrate = "50GiB/s"\nmax_concurrent = 1000\n'
)
# Each relay's files are named by number, not by configuration: paths of
# different lengths alone (storage dir "off" against "off2") measured 1.5%
# apart, round after round, between two relays otherwise identical.
declare -A port pid dir
n=0
declare -A bin=([off]="$BIN" [off2]="$BIN" [metrics]="$BIN" [on]="$BIN" [nofleet]="$BIN" [base]="$BASE_BIN")
extra[base]=""
for cfg in off off2 metrics on nofleet base; do
  dir[$cfg]="$work/relay$n"; n=$((n + 1))
  port[$cfg]=$(free_port)
  # The load comes from one loopback address: no per-address connection cap
  # (a key the reference build may predate; it has no such cap then).
  cap=$'max_connections_per_address = 0\n'; [ "$cfg" != base ] || cap=""
  printf '[server]\nlisten = "127.0.0.1:%s"\nworkers = %s\n%s[storage]\ndir = "%s"\n[[upstream]]\nurl = "http://127.0.0.1:%s"\n[trust]\npublic_key = "%s"\n[log]\nlevel = "warn"\n%s\n' \
    "${port[$cfg]}" "$WORKERS" "$cap" "${dir[$cfg]}" "$oport" "$pub" "${extra[$cfg]}" > "${dir[$cfg]}.base.toml"
done

# Every request an agent id drawn at random, so every request looks up the
# state of an agent that has not asked for a while.
cat > "$work/ids.lua" <<LUA
request = function()
  return wrk.format(nil, nil, { ["X-Agent-Id"] = "agent-" .. math.random(1, $AGENT_IDS) })
end
LUA
# The warm-up asks as every agent in turn, so that every agent is known before
# measuring: what is measured is a fleet the relay has seen, not the first
# sight of each agent (its state made, the table grown).
cat > "$work/warm.lua" <<LUA
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, { ["X-Agent-Id"] = "agent-" .. (i % $AGENT_IDS + 1) })
end
LUA
load() { taskset -c "$LOAD_CPUS" wrk -t1 -c"$2" -d"$3" -s "$work/${4:-ids}.lua" "$1" 2>&1; }

# Each start draws a fresh memory layout: its config gets a comment of random
# length (what the relay allocates while reading it moves everything allocated
# after), and its environment a variable of random size (the environment sits
# at the top of the stack). Configurations differ in content, so without this
# each would keep its own lucky or unlucky layout from round to round.
pad() { head -c $((RANDOM % 4096)) /dev/zero | tr '\0' x; }
start() { # cfg
  { echo "# layout $(pad)"; cat "${dir[$1]}.base.toml"; } > "${dir[$1]}.toml"
  [ -n "${bin[$1]}" ] || { echo "no binary for relay $1 (BASE_BIN?)" >&2; exit 2; }
  PATCHRELAY_LAYOUT_PAD=$(pad) taskset -c "$RELAY_CPUS" "${bin[$1]}" serve --config "${dir[$1]}.toml" >>"${dir[$1]}.log" 2>&1 & pid[$1]=$!; pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:${port[$1]}/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:${port[$1]}/readyz" >/dev/null || { echo "relay $1 (${bin[$1]}) did not start:" >&2; cat "${dir[$1]}.log" >&2; exit 1; }
  curl -sf -o /dev/null "http://127.0.0.1:${port[$1]}/v1/objects/$small"
  curl -sf -o /dev/null "http://127.0.0.1:${port[$1]}/v1/objects/$large"
  [ -z "$huge" ] || curl -sf -o /dev/null "http://127.0.0.1:${port[$1]}/v1/objects/$huge"
}
stop() { kill "${pid[$1]}" 2>/dev/null || true; wait "${pid[$1]}" 2>/dev/null || true; }
# CPU time of all the relay's threads so far, in nanoseconds.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{t += $1} END {printf "%.0f\n", t}'; }
# Requests completed, and bytes read, from wrk's summary.
served() { awk '/requests in/ {r=$1} /Transfer\/sec/ {v=$2; u=v; gsub(/[0-9.]/,"",u); sub(/[A-Za-z]+$/,"",v); m=(u=="GB")?1024:(u=="MB")?1:(u=="KB")?1/1024:1/1048576; t=v*m} END {print r, t}' "$1"; }

# Load relays a and b at once; prints "throughput_b/throughput_a cpu_per_request_b/cpu_per_request_a
# figure_a figure_b cpu_a cpu_b" (figure: req/s, or MB/s for large objects;
# cpu: microseconds per request). Which of the two loads starts first swaps
# with `first` (a or b): the control showed the first one gets ~2% more.
pair() { # a b path conns field first lua
  local a=$1 b=$2 a0 b0 a1 b1 x y warm=warm
  [ "$7" = ids ] || warm=$7
  if [ "$6" = a ]; then x=$a; y=$b; else x=$b; y=$a; fi
  # Warm-up at the same load: every agent seen, buffers made.
  load "http://127.0.0.1:${port[$x]}$3" "$4" "${WARMUP}s" "$warm" >/dev/null &
  load "http://127.0.0.1:${port[$y]}$3" "$4" "${WARMUP}s" "$warm" >/dev/null; wait
  a0=$(cpu_ns "${pid[$a]}"); b0=$(cpu_ns "${pid[$b]}")
  load "http://127.0.0.1:${port[$x]}$3" "$4" "${DURATION}s" "$7" > "${dir[$x]}.wrk" &
  load "http://127.0.0.1:${port[$y]}$3" "$4" "${DURATION}s" "$7" > "${dir[$y]}.wrk"; wait
  a1=$(cpu_ns "${pid[$a]}"); b1=$(cpu_ns "${pid[$b]}")
  read -r ra ma <<<"$(served "${dir[$a]}.wrk")"; read -r rb mb <<<"$(served "${dir[$b]}.wrk")"
  awk -v ra="$ra" -v rb="$rb" -v ma="$ma" -v mb="$mb" -v ca=$((a1 - a0)) -v cb=$((b1 - b0)) -v f="$5" -v d="$DURATION" \
    'BEGIN {fa = (f == 1) ? ra / d : ma; fb = (f == 1) ? rb / d : mb;
            printf "%.4f %.4f %.0f %.0f %.3f %.3f\n", fb / fa, (cb / rb) / (ca / ra), fa, fb, ca / ra / 1000, cb / rb / 1000}'
}
summary() { sort -g | awk '{a[NR]=$1} function q(p,  i){i=1+(NR-1)*p; return a[int(i)]+(i-int(i))*(a[int(i)+1]-a[int(i)])} END {printf "%.3f (%.3f-%.3f)", q(0.5), q(0.25), q(0.75)}'; }

echo "agent ids drawn from $AGENT_IDS; $ROUNDS rounds of ${DURATION}s; $placement"
cat > "$work/ranges.lua" <<LUA
local size = $((256 << 20))
request = function()
  local a = math.random(0, size - 65536)
  return wrk.format(nil, nil, { ["Range"] = "bytes=" .. a .. "-" .. (a + 65535) })
end
LUA
for w in "plans|update plans (chain?from=1, a plan of one step), 64 conns per relay|req/s|/v1/components/plan/chain?from=1|64|1|ids" "small|4KiB object, 256 conns per relay|req/s|/v1/objects/$small|256|1|ids" "large|24MiB object, 16 conns per relay|MB/s|/v1/objects/$large|16|2|ids" "ranges|64KiB ranges of a 256MiB object, 64 conns per relay|req/s|/v1/objects/$huge|64|1|ranges"; do
  IFS='|' read -r name label unit path conns field lua <<<"$w"
  case ",$WORKLOADS," in *",$name,"*) ;; *) continue;; esac
  echo; echo "$label ($unit, CPU us per request)"
  IFS=, read -r -a pairs <<<"$PAIRS"
  for b in "${pairs[@]}"; do : > "$work/$name.$b"; done
  for r in $(seq "$ROUNDS"); do
    line="  round $r:"
    # The pairs' order rotates round by round, and which of a pair starts
    # (and is loaded) first alternates.
    IFS=, read -r -a pairs <<<"$PAIRS"
    first=$( [ $((r % 2)) -eq 0 ] && echo a || echo b)
    for i in "${!pairs[@]}"; do
      b=${pairs[$(( (i + r) % ${#pairs[@]} ))]}
      # Both relays of a pair start afresh, so neither has served more than
      # the other before it is measured.
      if [ "$first" = a ]; then start "$REF"; start "$b"; else start "$b"; start "$REF"; fi
      out=$(pair "$REF" "$b" "$path" "$conns" "$field" "$first" "$lua")
      stop "$REF"; stop "$b"
      echo "$out" >> "$work/$name.$b"
      read -r tr cr fa fb ua ub <<<"$out"
      line+=$(printf '  %s/%s %s (%s vs %s; cpu %s vs %s)' "$b" "$REF" "$cr" "$fb" "$fa" "$ub" "$ua")
    done
    echo "$line"
  done
  echo "  medians of $ROUNDS rounds (quartiles):"
  for b in "${pairs[@]}"; do
    printf '    %-8s/%s  throughput %s   CPU per request %s\n' "$b" "$REF" \
      "$(cut -d' ' -f1 "$work/$name.$b" | summary)" "$(cut -d' ' -f2 "$work/$name.$b" | summary)"
  done
done
