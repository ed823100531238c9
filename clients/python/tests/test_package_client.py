"""``memcoord.Client`` against the real binary: every v1 action through its typed helper, over stdio
(``Client.spawn``) and over HTTP (``Client(url=...)`` to ``memcoord serve``). Exports against the
worker are in test_exports_server.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
import unittest

from mc_testutil import MiB, find_binary, safetensors_bytes, sample_tensors

from memcoord import Client, MemcoordError

WORKER_ARGS = ["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"]


class TypedHelpersStdioTest(unittest.TestCase):
    binary: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.binary = find_binary()

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        blob, self.data_start, self.spans = safetensors_bytes(sample_tensors())
        self.model_bytes = blob
        with open(os.path.join(self.tmp.name, "m.safetensors"), "wb") as f:
            f.write(blob)
        self.c = Client.spawn(self.binary, [*WORKER_ARGS, "--model-root", self.tmp.name], stderr="devnull")

    def tearDown(self) -> None:
        self.assertEqual(self.c.close(), 0)
        self.assertEqual(self.c.garbage, [])
        self.tmp.cleanup()

    def test_every_v1_action_typed(self) -> None:
        c = self.c
        devices = {d["device_id"]: d for d in c.list_devices()}
        self.assertEqual(devices["cpu"]["type"], "RAM")
        self.assertEqual(devices["shm"]["type"], "SharedMemory")

        status = c.get_status("cpu", include_fragmentation=True, include_allocations=False)
        self.assertEqual(status["device_id"], "cpu")
        self.assertIsNotNone(status["fragmentation"])
        before = c.get_usage("cpu")["allocated_bytes"]

        a = c.allocate("cpu", 3 * MiB, purpose="typed-test", allocation_type="Cache")
        aid = a["allocation"]["allocation_id"]
        self.assertEqual(a["allocation"]["size_bytes"], 3 * MiB)
        self.assertEqual(c.get_usage("cpu")["allocated_bytes"], before + 3 * MiB)
        listed = c.get_allocations("cpu", purpose="typed-test")
        self.assertEqual(listed["total_count"], 1)
        self.assertEqual(listed["allocations"][0]["allocation_id"], aid)

        t = c.transfer(aid, "cpu", "shm", mode="copy", wait_for_completion=True)
        self.assertEqual(t["status"], "Completed")
        self.assertEqual(t["bytes_transferred"], 3 * MiB)
        self.assertEqual(c.get_transfer(t["transfer_id"])["transfer_id"], t["transfer_id"])
        dest = t["destination_allocation_id"]
        self.assertEqual(c.get_allocations("shm", purpose="typed-test")["allocations"][0]["allocation_id"], dest)

        d = c.defragment("shm")
        self.assertEqual(d["device_id"], "shm")
        self.assertIn("moved_count", d)
        cleared = c.clear("shm")
        self.assertEqual((cleared["cleared_count"], cleared["freed_bytes"]), (1, 3 * MiB))

        o = c.optimize("cpu", "ClearCache")
        self.assertEqual(o["optimization_type"], "ClearCache")
        self.assertEqual(o["freed_bytes"], 3 * MiB, "a Cache allocation is reclaimed by ClearCache")
        with self.assertRaises(MemcoordError) as cm:
            c.deallocate(aid)
        self.assertEqual((cm.exception.code, cm.exception.status), ("ALLOCATION_NOT_FOUND", 404))

        b = c.allocate("cpu", MiB)
        self.assertEqual(c.deallocate(b["allocation"]["allocation_id"], device_id="cpu")["freed_bytes"], MiB)

        m = c.model_load("m", "m.safetensors", "shm", keep_alive_seconds=600)
        self.assertEqual((m["model_name"], m["tensor_count"]), ("m", len(sample_tensors())))
        self.assertEqual(m["size_bytes"], len(self.model_bytes) - self.data_start)
        self.assertEqual(c.model_status(model_name="m")["models"][0]["state"], "Loaded")
        lease = c.model_acquire("m", timeout_seconds=5)
        self.assertEqual(lease["model"]["model_name"], "m")
        with self.assertRaises(MemcoordError) as cm:
            c.model_unload("m")
        self.assertEqual((cm.exception.code, cm.exception.status), ("MODEL_IN_USE", 409))
        self.assertEqual(c.model_release(lease["lease_id"]), {"lease_id": lease["lease_id"], "model_name": "m"})
        opt = c.model_optimize("UnloadIdle", idle_seconds=0)
        self.assertEqual(opt["unloaded"], ["m"])
        with self.assertRaises(MemcoordError) as cm:
            c.model_status(model_name="m")
        self.assertEqual(cm.exception.code, "MODEL_NOT_FOUND")
        c.model_load("m", "m.safetensors", "shm")
        self.assertEqual(c.model_unload("m", force=True)["model_name"], "m")

        pressure = c.get_pressure("cpu")
        self.assertEqual([p["device_id"] for p in pressure], ["cpu"])
        self.assertEqual(c.analytics("cpu", window_seconds=60)[0]["window_seconds"], 60)
        self.assertIsInstance(c.optimization_recs(), list)

    def test_leases_with_a_time_limit_and_scoped_helpers(self) -> None:
        c = self.c
        c.model_load("m", "m.safetensors", "cpu")
        # Over stdio a lease without ttl_seconds has no time limit.
        with c.lease("m") as unlimited:
            self.assertIsNone(unlimited["expires_at"])
            with c.lease("m", ttl_seconds=120) as timed:
                self.assertIsInstance(timed["expires_at"], str)
                leases = c.model_status(model_name="m")["models"][0]["leases"]
                self.assertEqual({l["lease_id"] for l in leases}, {unlimited["lease_id"], timed["lease_id"]})
                renewed = c.model_renew(timed["lease_id"], 600)
                self.assertEqual(renewed["lease_id"], timed["lease_id"])
                self.assertGreater(renewed["expires_at"], timed["expires_at"])
                again = c.model_renew(timed["lease_id"])  # the limit it was last given, from now
                self.assertGreaterEqual(again["expires_at"], renewed["expires_at"])
                with self.assertRaises(MemcoordError) as cm:
                    c.model_acquire("m", ttl_seconds=0)
                self.assertEqual(cm.exception.code, "INVALID_PARAMETER")
                self.assertIn("ttl_seconds", cm.exception.message)
            # Released on leaving the block, and a release inside it is fine too.
            self.assertEqual(len(c.model_status(model_name="m")["models"][0]["leases"]), 1)
            c.model_release(unlimited["lease_id"])
        self.assertEqual(c.model_status(model_name="m")["models"][0]["leases"], [])
        with self.assertRaises(MemcoordError) as cm:
            c.model_renew(timed["lease_id"], 5)
        self.assertEqual((cm.exception.code, cm.exception.status), ("LEASE_NOT_FOUND", 404))

        before = c.get_usage("shm")["allocated_bytes"]
        with self.assertRaises(RuntimeError):
            with c.allocation("shm", 2 * MiB, purpose="scoped") as a:
                self.assertEqual(a["size_bytes"], 2 * MiB)
                self.assertEqual(a["purpose"], "scoped")
                self.assertEqual(c.get_usage("shm")["allocated_bytes"], before + 2 * MiB)
                raise RuntimeError("the block fails: the allocation is freed all the same")
        self.assertEqual(c.get_usage("shm")["allocated_bytes"], before)
        with c.allocation("cpu", MiB) as b:
            c.deallocate(b["allocation_id"])  # freed in the block: leaving it is still fine
        c.model_unload("m")

    def test_error_fields(self) -> None:
        with self.assertRaises(MemcoordError) as cm:
            self.c.allocate("nope", 4096)
        e = cm.exception
        self.assertEqual((e.code, e.status), ("INVALID_DEVICE", 404))
        self.assertIn("nope", e.message)
        self.assertIsInstance(e.request_id, str)
        with self.assertRaises(MemcoordError) as cm:
            self.c.allocate("cpu", 0)
        self.assertEqual(cm.exception.code, "INVALID_PARAMETER")


class HttpClientTest(unittest.TestCase):
    """``Client(url=...)`` against a real ``memcoord serve`` on a free loopback port."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.model_dir = self.tmp.name
        blob, _, _ = safetensors_bytes(sample_tensors())
        with open(os.path.join(self.model_dir, "m.safetensors"), "wb") as f:
            f.write(blob)
        self.addCleanup(self.tmp.cleanup)
        self.proc = subprocess.Popen(
            [find_binary(), "serve", "--listen", "127.0.0.1:0", *WORKER_ARGS, "--model-root", self.model_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        url = None
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            m = re.search(r"serving on (http://[0-9.:]+)", line)
            url = m.group(1) if m else None
        if url is None:
            self.proc.kill()
            self.fail("memcoord serve did not say where it listens")
        self.url = url

    def tearDown(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(20), 0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def test_typed_helpers_over_http(self) -> None:
        with Client(url=self.url) as c:
            self.assertIn("shm", [d["device_id"] for d in c.list_devices()])
            a = c.allocate("shm", 2 * MiB, purpose="http")
            self.assertEqual(c.get_usage("shm")["allocated_bytes"], 2 * MiB)
            # Concurrent: an allocate waiting for room does not hold up the others.
            waiting = c.submit("memory.allocate", {"device_id": "shm", "size_bytes": 63 * MiB, "timeout_seconds": 10})
            time.sleep(0.3)
            self.assertFalse(waiting.done())
            self.assertEqual(c.get_allocations("shm")["total_count"], 1)
            c.deallocate(a["allocation"]["allocation_id"])
            big = c.unwrap(c.wait(waiting, 15))
            self.assertEqual(big["allocation"]["size_bytes"], 63 * MiB)
            c.deallocate(big["allocation"]["allocation_id"])
            with self.assertRaises(MemcoordError) as cm:
                c.get_usage("nope")
            self.assertEqual((cm.exception.code, cm.exception.status), ("INVALID_DEVICE", 404))
            c.send_raw(b"not json")
            self.assertEqual(c.unmatched.get(timeout=5)["error_code"], "INVALID_REQUEST")

    def test_leases_over_http_have_a_time_limit_by_default(self) -> None:
        with Client(url=self.url) as c:
            c.model_load("m", "m.safetensors", "cpu")
            with c.lease("m") as l:
                self.assertIsInstance(l["expires_at"], str, "over HTTP a lease lasts 300 s by default")
                self.assertIsInstance(c.model_renew(l["lease_id"])["expires_at"], str)
            self.assertEqual(c.model_status(model_name="m")["models"][0]["leases"], [])


if __name__ == "__main__":
    unittest.main()
