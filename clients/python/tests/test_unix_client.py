"""``memcoord.Client(unix_path=...)`` against an in-test NDJSON server on a Unix socket (PROTOCOL 8.1).

The server side of ``--unix`` comes with issue 15; this fake speaks the same framing: one request
object per line in, one response per line out, out of order, ``request_id: null`` for a bad line.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import unittest
from typing import Any, Dict, List

import mc_testutil  # noqa: F401  (puts the package on sys.path)

from memcoord import Client, ExportInfo, MemcoordError


def envelope(rid: Any, data: Any = None, code: str | None = None, message: str | None = None, status: int = 200) -> bytes:
    return json.dumps({"success": code is None, "request_id": rid, "data": data if code is None else None,
                       "error_code": code, "error_message": message, "status_code": status}).encode() + b"\n"


class FakeNdjsonServer:
    """Accepts one connection; answers requests by action. ``memory.allocate`` is held until a
    ``memory.get_usage`` has been answered, so answers go out of order."""

    def __init__(self, path: str, knows_hello: bool = True) -> None:
        self.path = path
        self.knows_hello = knows_hello
        self.received: List[Dict[str, Any]] = []
        self.raw_lines: List[bytes] = []
        self.eof_seen = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._held: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._sock.accept()
        self.conn = conn
        with conn, conn.makefile("rb") as rf:
            for raw in rf:
                self.raw_lines.append(raw)
                try:
                    req = json.loads(raw)
                except ValueError:
                    conn.sendall(envelope(None, code="INVALID_REQUEST", message="the line is not valid JSON", status=400))
                    continue
                self.received.append(req)
                self._answer(conn, req)
            self.eof_seen.set()
            for req in self._held:  # in-flight requests are answered before the server closes
                conn.sendall(envelope(req["request_id"], {"late": True}))

    def _answer(self, conn: socket.socket, req: Dict[str, Any]) -> None:
        rid, action, data = req["request_id"], req["action"], req.get("data") or {}
        if action == "memory.allocate":
            self._held.append(req)
            return
        if action == "memory.get_usage":
            if data.get("device_id") != "cpu":
                conn.sendall(envelope(rid, code="INVALID_DEVICE", message=f"Device {data.get('device_id')} not found", status=404))
                return
            conn.sendall(envelope(rid, {"device_id": "cpu", "allocated_bytes": 0}))
            held, self._held = self._held, []
            for h in held:
                conn.sendall(envelope(h["request_id"], {"device_id": "cpu", "allocation": {"allocation_id": "a1"}, "success": True}))
            return
        if action == "memory.hello" and self.knows_hello:
            conn.sendall(envelope(rid, {"session_id": "s1", "tenant": "render"}))
            return
        if action == "memory.export":
            conn.sendall(envelope(rid, {
                "export_id": "e1", "device_id": "shm", "device_uuid": None, "size_bytes": 4096,
                "socket_path": "/run/memcoord/claim.sock", "secret": "s3cret", "expires_at": "2026-12-03T18:00:00Z",
                "allocations": [{"allocation_id": "a1", "offset": 0, "size_bytes": 4096}],
                "tensors": [{"name": "w", "dtype": "F16", "shape": [2, 1024], "allocation_id": "a1", "offset": 0, "size_bytes": 4096}],
            }))
            return
        if action == "memory.unexport":
            conn.sendall(envelope(rid, {"export_id": data["export_id"], "allocation_count": 1}))
            return
        if action == "memory.list_exports":
            conn.sendall(envelope(rid, {"exports": [{"export_id": "e1", "claimed": False}]}))
            return
        conn.sendall(envelope(rid, code="UNKNOWN_ACTION", message=f"unknown action `{action}`", status=404))

    def close(self) -> None:
        self._sock.close()
        self._thread.join(5)


class UnixClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.server = FakeNdjsonServer(os.path.join(self.tmp.name, "memcoord.sock"))

    def tearDown(self) -> None:
        self.server.close()
        self.tmp.cleanup()

    def test_concurrent_requests_matched_out_of_order(self) -> None:
        with Client(unix_path=self.server.path, token="tok") as c:
            self.assertEqual(c.session, {"session_id": "s1", "tenant": "render"})
            self.assertEqual(self.server.received[0]["action"], "memory.hello")
            self.assertEqual(self.server.received[0]["data"], {"token": "tok"})
            pending = c.submit("memory.allocate", {"device_id": "cpu", "size_bytes": 4096})
            time.sleep(0.1)
            self.assertFalse(pending.done(), "the fake server holds the allocate until a get_usage")
            usage = c.get_usage("cpu")  # answered first, then the allocate
            self.assertEqual(usage, {"device_id": "cpu", "allocated_bytes": 0})
            alloc = c.unwrap(c.wait(pending, 5))
            self.assertEqual(alloc["allocation"]["allocation_id"], "a1")
            # Each request was one line, with a fresh request_id, and data without None fields.
            ids = [r["request_id"] for r in self.server.received]
            self.assertEqual(len(ids), len(set(ids)))
            self.assertEqual(self.server.received[-1], {"request_id": ids[-1], "action": "memory.get_usage", "data": {"device_id": "cpu"}})
            self.assertTrue(all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in self.server.raw_lines))

    def test_a_token_to_a_server_without_hello_is_tolerated(self) -> None:
        self.server.close()
        path = os.path.join(self.tmp.name, "old.sock")
        self.server = FakeNdjsonServer(path, knows_hello=False)
        with Client(unix_path=path, token="tok") as c:
            self.assertIsNone(c.session, "no memory.hello there: no session answer")
            self.assertEqual(self.server.received[0]["action"], "memory.hello")
            self.assertEqual(c.get_usage("cpu"), {"device_id": "cpu", "allocated_bytes": 0})

    def test_errors_and_unmatched(self) -> None:
        with Client(unix_path=self.server.path) as c:
            with self.assertRaises(MemcoordError) as cm:
                c.get_usage("nope")
            e = cm.exception
            self.assertEqual((e.code, e.status, e.message), ("INVALID_DEVICE", 404, "Device nope not found"))
            self.assertEqual((e.error_code, e.status_code), ("INVALID_DEVICE", 404))
            self.assertIsInstance(e.request_id, str)
            c.send_raw(b"not json")
            resp = c.unmatched.get(timeout=5)
            self.assertEqual(resp["error_code"], "INVALID_REQUEST")
            self.assertIsNone(resp["request_id"])

    def test_export_helpers(self) -> None:
        with Client(unix_path=self.server.path) as c:
            info = c.export(model_name="unet", lease_id="l1", claim_seconds=5)
            self.assertIsInstance(info, ExportInfo)
            self.assertEqual(self.server.received[-1]["data"], {"model_name": "unet", "lease_id": "l1", "claim_seconds": 5})
            self.assertEqual((info.export_id, info.secret, info.size_bytes), ("e1", "s3cret", 4096))
            self.assertEqual(info.tensor("w").shape, (2, 1024))
            self.assertEqual(info.allocations[0].allocation_id, "a1")
            c.export(allocation_id="a1")
            self.assertEqual(self.server.received[-1]["data"], {"allocation_id": "a1"})
            self.assertEqual(c.unexport("e1"), {"export_id": "e1", "allocation_count": 1})
            self.assertEqual(c.list_exports(), [{"export_id": "e1", "claimed": False}])
            with self.assertRaises(ValueError):
                c.export(allocation_id="a1", model_name="unet", lease_id="l1")
            with self.assertRaises(ValueError):
                c.export(model_name="unet")  # a model export needs its lease

    def test_close_waits_for_answers_in_flight(self) -> None:
        c = Client(unix_path=self.server.path)
        pending = c.submit("memory.allocate", {"device_id": "cpu", "size_bytes": 1})
        self.assertIsNone(c.close())
        self.assertTrue(self.server.eof_seen.is_set(), "close() sends EOF: the session ends")
        self.assertEqual(pending.result(1)["data"], {"late": True})
        with self.assertRaises(ConnectionError):
            c.submit("memory.get_usage", {"device_id": "cpu"})

    def test_connect_failure_is_clear(self) -> None:
        with self.assertRaises(ConnectionError) as cm:
            Client(unix_path=os.path.join(self.tmp.name, "absent.sock"))
        self.assertIn("absent.sock", str(cm.exception))
        Client(unix_path=self.server.path).close()  # let the fake's accept return


if __name__ == "__main__":
    unittest.main()
