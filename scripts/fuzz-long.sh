#!/usr/bin/env bash
# The long fuzz runs of docs/reliability.md, on a machine with many cores and no Rust toolchain
# (the GPU machine's host: the device tool carries fuzz-bundle/).
#
#   scripts/fuzz-long.sh build   here: builds both targets (cargo-fuzz, stable, --sanitizer none)
#                                and packs them, the corpus and the dictionary into fuzz-bundle/
#   scripts/fuzz-long.sh run [INPUTS]
#                                there (carry fuzz-bundle): runs the decoder for INPUTS inputs
#                                (default 1,000,000), then the dispatcher for INPUTS inputs split
#                                over one job per core; logs, the final stats and any crash
#                                reproducer go to $OUT (or ./fuzz-out)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
  (cd fuzz && cargo +stable fuzz build --sanitizer none)
  rm -rf fuzz-bundle && mkdir -p fuzz-bundle
  cp fuzz/target/x86_64-unknown-linux-gnu/release/{decode,dispatch} fuzz-bundle/
  strip fuzz-bundle/decode fuzz-bundle/dispatch
  tar czf fuzz-bundle/corpus.tgz -C fuzz corpus dict
  cp "$0" fuzz-bundle/
  du -sh fuzz-bundle
  ;;
run)
  inputs=${2:-1000000}
  out=${OUT:-$PWD/fuzz-out}
  mkdir -p "$out"
  root=$PWD
  work=$(mktemp -d)
  tar xzf fuzz-bundle/corpus.tgz -C "$work"
  cores=$(nproc)
  {
    echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "inputs per target: $inputs"
  } | tee "$out/summary.txt"
  cd "$work"
  start=$(date +%s)
  "$root/fuzz-bundle/decode" -runs="$inputs" -dict=dict/protocol.dict -print_final_stats=1 \
    -artifact_prefix="$out/decode-" corpus/decode >"$out/decode.log" 2>&1 || echo "decode: FAILED (see decode.log)" | tee -a "$out/summary.txt"
  echo "decode: $(( $(date +%s) - start )) s; $(grep -E '^stat::number_of_executed_units' "$out/decode.log")" | tee -a "$out/summary.txt"
  # One job per core; -runs counts per job.
  per_job=$(( (inputs + cores - 1) / cores ))
  start=$(date +%s)
  "$root/fuzz-bundle/dispatch" -jobs="$cores" -workers="$cores" -runs="$per_job" \
    -dict=dict/protocol.dict -timeout=60 -max_total_time="${MAX_SECONDS:-500}" \
    -artifact_prefix="$out/dispatch-" -print_final_stats=1 corpus/dispatch >"$out/dispatch.log" 2>&1 || true
  secs=$(( $(date +%s) - start ))
  cp fuzz-*.log "$out/" 2>/dev/null || true
  total=$(cat fuzz-*.log | grep -E '^stat::number_of_executed_units' | awk '{s+=$2} END {print s+0}')
  crashes=$(find "$out" -name "dispatch-*" -type f | wc -l)
  echo "dispatch: $cores jobs of $per_job inputs, $total inputs in $secs s, $crashes reproducer(s)" | tee -a "$out/summary.txt"
  grep -h -E 'ERROR|panicked|invariant broken|deadly signal|Timeout' fuzz-*.log | head -20 | tee -a "$out/summary.txt" || true
  ;;
*)
  echo "usage: $0 build | run [INPUTS]" >&2
  exit 2
  ;;
esac
