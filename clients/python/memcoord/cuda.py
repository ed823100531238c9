"""``memcoord.cuda.attach``: a ``cuda:N`` export's VRAM mapped into this process, in place.

Through the CUDA driver (``libcuda.so.1``, via ctypes; no toolkit, no torch needed):

1. ``cuInit``; the device whose UUID is the export's ``device_uuid`` (so ``CUDA_VISIBLE_DEVICES``
   renumbering does not matter), else ordinal N of ``cuda:N``; its primary context, retained and
   pushed current while mapping (the context PyTorch uses too).
2. For each claimed descriptor, ``cuMemImportFromShareableHandle(fd,
   CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)``; the descriptor is closed after the import.
3. ``cuMemAddressReserve`` of the whole export (rounded up to the allocation granularity), then
   ``cuMemMap`` of each segment at its ``offset``, then ``cuMemSetAccess`` read/write for the device.

The result exposes ``__cuda_array_interface__`` (version 3) for the whole range (bytes) and per
tensor (:meth:`CudaMapping.tensor`); ``torch.as_tensor(obj, device="cuda")``, CuPy and Numba take it.
Closing (or leaving the ``with`` block) unmaps, releases the imported handles and frees the address
range: tensors made from it must not be used afterwards (the pointers would be dangling).
DLPack is not offered: ``torch.as_tensor`` / ``cupy.asarray`` of the array interface do the same job.
"""

from __future__ import annotations

import ctypes
from typing import Any, Dict, List, Optional, Tuple, Union

from .claim import Claim, claim
from .types import ExportInfo, TensorInfo, dtype_info

__all__ = ["CudaError", "CudaMapping", "CudaTensor", "attach", "available"]

CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0

CUresult = ctypes.c_int
CUdevice = ctypes.c_int
CUdeviceptr = ctypes.c_ulonglong
CUcontext = ctypes.c_void_p
CUmemGenericAllocationHandle = ctypes.c_ulonglong


class CUmemLocation(ctypes.Structure):
    """``CUmemLocation``: {CUmemLocationType type; int id;}."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    """``CUmemAllocationProp`` (32 bytes on 64-bit)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    """``CUmemAccessDesc``: {CUmemLocation location; CUmemAccess_flags flags;} (12 bytes)."""

    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CudaError(RuntimeError):
    """A CUDA driver call failed; ``result`` is the CUresult and ``name`` its name."""

    def __init__(self, call: str, result: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({result})")
        self.call, self.result, self.name = call, result, name


_lib: Optional[ctypes.CDLL] = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise ImportError(f"memcoord.cuda needs the NVIDIA driver's libcuda.so.1, which could not be loaded: {e}") from None
    sig = {
        "cuInit": [ctypes.c_uint],
        "cuGetErrorName": [CUresult, ctypes.POINTER(ctypes.c_char_p)],
        "cuDeviceGet": [ctypes.POINTER(CUdevice), ctypes.c_int],
        "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
        "cuDeviceGetUuid": [ctypes.c_char * 16, CUdevice],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(CUcontext), CUdevice],
        "cuDevicePrimaryCtxRelease_v2": [CUdevice],
        "cuCtxPushCurrent_v2": [CUcontext],
        "cuCtxPopCurrent_v2": [ctypes.POINTER(CUcontext)],
        "cuMemImportFromShareableHandle": [ctypes.POINTER(CUmemGenericAllocationHandle), ctypes.c_void_p, ctypes.c_int],
        "cuMemGetAllocationPropertiesFromHandle": [ctypes.POINTER(CUmemAllocationProp), CUmemGenericAllocationHandle],
        "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp), ctypes.c_int],
        "cuMemAddressReserve": [ctypes.POINTER(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr, ctypes.c_ulonglong],
        "cuMemMap": [CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle, ctypes.c_ulonglong],
        "cuMemSetAccess": [CUdeviceptr, ctypes.c_size_t, ctypes.POINTER(CUmemAccessDesc), ctypes.c_size_t],
        "cuMemUnmap": [CUdeviceptr, ctypes.c_size_t],
        "cuMemRelease": [CUmemGenericAllocationHandle],
        "cuMemAddressFree": [CUdeviceptr, ctypes.c_size_t],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = CUresult
    _lib = lib
    return lib


def available() -> bool:
    """True when libcuda loads and ``cuInit`` succeeds (a driver and at least one usable GPU)."""
    try:
        lib = _load()
    except ImportError:
        return False
    return lib.cuInit(0) == 0


def _check(call: str, result: int) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        lib = _load()
        got = lib.cuGetErrorName(result, ctypes.byref(name))
        raise CudaError(call, result, (name.value or b"?").decode() if got == 0 else "CUDA_ERROR_UNKNOWN")


def _uuid_string(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _find_device(lib: ctypes.CDLL, device_id: str, device_uuid: Optional[str]) -> Tuple[int, int]:
    """(CUdevice, ordinal in this process) for the export's GPU."""
    count = ctypes.c_int()
    _check("cuDeviceGetCount", lib.cuDeviceGetCount(ctypes.byref(count)))
    if device_uuid:
        for i in range(count.value):
            dev = CUdevice()
            _check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), i))
            buf = (ctypes.c_char * 16)()
            _check("cuDeviceGetUuid", lib.cuDeviceGetUuid(buf, dev))
            if _uuid_string(bytes(buf)).lower() == device_uuid.lower():
                return dev.value, i
        raise ValueError(
            f"the export's GPU {device_uuid} ({device_id}) is not visible to this process "
            f"({count.value} GPU(s) visible; check CUDA_VISIBLE_DEVICES)"
        )
    try:
        ordinal = int(device_id.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{device_id!r} is not a cuda:N device") from None
    if ordinal >= count.value:
        raise ValueError(f"{device_id} is not visible to this process ({count.value} GPU(s) visible)")
    dev = CUdevice()
    _check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), ordinal))
    return dev.value, ordinal


def _round_up(x: int, g: int) -> int:
    return -(-x // g) * g


class CudaTensor:
    """One tensor of a mapped export: a device pointer, dtype and shape, with ``__cuda_array_interface__``."""

    def __init__(self, mapping: "CudaMapping", ptr: int, info: TensorInfo) -> None:
        self.mapping = mapping  # keeps the mapping object alive as long as the tensor view is
        self.ptr = ptr
        self.info = info
        self.dtype = info.dtype
        self.shape = info.shape
        self.device_ordinal = mapping.device_ordinal

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        """Version 3 of the interface (C-contiguous, no stream sync needed: the bytes are at rest)."""
        self.mapping._check_open()
        return {
            "shape": tuple(self.shape),
            "typestr": dtype_info(self.dtype).typestr,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
            "stream": None,
        }


class CudaMapping:
    """An attached ``cuda:N`` export; see the module's documentation. Use as a context manager."""

    def __init__(self, info: ExportInfo, claimed: Claim) -> None:
        self.info = info
        self.size_bytes = claimed.size_bytes
        self.ptr = 0
        self.reserved_bytes = 0
        self._handles: List[int] = []
        self._mapped: List[Tuple[int, int]] = []
        self._ctx = CUcontext()
        self._dev = -1
        lib = _load()
        self._lib = lib
        try:
            _check("cuInit", lib.cuInit(0))
            self._dev, self.device_ordinal = _find_device(lib, info.device_id, info.device_uuid)
            _check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._dev))
            _check("cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(self._ctx))
            try:
                self._map(claimed)
            finally:
                popped = CUcontext()
                lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
        except BaseException:
            self._release()
            raise
        finally:
            claimed.close()

    def _map(self, claimed: Claim) -> None:
        lib = self._lib
        for fd in claimed.fds:
            h = CUmemGenericAllocationHandle()
            _check(
                "cuMemImportFromShareableHandle",
                lib.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            )
            self._handles.append(h.value)
        if not self._handles:
            return
        prop = CUmemAllocationProp()
        _check("cuMemGetAllocationPropertiesFromHandle", lib.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(prop), self._handles[0]))
        gran = ctypes.c_size_t()
        _check("cuMemGetAllocationGranularity", lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        g = max(int(gran.value), 1)
        segs = claimed.segments
        for i, s in enumerate(segs):
            if s.offset % g or (i + 1 < len(segs) and s.size_bytes % g):
                raise ValueError(
                    f"export {self.info.export_id}: segment {i} (offset {s.offset}, {s.size_bytes} bytes) is not "
                    f"aligned to the GPU's mapping granularity of {g} bytes"
                )
        self.reserved_bytes = _round_up(self.size_bytes, g)
        ptr = CUdeviceptr()
        _check("cuMemAddressReserve", lib.cuMemAddressReserve(ctypes.byref(ptr), self.reserved_bytes, g, 0, 0))
        self.ptr = ptr.value
        for s, h in zip(segs, self._handles):
            size = _round_up(s.size_bytes, g)
            _check("cuMemMap", lib.cuMemMap(self.ptr + s.offset, size, 0, h, 0))
            self._mapped.append((self.ptr + s.offset, size))
        desc = CUmemAccessDesc()
        desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self._dev
        desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        _check("cuMemSetAccess", lib.cuMemSetAccess(self.ptr, self.reserved_bytes, ctypes.byref(desc), 1))

    def _check_open(self) -> None:
        if self._dev < 0:
            raise ValueError(f"export {self.info.export_id}: the mapping is closed")

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        """The whole export as a 1-D array of bytes (``|u1``)."""
        self._check_open()
        return {"shape": (self.size_bytes,), "typestr": "|u1", "data": (self.ptr, False), "strides": None, "version": 3, "stream": None}

    def tensor(self, name: str) -> CudaTensor:
        """Tensor ``name`` of a model export, with its dtype and shape."""
        self._check_open()
        t = self.info.tensor(name)
        return CudaTensor(self, self.ptr + t.offset, t)

    def tensors(self) -> Dict[str, CudaTensor]:
        """Every tensor of the export, by name."""
        return {t.name: self.tensor(t.name) for t in self.info.tensors}

    def _release(self) -> None:
        lib = self._lib
        pushed = False
        if self._ctx.value:
            pushed = lib.cuCtxPushCurrent_v2(self._ctx) == 0
        try:
            for addr, size in reversed(self._mapped):
                lib.cuMemUnmap(addr, size)
            self._mapped = []
            for h in self._handles:
                lib.cuMemRelease(h)
            self._handles = []
            if self.ptr:
                lib.cuMemAddressFree(self.ptr, self.reserved_bytes)
                self.ptr = 0
        finally:
            if pushed:
                popped = CUcontext()
                lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
            if self._ctx.value and self._dev >= 0:
                lib.cuDevicePrimaryCtxRelease_v2(self._dev)
            self._ctx = CUcontext()
            self._dev = -1

    def close(self) -> None:
        """Unmap every segment, release the imported handles, free the address range (idempotent)."""
        if self._dev >= 0 or self._handles or self.ptr:
            self._release()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._dev < 0

    def __enter__(self) -> "CudaMapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    export_info: Union[ExportInfo, Dict[str, Any]], *, claimed: Optional[Claim] = None, timeout: float = 30.0
) -> CudaMapping:
    """Claim a ``cuda:N`` export (unless ``claimed`` is given) and map it: returns a :class:`CudaMapping`.

    Raises ``ImportError`` when libcuda cannot be loaded, :class:`CudaError` when a driver call fails.
    """
    info = ExportInfo.coerce(export_info)
    if not info.device_id.startswith("cuda"):
        raise ValueError(f"export {info.export_id} is on {info.device_id}: use memcoord.shm.attach")
    _load()  # fail before claiming (a claim uses the secret up)
    c = claimed if claimed is not None else claim(info, timeout=timeout)
    return CudaMapping(info, c)

