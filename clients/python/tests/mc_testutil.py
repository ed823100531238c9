"""Shared helpers of the Python client's tests: the binary, safetensors files, a fake claim server."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

CLIENT_DIR = Path(__file__).resolve().parent.parent  # clients/python
if str(CLIENT_DIR) not in sys.path:
    sys.path.insert(0, str(CLIENT_DIR))

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


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


def safetensors_bytes(tensors: Sequence[Tuple[str, str, Sequence[int], bytes]]) -> Tuple[bytes, int, Dict[str, Tuple[int, int]]]:
    """A safetensors file of ``(name, dtype, shape, data)``: (file bytes, data start, {name: (begin, end)})."""
    header: Dict[str, Any] = {}
    spans: Dict[str, Tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        spans[name] = (pos, pos + len(data))
        pos += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data_start = 8 + len(h)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors), data_start, spans


def sample_tensors() -> List[Tuple[str, str, List[int], bytes]]:
    """A few tensors of different dtypes and shapes, with values that differ per byte."""
    f16 = struct.pack("<6e", 0.5, -1.0, 2.0, 3.25, -0.125, 65504.0)
    f32 = struct.pack("<4f", 1.5, -2.5, 4096.0, 0.0)
    i64 = struct.pack("<3q", -1, 2**40, 7)
    u8 = bytes(range(7, 7 + 33))
    bf16 = bytes([0x80, 0x3F, 0x00, 0x40])  # 1.0, 2.0
    boolean = bytes([1, 0, 1])
    return [
        ("w.f16", "F16", [2, 3], f16),
        ("w.f32", "F32", [4], f32),
        ("idx.i64", "I64", [3], i64),
        ("bytes.u8", "U8", [3, 11], u8),
        ("w.bf16", "BF16", [2], bf16),
        ("mask", "BOOL", [3], boolean),
        ("empty", "F32", [0, 4], b""),
    ]


class FakeClaimServer:
    """An in-test claim socket per PROTOCOL 8.3, passing real descriptors with SCM_RIGHTS.

    ``add(export_id, secret, segments, fds)`` registers an export; a secret works once. Answers are
    split over several sendmsg calls with at most ``per_message`` descriptors each, the line's bytes
    spread over them as the contract says.
    """

    def __init__(self, directory: str, per_message: int = 250) -> None:
        self.path = os.path.join(directory, "claim.sock")
        self.per_message = per_message
        self.exports: Dict[str, Dict[str, Any]] = {}
        self.requests: List[bytes] = []
        self.sendmsg_fd_counts: List[int] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._stop = False
        self._handled = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def add(self, export_id: str, secret: str, device_id: str, size_bytes: int,
            segments: List[Dict[str, int]], fds: List[int]) -> None:
        with self._lock:
            self.exports[export_id] = {"secret": secret, "device_id": device_id, "size_bytes": size_bytes,
                                       "segments": segments, "fds": fds, "claimed": False}

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._handle(conn)
                except OSError:
                    pass
            with self._done:
                self._handled += 1
                self._done.notify_all()

    def wait_handled(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` claims have been answered and their connections closed on this side."""
        with self._done:
            if not self._done.wait_for(lambda: self._handled >= count, timeout):
                raise TimeoutError(f"the claim server answered {self._handled} claims, not {count}")

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        line = buf.split(b"\n", 1)[0]
        self.requests.append(line)
        try:
            req = json.loads(line)
            eid, secret = req["export_id"], req["secret"]
        except (ValueError, KeyError, TypeError):
            eid, secret = None, None
        with self._lock:
            exp = self.exports.get(eid) if isinstance(eid, str) else None
            ok = exp is not None and not exp["claimed"] and exp["secret"] == secret
            if ok:
                exp["claimed"] = True
        if not ok:
            err = {"error_code": "EXPORT_NOT_FOUND", "error_message": f"Export {eid} not found"}
            conn.sendall(json.dumps(err).encode() + b"\n")
            return
        answer = {"export_id": eid, "device_id": exp["device_id"], "size_bytes": exp["size_bytes"],
                  "segments": exp["segments"]}
        data = json.dumps(answer).encode() + b"\n"
        fds = exp["fds"]
        groups = [fds[i:i + self.per_message] for i in range(0, len(fds), self.per_message)] or [[]]
        # Spread the line's bytes over the groups: each sendmsg carries bytes and its descriptors.
        n = len(groups)
        cuts = [len(data) * i // n for i in range(n + 1)]
        for i, group in enumerate(groups):
            piece = data[cuts[i]:cuts[i + 1]]
            socket.send_fds(conn, [piece], group) if group else conn.sendall(piece)
            self.sendmsg_fd_counts.append(len(group))

    def close(self) -> None:
        self._stop = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)


def open_fds() -> int:
    """How many descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))
