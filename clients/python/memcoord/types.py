"""Typed views of the answers that the attach helpers consume: exports and their tensors (8.3).

Every other action returns its ``data`` object as a plain ``dict`` (documented on each
:class:`memcoord.Client` method); these few are dataclasses because :func:`memcoord.claim`,
:func:`memcoord.shm.attach` and :func:`memcoord.cuda.attach` compute with them. Each keeps the whole
wire object in ``raw``, so fields added by later versions are not lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["DTYPES", "DType", "ExportAllocation", "ExportInfo", "Segment", "TensorInfo", "dtype_info"]


@dataclass(frozen=True)
class DType:
    """A safetensors dtype and its names elsewhere."""

    name: str  #: as the safetensors header writes it ("F16")
    itemsize: int  #: bytes per element
    numpy: Optional[str]  #: numpy dtype string, None where numpy has none (BF16, F8…)
    struct: Optional[str]  #: ``memoryview.cast`` format (native order: little-endian hosts), None where cast has none (F16, BF16…)
    torch: str  #: attribute of the ``torch`` module ("float16")
    typestr: str  #: ``__cuda_array_interface__`` / numpy array-interface typestr


#: The safetensors dtypes, by header name.
DTYPES: Dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, "<f8", "d", "float64", "<f8"),
        DType("F32", 4, "<f4", "f", "float32", "<f4"),
        DType("F16", 2, "<f2", None, "float16", "<f2"),
        DType("BF16", 2, None, None, "bfloat16", "<V2"),
        DType("F8_E4M3", 1, None, None, "float8_e4m3fn", "|V1"),
        DType("F8_E5M2", 1, None, None, "float8_e5m2", "|V1"),
        DType("I64", 8, "<i8", "q", "int64", "<i8"),
        DType("I32", 4, "<i4", "i", "int32", "<i4"),
        DType("I16", 2, "<i2", "h", "int16", "<i2"),
        DType("I8", 1, "|i1", "b", "int8", "|i1"),
        DType("U64", 8, "<u8", "Q", "uint64", "<u8"),
        DType("U32", 4, "<u4", "I", "uint32", "<u4"),
        DType("U16", 2, "<u2", "H", "uint16", "<u2"),
        DType("U8", 1, "|u1", "B", "uint8", "|u1"),
        DType("BOOL", 1, "|b1", "?", "bool", "|b1"),
    )
}


def dtype_info(name: str) -> DType:
    """The :class:`DType` of a safetensors dtype name; ``ValueError`` naming it if unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r} (known: {', '.join(DTYPES)})") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a model export: where its bytes are in the export's range."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    allocation_id: Optional[str]
    offset: int  #: byte offset in the export's range
    size_bytes: int
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorInfo":
        """Build from the wire object ``{name, dtype, shape, allocation_id, offset, size_bytes}``."""
        return cls(
            name=str(d["name"]),
            dtype=str(d["dtype"]),
            shape=tuple(int(x) for x in d["shape"]),
            allocation_id=d.get("allocation_id"),
            offset=int(d["offset"]),
            size_bytes=int(d["size_bytes"]),
            raw=dict(d),
        )


@dataclass(frozen=True)
class ExportAllocation:
    """One allocation of an export: ``{allocation_id, offset, size_bytes}``."""

    allocation_id: str
    offset: int
    size_bytes: int

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExportAllocation":
        """Build from the wire object."""
        return cls(str(d["allocation_id"]), int(d["offset"]), int(d["size_bytes"]))


@dataclass(frozen=True)
class ExportInfo:
    """The answer of ``memory.export`` (PROTOCOL 8.3); pass it to :func:`memcoord.claim` or an attach."""

    export_id: str
    device_id: str
    device_uuid: Optional[str]
    size_bytes: int
    socket_path: str
    secret: str
    expires_at: Optional[str]
    allocations: Tuple[ExportAllocation, ...]
    tensors: Tuple[TensorInfo, ...]
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ExportInfo":
        """Build from the ``data`` of a ``memory.export`` answer."""
        return cls(
            export_id=str(d["export_id"]),
            device_id=str(d["device_id"]),
            device_uuid=d.get("device_uuid"),
            size_bytes=int(d["size_bytes"]),
            socket_path=str(d["socket_path"]),
            secret=str(d["secret"]),
            expires_at=d.get("expires_at"),
            allocations=tuple(ExportAllocation.from_dict(a) for a in d.get("allocations") or ()),
            tensors=tuple(TensorInfo.from_dict(t) for t in d.get("tensors") or ()),
            raw=dict(d),
        )

    @classmethod
    def coerce(cls, value: Union["ExportInfo", Dict[str, Any]]) -> "ExportInfo":
        """Accept an :class:`ExportInfo` or the wire dict."""
        if isinstance(value, ExportInfo):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TypeError(f"expected an ExportInfo or the dict of a memory.export answer, got {type(value).__name__}")

    def tensor(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` called ``name``; ``KeyError`` naming it if the export has none."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"export {self.export_id} has no tensor {name!r}")


@dataclass(frozen=True)
class Segment:
    """One segment of a claim: ``offset`` in the export's range, its size, and (shm) where it starts in the file."""

    offset: int
    size_bytes: int
    file_offset: int

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Segment":
        """Build from the wire object ``{offset, size_bytes, file_offset}`` (file_offset may be absent for VRAM)."""
        return cls(int(d["offset"]), int(d["size_bytes"]), int(d.get("file_offset") or 0))


def segments_from(lst: List[Dict[str, Any]]) -> List[Segment]:
    """Parse a claim answer's ``segments``."""
    return [Segment.from_dict(s) for s in lst]
