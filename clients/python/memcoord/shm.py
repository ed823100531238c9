"""``memcoord.shm.attach``: an ``shm`` export's bytes in this process, in place, without a copy.

Each claimed segment is mapped ``MAP_SHARED`` from its descriptor at its ``file_offset``. Where every
segment's ``offset`` and ``file_offset`` are page-aligned (what memcoord sends), the segments are
mapped back to back into one reserved range, so one ``memoryview`` spans the whole export. A single
segment at any offset is mapped alone. Anything else is mapped segment by segment: tensors that lie
inside one segment are still readable, a view over the whole range is not.

The reserved range is a Python ``mmap`` object whose pages are replaced (``MAP_FIXED``) by the
segments' file pages, so Python's own buffer accounting protects it: :meth:`ShmMapping.close` refuses
(``BufferError``) while a memoryview or numpy array made from it is alive, unless ``force=True``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .claim import Claim, claim
from .types import ExportInfo, Segment, TensorInfo, dtype_info

__all__ = ["ShmMapping", "attach", "storage_format"]

_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # Linux and the BSDs alike
_MAP_ANON = getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0x20))
_libc: Optional[ctypes.CDLL] = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        _libc = lib
    return _libc


def _map_fixed(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
    got = _c().mmap(ctypes.c_void_p(addr), length, prot, flags | _MAP_FIXED, fd, offset)
    if got is None or got == ctypes.c_void_p(-1).value or got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes at file offset {offset} failed: {os.strerror(err)}")


def _address_of(m: mmap.mmap) -> int:
    holder = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


_BITS_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def storage_format(dtype: str) -> str:
    """The ``memoryview.cast`` format that :meth:`ShmMapping.tensor_memoryview` gives a dtype: its own
    where ``struct`` has one, else the unsigned integer of its width (its raw bits)."""
    d = dtype_info(dtype)
    return d.struct or _BITS_FORMAT[d.itemsize]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError("memcoord: .numpy() and .tensor() need numpy (pip install numpy); .memoryview() works without it") from None
    return numpy


class ShmMapping:
    """An attached ``shm`` export. Use as a context manager, or call :meth:`close`."""

    def __init__(self, info: ExportInfo, claimed: Claim, writable: bool = True) -> None:
        self.info = info
        self.size_bytes = claimed.size_bytes
        self.segments: List[Segment] = list(claimed.segments)
        self.writable = writable
        self._maps: List[mmap.mmap] = []
        self._seg_views: List[Tuple[int, int, mmap.mmap, int]] = []  # (offset, size, map, delta)
        self._whole: Optional[mmap.mmap] = None
        self._whole_delta = 0
        self.contiguous = False
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._map(claimed.fds, prot)
        except BaseException:
            self._unmap_all()
            raise
        finally:
            claimed.close()  # a mapping holds the file; the descriptors are no longer needed

    def _map(self, fds: Sequence[int], prot: int) -> None:
        segs = self.segments
        if self.size_bytes == 0 or not segs:
            self.contiguous = True
            return
        aligned = all(s.offset % _PAGE == 0 and s.file_offset % _PAGE == 0 for s in segs)
        if len(segs) > 1 and aligned:
            total = -(-self.size_bytes // _PAGE) * _PAGE
            whole = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE, prot=prot)
            self._whole = whole
            base = _address_of(whole)
            for s, fd in zip(segs, fds):
                if s.size_bytes:
                    _map_fixed(base + s.offset, s.size_bytes, prot, mmap.MAP_SHARED, fd, s.file_offset)
            self.contiguous = True
            return
        for s, fd in zip(segs, fds):
            start = s.file_offset - s.file_offset % _PAGE
            delta = s.file_offset - start
            m = mmap.mmap(fd, delta + max(s.size_bytes, 1), flags=mmap.MAP_SHARED, prot=prot, offset=start)
            self._maps.append(m)
            self._seg_views.append((s.offset, s.size_bytes, m, delta))
        if len(segs) == 1 and segs[0].offset == 0:
            self._whole, self._whole_delta = self._maps[0], self._seg_views[0][3]
            self.contiguous = True

    # -- views -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._whole is None and not self._maps and self.size_bytes:
            raise ValueError(f"export {self.info.export_id}: the mapping is closed")

    def memoryview(self, offset: int = 0, size: Optional[int] = None) -> memoryview:
        """A writable (if mapped so) ``memoryview`` of ``size`` bytes from ``offset`` of the export, no copy."""
        self._check_open()
        size = self.size_bytes - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.size_bytes:
            raise ValueError(f"bytes {offset}..{offset + size} are outside the export's {self.size_bytes} bytes")
        if self.size_bytes == 0:
            return memoryview(b"")
        if self._whole is not None:
            d = self._whole_delta
            return memoryview(self._whole)[d + offset : d + offset + size]
        for seg_off, seg_size, m, delta in self._seg_views:
            if seg_off <= offset and offset + size <= seg_off + seg_size:
                start = delta + offset - seg_off
                return memoryview(m)[start : start + size]
        raise ValueError(
            f"export {self.info.export_id}: bytes {offset}..{offset + size} span segments that could not be "
            "mapped back to back (their offsets are not page-aligned); read them segment by segment"
        )

    def tensor_bytes(self, name: str) -> memoryview:
        """The bytes of tensor ``name`` (a model export), as a ``memoryview`` of format ``B``."""
        t = self.info.tensor(name)
        return self.memoryview(t.offset, t.size_bytes)

    def tensor_memoryview(self, name: str) -> memoryview:
        """Tensor ``name`` as a typed, shaped ``memoryview`` (``cast``; no copy, no numpy needed).

        ``format`` is the dtype's ``struct`` code (``f`` for F32, ``q`` for I64, ``?`` for BOOL, …) and
        ``shape`` the header's. F16, BF16 and F8, which ``memoryview`` has no format for, come as their
        raw bits: format ``H`` (2 bytes) or ``B`` (1 byte), same shape (decode F16 with
        ``struct.unpack("<e", ...)``). A tensor with a 0 in its shape comes as an empty 1-D view
        (``memoryview`` cannot have a 0 in its shape).
        """
        t = self.info.tensor(name)
        mv = self.tensor_bytes(name)
        fmt = storage_format(t.dtype)
        if 0 in t.shape:
            return mv.cast(fmt)
        return mv.cast(fmt, list(t.shape))

    def numpy(self, dtype: Any = "u1", offset: int = 0, shape: Optional[Sequence[int]] = None) -> Any:
        """A numpy array over the export's bytes from ``offset`` (no copy): ``shape`` elements of ``dtype``,
        or as many as fit."""
        np = _numpy()
        dt = np.dtype(dtype)
        if shape is None:
            count = (self.size_bytes - offset) // dt.itemsize
            shape = (count,)
        count = 1
        for x in shape:
            count *= int(x)
        return np.frombuffer(self.memoryview(offset, count * dt.itemsize), dtype=dt).reshape(tuple(shape))

    def tensor(self, name: str) -> Any:
        """Tensor ``name`` as a numpy array of its dtype and shape (no copy). BF16 and F8 need a library that
        gives numpy those dtypes (``ml_dtypes``) and raise ``ValueError`` without it."""
        np = _numpy()
        t: TensorInfo = self.info.tensor(name)
        dt = dtype_info(t.dtype)
        np_dtype: Any = dt.numpy
        if np_dtype is None:
            try:
                import ml_dtypes  # type: ignore[import-not-found]

                np_dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[t.dtype]
            except (ImportError, KeyError):
                raise ValueError(f"tensor {name!r} is {t.dtype}, which numpy has no dtype for; use tensor_bytes() (or install ml_dtypes)") from None
        return np.frombuffer(self.tensor_bytes(name), dtype=np_dtype).reshape(t.shape)

    def tensors(self) -> List[TensorInfo]:
        """The export's :class:`TensorInfo` list (empty for an allocation export)."""
        return list(self.info.tensors)

    # -- lifetime --------------------------------------------------------------------------

    def _unmap_all(self) -> None:
        maps = ([self._whole] if self._whole is not None else []) + [m for m in self._maps if m is not self._whole]
        for m in maps:
            m.close()
        self._whole, self._maps, self._seg_views = None, [], []

    def close(self, force: bool = False) -> None:
        """Unmap the export.

        Raises ``BufferError`` (and unmaps nothing) while memoryviews or arrays made from it are alive.
        With ``force=True`` those views are cut off from the shared memory instead: their pages are
        replaced by private zero pages (reads give zeros, nothing crashes), and the address range is
        returned once the last of them is gone.
        """
        try:
            self._unmap_all()
        except BufferError:
            if not force:
                raise
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            for m in ([self._whole] if self._whole is not None else []) + self._maps:
                if m is None or m.closed:
                    continue
                try:
                    _map_fixed(_address_of(m), len(m), prot, mmap.MAP_PRIVATE | _MAP_ANON, -1, 0)
                except BufferError:
                    # address_of itself needs a buffer: take it from a fresh view
                    pass
                try:
                    m.close()
                except BufferError:
                    pass  # freed by the garbage collector with the last view
            self._whole, self._maps, self._seg_views = None, [], []

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._whole is None and not self._maps

    def __enter__(self) -> "ShmMapping":
        return self

    def __exit__(self, *exc: object) -> None:
        # Leaving the block ends access even if views are still referenced (a traceback holds
        # them): they are cut off from the shared memory rather than left pointing into it.
        self.close(force=True)


def attach(
    export_info: Union[ExportInfo, Dict[str, Any]],
    *,
    claimed: Optional[Claim] = None,
    writable: bool = True,
    timeout: float = 30.0,
) -> ShmMapping:
    """Claim an ``shm`` export (unless ``claimed`` is given) and map it: returns a :class:`ShmMapping`.

    ``writable=False`` maps it read-only. A ``cuda:N`` export is refused (use :func:`memcoord.cuda.attach`).
    """
    info = ExportInfo.coerce(export_info)
    if info.device_id.startswith("cuda"):
        raise ValueError(f"export {info.export_id} is on {info.device_id}: use memcoord.cuda.attach")
    c = claimed if claimed is not None else claim(info, timeout=timeout)
    try:
        return ShmMapping(info, c, writable=writable)
    except OSError as e:
        if e.errno == errno.EACCES and writable and claimed is None:
            raise PermissionError(f"export {info.export_id}: the descriptor is not writable; attach with writable=False") from e
        raise
