"""``memcoord.cuda.attach``: a ``cuda:N`` export's VRAM mapped into this process, in place.

Through the CUDA driver (``libcuda.so.1``, via ctypes; no toolkit, no torch needed):

1. ``cuInit``; the GPU whose UUID is the export's ``device_uuid`` (``cuDeviceGetUuid_v2``, the UUID
   NVML and ``nvidia-smi -L`` print), so that a ``CUDA_VISIBLE_DEVICES`` that numbers GPUs
   differently from memcoord does not matter; without a UUID (or a driver that cannot read one),
   the ordinal N of ``cuda:N``. Its primary context (the one PyTorch uses) is retained and pushed
   current while mapping and unmapping.
2. For each claimed descriptor, once: ``cuMemImportFromShareableHandle(fd,
   CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)``. memcoord sends each physical allocation whole, with
   ``file_offset`` 0 (the driver maps one only from its start); each descriptor is imported once
   and its handle released on close. The descriptors are closed once imported.
3. ``cuMemAddressReserve`` of the export's range, then for each segment
   ``cuMemMap(base + offset, size_bytes, file_offset, handle)`` (``file_offset``, 0 from memcoord, is
   passed on as the driver's offset into the physical allocation), then ``cuMemSetAccess`` read/write for the GPU
   over each run of back-to-back segments. Offsets and sizes are multiples of the GPU's mapping
   granularity (2 MiB on an H200); anything else is refused before a call is made.

Closing (or leaving the ``with`` block) pushes the context, unmaps every segment, releases every
imported handle, frees the address range, then pops and releases the context; every step is tried
even when an earlier one failed, and the first failure is raised naming its driver call. Tensors
made from the mapping must not be used afterwards (their pointers would be dangling).

The mapping, and each tensor of a model export (:meth:`CudaMapping.tensor`), offer
``__cuda_array_interface__`` (version 3; PyTorch, CuPy, Numba) and DLPack (``__dlpack__``,
``__dlpack_device__``; PyTorch, JAX, CuPy). The bytes are at rest: no stream synchronisation is
needed, so both say so (``stream: None``; ``__dlpack__`` ignores ``stream``).
"""

from __future__ import annotations

import ctypes
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _dlpack
from .claim import Claim, claim
from .types import ExportInfo, Segment, TensorInfo, dtype_info

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


class CUuuid(ctypes.Structure):
    """``CUuuid {char bytes[16]}``."""

    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


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
    """A CUDA driver call failed: ``call`` names it (with its arguments), ``result`` is the CUresult
    and ``name`` its name (``CUDA_ERROR_INVALID_VALUE``)."""

    def __init__(self, call: str, result: int, name: str, description: str = "") -> None:
        more = f": {description}" if description else ""
        super().__init__(f"{call} failed: {name} ({result}){more}")
        self.call, self.result, self.name = call, result, name


_SIGNATURES: Dict[str, List[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorName": [CUresult, ctypes.POINTER(ctypes.c_char_p)],
    "cuGetErrorString": [CUresult, ctypes.POINTER(ctypes.c_char_p)],
    "cuDeviceGet": [ctypes.POINTER(CUdevice), ctypes.c_int],
    "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
    "cuDeviceGetUuid": [ctypes.POINTER(CUuuid), CUdevice],
    "cuDeviceGetUuid_v2": [ctypes.POINTER(CUuuid), CUdevice],
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
_OPTIONAL = {"cuDeviceGetUuid_v2", "cuGetErrorString"}

#: The driver in use: libcuda, loaded on first need. Tests put a stand-in with the same functions here.
_lib: Any = None


def _load() -> Any:
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise ImportError(f"memcoord.cuda needs the NVIDIA driver's libcuda.so.1, which could not be loaded: {e}") from None
    for name, args in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            if name in _OPTIONAL:
                continue
            raise ImportError(f"libcuda.so.1 has no {name}: the driver is too old for memcoord.cuda (CUDA 11.4 or later)") from None
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


def _error(lib: Any, call: str, result: int) -> CudaError:
    name, text = ctypes.c_char_p(), ctypes.c_char_p()
    got = lib.cuGetErrorName(result, ctypes.byref(name))
    label = (name.value or b"?").decode() if got == 0 else "CUDA_ERROR_UNKNOWN"
    description = ""
    if hasattr(lib, "cuGetErrorString") and lib.cuGetErrorString(result, ctypes.byref(text)) == 0 and text.value:
        description = text.value.decode(errors="replace")
    return CudaError(call, result, label, description)


def _check(call: str, result: int) -> None:
    if result != 0:
        raise _error(_load(), call, result)


def uuid_string(raw: bytes) -> str:
    """A 16-byte ``CUuuid`` as NVML writes a GPU's UUID: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``."""
    h = bytes(raw).hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _ordinal_of(device_id: str, count: int) -> int:
    try:
        ordinal = int(device_id.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{device_id!r} is not a cuda:N device") from None
    if not 0 <= ordinal < count:
        raise ValueError(f"{device_id} is not visible to this process ({count} GPU(s) visible; check CUDA_VISIBLE_DEVICES)")
    return ordinal


def find_device(device_id: str, device_uuid: Optional[str]) -> Tuple[int, int]:
    """(CUdevice, ordinal in this process) of the export's GPU: by ``device_uuid``, else ``cuda:N``'s N.

    A UUID that no visible GPU has is an error (mapping it on another GPU would be wrong), except
    where this driver cannot read UUIDs: then the ordinal is used.
    """
    lib = _load()
    count = ctypes.c_int()
    _check("cuDeviceGetCount", lib.cuDeviceGetCount(ctypes.byref(count)))
    get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or getattr(lib, "cuDeviceGetUuid", None)
    if device_uuid and device_uuid.upper().startswith("GPU-") and get_uuid is not None:
        seen: List[str] = []
        for i in range(count.value):
            dev = CUdevice()
            _check(f"cuDeviceGet({i})", lib.cuDeviceGet(ctypes.byref(dev), i))
            raw = CUuuid()
            if get_uuid(ctypes.byref(raw), dev.value) != 0:
                break  # cannot read UUIDs here: fall back to the ordinal
            u = uuid_string(bytes(raw.bytes))
            if u.lower() == device_uuid.lower():
                return dev.value, i
            seen.append(u)
        else:
            raise ValueError(
                f"the export's GPU {device_uuid} ({device_id}) is not visible to this process; it sees "
                f"{', '.join(seen) or 'no GPU'} (check CUDA_VISIBLE_DEVICES)"
            )
    ordinal = _ordinal_of(device_id, count.value)
    dev = CUdevice()
    _check(f"cuDeviceGet({ordinal})", lib.cuDeviceGet(ctypes.byref(dev), ordinal))
    return dev.value, ordinal


def _round_up(x: int, g: int) -> int:
    return -(-x // g) * g


def plan(segments: Sequence[Segment], size_bytes: int, granularity: int) -> Tuple[int, List[Tuple[int, int]]]:
    """Check a claim's segments against the mapping rules; returns (bytes to reserve, access runs).

    Each segment's ``offset``, ``size_bytes`` and ``file_offset`` must be multiples of
    ``granularity``; segments may not overlap. The access runs are the (offset, size) of each stretch
    of back-to-back segments: one ``cuMemSetAccess`` each.
    """
    g = max(int(granularity), 1)
    end = 0
    runs: List[Tuple[int, int]] = []
    for i, s in enumerate(segments):
        for what, v in (("offset", s.offset), ("size_bytes", s.size_bytes), ("file_offset", s.file_offset)):
            if v % g or v < 0:
                raise ValueError(
                    f"segment {i} (offset {s.offset}, {s.size_bytes} bytes, file_offset {s.file_offset}): its "
                    f"{what} is not a multiple of the GPU's mapping granularity of {g} bytes"
                )
        if s.size_bytes == 0:
            continue
        if s.offset < end:
            raise ValueError(f"segment {i} (offset {s.offset}) overlaps the segment before it (which ends at {end})")
        if runs and runs[-1][0] + runs[-1][1] == s.offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + s.size_bytes)
        else:
            runs.append((s.offset, s.size_bytes))
        end = s.offset + s.size_bytes
    return _round_up(max(size_bytes, end), g), runs


def _cai(ptr: int, shape: Tuple[int, ...], typestr: str) -> Dict[str, Any]:
    return {"shape": shape, "typestr": typestr, "data": (ptr, False), "strides": None, "version": 3, "stream": None}


class CudaTensor:
    """One tensor of a mapped export: a device pointer, dtype and shape; ``__cuda_array_interface__``
    and DLPack. BF16 and F8 have no array-interface typestr that consumers read: use DLPack
    (``torch.from_dlpack``) for those, or :func:`memcoord.torch.tensors_of`."""

    def __init__(self, mapping: "CudaMapping", ptr: int, info: TensorInfo) -> None:
        self.mapping = mapping  # keeps the mapping object alive as long as the tensor view is
        self.ptr = ptr
        self.info = info
        self.dtype = info.dtype
        self.shape = info.shape
        self.device_ordinal = mapping.device_ordinal

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        """Version 3 of the interface (C-contiguous; no stream sync needed: the bytes are at rest)."""
        self.mapping._check_open()
        return _cai(self.ptr, tuple(self.shape), dtype_info(self.dtype).typestr)

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None) -> object:
        """A legacy ``dltensor`` capsule (no copy; ``copy=True`` is refused)."""
        del stream, max_version, dl_device
        if copy:
            raise BufferError("memcoord tensors are views of shared VRAM; a copy is the consumer's to make")
        self.mapping._check_open()
        return _dlpack.capsule(self.ptr, _dlpack.KDL_CUDA, self.device_ordinal, self.dtype, self.shape)

    def __dlpack_device__(self) -> Tuple[int, int]:
        """(kDLCUDA, ordinal)."""
        return (_dlpack.KDL_CUDA, self.device_ordinal)


class CudaMapping:
    """An attached ``cuda:N`` export; see the module's documentation. Use as a context manager."""

    def __init__(self, info: ExportInfo, claimed: Claim) -> None:
        self.info = info
        self.size_bytes = claimed.size_bytes
        self.segments: List[Segment] = list(claimed.segments)
        self.ptr = 0
        self.reserved_bytes = 0
        self.granularity = 0
        self.device_ordinal = -1
        self._handles: List[int] = []  # one per descriptor, in the claim's order
        self._mapped: List[Tuple[int, int]] = []  # (address, size) of each cuMemMap that succeeded
        self._ctx = CUcontext()
        self._dev = -1
        self._lib = _load()
        lib = self._lib
        try:
            if len(claimed.fds) != len(self.segments):
                raise ValueError(f"export {info.export_id}: {len(claimed.fds)} descriptors for {len(self.segments)} segments")
            _check("cuInit", lib.cuInit(0))
            self._dev, self.device_ordinal = find_device(info.device_id, info.device_uuid)
            _check(f"cuDevicePrimaryCtxRetain({self.device_ordinal})", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._dev))
            _check("cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(self._ctx))
            try:
                self._map(claimed.fds)
            finally:
                popped = CUcontext()
                lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
        except BaseException:
            try:
                self._release()
            except CudaError:
                pass  # the error that stopped the attach is the one to report
            raise
        finally:
            claimed.close()

    def _map(self, fds: Sequence[int]) -> None:
        lib = self._lib
        eid = self.info.export_id
        for i, fd in enumerate(fds):
            h = CUmemGenericAllocationHandle()
            _check(
                f"cuMemImportFromShareableHandle(fd {fd}, segment {i} of export {eid})",
                lib.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            )
            self._handles.append(h.value)
        if not self._handles:
            return
        prop = CUmemAllocationProp()
        _check("cuMemGetAllocationPropertiesFromHandle", lib.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(prop), self._handles[0]))
        gran = ctypes.c_size_t()
        _check(
            "cuMemGetAllocationGranularity",
            lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        )
        self.granularity = g = max(int(gran.value), 1)
        try:
            reserve, runs = plan(self.segments, self.size_bytes, g)
        except ValueError as e:
            raise ValueError(f"export {eid}: {e}") from None
        ptr = CUdeviceptr()
        _check(f"cuMemAddressReserve({reserve} bytes)", lib.cuMemAddressReserve(ctypes.byref(ptr), reserve, g, 0, 0))
        self.ptr, self.reserved_bytes = ptr.value, reserve
        for i, (s, h) in enumerate(zip(self.segments, self._handles)):
            if s.size_bytes == 0:
                continue
            addr = self.ptr + s.offset
            _check(
                f"cuMemMap(base+{s.offset:#x}, {s.size_bytes} bytes, file_offset {s.file_offset:#x}) of segment {i} of export {eid}",
                lib.cuMemMap(addr, s.size_bytes, s.file_offset, h, 0),
            )
            self._mapped.append((addr, s.size_bytes))
        desc = CUmemAccessDesc()
        desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self._dev
        desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        for off, size in runs:
            _check(
                f"cuMemSetAccess(base+{off:#x}, {size} bytes, read/write for {self.info.device_id})",
                lib.cuMemSetAccess(self.ptr + off, size, ctypes.byref(desc), 1),
            )

    def _check_open(self) -> None:
        if self._dev < 0:
            raise ValueError(f"export {self.info.export_id}: the mapping is closed")

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        """The whole export as a 1-D array of bytes (``|u1``)."""
        self._check_open()
        return _cai(self.ptr, (self.size_bytes,), "|u1")

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None) -> object:
        """The whole export as a 1-D ``uint8`` DLPack tensor (no copy)."""
        del stream, max_version, dl_device
        if copy:
            raise BufferError("memcoord mappings are views of shared VRAM; a copy is the consumer's to make")
        self._check_open()
        return _dlpack.capsule(self.ptr, _dlpack.KDL_CUDA, self.device_ordinal, "U8", (self.size_bytes,))

    def __dlpack_device__(self) -> Tuple[int, int]:
        """(kDLCUDA, ordinal)."""
        return (_dlpack.KDL_CUDA, self.device_ordinal)

    def tensor(self, name: str) -> CudaTensor:
        """Tensor ``name`` of a model export, with its dtype and shape."""
        self._check_open()
        t = self.info.tensor(name)
        return CudaTensor(self, self.ptr + t.offset, t)

    def tensors(self) -> Dict[str, CudaTensor]:
        """Every tensor of the export, by name."""
        self._check_open()
        return {t.name: CudaTensor(self, self.ptr + t.offset, t) for t in self.info.tensors}

    def _release(self) -> None:
        """Unmap, release the handles, free the range, drop the context: each step tried; the first failure raised."""
        lib = self._lib
        errors: List[CudaError] = []

        def step(call: str, result: int) -> None:
            if result != 0:
                errors.append(_error(lib, call, result))

        pushed = False
        if self._ctx.value:
            r = lib.cuCtxPushCurrent_v2(self._ctx)
            pushed = r == 0
            step("cuCtxPushCurrent", r)
        try:
            for addr, size in reversed(self._mapped):
                step(f"cuMemUnmap({addr:#x}, {size} bytes)", lib.cuMemUnmap(addr, size))
            self._mapped = []
            for h in self._handles:
                step("cuMemRelease", lib.cuMemRelease(h))
            self._handles = []
            if self.ptr:
                step(f"cuMemAddressFree({self.ptr:#x}, {self.reserved_bytes} bytes)", lib.cuMemAddressFree(self.ptr, self.reserved_bytes))
                self.ptr = 0
        finally:
            if pushed:
                popped = CUcontext()
                lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
            if self._ctx.value and self._dev >= 0:
                step("cuDevicePrimaryCtxRelease", lib.cuDevicePrimaryCtxRelease_v2(self._dev))
            self._ctx = CUcontext()
            self._dev = -1
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Unmap every segment, release the imported handles, free the address range (idempotent).

        Raises :class:`CudaError` for the first driver call that failed (after trying all of them).
        """
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

    Raises ``ImportError`` when libcuda cannot be loaded (before claiming: the secret stays good),
    :class:`CudaError` naming the driver call that failed, ``ValueError`` for a GPU this process
    does not see or segments that break the mapping rules.
    """
    info = ExportInfo.coerce(export_info)
    if not info.device_id.startswith("cuda"):
        raise ValueError(f"export {info.export_id} is on {info.device_id}: use memcoord.shm.attach")
    _load()  # fail before claiming (a claim uses the secret up)
    c = claimed if claimed is not None else claim(info, timeout=timeout)
    return CudaMapping(info, c)
