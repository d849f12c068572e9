#!/usr/bin/env bash
# Air-gap throughput: `patchrelay export` and `import` of a repository of
# SIZE_GIB beside `tar cf` and `tar xf` of the same files, on the same disk,
# in the same run, alternating; and the peak memory of each.
#
#   loadtest/airgap-bench.sh                       # 2 GiB in 64 objects of 32 MiB, 3 rounds
#   SIZE_GIB=1 FILE_MIB=8 ROUNDS=5 loadtest/airgap-bench.sh
#   WORK=/mnt/usb loadtest/airgap-bench.sh          # where the files go (a real disk, not tmpfs)
#
# Every step starts with a cold page cache (as root: drop_caches; otherwise
# the step says "warm") and ends with its bytes on disk: each command is
# followed by `sync`, which is where tar's writes reach the disk (patchrelay
# fsyncs the bundle itself, and syncs the store's file system once before an
# import is adopted). Reported: seconds (median), MB/s, patchrelay's time
# over tar's (the goal: within 1.5x), and peak RSS.
#
# Needs a release build: cargo build --release
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_GIB=${SIZE_GIB:-2}
FILE_MIB=${FILE_MIB:-32}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release/patchrelay}
WORK=${WORK:-/var/tmp}
[ -x "$BIN" ] || { echo "missing: $BIN (cargo build --release)" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "missing: /usr/bin/time (apt-get install time)" >&2; exit 2; }

work=$(mktemp -d "$WORK/patchrelay-airgap.XXXXXX")
trap '[ -n "${KEEP:-}" ] && cat "$work/results" >&2; rm -rf "$work"' EXIT
files=$(( (SIZE_GIB << 10) / FILE_MIB ))
cache="warm"
[ "$(id -u)" -eq 0 ] && [ -w /proc/sys/vm/drop_caches ] && cache="cold"
drop() {
  sync
  if [ "$cache" = cold ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

echo "generating $files objects of $FILE_MIB MiB in $work ..." >&2
for i in $(seq -w 1 "$files"); do
  mkdir -p "$work/in/c$i/1"
  head -c $((FILE_MIB << 20)) /dev/urandom > "$work/in/c$i/1/c$i.bin"
done
pub=$("$BIN" keygen --secret "$work/key" 2>/dev/null)
"$BIN" publish --input "$work/in" --output "$work/repo" --key "$work/key" >/dev/null
rm -rf "$work/in"
bytes=$(du -sb "$work/repo/v1" | cut -f1)

# run NAME CMD...: seconds (including the sync after it) and peak RSS (KiB).
run() {
  local name=$1; shift
  drop
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$work/rss" "$@" >/dev/null
  sync
  t1=$(date +%s.%N)
  echo "$name $(echo "$t1 - $t0" | bc) $(cat "$work/rss")" >> "$work/results"
}

# Each round writes into a directory of its own, removed (and the freed
# blocks given back: with `discard`, a file system pays for a deletion at
# its next commit) before the next round, never between two steps.
round_dir=""
tar_cf() { run tar_cf tar cf "$round_dir/tar.tar" -C "$work/repo" v1; }
export_() { run export "$BIN" export --repository "$work/repo" --output "$round_dir/bundle.tar" --quiet; }
tar_xf() { mkdir "$round_dir/x"; run tar_xf tar xf "$round_dir/bundle.tar" -C "$round_dir/x"; }
import_() {
  printf '[storage]\ndir = "%s"\n[trust]\npublic_key = "%s"\n' "$round_dir/relay" "$pub" > "$round_dir/relay.toml"
  run import "$BIN" import --config "$round_dir/relay.toml" "$round_dir/bundle.tar" --quiet
}
# Alternating which goes first, round by round (an export before its tar,
# then a tar before its export).
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r of $ROUNDS ..." >&2
  round_dir="$work/round-$r"
  mkdir "$round_dir"
  if [ $((r % 2)) -eq 1 ]; then
    tar_cf; export_; tar_xf; import_
  else
    export_; tar_cf; import_; tar_xf
  fi
  rm -rf "$round_dir"
  sync
  command -v fstrim >/dev/null 2>&1 && [ "$cache" = cold ] && fstrim "$WORK" 2>/dev/null || sleep 5
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
col() { awk -v n="$1" -v c="$2" '$1==n {print $c}' "$work/results" | median; }
printf '\n%s of objects (%d x %d MiB), %s page cache, median of %d rounds, each step ending in sync\n' \
  "$(numfmt --to=iec "$bytes")" "$files" "$FILE_MIB" "$cache" "$ROUNDS"
printf '%-8s %9s %9s %11s\n' step seconds MB/s "peak RSS"
for s in tar_cf export tar_xf import; do
  t=$(col "$s" 2); m=$(col "$s" 3)
  printf '%-8s %9.2f %9.0f %8.0f MiB\n' "$s" "$t" "$(echo "$bytes / $t / 1000000" | bc -l)" "$(echo "$m / 1024" | bc -l)"
done
printf 'export / tar cf: %.2fx the time; import / tar xf: %.2fx\n' \
  "$(echo "$(col export 2) / $(col tar_cf 2)" | bc -l)" "$(echo "$(col import 2) / $(col tar_xf 2)" | bc -l)"
