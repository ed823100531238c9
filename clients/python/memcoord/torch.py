"""``memcoord.torch.state_dict``: a model served by memcoord, as torch tensors viewing it in place.

::

    with memcoord.torch.state_dict(client, "sdxl_unet") as sd:
        unet.load_state_dict(sd, assign=True)      # unet built on the meta device
        ...                                         # compute
    # leaving: the tensors are unmapped, the export ended, the lease released

Inside the block memcoord holds a lease on the model (it is neither evicted nor offloaded) and an
export of it. A ``cuda:N`` model is mapped with :func:`memcoord.cuda.attach` and its tensors are
``torch.as_tensor`` of the mapping's ``__cuda_array_interface__`` on that GPU; an ``shm`` model is
mapped with :func:`memcoord.shm.attach` and its tensors are CPU tensors (``torch.frombuffer``). No byte
is copied either way. Writes through the tensors change the served model for every process.

The tensors must not be used after the block: a module that received them with ``assign=True`` must
be dropped (or given other weights) before leaving. (On ``shm`` such a late read gives zeros; on a
GPU it is an illegal address.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from ._errors import MemcoordError
from .types import ExportInfo, dtype_info

__all__ = ["state_dict", "tensors_of"]


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("memcoord.torch needs PyTorch (pip install torch); the rest of memcoord works without it") from None
    return torch


def tensors_of(info: ExportInfo, mapping: Any) -> Dict[str, Any]:
    """``{name: torch.Tensor}`` for every tensor of a model export, viewing ``mapping`` (an attach result) in place."""
    torch = _torch()
    if not info.tensors:
        return {}
    if hasattr(mapping, "__cuda_array_interface__"):
        flat = torch.as_tensor(mapping, device=f"cuda:{mapping.device_ordinal}")
    else:
        flat = torch.frombuffer(mapping.memoryview(), dtype=torch.uint8)
    out: Dict[str, Any] = {}
    for t in info.tensors:
        dt = getattr(torch, dtype_info(t.dtype).torch, None)
        if dt is None:
            raise ValueError(f"tensor {t.name!r} is {t.dtype}, which this PyTorch has no dtype for")
        raw = flat[t.offset : t.offset + t.size_bytes]
        out[t.name] = raw.view(dt).reshape(t.shape)
    return out


@contextlib.contextmanager
def state_dict(
    client: Any,
    model_name: str,
    *,
    timeout_seconds: Optional[float] = None,
    claim_seconds: Optional[float] = None,
) -> Iterator[Dict[str, Any]]:
    """Lease ``model_name``, export it, map it, and yield ``{name: torch.Tensor}`` viewing it in place.

    ``client`` is a :class:`memcoord.Client`. ``timeout_seconds`` is the acquire's wait (an offloaded
    model is brought back first). On leaving, the mapping is closed, the export ended and the lease
    released, in that order, even after an error.
    """
    torch = _torch()
    del torch
    lease = client.model_acquire(model_name, timeout_seconds=timeout_seconds)
    lease_id = lease["lease_id"]
    info: Optional[ExportInfo] = None
    mapping: Any = None
    tensors: Dict[str, Any] = {}
    try:
        info = client.export(model_name=model_name, lease_id=lease_id, claim_seconds=claim_seconds)
        if info.device_id.startswith("cuda"):
            from . import cuda

            mapping = cuda.attach(info)
        else:
            from . import shm

            mapping = shm.attach(info)
        tensors = tensors_of(info, mapping)
        yield tensors
    finally:
        tensors.clear()
        try:
            if mapping is not None:
                if hasattr(mapping, "__cuda_array_interface__"):
                    mapping.close()
                else:
                    mapping.close(force=True)
        finally:
            try:
                if info is not None:
                    try:
                        client.unexport(info.export_id)
                    except MemcoordError as e:
                        if e.code != "EXPORT_NOT_FOUND":  # already ended (e.g. with the lease)
                            raise
            finally:
                client.model_release(lease_id)
