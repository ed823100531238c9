"""Minimal stdlib-only client for ``memcoord worker`` (the NDJSON stdio transport).

The worker reads one JSON request per line on stdin and writes one JSON response per line
on stdout (see docs/protocol.md, section 4.1).  Requests are handled concurrently by the worker, so
responses can arrive out of order; this client matches them to their requests by
``request_id``.  Responses whose ``request_id`` is ``null`` (malformed lines, over-long lines)
cannot be matched and are put on :attr:`MemcoordClient.unmatched`.

Example::

    with MemcoordClient("target/release/memcoord", ["--budget", "cpu=64MiB"]) as mc:
        alloc = mc.call("memory.allocate", {"device_id": "cpu", "size_bytes": 4096})
        mc.call("memory.deallocate", {"allocation_id": alloc["allocation"]["allocation_id"]})
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import uuid
from collections.abc import Sequence
from typing import Any, BinaryIO, Optional

__all__ = ["MemcoordClient", "MemcoordError", "PendingRequest"]


class MemcoordError(Exception):
    """A request the worker answered with ``success: false``."""

    def __init__(
        self,
        error_code: Optional[str],
        error_message: Optional[str],
        status_code: Optional[int],
        request_id: Optional[str],
    ) -> None:
        super().__init__(f"{error_code} ({status_code}): {error_message}")
        self.error_code = error_code
        self.error_message = error_message
        self.status_code = status_code
        self.request_id = request_id


class PendingRequest:
    """Handle for an in-flight request, returned by :meth:`MemcoordClient.submit`."""

    def __init__(self, request_id: str, action: str) -> None:
        self.request_id = request_id
        self.action = action
        self._event = threading.Event()
        self._response: Optional[dict[str, Any]] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        """True once a response (or a transport failure) has arrived."""
        return self._event.is_set()

    def _set(self, response: Optional[dict[str, Any]], error: Optional[BaseException] = None) -> None:
        self._response, self._error = response, error
        self._event.set()

    def result(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """Block until the response envelope arrives and return it.

        Raises ``TimeoutError`` if it does not arrive within ``timeout`` seconds, and
        ``ConnectionError`` if the worker's stdout closed before answering.
        """
        if not self._event.wait(timeout):
            raise TimeoutError(f"no response to {self.action} ({self.request_id}) within {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response


class MemcoordClient:
    """Spawns ``memcoord worker`` and talks NDJSON to it over stdin/stdout.

    :param binary: path to the ``memcoord`` executable.
    :param extra_args: arguments appended after ``worker`` (e.g. ``["--budget", "cpu=64MiB"]``).
    :param stderr: ``"inherit"`` (default: the worker's logs go to our stderr) or ``"devnull"``.
    """

    def __init__(
        self,
        binary: str,
        extra_args: Sequence[str] = (),
        stderr: str = "inherit",
    ) -> None:
        if stderr not in ("inherit", "devnull"):
            raise ValueError("stderr must be 'inherit' or 'devnull'")
        self.proc = subprocess.Popen(
            [binary, "worker", *extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if stderr == "inherit" else subprocess.DEVNULL,
        )
        #: Responses with ``request_id: null`` (or an id nobody waits for), in arrival order.
        self.unmatched: "queue.Queue[dict[str, Any]]" = queue.Queue()
        #: Stdout lines that were not JSON objects (a protocol violation by the worker).
        self.garbage: list[bytes] = []
        self._pending: dict[str, PendingRequest] = {}
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._eof = False
        self._reader = threading.Thread(target=self._read_loop, name="memcoord-reader", daemon=True)
        self._reader.start()

    # -- reading ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        stdout: BinaryIO = self.proc.stdout  # type: ignore[assignment]
        for raw in stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                self.garbage.append(raw)
                continue
            if not isinstance(msg, dict):
                self.garbage.append(raw)
                continue
            rid = msg.get("request_id")
            waiter = None
            if isinstance(rid, str):
                with self._pending_lock:
                    waiter = self._pending.pop(rid, None)
            if waiter is not None:
                waiter._set(msg)
            else:
                self.unmatched.put(msg)
        # stdout closed: fail everyone still waiting.
        with self._pending_lock:
            self._eof = True
            waiters, self._pending = list(self._pending.values()), {}
        for w in waiters:
            w._set(None, ConnectionError(f"worker closed stdout before answering {w.action} ({w.request_id})"))

    # -- writing ---------------------------------------------------------------------------

    def send_raw(self, line: bytes) -> None:
        """Write ``line`` to the worker's stdin as-is (a trailing LF is added if missing)."""
        if not line.endswith(b"\n"):
            line += b"\n"
        stdin = self.proc.stdin
        assert stdin is not None
        with self._write_lock:
            stdin.write(line)
            stdin.flush()

    def submit(self, action: str, data: Optional[dict[str, Any]] = None) -> PendingRequest:
        """Send a request without waiting; returns a handle for :meth:`wait`."""
        rid = str(uuid.uuid4())
        handle = PendingRequest(rid, action)
        with self._pending_lock:
            if self._eof:
                raise ConnectionError("worker stdout is closed")
            self._pending[rid] = handle
        line = json.dumps({"request_id": rid, "action": action, "data": data}).encode() + b"\n"
        try:
            self.send_raw(line)
        except BaseException:
            with self._pending_lock:
                self._pending.pop(rid, None)
            raise
        return handle

    @staticmethod
    def wait(handle: PendingRequest, timeout: Optional[float] = 30.0) -> dict[str, Any]:
        """Wait for the response envelope of a submitted request."""
        return handle.result(timeout)

    def request(self, action: str, data: Optional[dict[str, Any]] = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send a request and return the full response envelope."""
        return self.wait(self.submit(action, data), timeout)

    @staticmethod
    def unwrap(envelope: dict[str, Any]) -> Any:
        """Return ``envelope["data"]`` or raise :class:`MemcoordError` for a failure envelope."""
        if envelope.get("success"):
            return envelope.get("data")
        raise MemcoordError(
            envelope.get("error_code"),
            envelope.get("error_message"),
            envelope.get("status_code"),
            envelope.get("request_id"),
        )

    def call(self, action: str, data: Optional[dict[str, Any]] = None, timeout: float = 30.0) -> Any:
        """Send a request; return its ``data`` on success, raise :class:`MemcoordError` otherwise."""
        return self.unwrap(self.request(action, data, timeout))

    # -- lifetime --------------------------------------------------------------------------

    def close(self, timeout: float = 10) -> int:
        """Close stdin (EOF: the worker finishes in-flight work and exits), wait, return the exit code.

        Kills the worker if it has not exited within ``timeout`` seconds and raises
        ``subprocess.TimeoutExpired``.
        """
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            with self._write_lock:
                try:
                    stdin.close()
                except BrokenPipeError:
                    pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return code

    def __enter__(self) -> "MemcoordClient":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            try:
                self.close()
            except subprocess.TimeoutExpired:
                pass
        elif self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
