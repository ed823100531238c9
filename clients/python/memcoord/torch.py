"""``memcoord.torch``: a model served by memcoord, as torch tensors viewing its bytes in place.

::

    sd = memcoord.torch.state_dict(client, "sdxl_unet")   # lease + export + map, no copy
    unet.load_state_dict(sd, assign=True)                 # unet built on the meta device
    ...                                                   # compute
    del unet                                              # drop every tensor that views sd ...
    sd.release()                                          # ... then unmap, end the export, release the lease

or as a context manager (``with memcoord.torch.state_dict(client, "sdxl_unet") as sd: ...``).

A ``cuda:N`` model is mapped with :func:`memcoord.cuda.attach`: its tensors are CUDA tensors on that
GPU (``torch.as_tensor`` of the mapping's ``__cuda_array_interface__``). An ``shm`` model is mapped
with :func:`memcoord.shm.attach`: its tensors are CPU tensors (``torch.frombuffer``). No byte is
copied either way, and writes through the tensors change the served model for every process.

Each tensor is one ``as_strided`` view of a per-dtype view of the whole mapping (one torch call per
tensor: about 1,000 tensors take a few milliseconds). Every safetensors dtype this PyTorch has is
served: F16, BF16, F32, F64, I8 to I64, U8 (U16 to U64 from torch 2.3), BOOL, F8_E4M3
(``torch.float8_e4m3fn``) and F8_E5M2 (``torch.float8_e5m2``) from torch 2.1.

After :meth:`StateDict.release` the tensors must not be used: on ``shm`` their pages are replaced
by zeros; on a GPU their addresses are unmapped (a kernel reading them fails with an illegal
address, which poisons the CUDA context). Drop the module (or give it other weights) first.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from ._errors import MemcoordError
from .types import ExportInfo, dtype_info

__all__ = ["StateDict", "attach", "state_dict", "tensors_of", "torch_dtype"]


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("memcoord.torch needs PyTorch (pip install torch); the rest of memcoord works without it") from None
    return torch


def torch_dtype(dtype: str) -> Any:
    """The ``torch.dtype`` of a safetensors dtype; ``ValueError`` when this PyTorch has none."""
    torch = _torch()
    dt = getattr(torch, dtype_info(dtype).torch, None)
    if dt is None:
        raise ValueError(f"dtype {dtype} has no torch.{dtype_info(dtype).torch} in PyTorch {torch.__version__}")
    return dt


_STRIDES: Dict[Tuple[int, ...], Tuple[int, ...]] = {}


def _strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    s = _STRIDES.get(shape)
    if s is None:
        out = []
        step = 1
        for d in reversed(shape):
            out.append(step)
            step *= max(d, 1)
        s = tuple(reversed(out))
        if len(_STRIDES) < 65536:
            _STRIDES[shape] = s
    return s


def tensors_of(info: ExportInfo, mapping: Any) -> Dict[str, Any]:
    """``{name: torch.Tensor}`` for every tensor of a model export, viewing ``mapping`` in place.

    ``mapping`` is what :func:`memcoord.cuda.attach` or :func:`memcoord.shm.attach` returned for
    ``info``. Raises ``ValueError`` naming the tensor whose offset is not a multiple of its element
    size (a view cannot start there) or whose bytes do not match its dtype and shape.
    """
    torch = _torch()
    if not info.tensors:
        return {}
    size = int(mapping.size_bytes)
    if hasattr(mapping, "__cuda_array_interface__"):
        flat = torch.as_tensor(mapping, device=f"cuda:{mapping.device_ordinal}")
    elif size:
        flat = torch.frombuffer(mapping.memoryview(), dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8)
    bases: Dict[str, Tuple[Any, int]] = {}
    out: Dict[str, Any] = {}
    for t in info.tensors:
        got = bases.get(t.dtype)
        if got is None:
            dt = torch_dtype(t.dtype)
            k = dtype_info(t.dtype).itemsize
            got = bases[t.dtype] = (flat[: size - size % k].view(dt), k)
        base, k = got
        shape = t.shape
        count = 1
        for d in shape:
            count *= d
        if count * k != t.size_bytes or t.offset < 0 or t.offset + t.size_bytes > size:
            raise ValueError(
                f"tensor {t.name!r}: {t.dtype}{list(shape)} is {count * k} bytes, but the export gives it "
                f"{t.size_bytes} bytes at offset {t.offset} of {size}"
            )
        if t.offset % k:
            raise ValueError(
                f"tensor {t.name!r} ({t.dtype}) starts at byte {t.offset} of the export, not a multiple of its "
                f"{k}-byte elements: it cannot be viewed in place"
            )
        out[t.name] = base.as_strided(shape, _strides(shape), t.offset // k)
    return out


class StateDict(dict):
    """``{name: torch.Tensor}`` viewing a served model, plus what keeps it mapped.

    A ``dict`` (``module.load_state_dict(sd, assign=True)`` takes it as is) with:

    - :attr:`lease_id` (the lease it holds, or None when made by :func:`attach`),
      :attr:`export` (the :class:`memcoord.ExportInfo`), :attr:`mapping` (the attach result),
      :attr:`model_name`, :attr:`device`;
    - :meth:`release`: empties the dict, unmaps, ends the export and releases the lease, in that
      order, each step tried even if one before it failed. Leaving a ``with`` block does the same.
    """

    def __init__(
        self,
        tensors: Dict[str, Any],
        *,
        export: ExportInfo,
        mapping: Any,
        client: Any = None,
        lease_id: Optional[str] = None,
        model_name: Optional[str] = None,
    ) -> None:
        super().__init__(tensors)
        self.export = export
        self.mapping = mapping
        self.client = client
        self.lease_id = lease_id
        self.model_name = model_name
        self.device = export.device_id if export.device_id.startswith("cuda") else "cpu"
        self.released = False

    def release(self) -> None:
        """Unmap, end the export (when a client is held) and release the lease; idempotent."""
        if self.released:
            return
        self.released = True
        self.clear()
        mapping, self.mapping = self.mapping, None
        try:
            if mapping is not None:
                if hasattr(mapping, "__cuda_array_interface__"):
                    mapping.close()
                else:
                    mapping.close(force=True)
        finally:
            try:
                if self.client is not None:
                    try:
                        self.client.unexport(self.export.export_id)
                    except MemcoordError as e:
                        if e.code != "EXPORT_NOT_FOUND":  # already ended (with the lease, say)
                            raise
            finally:
                if self.client is not None and self.lease_id is not None:
                    self.client.model_release(self.lease_id)

    close = release

    def __enter__(self) -> "StateDict":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"{len(self)} tensors on {self.device}"
        return f"<memcoord StateDict of {self.model_name or self.export.export_id}: {state}>"


def attach(export_info: Union[ExportInfo, Dict[str, Any]], *, timeout: float = 30.0) -> StateDict:
    """Claim and map a model export made by someone else; returns its :class:`StateDict`.

    For a worker handed an :class:`memcoord.ExportInfo` (as JSON) by a host that holds the lease:
    :meth:`StateDict.release` only unmaps; the export and the lease stay the host's to end.
    """
    _torch()  # fail before claiming: a claim uses the secret up
    info = ExportInfo.coerce(export_info)
    mapping = _map(info, timeout)
    try:
        return StateDict(tensors_of(info, mapping), export=info, mapping=mapping, model_name=None)
    except BaseException:
        _close(mapping)
        raise


def _map(info: ExportInfo, timeout: float) -> Any:
    if info.device_id.startswith("cuda"):
        from . import cuda

        return cuda.attach(info, timeout=timeout)
    from . import shm

    return shm.attach(info, timeout=timeout)


def _close(mapping: Any) -> None:
    if hasattr(mapping, "__cuda_array_interface__"):
        mapping.close()
    else:
        mapping.close(force=True)


def state_dict(
    client: Any,
    model_name: str,
    *,
    timeout_seconds: Optional[float] = None,
    ttl_seconds: Optional[float] = None,
    claim_seconds: Optional[float] = None,
) -> StateDict:
    """Lease ``model_name``, export it, map it: a :class:`StateDict` of torch tensors viewing it in place.

    ``client`` is a :class:`memcoord.Client` (a stdio worker, a Unix socket or HTTP).
    ``timeout_seconds`` is the acquire's wait (an offloaded model is brought back first),
    ``ttl_seconds`` the lease's time limit (PROTOCOL 8.5; None: until released or the session ends).
    Call :meth:`StateDict.release` (or use it in a ``with`` block) when done; if anything fails on the
    way, what was taken is given back before the error is raised.
    """
    _torch()
    lease = client.model_acquire(model_name, timeout_seconds=timeout_seconds, ttl_seconds=ttl_seconds)
    lease_id = lease["lease_id"]
    info: Optional[ExportInfo] = None
    mapping: Any = None
    try:
        info = client.export(model_name=model_name, lease_id=lease_id, claim_seconds=claim_seconds)
        mapping = _map(info, 30.0)
        tensors = tensors_of(info, mapping)
    except BaseException:
        try:
            if mapping is not None:
                _close(mapping)
            if info is not None:
                try:
                    client.unexport(info.export_id)
                except MemcoordError:
                    pass
        finally:
            client.model_release(lease_id)
        raise
    return StateDict(tensors, export=info, mapping=mapping, client=client, lease_id=lease_id, model_name=model_name)
