"""DLPack capsules for memory this package maps (``__dlpack__`` / ``__dlpack_device__``), through ctypes.

A capsule holds a legacy ``DLManagedTensor`` (the exchange every DLPack consumer accepts: PyTorch,
JAX, CuPy, NumPy ≥ 1.22). The struct, its shape and its strides live in one ``malloc`` block whose
``deleter`` is libc's ``free``: the consumer calls it when its tensor is gone, and no Python code runs
then (a Python callback could run during interpreter shutdown, when it is no longer safe). A capsule
that nobody consumes keeps its block (about a hundred bytes) until the process exits.

The producer keeps no reference to the consumer's tensor: the mapping the pointer points into must
outlive it (that is the attach helpers' rule: close after the last tensor is dropped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional, Sequence, Tuple

__all__ = ["KDL_CPU", "KDL_CUDA", "capsule", "dl_dtype"]

KDL_CPU = 1
KDL_CUDA = 2

# DLDataTypeCode (dlpack.h 1.1)
_INT, _UINT, _FLOAT, _BFLOAT, _BOOL = 0, 1, 2, 4, 6
_F8_E4M3FN, _F8_E5M2 = 10, 12

#: safetensors dtype → (DLDataTypeCode, bits)
_CODES = {
    "F64": (_FLOAT, 64),
    "F32": (_FLOAT, 32),
    "F16": (_FLOAT, 16),
    "BF16": (_BFLOAT, 16),
    "F8_E4M3": (_F8_E4M3FN, 8),
    "F8_E5M2": (_F8_E5M2, 8),
    "I64": (_INT, 64),
    "I32": (_INT, 32),
    "I16": (_INT, 16),
    "I8": (_INT, 8),
    "U64": (_UINT, 64),
    "U32": (_UINT, 32),
    "U16": (_UINT, 16),
    "U8": (_UINT, 8),
    "BOOL": (_BOOL, 8),
}


class DLDevice(ctypes.Structure):
    """``DLDevice {int32 device_type; int32 device_id}``."""

    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    """``DLDataType {uint8 code; uint8 bits; uint16 lanes}``."""

    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    """``DLTensor`` (48 bytes on 64-bit)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    """Legacy ``DLManagedTensor {DLTensor dl_tensor; void *manager_ctx; void (*deleter)(DLManagedTensor *)}``."""

    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_NAME = ctypes.create_string_buffer(b"dltensor")  # a capsule keeps a pointer to its name: it must live forever
_libc: Optional[ctypes.CDLL] = None
_capsule_new = None


def _setup() -> Tuple[ctypes.CDLL, object]:
    global _libc, _capsule_new
    if _libc is None or _capsule_new is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _libc, _capsule_new = libc, new
    return _libc, _capsule_new


def dl_dtype(dtype: str) -> Tuple[int, int]:
    """(DLDataTypeCode, bits) of a safetensors dtype; ``ValueError`` naming it if DLPack has none."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no DLPack type code") from None


def capsule(ptr: int, device_type: int, device_id: int, dtype: str, shape: Sequence[int]) -> object:
    """A ``"dltensor"`` capsule viewing C-contiguous ``shape`` elements of ``dtype`` at ``ptr``."""
    code, bits = dl_dtype(dtype)
    libc, new = _setup()
    ndim = len(shape)
    head = ctypes.sizeof(DLManagedTensor)
    block = libc.malloc(head + 16 * max(ndim, 1))
    if not block:
        raise MemoryError("malloc of a DLPack tensor descriptor failed")
    m = DLManagedTensor.from_address(block)
    dims = (ctypes.c_int64 * max(ndim, 1)).from_address(block + head)
    strides = (ctypes.c_int64 * max(ndim, 1)).from_address(block + head + 8 * max(ndim, 1))
    step = 1
    for i in range(ndim - 1, -1, -1):
        dims[i] = int(shape[i])
        strides[i] = step
        step *= max(int(shape[i]), 1)
    empty = any(int(x) == 0 for x in shape)
    m.dl_tensor.data = None if empty else ptr
    m.dl_tensor.device = DLDevice(device_type, device_id)
    m.dl_tensor.ndim = ndim
    m.dl_tensor.dtype = DLDataType(code, bits, 1)
    m.dl_tensor.shape = ctypes.cast(block + head, ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.strides = ctypes.cast(block + head + 8 * max(ndim, 1), ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.byte_offset = 0
    m.manager_ctx = None
    m.deleter = ctypes.cast(libc.free, ctypes.c_void_p).value
    del dims, strides
    return new(block, ctypes.addressof(_NAME), None)
