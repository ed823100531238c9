"""The claim of an export (PROTOCOL 8.3): one line out, one line and its descriptors back.

Connect to the export's ``socket_path`` (a Unix stream socket), send
``{"export_id": "…", "secret": "…"}`` and a newline. memcoord answers one line
``{"export_id", "device_id", "size_bytes", "segments": [{"offset", "size_bytes", "file_offset"}]}``
and passes one file descriptor per segment, in order, as SCM_RIGHTS data on the bytes of that line
(at most 250 per sendmsg: more come with the following bytes, so several ``recvmsg`` calls may be
needed), then closes. A wrong or used secret, an expired claim or an ended export is answered
``{"error_code": "EXPORT_NOT_FOUND", …}`` with no descriptor.
"""

from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

from ._errors import MemcoordError
from .types import ExportInfo, Segment, segments_from

__all__ = ["Claim", "claim"]

#: The kernel's limit of descriptors in one SCM_RIGHTS message (SCM_MAX_FD); memcoord sends ≤ 250.
_MAX_FDS_PER_MESSAGE = 253
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: The longest answer line accepted (a model export of 100,000 segments fits).
_MAX_LINE = 64 * 1024 * 1024


@dataclass
class Claim:
    """What a claim returned: the segments and one open descriptor per segment (this process owns them).

    Close it (or use it as a context manager) to close the descriptors; attaching does so itself.
    """

    export_id: str
    device_id: str
    size_bytes: int
    segments: List[Segment]
    fds: List[int]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        """Close every descriptor still held."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> "tuple[bytes, List[int], int]":
    """``socket.recv_fds`` (3.9+) with the flags kept, so that a truncated control message is seen."""
    fds = array.array("i")
    # MSG_CMSG_CLOEXEC: the descriptors are not inherited by processes this one starts.
    msg, ancdata, flags, _addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * fds.itemsize), _CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds), flags


def claim(export_info: Union[ExportInfo, Dict[str, Any]], *, timeout: float = 30.0) -> Claim:
    """Claim an export: returns a :class:`Claim` holding its segments and their descriptors.

    Raises :class:`MemcoordError` ``EXPORT_NOT_FOUND`` (status 404) when memcoord refuses the claim
    (wrong or used secret, expired, ended), and ``ConnectionError`` when the answer is cut short.
    """
    info = ExportInfo.coerce(export_info)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: List[int] = []
    ok = False
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(info.socket_path)
        except OSError as e:
            raise ConnectionError(f"cannot connect to the claim socket {info.socket_path}: {e}") from e
        sock.sendall(json.dumps({"export_id": info.export_id, "secret": info.secret}).encode() + b"\n")
        buf = b""
        answer: Dict[str, Any] = {}
        want = -1  # descriptors expected, once the line is read
        while True:
            chunk, got, flags = _recv_fds(sock, 65536, _MAX_FDS_PER_MESSAGE)
            fds.extend(got)
            if flags & getattr(socket, "MSG_CTRUNC", 0):
                raise ConnectionError(
                    f"claim of export {info.export_id}: descriptors were cut off (MSG_CTRUNC); "
                    "is the process out of file descriptors (ulimit -n)?"
                )
            buf += chunk
            if len(buf) > _MAX_LINE:
                raise ConnectionError(f"claim of export {info.export_id}: answer longer than {_MAX_LINE} bytes")
            if want < 0 and b"\n" in buf:
                line = buf.split(b"\n", 1)[0]
                try:
                    answer = json.loads(line)
                except ValueError:
                    raise ConnectionError(f"claim of export {info.export_id}: the answer is not JSON: {line[:200]!r}") from None
                if not isinstance(answer, dict):
                    raise ConnectionError(f"claim of export {info.export_id}: the answer is not a JSON object")
                if answer.get("error_code") is not None:
                    raise MemcoordError(
                        answer["error_code"],
                        answer.get("error_message") or answer.get("message") or f"claim of export {info.export_id} refused",
                        answer.get("status_code") or 404,
                    )
                if not isinstance(answer.get("segments"), list):
                    raise ConnectionError(f"claim of export {info.export_id}: the answer has no segments: {line[:200]!r}")
                want = len(answer["segments"])
            if want >= 0 and len(fds) >= want:
                break
            if not chunk:
                if want < 0:
                    raise ConnectionError(f"claim of export {info.export_id}: the socket closed before an answer line")
                raise ConnectionError(
                    f"claim of export {info.export_id}: {len(fds)} descriptor(s) received, {want} expected"
                )
        if len(fds) != want:
            raise ConnectionError(f"claim of export {info.export_id}: {len(fds)} descriptor(s) received, {want} expected")
        result = Claim(
            export_id=str(answer.get("export_id", info.export_id)),
            device_id=str(answer.get("device_id", info.device_id)),
            size_bytes=int(answer.get("size_bytes", info.size_bytes)),
            segments=segments_from(answer["segments"]),
            fds=fds,
            raw=answer,
        )
        ok = True
        return result
    finally:
        sock.close()
        if not ok:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
