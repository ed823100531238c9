#!/usr/bin/env python3
"""Baseline stdio worker: the "status quo" a memcoord benchmark compares against.

It does what the seed's Python workers do, and no more: read NDJSON requests with
``for line in sys.stdin``, ``json.loads`` each one, handle it synchronously, and write the
response envelope with ``json.dumps`` to ``sys.stdout``.

* ``memory.get_usage`` answers a MemoryUsageStats-shaped dict for device ``"cpu"``, built from
  the in-memory counters the worker keeps (as a real worker keeps its bookkeeping);
  any other ``device_id`` gets ``INVALID_DEVICE``.
* Any other action gets ``UNKNOWN_ACTION``; a line that is not a JSON object gets
  ``INVALID_REQUEST`` with ``request_id: null``.

Output buffering: by default stdout is left buffered (Python's default for a pipe) and flushed
at EOF only, so this suits pipelined runs (send everything, then read). A client that waits for
each answer before sending the next request must pass ``--flush-each``, which flushes after
every response line.

Usage: ``python3 baseline_worker.py [--flush-each] [--budget-bytes N]``
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional


def envelope(request_id: Optional[str], data: Any = None, error_code: Optional[str] = None,
             error_message: Optional[str] = None, status_code: int = 200) -> dict[str, Any]:
    """Build a response envelope with every field present."""
    return {
        "success": error_code is None,
        "request_id": request_id,
        "data": data,
        "error_code": error_code,
        "error_message": error_message,
        "status_code": status_code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flush-each", action="store_true", help="flush stdout after every response")
    parser.add_argument("--budget-bytes", type=int, default=64 * 1024 * 1024, help="budget reported for cpu")
    args = parser.parse_args()

    # The worker's bookkeeping, as a real worker would keep it.
    stats: dict[str, dict[str, Any]] = {
        "cpu": {
            "device_id": "cpu",
            "allocated_bytes": 0,
            "reserved_bytes": 0,
            "peak_allocated_bytes": 0,
            "peak_reserved_bytes": 0,
            "reservation_bytes": 0,
            "model_bytes": 0,
            "budget_bytes": args.budget_bytes,
            "allocation_count": 0,
            "total_allocations": 0,
            "total_deallocations": 0,
            "failed_allocations": 0,
            "average_allocation_time_ms": 0.0,
        }
    }

    out = sys.stdout
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError as e:
            resp = envelope(None, error_code="INVALID_REQUEST", error_message=f"invalid JSON: {e}", status_code=400)
        else:
            if not isinstance(req, dict):
                resp = envelope(None, error_code="INVALID_REQUEST", error_message="request is not an object",
                                status_code=400)
            else:
                rid = req.get("request_id")
                action = req.get("action")
                data = req.get("data") or {}
                if action == "memory.get_usage":
                    device = data.get("device_id") if isinstance(data, dict) else None
                    if device in stats:
                        resp = envelope(rid, dict(stats[device]))
                    else:
                        resp = envelope(rid, error_code="INVALID_DEVICE", error_message=f"Device {device} not found",
                                        status_code=404)
                else:
                    resp = envelope(rid, error_code="UNKNOWN_ACTION", error_message=f"unknown action {action!r}",
                                    status_code=404)
        out.write(json.dumps(resp) + "\n")
        if args.flush_each:
            out.flush()
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
