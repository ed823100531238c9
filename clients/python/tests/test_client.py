"""End-to-end tests of ``memcoord worker`` through :mod:`memcoord_client` (stdlib unittest).

The binary is ``$MEMCOORD_BIN``; if unset, ``target/release/memcoord`` then ``target/debug/memcoord``
of the repository (``../../target`` relative to ``clients/python``).

Run from the repository root::

    MEMCOORD_BIN=target/debug/memcoord python3 -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import time
import unittest
from pathlib import Path
from typing import Any

CLIENT_DIR = Path(__file__).resolve().parent.parent  # clients/python
sys.path.insert(0, str(CLIENT_DIR))

from memcoord_client import MemcoordClient, MemcoordError  # noqa: E402

MiB = 1024 * 1024
WORKER_ARGS = ["--budget", "cpu=64MiB", "--budget", "shm=64MiB"]
ENVELOPE_KEYS = {"success", "request_id", "data", "error_code", "error_message", "status_code"}
USAGE_KEYS = {
    "device_id", "allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
    "reservation_bytes", "model_bytes", "budget_bytes", "allocation_count", "total_allocations",
    "total_deallocations", "failed_allocations", "average_allocation_time_ms",
}
ALLOCATE_KEYS = {
    "device_id", "allocation", "success", "allocation_time_ms", "available_memory_bytes",
    "utilization_percentage", "message", "allocated_at",
}
ALLOCATION_KEYS = {
    "allocation_id", "device_id", "size_bytes", "alignment", "allocation_type", "purpose",
    "persistent", "owner", "created_at", "handle",
}


def find_binary() -> str:
    """Locate the memcoord binary, or raise with a clear message (fails the whole test class)."""
    env = os.environ.get("MEMCOORD_BIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise FileNotFoundError(f"MEMCOORD_BIN={env!r} is not an executable file")
        return env
    for profile in ("release", "debug"):
        candidate = (CLIENT_DIR / ".." / ".." / "target" / profile / "memcoord").resolve()
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(
        "memcoord binary not found: set MEMCOORD_BIN, or build it (cargo build) so that "
        f"{(CLIENT_DIR / '..' / '..' / 'target').resolve()}/{{release,debug}}/memcoord exists"
    )


class WorkerTest(unittest.TestCase):
    binary: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.binary = find_binary()

    def setUp(self) -> None:
        self.mc = MemcoordClient(self.binary, WORKER_ARGS, stderr="devnull")
        self.closed = False

    def tearDown(self) -> None:
        if not self.closed:
            code = self.mc.close()
            self.assertEqual(code, 0, "worker exit code after EOF on stdin")
        self.assertEqual(self.mc.garbage, [], "stdout must carry protocol responses only")

    # -- helpers ---------------------------------------------------------------------------

    def usage(self, device: str) -> dict[str, Any]:
        u = self.mc.call("memory.get_usage", {"device_id": device})
        self.assertTrue(USAGE_KEYS <= set(u), f"MemoryUsageStats misses {USAGE_KEYS - set(u)}")
        self.assertEqual(u["device_id"], device)
        return u

    def allocate(self, device: str, size: int, **extra: Any) -> dict[str, Any]:
        data = self.mc.call("memory.allocate", {"device_id": device, "size_bytes": size, **extra})
        self.check_allocate(data, device, size)
        return data

    def check_allocate(self, data: dict[str, Any], device: str, size: int) -> None:
        self.assertTrue(ALLOCATE_KEYS <= set(data), f"AllocateMemoryResponse misses {ALLOCATE_KEYS - set(data)}")
        alloc = data["allocation"]
        self.assertTrue(ALLOCATION_KEYS <= set(alloc), f"MemoryAllocation misses {ALLOCATION_KEYS - set(alloc)}")
        self.assertIs(data["success"], True)
        self.assertEqual(data["device_id"], device)
        self.assertEqual(alloc["device_id"], device)
        self.assertEqual(alloc["size_bytes"], size)
        self.assertIsInstance(alloc["allocation_id"], str)

    def deallocate(self, allocation_id: str, device: str, size: int) -> None:
        d = self.mc.call("memory.deallocate", {"allocation_id": allocation_id})
        self.assertEqual(d, {"allocation_id": allocation_id, "device_id": device, "freed_bytes": size})

    # -- tests -----------------------------------------------------------------------------

    def test_list_devices(self) -> None:
        env = self.mc.request("memory.list_devices")
        self.assertEqual(set(env), ENVELOPE_KEYS)
        self.assertIs(env["success"], True)
        self.assertEqual(env["status_code"], 200)
        self.assertIsNone(env["error_code"])
        types = {d["device_id"]: d["type"] for d in env["data"]["devices"]}
        self.assertEqual(types.get("cpu"), "RAM", types)
        self.assertEqual(types.get("shm"), "SharedMemory", types)

    def test_allocate_deallocate_cpu(self) -> None:
        size = 3 * MiB + 17
        before = self.usage("cpu")
        data = self.allocate("cpu", size, purpose="test")
        self.assertIsNone(data["allocation"]["handle"])
        during = self.usage("cpu")
        self.assertEqual(during["allocated_bytes"], before["allocated_bytes"] + size)
        self.assertEqual(during["allocation_count"], before["allocation_count"] + 1)
        self.deallocate(data["allocation"]["allocation_id"], "cpu", size)
        after = self.usage("cpu")
        self.assertEqual(after["allocated_bytes"], before["allocated_bytes"])
        self.assertEqual(after["allocation_count"], before["allocation_count"])

    def test_shm_handle_is_mappable(self) -> None:
        size = 1 * MiB + 4321
        data = self.allocate("shm", size)
        handle = data["allocation"]["handle"]
        self.assertIsInstance(handle, dict, "shm allocation must carry a handle {path, offset}")
        path, offset = handle["path"], handle["offset"]
        self.assertIsInstance(path, str)
        self.assertIsInstance(offset, int)
        self.assertGreaterEqual(os.path.getsize(path), offset + size, "shm file shorter than offset + size")

        pattern = (bytes(range(251)) * (size // 251 + 1))[:size]
        base = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
        delta = offset - base

        # First mapping: write the pattern.
        with open(path, "r+b") as f:
            with mmap.mmap(f.fileno(), delta + size, offset=base) as m1:
                m1[delta:delta + size] = pattern
                m1.flush()

        # Second, separate mapping of the same file: read it back.
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, delta + size, prot=mmap.PROT_READ, offset=base) as m2:
                self.assertTrue(m2[delta:delta + size] == pattern, "pattern read back through a second mapping differs")
        finally:
            os.close(fd)

        self.deallocate(data["allocation"]["allocation_id"], "shm", size)

    def test_invalid_device(self) -> None:
        with self.assertRaises(MemcoordError) as cm:
            self.mc.call("memory.allocate", {"device_id": "nope", "size_bytes": 4096})
        err = cm.exception
        self.assertEqual(err.error_code, "INVALID_DEVICE")
        self.assertEqual(err.status_code, 404)
        self.assertIsInstance(err.request_id, str)
        self.assertTrue(err.error_message)

    def test_malformed_line(self) -> None:
        self.mc.send_raw(b'{"request_id": "x", "action": ')  # not valid JSON
        try:
            resp = self.mc.unmatched.get(timeout=10)
        except queue.Empty:
            self.fail("no response to a malformed line within 10 s")
        self.assertEqual(set(resp), ENVELOPE_KEYS)
        self.assertIs(resp["success"], False)
        self.assertIsNone(resp["request_id"])
        self.assertEqual(resp["error_code"], "INVALID_REQUEST")
        self.assertEqual(resp["status_code"], 400)
        self.assertIsNone(resp["data"])
        # The worker keeps going.
        self.assertEqual(self.usage("cpu")["device_id"], "cpu")

    def test_waiting_allocate_does_not_block_others(self) -> None:
        first = self.allocate("cpu", 32 * MiB)
        big = 48 * MiB
        pending = self.mc.submit("memory.allocate", {"device_id": "cpu", "size_bytes": big, "timeout_seconds": 10})
        time.sleep(0.3)  # let the worker start waiting
        self.assertFalse(pending.done(), "48 MiB allocate should wait: 32 + 48 MiB > 64 MiB budget")

        t0 = time.monotonic()
        u = self.usage("cpu")
        self.assertLess(time.monotonic() - t0, 5.0, "get_usage was held up by the waiting allocate")
        self.assertFalse(pending.done(), "get_usage must be answered while the allocate is still pending")
        self.assertEqual(u["allocated_bytes"], 32 * MiB)

        self.deallocate(first["allocation"]["allocation_id"], "cpu", 32 * MiB)
        env = self.mc.wait(pending, timeout=10)
        data = self.mc.unwrap(env)
        self.check_allocate(data, "cpu", big)
        self.assertEqual(self.usage("cpu")["allocated_bytes"], big)
        self.deallocate(data["allocation"]["allocation_id"], "cpu", big)

    def test_close_exit_code(self) -> None:
        self.mc.call("memory.allocate", {"device_id": "cpu", "size_bytes": MiB})
        self.closed = True
        self.assertEqual(self.mc.close(), 0)
        self.assertEqual(self.mc.unmatched.qsize(), 0)
        self.assertEqual(self.mc.garbage, [])


if __name__ == "__main__":
    unittest.main()
