"""memcoord's Python client.

- :class:`Client`: spawn ``memcoord worker`` (:meth:`Client.spawn`), connect to a Unix socket
  (``Client(unix_path=...)``) or to ``memcoord serve`` (``Client(url=...)``); typed helpers for every
  action, :meth:`Client.export` among them.
- :func:`claim`: claim an export over its Unix socket (descriptors by SCM_RIGHTS).
- :mod:`memcoord.shm`, :mod:`memcoord.cuda`: map an export's bytes into this process, no copy.
- :mod:`memcoord.torch`: a served model as ``{name: torch.Tensor}`` for ``load_state_dict(assign=True)``
  (:func:`memcoord.torch.state_dict` takes the lease and the export itself; :func:`memcoord.torch.attach`
  maps an export someone else made); ``release()`` unmaps.

No required dependency: numpy and torch are imported only by the helpers that need them.
"""

from __future__ import annotations

from ._errors import MemcoordError
from .claim import Claim, claim
from .client import Client, PendingRequest
from .types import DTYPES, ExportAllocation, ExportInfo, Segment, TensorInfo

__version__ = "0.14.0"

__all__ = [
    "DTYPES",
    "Claim",
    "Client",
    "ExportAllocation",
    "ExportInfo",
    "MemcoordError",
    "PendingRequest",
    "Segment",
    "TensorInfo",
    "claim",
    "cuda",
    "shm",
    "torch",
]


def __getattr__(name: str) -> object:
    # memcoord.shm / memcoord.cuda / memcoord.torch without importing them (and torch) up front.
    if name in ("shm", "cuda", "torch"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'memcoord' has no attribute {name!r}")
