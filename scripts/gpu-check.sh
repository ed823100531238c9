#!/usr/bin/env bash
# The GPU checks and benchmarks, in one call on the GPU machine.
#
#   scripts/gpu-check.sh build   here (Rust toolchain): builds the binaries into gpu-bundle/
#   scripts/gpu-check.sh run     on the GPU machine (carry gpu-bundle): runs the GPU tests, the
#                                GPU benchmarks, a full-scale trace replay on cuda:0, the Python
#                                client's tests and issue 14's export proof (scripts/gpu/export_proof.py:
#                                needs python3 with torch; safetensors for its comparison), and
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
  cp assets/traces/sdxl-inference.jsonl gpu-bundle/
  cp -r clients/python gpu-bundle/python
  cp scripts/gpu-check.sh gpu-bundle/
  cp scripts/gpu/export_proof.py gpu-bundle/
  find gpu-bundle/python -name __pycache__ -prune -exec rm -rf {} +
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
    echo "## memcoord serve on the GPU: allocations, analytics, recommendations, metrics, dashboard"
    echo '```'
    "$b/memcoord" serve --listen 127.0.0.1:7077 --budget cuda:0=8GiB >/dev/null 2>"$out/serve.err" &
    serve_pid=$!
    python3 - <<'PY' 2>&1 || echo "SERVE CHECK FAILED"
import json, time, urllib.request
base = "http://127.0.0.1:7077"
def call(method, path, body=None, accept="application/json"):
    req = urllib.request.Request(base + path, method=method, headers={"Accept": accept, "Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
for _ in range(100):
    try:
        if call("GET", "/healthz")[0] == 200: break
    except Exception: time.sleep(0.1)
ids = []
for i in range(64):
    s, t = call("POST", "/v1/allocations", {"device_id": "cuda:0", "size_bytes": 64 << 20, "allocation_type": "Activations" if i % 2 else "Cache", "purpose": f"layer{i % 4}"})
    assert s == 200, t
    ids.append(json.loads(t)["data"]["allocation"]["allocation_id"])
for i in ids[::2]:
    assert call("DELETE", f"/v1/allocations/{i}")[0] == 200
a = json.loads(call("GET", "/v1/analytics?device_id=cuda:0&window_seconds=60")[1])["data"]["devices"][0]
print("analytics cuda:0: allocations", a["allocation_count"], "latency ms", a["allocation_latency_ms"], "peak", a["peak_allocated_bytes"], "by purpose", a["bytes_by_purpose"])
recs = json.loads(call("GET", "/v1/recommendations?device_id=cuda:0")[1])["data"]["recommendations"]
print("recommendations:", [(r["kind"], r["estimated_savings_bytes"]) for r in recs])
for r in recs:
    if r["kind"] == "Defragment":
        s, t = call("POST", "/v1/command", {"request_id": "r", "action": r["request"]["action"], "data": r["request"]["data"]})
        d = json.loads(t)["data"]
        print("applied Defragment: moved", d["moved_count"], "fragmentation", d["fragmentation_before"], "->", d["fragmentation_after"])
t0 = time.time(); s, t = call("GET", "/v1/dashboard/state?buckets=256"); dt = (time.time() - t0) * 1000
print(f"dashboard state: HTTP {s}, {len(t)} bytes, {dt:.1f} ms")
s, m = call("GET", "/metrics", accept="application/openmetrics-text")
print("metrics: HTTP", s, "; cuda:0 lines:")
print("\n".join(l for l in m.splitlines() if 'device="cuda:0"' in l and ("allocated_bytes" in l or "fragmentation" in l or "capacity" in l or "pressure_level" in l)))
PY
    "$b/memcoord" devices --url http://127.0.0.1:7077 2>&1 || true
    kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null; echo "serve exited: $?"
    echo '```'
    echo "## replay through the CLI, full scale, cuda:0"
    echo '```'
    "$b/memcoord" replay "$b/sdxl-inference.jsonl" --device cuda:0 --budget cuda:0=100GiB --json 2>&1 || true
    echo '```'
    echo "## Python client tests on the GPU (cuda.attach against the real driver)"
    echo '```'
    MEMCOORD_BIN="$b/memcoord" python3 -m unittest discover -s "$b/python/tests" -v 2>&1 || echo "PYTHON CLIENT TESTS FAILED"
    echo '```'
    PYTHONUNBUFFERED=1 python3 "$b/export_proof.py" --memcoord "$b/memcoord" --client-dir "$b/python" || echo "EXPORT PROOF FAILED"
  } 2>&1 | tee "$report"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
