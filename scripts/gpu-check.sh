#!/usr/bin/env bash
# The GPU checks and benchmarks, in one call on the GPU machine.
#
#   scripts/gpu-check.sh build   here (Rust toolchain): builds the binaries into gpu-bundle/
#   scripts/gpu-check.sh run     on the GPU machine (carry gpu-bundle): runs the GPU tests, the
#                                GPU benchmarks and a full-scale trace replay on cuda:0, and
#                                writes the report to $OUT/gpu-report.md (or ./gpu-report.md)
set -euo pipefail
cd "$(dirname "$0")/.."

exe_of() { # the executable cargo built for a test or bench target
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}

case "${1:-}" in
build)
  cargo build --release --quiet
  rm -rf gpu-bundle && mkdir -p gpu-bundle
  cp target/release/memcoord gpu-bundle/
  cp "$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null | exe_of gpu)" gpu-bundle/gpu-tests
  cp "$(cargo bench --no-run --bench gpu --message-format=json 2>/dev/null | exe_of gpu)" gpu-bundle/gpu-bench
  cp ../shared/traces/sdxl-inference.jsonl gpu-bundle/ 2>/dev/null || echo "no trace beside the repo: the replay will be skipped"
  strip gpu-bundle/memcoord gpu-bundle/gpu-tests gpu-bundle/gpu-bench
  du -sh gpu-bundle
  ;;
run)
  out="${OUT:-.}"
  report="$out/gpu-report.md"
  b=gpu-bundle
  {
    echo "# memcoord GPU report"
    echo
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo
    echo "## GPU tests"
    echo '```'
    "$b/gpu-tests" --nocapture --test-threads=1 2>&1 || echo "GPU TESTS FAILED"
    echo '```'
    echo "## memcoord status"
    echo '```'
    "$b/memcoord" status 2>&1 || true
    echo '```'
    echo "## benchmarks"
    echo '```'
    MEMCOORD_TRACE="$b/sdxl-inference.jsonl" "$b/gpu-bench" 2>&1 || echo "GPU BENCH FAILED"
    echo '```'
    echo "## replay through the CLI, full scale, cuda:0"
    echo '```'
    "$b/memcoord" replay "$b/sdxl-inference.jsonl" --device cuda:0 --budget cuda:0=100GiB --json 2>&1 || true
    echo '```'
  } 2>&1 | tee "$report"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
