"""``memcoord.Client``: one client for the three ways in (stdio worker, Unix socket, HTTP).

- :meth:`Client.spawn` starts ``memcoord worker`` and speaks NDJSON over its stdin/stdout
  (PROTOCOL 1, docs/protocol.md 4.1).
- ``Client(unix_path=...)`` connects to a Unix-domain stream socket that speaks exactly the stdio
  framing (PROTOCOL 8.1: ``--unix PATH`` on ``memcoord serve`` / ``memcoord worker``). The connection
  is a session: what it creates ends when it closes.
- ``Client(url=...)`` sends each request to ``POST {url}/v1/command`` (docs/protocol.md 4.2). HTTP has
  no sessions: what a request creates lives until it is released.

Requests may be in flight concurrently on every transport; answers are matched to requests by
``request_id`` (on the stream transports responses can arrive out of order). Answers whose
``request_id`` is ``null`` (a malformed line) go to :attr:`Client.unmatched`.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import threading
import urllib.parse
import uuid
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ._errors import MemcoordError
from .types import ExportInfo

__all__ = ["Client", "PendingRequest"]

Json = Dict[str, Any]


def _clean(data: Json) -> Json:
    """Drop fields left as None: the contract reads a missing optional field as its default."""
    return {k: v for k, v in data.items() if v is not None}


def spawn_worker(binary: str, args: Sequence[str], stderr: str = "inherit") -> "subprocess.Popen[bytes]":
    """Start ``binary worker *args`` with pipes on stdin and stdout (stderr: "inherit" or "devnull")."""
    if stderr not in ("inherit", "devnull"):
        raise ValueError("stderr must be 'inherit' or 'devnull'")
    return subprocess.Popen(
        [binary, "worker", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None if stderr == "inherit" else subprocess.DEVNULL,
    )


class PendingRequest:
    """Handle for an in-flight request, returned by :meth:`Client.submit`."""

    def __init__(self, request_id: str, action: str) -> None:
        self.request_id = request_id
        self.action = action
        self._event = threading.Event()
        self._response: Optional[Json] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        """True once a response (or a transport failure) has arrived."""
        return self._event.is_set()

    def _set(self, response: Optional[Json], error: Optional[BaseException] = None) -> None:
        self._response, self._error = response, error
        self._event.set()

    def result(self, timeout: Optional[float] = None) -> Json:
        """Block until the response envelope arrives and return it.

        Raises ``TimeoutError`` if it does not arrive within ``timeout`` seconds, and
        ``ConnectionError`` if the connection closed before the answer.
        """
        if not self._event.wait(timeout):
            raise TimeoutError(f"no response to {self.action} ({self.request_id}) within {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response


class Client:
    """A memcoord client. Build it with :meth:`spawn`, ``Client(unix_path=...)`` or ``Client(url=...)``.

    :param unix_path: a Unix socket of ``memcoord serve|worker --unix PATH``.
    :param url: the base URL of ``memcoord serve`` (``http://127.0.0.1:7077``).
    :param token: over HTTP, the bearer token (``Authorization: Bearer``); over a socket or stdio it
        is sent in a ``memory.hello`` request first (tenants, PROTOCOL 8.2). A server without
        ``memory.hello`` (it answers UNKNOWN_ACTION) is used without it: :attr:`session` is then None.
    :param timeout: the default seconds :meth:`call` and the typed helpers wait for an answer.

    Use it as a context manager, or call :meth:`close`.
    """

    proc: Optional["subprocess.Popen[bytes]"]

    def __init__(
        self,
        *,
        unix_path: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        _proc: Optional["subprocess.Popen[bytes]"] = None,
    ) -> None:
        given = [x for x in (unix_path, url, _proc) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of unix_path= or url= (or use Client.spawn(...))")
        self.timeout = timeout
        self.proc = _proc
        self.url: Optional[str] = None
        self.unix_path = unix_path
        #: Responses with ``request_id: null`` (or an id nobody waits for), in arrival order.
        self.unmatched: "queue.Queue[Json]" = queue.Queue()
        #: Lines received that were not JSON objects (a protocol violation by the server).
        self.garbage: List[bytes] = []
        self._pending: Dict[str, PendingRequest] = {}
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._eof = False
        self._token = token
        self._sock: Optional[socket.socket] = None
        self._reader: Optional[threading.Thread] = None
        self._write: Callable[[bytes], None]
        if _proc is not None:
            stdin, stdout = _proc.stdin, _proc.stdout
            assert stdin is not None and stdout is not None

            def write_stdin(line: bytes) -> None:
                stdin.write(line)
                stdin.flush()

            self._write = write_stdin
            self._start_reader(stdout, "worker closed stdout")
        elif unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(unix_path)
            except OSError as e:
                sock.close()
                raise ConnectionError(f"cannot connect to the memcoord socket {unix_path}: {e}") from e
            self._sock = sock
            self._write = sock.sendall
            self._start_reader(sock.makefile("rb"), "the server closed the connection")
        else:
            assert url is not None
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"url must be http://HOST:PORT or https://HOST:PORT, got {url!r}")
            self.url = url.rstrip("/")
            self._http = parsed
        #: ``memory.hello``'s answer ({session_id, tenant}) when a token was sent over a stream.
        self.session: Optional[Json] = None
        if token is not None and self.url is None:
            try:
                self.session = self.call("memory.hello", {"token": token})
            except MemcoordError as e:
                if e.code != "UNKNOWN_ACTION":
                    self.close()
                    raise
                # A server older than memory.hello: no tenants there, carry on without.
            except BaseException:
                self.close()
                raise

    @classmethod
    def spawn(
        cls,
        binary: str = "memcoord",
        args: Sequence[str] = (),
        *,
        stderr: str = "inherit",
        token: Optional[str] = None,
        timeout: float = 30.0,
    ) -> "Client":
        """Start ``binary worker *args`` and talk to it over its stdin/stdout.

        :param stderr: ``"inherit"`` (the worker's logs go to our stderr) or ``"devnull"``.
        """
        return cls(_proc=spawn_worker(binary, args, stderr), token=token, timeout=timeout)

    # -- stream transports (stdio, Unix socket) --------------------------------------------

    def _start_reader(self, stream: BinaryIO, closed_msg: str) -> None:
        self._stream = stream
        self._reader = threading.Thread(
            target=self._read_loop, args=(stream, closed_msg), name="memcoord-reader", daemon=True
        )
        self._reader.start()

    def _dispatch(self, msg: Any, raw: bytes) -> None:
        if not isinstance(msg, dict):
            self.garbage.append(raw)
            return
        rid = msg.get("request_id")
        waiter = None
        if isinstance(rid, str):
            with self._pending_lock:
                waiter = self._pending.pop(rid, None)
        if waiter is not None:
            waiter._set(msg)
        else:
            self.unmatched.put(msg)

    def _read_loop(self, stream: BinaryIO, closed_msg: str) -> None:
        try:
            for raw in stream:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self.garbage.append(raw)
                    continue
                self._dispatch(msg, raw)
        except (OSError, ValueError):
            pass  # the socket was closed under us: same as EOF
        with self._pending_lock:
            self._eof = True
            waiters, self._pending = list(self._pending.values()), {}
        for w in waiters:
            w._set(None, ConnectionError(f"{closed_msg} before answering {w.action} ({w.request_id})"))

    # -- HTTP ------------------------------------------------------------------------------

    def _http_post(self, body: bytes) -> Json:
        p = self._http
        conn_cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(p.hostname, p.port, timeout=max(self.timeout, 3600.0))
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.request("POST", (p.path.rstrip("/") or "") + "/v1/command", body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        try:
            msg = json.loads(payload)
        except ValueError:
            raise ConnectionError(f"HTTP {resp.status} from {self.url}: not a JSON envelope: {payload[:200]!r}") from None
        if not isinstance(msg, dict):
            raise ConnectionError(f"HTTP {resp.status} from {self.url}: not a JSON object: {payload[:200]!r}")
        return msg

    def _http_submit(self, handle: PendingRequest, body: bytes) -> None:
        def run() -> None:
            try:
                msg = self._http_post(body)
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                handle._set(None, e if isinstance(e, Exception) else ConnectionError(str(e)))
                return
            handle._set(msg)

        threading.Thread(target=run, name=f"memcoord-http-{handle.request_id}", daemon=True).start()

    # -- requests --------------------------------------------------------------------------

    def send_raw(self, line: bytes) -> None:
        """Send ``line`` as-is (a trailing LF is added if missing); its answer goes to :attr:`unmatched`.

        Over HTTP the line is the body of one ``POST /v1/command``.
        """
        if self.url is not None:
            try:
                msg = self._http_post(line)
            except ConnectionError:
                return
            self.unmatched.put(msg)
            return
        if not line.endswith(b"\n"):
            line += b"\n"
        with self._write_lock:
            self._write(line)

    def submit(self, action: str, data: Optional[Json] = None) -> PendingRequest:
        """Send a request without waiting; returns a handle for :meth:`wait`."""
        rid = str(uuid.uuid4())
        handle = PendingRequest(rid, action)
        body = json.dumps({"request_id": rid, "action": action, "data": data}).encode()
        if self.url is not None:
            self._http_submit(handle, body)
            return handle
        with self._pending_lock:
            if self._eof:
                raise ConnectionError("the connection to memcoord is closed")
            self._pending[rid] = handle
        try:
            self.send_raw(body + b"\n")
        except BaseException:
            with self._pending_lock:
                self._pending.pop(rid, None)
            raise
        return handle

    @staticmethod
    def wait(handle: PendingRequest, timeout: Optional[float] = 30.0) -> Json:
        """Wait for the response envelope of a submitted request."""
        return handle.result(timeout)

    def request(self, action: str, data: Optional[Json] = None, timeout: Optional[float] = None) -> Json:
        """Send a request and return the full response envelope."""
        return self.wait(self.submit(action, data), self.timeout if timeout is None else timeout)

    @staticmethod
    def unwrap(envelope: Json) -> Any:
        """Return ``envelope["data"]`` or raise :class:`MemcoordError` for a failure envelope."""
        if envelope.get("success"):
            return envelope.get("data")
        raise MemcoordError(
            envelope.get("error_code"),
            envelope.get("error_message"),
            envelope.get("status_code"),
            envelope.get("request_id"),
        )

    def call(self, action: str, data: Optional[Json] = None, timeout: Optional[float] = None) -> Any:
        """Send a request; return its ``data`` on success, raise :class:`MemcoordError` otherwise."""
        return self.unwrap(self.request(action, data, timeout))

    def _act(self, action: str, data: Json, wait_seconds: Optional[float] = None) -> Any:
        """A typed helper's call: None fields dropped; waits at least ``wait_seconds`` + 30 s."""
        timeout = self.timeout if wait_seconds is None else max(self.timeout, float(wait_seconds) + 30.0)
        return self.call(action, _clean(data), timeout)

    # -- lifetime --------------------------------------------------------------------------

    def close(self, timeout: float = 10) -> Optional[int]:
        """End the session.

        stdio: closes stdin (EOF: the worker finishes in-flight work, frees what it holds and exits),
        waits, and returns its exit code; kills it and raises ``subprocess.TimeoutExpired`` if it has
        not exited within ``timeout`` seconds. Unix socket: shuts down the sending side, waits up to
        ``timeout`` for the answers in flight, closes; returns None. HTTP: nothing to close; None.
        """
        if self.proc is not None:
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
            if self._reader is not None:
                self._reader.join(timeout)
                if self.proc.stdout is not None and not self._reader.is_alive():
                    self.proc.stdout.close()
            return code
        if self._sock is not None:
            sock, self._sock = self._sock, None
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self._reader is not None:
                self._reader.join(timeout)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._stream.close()
            sock.close()
        return None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
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
        else:
            self.close()

    # -- typed helpers: v1 actions (docs/protocol.md 11) ------------------------------------
    # Each returns the answer's ``data`` object (a dict, shapes in docs/protocol.md 8) and raises
    # MemcoordError with the contract's error code otherwise. Arguments left None are not sent,
    # so the server's defaults apply.

    def list_devices(self) -> List[Json]:
        """``memory.list_devices`` → the list of ``MemoryInfo`` dicts (``device_id``, ``type``, ``total_memory``…)."""
        return list(self._act("memory.list_devices", {})["devices"])

    def get_status(
        self,
        device_id: str,
        *,
        include_allocations: Optional[bool] = None,
        include_usage_stats: Optional[bool] = None,
        include_fragmentation: Optional[bool] = None,
    ) -> Json:
        """``memory.get_status`` → ``GetMemoryStatusResponse`` {device_id, memory_info, usage_stats, allocations, fragmentation, health_score, last_updated}."""
        return self._act(
            "memory.get_status",
            {
                "device_id": device_id,
                "include_allocations": include_allocations,
                "include_usage_stats": include_usage_stats,
                "include_fragmentation": include_fragmentation,
            },
        )

    def get_usage(self, device_id: str) -> Json:
        """``memory.get_usage`` → ``MemoryUsageStats`` {allocated_bytes, reserved_bytes, budget_bytes, allocation_count, …}."""
        return self._act("memory.get_usage", {"device_id": device_id})

    def get_allocations(
        self,
        device_id: str,
        *,
        allocation_type: Optional[str] = None,
        purpose: Optional[str] = None,
        owner: Optional[str] = None,
        offset: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Json:
        """``memory.get_allocations`` → {device_id, total_count, allocations: [MemoryAllocation]}."""
        return self._act(
            "memory.get_allocations",
            {
                "device_id": device_id,
                "allocation_type": allocation_type,
                "purpose": purpose,
                "owner": owner,
                "offset": offset,
                "limit": limit,
            },
        )

    def allocate(
        self,
        device_id: str,
        size_bytes: int,
        *,
        allocation_type: Optional[str] = None,
        alignment: Optional[int] = None,
        purpose: Optional[str] = None,
        persistent: Optional[bool] = None,
        timeout_seconds: Optional[float] = None,
    ) -> Json:
        """``memory.allocate`` → ``AllocateMemoryResponse`` {device_id, allocation: MemoryAllocation, success, allocation_time_ms, …}.

        ``allocation["handle"]`` is ``{path, offset}`` on ``shm``. Waits up to ``timeout_seconds``
        (server default 30) for room; the client waits that long plus 30 s.
        """
        return self._act(
            "memory.allocate",
            {
                "device_id": device_id,
                "size_bytes": size_bytes,
                "allocation_type": allocation_type,
                "alignment": alignment,
                "purpose": purpose,
                "persistent": persistent,
                "timeout_seconds": timeout_seconds,
            },
            30.0 if timeout_seconds is None else timeout_seconds,
        )

    def deallocate(self, allocation_id: str, *, device_id: Optional[str] = None) -> Json:
        """``memory.deallocate`` → {allocation_id, device_id, freed_bytes}."""
        return self._act("memory.deallocate", {"allocation_id": allocation_id, "device_id": device_id})

    def clear(self, device_id: str, *, force: Optional[bool] = None) -> Json:
        """``memory.clear`` → {device_id, cleared_count, freed_bytes, kept_persistent_count}."""
        return self._act("memory.clear", {"device_id": device_id, "force": force})

    def defragment(self, device_id: str) -> Json:
        """``memory.defragment`` → {device_id, moved_count, moved_bytes, fragmentation_before, fragmentation_after, released_bytes, duration_ms}."""
        return self._act("memory.defragment", {"device_id": device_id}, 600.0)

    def transfer(
        self,
        allocation_id: str,
        source_device_id: str,
        destination_device_id: str,
        *,
        mode: Optional[str] = None,
        wait_for_completion: Optional[bool] = None,
    ) -> Json:
        """``memory.transfer`` → ``MemoryTransfer`` {transfer_id, status, destination_allocation_id, …}; mode "move" (default) or "copy"."""
        return self._act(
            "memory.transfer",
            {
                "allocation_id": allocation_id,
                "source_device_id": source_device_id,
                "destination_device_id": destination_device_id,
                "mode": mode,
                "wait_for_completion": wait_for_completion,
            },
            600.0 if wait_for_completion else None,
        )

    def get_transfer(self, transfer_id: str) -> Json:
        """``memory.get_transfer`` → ``MemoryTransfer``."""
        return self._act("memory.get_transfer", {"transfer_id": transfer_id})

    def optimize(
        self,
        device_id: str,
        optimization_type: Union[str, int],
        *,
        force: Optional[bool] = None,
        target_usage_percentage: Optional[float] = None,
        preserve_allocations: Optional[Sequence[str]] = None,
        wait_for_completion: Optional[bool] = None,
    ) -> Json:
        """``memory.optimize`` → {device_id, optimization_type, freed_bytes, actions, usage_before, usage_after, duration_ms}."""
        return self._act(
            "memory.optimize",
            {
                "device_id": device_id,
                "optimization_type": optimization_type,
                "force": force,
                "target_usage_percentage": target_usage_percentage,
                "preserve_allocations": None if preserve_allocations is None else list(preserve_allocations),
                "wait_for_completion": wait_for_completion,
            },
            600.0,
        )

    def model_load(
        self,
        model_name: str,
        path: str,
        device_id: str,
        *,
        keep_alive_seconds: Optional[float] = None,
        timeout_seconds: Optional[float] = None,
    ) -> Json:
        """``memory.model_load`` → ``ModelInfo`` {model_name, device_id, resident_device_id, state, size_bytes, tensor_count, …}.

        ``path`` is a .safetensors file under the worker's ``--model-root``.
        """
        return self._act(
            "memory.model_load",
            {
                "model_name": model_name,
                "path": path,
                "device_id": device_id,
                "keep_alive_seconds": keep_alive_seconds,
                "timeout_seconds": timeout_seconds,
            },
            600.0,
        )

    def model_unload(self, model_name: str, *, force: Optional[bool] = None) -> Json:
        """``memory.model_unload`` → {model_name, freed_bytes}."""
        return self._act("memory.model_unload", {"model_name": model_name, "force": force})

    def model_acquire(
        self, model_name: str, *, timeout_seconds: Optional[float] = None, ttl_seconds: Optional[float] = None
    ) -> Json:
        """``memory.model_acquire`` → {lease_id, expires_at, model: ModelInfo}.

        ``ttl_seconds`` (v1.1, 8.5): the lease ends by itself that many seconds from now unless
        renewed (:meth:`model_renew`); ``expires_at`` says when (null: no limit). Left None, a lease
        over stdio or a Unix socket lasts until released or the session ends; over HTTP, 300 s.
        """
        return self._act(
            "memory.model_acquire",
            {"model_name": model_name, "timeout_seconds": timeout_seconds, "ttl_seconds": ttl_seconds},
            30.0 if timeout_seconds is None else timeout_seconds,
        )

    def model_release(self, lease_id: str) -> Json:
        """``memory.model_release`` → {lease_id, model_name}."""
        return self._act("memory.model_release", {"lease_id": lease_id})

    def model_status(self, *, device_id: Optional[str] = None, model_name: Optional[str] = None) -> Json:
        """``memory.model_status`` → {models: [ModelInfo], model_bytes, model_budget_bytes}."""
        return self._act("memory.model_status", {"device_id": device_id, "model_name": model_name})

    def model_optimize(
        self,
        strategy: str,
        *,
        device_id: Optional[str] = None,
        idle_seconds: Optional[float] = None,
        target_bytes: Optional[int] = None,
    ) -> Json:
        """``memory.model_optimize`` (strategy "OffloadIdle", "UnloadIdle" or "FitBudget") → {unloaded, offloaded, freed_bytes}."""
        return self._act(
            "memory.model_optimize",
            {"strategy": strategy, "device_id": device_id, "idle_seconds": idle_seconds, "target_bytes": target_bytes},
            600.0,
        )

    def get_pressure(self, device_id: Optional[str] = None) -> List[Json]:
        """``memory.get_pressure`` → the list of ``MemoryPressure`` dicts (one per device, or the one asked for)."""
        return list(self._act("memory.get_pressure", {"device_id": device_id})["devices"])

    def analytics(self, device_id: Optional[str] = None, *, window_seconds: Optional[float] = None) -> List[Json]:
        """``memory.analytics`` → the list of ``MemoryAnalytics`` dicts."""
        return list(self._act("memory.analytics", {"device_id": device_id, "window_seconds": window_seconds})["devices"])

    def optimization_recs(self, device_id: Optional[str] = None) -> List[Json]:
        """``memory.optimization_recs`` → the list of ``Recommendation`` dicts (``request`` applies one)."""
        return list(self._act("memory.optimization_recs", {"device_id": device_id})["recommendations"])

    # -- typed helpers: v1.1 (PROTOCOL 8) ---------------------------------------------------

    def hello(self, token: str) -> Json:
        """``memory.hello`` (8.2) → {session_id, tenant}: the token applies to the rest of the session."""
        return self._act("memory.hello", {"token": token})

    def list_sessions(self) -> List[Json]:
        """``memory.list_sessions`` (8.1) → the list of session dicts."""
        return list(self._act("memory.list_sessions", {})["sessions"])

    def model_renew(self, lease_id: str, ttl_seconds: Optional[float] = None) -> Json:
        """``memory.model_renew`` (8.5) → {lease_id, expires_at}: the lease ends ``ttl_seconds`` from now.

        Left None, the lease gets the time limit it was last given again (a heartbeat). An unknown
        or expired lease raises :class:`MemcoordError` ``LEASE_NOT_FOUND``.
        """
        return self._act("memory.model_renew", {"lease_id": lease_id, "ttl_seconds": ttl_seconds})

    # -- scoped helpers ----------------------------------------------------------------------

    def _end_quietly(self, action: str, data: Json, gone_code: str) -> None:
        """Ends what a ``with`` block held. Already gone (freed or released in the block, a lease
        that expired) is fine, and so is a stream that closed (the session's end released it)."""
        try:
            self._act(action, data)
        except MemcoordError as e:
            if e.code != gone_code:
                raise
        except ConnectionError:
            if self.url is not None:
                raise

    @contextmanager
    def allocation(self, device_id: str, size_bytes: int, **options: Any) -> Iterator[Json]:
        """``with client.allocation("shm", n, purpose="kv") as a:`` → the ``MemoryAllocation`` dict
        (``a["allocation_id"]``, ``a["handle"]``…), deallocated when the block ends, however it ends.

        ``options`` are :meth:`allocate`'s keyword arguments.
        """
        made = self.allocate(device_id, size_bytes, **options)["allocation"]
        try:
            yield made
        finally:
            self._end_quietly("memory.deallocate", {"allocation_id": made["allocation_id"]}, "ALLOCATION_NOT_FOUND")

    @contextmanager
    def lease(
        self, model_name: str, *, ttl_seconds: Optional[float] = None, timeout_seconds: Optional[float] = None
    ) -> Iterator[Json]:
        """``with client.lease("unet") as l:`` → :meth:`model_acquire`'s answer (``l["lease_id"]``,
        ``l["expires_at"]``, ``l["model"]``), released when the block ends, however it ends (a lease
        that expired meanwhile is fine). Renew a long one with :meth:`model_renew`.
        """
        got = self.model_acquire(model_name, ttl_seconds=ttl_seconds, timeout_seconds=timeout_seconds)
        try:
            yield got
        finally:
            self._end_quietly("memory.model_release", {"lease_id": got["lease_id"]}, "LEASE_NOT_FOUND")

    def export(
        self,
        *,
        allocation_id: Optional[str] = None,
        model_name: Optional[str] = None,
        lease_id: Optional[str] = None,
        claim_seconds: Optional[float] = None,
    ) -> ExportInfo:
        """``memory.export`` (8.3) of one allocation, or of a model under a lease → :class:`ExportInfo`.

        Give ``allocation_id``, or ``model_name`` with ``lease_id`` (from :meth:`model_acquire`).
        ``claim_seconds`` (server default 60) bounds when the secret can be claimed. Pass the
        answer to :func:`memcoord.claim`, :func:`memcoord.shm.attach` or :func:`memcoord.cuda.attach`.
        """
        if (allocation_id is None) == (model_name is None):
            raise ValueError("export needs exactly one of allocation_id= or model_name= (with lease_id=)")
        if model_name is not None and lease_id is None:
            raise ValueError("exporting a model needs the lease_id of a lease on it (Client.model_acquire)")
        data = self._act(
            "memory.export",
            {
                "allocation_id": allocation_id,
                "model_name": model_name,
                "lease_id": lease_id,
                "claim_seconds": claim_seconds,
            },
        )
        return ExportInfo.from_dict(data)

    def unexport(self, export_id: str) -> Json:
        """``memory.unexport`` (8.3) → {export_id, allocation_count}. Importers must unmap first."""
        return self._act("memory.unexport", {"export_id": export_id})

    def list_exports(self) -> List[Json]:
        """``memory.list_exports`` (8.3) → the list of {export_id, device_id, size_bytes, tenant, client_pid, claimed, created_at, expires_at}."""
        return list(self._act("memory.list_exports", {})["exports"])
