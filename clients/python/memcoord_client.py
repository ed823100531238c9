"""Compatibility shim: ``memcoord_client.MemcoordClient`` is now :meth:`memcoord.Client.spawn`.

Kept so that code written against the single-file client keeps working::

    from memcoord_client import MemcoordClient, MemcoordError

    with MemcoordClient("target/release/memcoord", ["--budget", "cpu=64MiB"]) as mc:
        alloc = mc.call("memory.allocate", {"device_id": "cpu", "size_bytes": 4096})

New code should use the ``memcoord`` package (``memcoord.Client``), which adds the Unix-socket and
HTTP transports, typed helpers, exports and zero-copy attach.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

try:
    from memcoord import Client, MemcoordError, PendingRequest
    from memcoord.client import spawn_worker
except ImportError:  # run from a checkout: the package sits next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from memcoord import Client, MemcoordError, PendingRequest
    from memcoord.client import spawn_worker

__all__ = ["MemcoordClient", "MemcoordError", "PendingRequest"]


class MemcoordClient(Client):
    """Spawns ``binary worker *extra_args`` and talks NDJSON to it (see :class:`memcoord.Client`).

    :param stderr: ``"inherit"`` (default: the worker's logs go to our stderr) or ``"devnull"``.
    """

    def __init__(self, binary: str, extra_args: Sequence[str] = (), stderr: str = "inherit") -> None:
        super().__init__(_proc=spawn_worker(binary, extra_args, stderr))
