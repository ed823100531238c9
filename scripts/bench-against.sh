#!/usr/bin/env bash
# This tree's stdio and engine benchmarks side by side with an earlier commit's, in one run,
# alternating between the two so that both see the same machine (issue 13: "figures within
# noise of before"). Prints each run's lines, labelled, then a summary table.
#
#   scripts/bench-against.sh REV [ROUNDS]     (ROUNDS: runs of each side, default 3)
#
# The earlier commit is checked out in a git worktree (target/bench-base, or the directory in
# MEMCOORD_BENCH_BASE_DIR) and built there with its own target directory: the first run builds
# it (minutes), later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/bench-against.sh REV [ROUNDS]}
rounds=${2:-3}
base=${MEMCOORD_BENCH_BASE_DIR:-target/bench-base}

exe_of() { # the executable cargo built for a bench target
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
build() { # directory → "stdio-exe engine-exe", built in that tree
  local dir=$1 stdio engine
  stdio=$(cd "$dir" && cargo bench --quiet --no-run --bench stdio --message-format=json 2>/dev/null | exe_of stdio)
  engine=$(cd "$dir" && cargo bench --quiet --no-run --bench engine --message-format=json 2>/dev/null | exe_of engine)
  echo "$stdio $engine"
}

if [ ! -e "$base/.git" ]; then
  git worktree add --detach "$base" "$rev" >/dev/null
else
  git -C "$base" checkout --quiet --detach "$rev"
fi
read -r base_stdio base_engine < <(build "$base")
read -r new_stdio new_engine < <(build .)
[ -n "$base_stdio" ] && [ -n "$new_stdio" ] || { echo "build failed" >&2; exit 1; }

log=$(mktemp)
for round in $(seq "$rounds"); do
  for side in base new; do
    if [ "$side" = base ]; then s=$base_stdio; e=$base_engine; else s=$new_stdio; e=$new_engine; fi
    echo "== round $round, $side: stdio =="
    "$s" 2>/dev/null | sed "s/^/$side stdio | /" | tee -a "$log"
    echo "== round $round, $side: engine (pairs) =="
    "$e" --pairs-only 2>/dev/null | sed "s/^/$side engine | /" | tee -a "$log"
  done
done

python3 - "$log" "$rev" <<'PY'
import re, statistics, sys
log, rev = sys.argv[1], sys.argv[2]
figures = {}
for line in open(log):
    side, _, rest = line.partition(" ")
    def add(name, value):
        figures.setdefault(name, {}).setdefault(side, []).append(float(value))
    if m := re.search(r"memcoord worker\s+([\d.]+) req/s", rest): add("stdio: pipelined get_usage (req/s)", m[1])
    if m := re.search(r"memcoord pair\s+p50\s+([\d.]+)", rest): add("stdio: allocate+free pair p50 (µs)", m[1])
    if m := re.search(r"cat echo floor p50\s+([\d.]+)", rest): add("stdio: cat echo floor p50 (µs)", m[1])
    if m := re.search(r"^\s*([\d,]+) live:\s+([\d.]+) ns per pair", rest.split("| ", 1)[-1]):
        add(f"engine: pair p50, {m[1]} live (ns)", m[2])
print(f"\n| figure (median of runs) | {rev} | this tree | this / {rev} |")
print("|---|---|---|---|")
for name, sides in figures.items():
    b, n = statistics.median(sides.get("base", [0])), statistics.median(sides.get("new", [0]))
    print(f"| {name} | {b:,.1f} | {n:,.1f} | {n / b if b else float('nan'):.2f} |")
PY
rm -f "$log"
