"""``memcoord.cuda.attach`` without a GPU: the driver calls it makes, checked against a stand-in driver.

The stand-in (``FakeDriver``) has the functions the module calls, with the driver's rules for them
(a handle must be imported before it is mapped, a map must fall inside a reservation and inside its
physical allocation, offsets and sizes on the granularity, unmap before the range is freed, …), and
records every call. The descriptors are real: the in-test claim server passes them with SCM_RIGHTS,
each standing for a "physical allocation" by the file it opens (several segments may open the same
one, as a cuda:N export's may). On a machine with a GPU, ``GpuAttachTest`` maps a real export.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import unittest
import uuid
from typing import Any, Dict, List, Optional, Tuple

from mc_testutil import MiB, FakeClaimServer, open_fds

from memcoord import ExportInfo, _dlpack, cuda

G = 2 * MiB  # the granularity the stand-in reports (an H200's)
UUIDS = [bytes(range(16)), bytes(range(16, 32))]


class FakeDriver:
    """A CUDA driver stand-in: ``calls`` lists (name, args) in order; ``fail`` = {name: (nth call, CUresult)}."""

    def __init__(self, phys_sizes: Dict[int, int]) -> None:
        self.phys_sizes = phys_sizes  # inode of a descriptor's file -> bytes of "physical memory"
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.fail: Dict[str, Tuple[int, int]] = {}
        self.counts: Dict[str, int] = {}
        self.handles: Dict[int, int] = {}  # live handle -> inode
        self.reserved: Dict[int, int] = {}  # base -> size
        self.mapped: Dict[int, Tuple[int, int, int]] = {}  # address -> (size, handle, offset)
        self.access: List[Tuple[int, int, int]] = []
        self.ctx_refs = 0
        self.ctx_stack: List[int] = []
        self._next = 0x1000

    def _call(self, name: str, *args: Any) -> Optional[int]:
        self.calls.append((name, args))
        n = self.counts[name] = self.counts.get(name, 0) + 1
        f = self.fail.get(name)
        if f is not None and f[0] == n:
            return f[1]
        return None

    def cuGetErrorName(self, result: int, out: Any) -> int:
        out._obj.value = {1: b"CUDA_ERROR_INVALID_VALUE", 2: b"CUDA_ERROR_OUT_OF_MEMORY"}.get(result, b"CUDA_ERROR_UNKNOWN")
        return 0

    def cuGetErrorString(self, result: int, out: Any) -> int:
        out._obj.value = b"invalid argument" if result == 1 else b"something failed"
        return 0

    def cuInit(self, flags: int) -> int:
        return self._call("cuInit", flags) or 0

    def cuDeviceGetCount(self, out: Any) -> int:
        out._obj.value = len(UUIDS)
        return self._call("cuDeviceGetCount") or 0

    def cuDeviceGet(self, out: Any, ordinal: int) -> int:
        out._obj.value = 100 + ordinal  # a CUdevice is not its ordinal
        return self._call("cuDeviceGet", ordinal) or 0

    def cuDeviceGetUuid_v2(self, out: Any, dev: int) -> int:
        ctypes.memmove(ctypes.addressof(out._obj), UUIDS[dev - 100], 16)
        return self._call("cuDeviceGetUuid_v2", dev) or 0

    def cuDevicePrimaryCtxRetain(self, out: Any, dev: int) -> int:
        self.ctx_refs += 1
        out._obj.value = 0xC0 + dev
        return self._call("cuDevicePrimaryCtxRetain", dev) or 0

    def cuDevicePrimaryCtxRelease_v2(self, dev: int) -> int:
        self.ctx_refs -= 1
        return self._call("cuDevicePrimaryCtxRelease", dev) or 0

    def cuCtxPushCurrent_v2(self, ctx: Any) -> int:
        self.ctx_stack.append(ctx.value if hasattr(ctx, "value") else ctx)
        return self._call("cuCtxPushCurrent") or 0

    def cuCtxPopCurrent_v2(self, out: Any) -> int:
        self.ctx_stack.pop()
        return self._call("cuCtxPopCurrent") or 0

    def cuMemImportFromShareableHandle(self, out: Any, fd: Any, kind: int) -> int:
        r = self._call("cuMemImportFromShareableHandle", fd.value, kind)
        if r:
            return r
        assert kind == cuda.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._next += 1
        self.handles[self._next] = os.fstat(fd.value).st_ino
        out._obj.value = self._next
        return 0

    def cuMemGetAllocationPropertiesFromHandle(self, prop: Any, h: int) -> int:
        assert h in self.handles
        prop._obj.location.type = cuda.CU_MEM_LOCATION_TYPE_DEVICE
        return self._call("cuMemGetAllocationPropertiesFromHandle", h) or 0

    def cuMemGetAllocationGranularity(self, out: Any, prop: Any, option: int) -> int:
        out._obj.value = G
        return self._call("cuMemGetAllocationGranularity", option) or 0

    def cuMemAddressReserve(self, out: Any, size: int, align: int, addr: int, flags: int) -> int:
        r = self._call("cuMemAddressReserve", size, align)
        if r:
            return r
        assert size % G == 0 and size > 0
        base = 0x7F0000000000 + len(self.calls) * 0x100000000
        self.reserved[base] = size
        out._obj.value = base
        return 0

    def cuMemMap(self, addr: int, size: int, offset: int, h: int, flags: int) -> int:
        r = self._call("cuMemMap", addr, size, offset, h)
        if r:
            return r
        if h not in self.handles or size % G or offset % G or addr % G:
            return 1
        if offset + size > self.phys_sizes[self.handles[h]]:
            return 1
        if not any(b <= addr and addr + size <= b + s for b, s in self.reserved.items()):
            return 1
        if any(a < addr + size and addr < a + m[0] for a, m in self.mapped.items()):
            return 1
        self.mapped[addr] = (size, h, offset)
        return 0

    def cuMemSetAccess(self, addr: int, size: int, desc: Any, count: int) -> int:
        r = self._call("cuMemSetAccess", addr, size)
        if r:
            return r
        d = desc._obj
        # every byte of the range must be mapped
        covered = sum(m[0] for a, m in self.mapped.items() if addr <= a and a + m[0] <= addr + size)
        if covered != size or count != 1 or d.flags != cuda.CU_MEM_ACCESS_FLAGS_PROT_READWRITE:
            return 1
        self.access.append((addr, size, d.location.id))
        return 0

    def cuMemUnmap(self, addr: int, size: int) -> int:
        r = self._call("cuMemUnmap", addr, size)
        if r:
            return r
        if self.mapped.get(addr, (None,))[0] != size:
            return 1
        del self.mapped[addr]
        return 0

    def cuMemRelease(self, h: int) -> int:
        r = self._call("cuMemRelease", h)
        if r:
            return r
        return 0 if self.handles.pop(h, None) is not None else 1

    def cuMemAddressFree(self, addr: int, size: int) -> int:
        r = self._call("cuMemAddressFree", addr, size)
        if r:
            return r
        if self.reserved.get(addr) != size or any(addr <= a < addr + size for a in self.mapped):
            return 1  # a range is freed only once nothing is mapped in it
        del self.reserved[addr]
        return 0

    def names(self) -> List[str]:
        return [c[0] for c in self.calls]


class CudaAttachFakeDriverTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.server = FakeClaimServer(self.tmp.name)
        self.files: List[int] = []
        self.sizes: Dict[int, int] = {}
        self.saved = cuda._lib

    def tearDown(self) -> None:
        cuda._lib = self.saved
        self.server.close()
        for fd in self.files:
            os.close(fd)
        self.tmp.cleanup()

    def phys(self, size: int) -> int:
        """A descriptor standing for a physical allocation of ``size`` bytes."""
        path = os.path.join(self.tmp.name, f"phys-{uuid.uuid4()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.files.append(fd)
        self.sizes[os.fstat(fd).st_ino] = size
        return fd

    def export(self, size: int, segments: List[Dict[str, int]], fds: List[int], device_uuid: Optional[str] = None,
               device_id: str = "cuda:0", tensors: Optional[List[Dict[str, Any]]] = None) -> ExportInfo:
        eid, secret = str(uuid.uuid4()), uuid.uuid4().hex
        self.server.add(eid, secret, device_id, size, segments, fds)
        return ExportInfo.from_dict({
            "export_id": eid, "device_id": device_id, "device_uuid": device_uuid, "size_bytes": size,
            "socket_path": self.server.path, "secret": secret, "expires_at": None,
            "allocations": [], "tensors": tensors or [],
        })

    def driver(self) -> FakeDriver:
        d = FakeDriver(self.sizes)
        cuda._lib = d
        return d

    def test_segments_map_at_their_file_offsets_and_close_releases_in_order(self) -> None:
        a, b = self.phys(8 * G), self.phys(4 * G)
        # Three segments: two parts of allocation a (each with its own descriptor), then b.
        segs = [{"offset": 0, "size_bytes": 2 * G, "file_offset": 4 * G},
                {"offset": 2 * G, "size_bytes": 3 * G, "file_offset": 0},
                {"offset": 5 * G, "size_bytes": 4 * G, "file_offset": 0}]
        tensors = [{"name": "w", "dtype": "F16", "shape": [G // 2], "allocation_id": None, "offset": G, "size_bytes": G}]
        info = self.export(9 * G - 100, segs, [a, a, b], device_uuid=cuda.uuid_string(UUIDS[1]), tensors=tensors)
        d = self.driver()
        before = open_fds()
        m = cuda.attach(info)
        self.server.wait_handled(1)
        self.assertEqual(open_fds(), before, "every claimed descriptor is closed once imported")
        self.assertEqual(m.device_ordinal, 1, "the GPU is chosen by UUID, not by cuda:0's ordinal")
        self.assertEqual(d.counts["cuMemImportFromShareableHandle"], 3, "one import per descriptor")
        hs = [c[1][3] for c in d.calls if c[0] == "cuMemMap"]
        self.assertEqual(len(set(hs)), 3)
        self.assertEqual([d.handles[h] for h in hs][0], os.fstat(a).st_ino)
        self.assertEqual(d.reserved, {m.ptr: 9 * G})
        self.assertEqual(
            [(c[1][0] - m.ptr, c[1][1], c[1][2]) for c in d.calls if c[0] == "cuMemMap"],
            [(0, 2 * G, 4 * G), (2 * G, 3 * G, 0), (5 * G, 4 * G, 0)],
        )
        self.assertEqual(d.access, [(m.ptr, 9 * G, 101)], "one cuMemSetAccess for back-to-back segments, for the chosen GPU")
        cai = m.__cuda_array_interface__
        self.assertEqual((cai["data"], cai["shape"], cai["typestr"], cai["version"]), ((m.ptr, False), (9 * G - 100,), "|u1", 3))
        t = m.tensor("w").__cuda_array_interface__
        self.assertEqual((t["data"][0] - m.ptr, t["shape"], t["typestr"]), (G, (G // 2,), "<f2"))
        self.assertEqual(m.tensor("w").__dlpack_device__(), (_dlpack.KDL_CUDA, 1))
        self.assertEqual(d.ctx_stack, [], "the context is not left pushed")
        d.calls.clear()
        m.close()
        names = d.names()
        self.assertEqual(names[0], "cuCtxPushCurrent")
        self.assertEqual(names[1:4], ["cuMemUnmap"] * 3)
        self.assertEqual(names[4:7], ["cuMemRelease"] * 3)
        self.assertEqual(names[7:], ["cuMemAddressFree", "cuCtxPopCurrent", "cuDevicePrimaryCtxRelease"])
        self.assertEqual((d.mapped, d.handles, d.reserved, d.ctx_refs), ({}, {}, {}, 0))
        self.assertTrue(m.closed)
        m.close()  # idempotent
        self.assertEqual(len(d.calls), 10)
        with self.assertRaises(ValueError):
            m.__cuda_array_interface__

    def test_gaps_get_one_access_call_per_run(self) -> None:
        a = self.phys(4 * G)
        segs = [{"offset": 0, "size_bytes": G, "file_offset": 0}, {"offset": 2 * G, "size_bytes": G, "file_offset": G}]
        d = self.driver()
        with cuda.attach(self.export(3 * G, segs, [a, a])) as m:
            self.assertEqual(d.access, [(m.ptr, G, 100), (m.ptr + 2 * G, G, 100)])
            self.assertEqual(m.device_ordinal, 0)
        self.assertEqual((d.mapped, d.handles, d.reserved), ({}, {}, {}))

    def test_a_failing_map_names_the_call_and_gives_everything_back(self) -> None:
        a = self.phys(8 * G)
        segs = [{"offset": i * G, "size_bytes": G, "file_offset": i * G} for i in range(4)]
        d = self.driver()
        d.fail["cuMemMap"] = (3, 2)
        before = open_fds()
        with self.assertRaises(cuda.CudaError) as cm:
            cuda.attach(self.export(4 * G, segs, [a] * 4))
        self.server.wait_handled(1)
        e = cm.exception
        self.assertEqual((e.name, e.result), ("CUDA_ERROR_OUT_OF_MEMORY", 2))
        self.assertIn("cuMemMap(base+0x400000, 2097152 bytes, file_offset 0x400000) of segment 2", str(e))
        self.assertEqual((d.mapped, d.handles, d.reserved, d.ctx_refs, d.ctx_stack), ({}, {}, {}, 0, []))
        self.assertEqual(open_fds(), before)

    def test_segments_off_the_granularity_are_refused_before_any_map(self) -> None:
        a = self.phys(8 * G)
        for seg in ({"offset": 0, "size_bytes": G + 4096, "file_offset": 0},
                    {"offset": 0, "size_bytes": G, "file_offset": 4096}):
            d = self.driver()
            with self.assertRaises(ValueError) as cm:
                cuda.attach(self.export(G, [seg], [a]))
            self.assertIn("granularity of 2097152 bytes", str(cm.exception))
            self.assertNotIn("cuMemMap", d.names())
            self.assertEqual((d.handles, d.reserved, d.ctx_refs), ({}, {}, 0))

    def test_device_choice(self) -> None:
        a = self.phys(G)
        seg = [{"offset": 0, "size_bytes": G, "file_offset": 0}]
        self.driver()
        with cuda.attach(self.export(G, seg, [a], device_id="cuda:1")) as m:
            self.assertEqual(m.device_ordinal, 1, "no UUID: the ordinal of cuda:N")
        with self.assertRaises(ValueError) as cm:
            cuda.attach(self.export(G, seg, [a], device_uuid="GPU-ffffffff-0000-0000-0000-000000000000"))
        self.assertIn("not visible to this process", str(cm.exception))
        self.assertIn(cuda.uuid_string(UUIDS[0]), str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            cuda.attach(self.export(G, seg, [a], device_id="cuda:7"))
        self.assertIn("cuda:7 is not visible", str(cm.exception))

    def test_errors_on_close_are_reported_after_every_step(self) -> None:
        a = self.phys(2 * G)
        d = self.driver()
        m = cuda.attach(self.export(2 * G, [{"offset": 0, "size_bytes": G, "file_offset": 0},
                                            {"offset": G, "size_bytes": G, "file_offset": G}], [a, a]))
        d.fail["cuMemUnmap"] = (1, 1)
        with self.assertRaises(cuda.CudaError) as cm:
            m.close()
        self.assertTrue(str(cm.exception).startswith("cuMemUnmap("))
        self.assertIn("invalid argument", str(cm.exception))
        self.assertEqual(d.counts["cuMemRelease"], 2, "the handles are released all the same")
        self.assertEqual(d.ctx_refs, 0)
        self.assertTrue(m.closed)

    def test_uuid_string_is_nvml_form(self) -> None:
        self.assertEqual(cuda.uuid_string(bytes(range(16))), "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f")


class DlpackCapsuleTest(unittest.TestCase):
    """The capsule's DLManagedTensor, read back field by field (no consumer library needed)."""

    def test_capsule_fields_and_deleter(self) -> None:
        buf = (ctypes.c_uint16 * 6)()
        cap = _dlpack.capsule(ctypes.addressof(buf), _dlpack.KDL_CPU, 0, "BF16", (2, 3))
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        name = ctypes.pythonapi.PyCapsule_GetName
        name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        self.assertEqual(name(cap), b"dltensor")
        m = _dlpack.DLManagedTensor.from_address(get(cap, b"dltensor"))
        t = m.dl_tensor
        self.assertEqual((t.data, t.device.device_type, t.device.device_id, t.ndim), (ctypes.addressof(buf), 1, 0, 2))
        self.assertEqual((t.dtype.code, t.dtype.bits, t.dtype.lanes), (4, 16, 1))
        self.assertEqual(([t.shape[0], t.shape[1]], [t.strides[0], t.strides[1]], t.byte_offset), ([2, 3], [3, 1], 0))
        self.assertTrue(m.deleter)
        # A consumer renames the capsule and calls the deleter when done: it frees the block.
        rename = ctypes.pythonapi.PyCapsule_SetName
        rename.restype, rename.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
        self.assertEqual(rename(cap, b"used_dltensor"), 0)
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(m.deleter)(ctypes.addressof(m))

    def test_every_dtype_has_a_code(self) -> None:
        from memcoord import DTYPES

        for n in DTYPES:
            code, bits = _dlpack.dl_dtype(n)
            self.assertEqual(bits, DTYPES[n].itemsize * 8, n)
        self.assertEqual(_dlpack.dl_dtype("F8_E4M3"), (10, 8))


_CHILD = r"""
import ctypes, hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from memcoord import ExportInfo, cuda
info = ExportInfo.from_dict(json.loads(sys.argv[2]))
with cuda.attach(info) as m:
    lib = cuda._load()
    lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_size_t]
    ctx = cuda.CUcontext()
    cuda._check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), m._dev))
    cuda._check("cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(ctx))
    buf = ctypes.create_string_buffer(m.size_bytes)
    cuda._check("cuMemcpyDtoH", lib.cuMemcpyDtoH_v2(buf, m.ptr, m.size_bytes))
    lib.cuCtxPopCurrent_v2(ctypes.byref(cuda.CUcontext()))
    lib.cuDevicePrimaryCtxRelease_v2(m._dev)
    print(json.dumps({"sha256": hashlib.sha256(buf.raw).hexdigest(), "ordinal": m.device_ordinal, "granularity": m.granularity}))
"""


class GpuAttachTest(unittest.TestCase):
    """The real driver, where there is a GPU (skipped, visibly, elsewhere): this process makes
    physical VRAM exportable as POSIX descriptors (what memcoord does), passes them through the
    in-test claim server, and a second process maps them with ``cuda.attach`` and reads them back."""

    def test_second_process_maps_whole_physical_allocations_in_segment_order(self) -> None:
        # The H200's driver (580) refuses cuMemMap at a non-zero offset into a physical
        # allocation (CUDA_ERROR_NOT_SUPPORTED), so memcoord exports whole physical
        # allocations (file_offset 0); here they are passed in the opposite order to memory.
        if not cuda.available():
            self.skipTest("SKIPPED: no GPU (libcuda.so.1 missing or cuInit failed)")
        import hashlib
        import json
        import subprocess
        import sys

        from mc_testutil import CLIENT_DIR

        lib = cuda._load()
        C = ctypes
        lib.cuMemCreate.argtypes = [C.POINTER(cuda.CUmemGenericAllocationHandle), C.c_size_t, C.POINTER(cuda.CUmemAllocationProp), C.c_ulonglong]
        lib.cuMemExportToShareableHandle.argtypes = [C.c_void_p, cuda.CUmemGenericAllocationHandle, C.c_int, C.c_ulonglong]
        lib.cuMemcpyHtoD_v2.argtypes = [cuda.CUdeviceptr, C.c_void_p, C.c_size_t]
        dev, _ = cuda.find_device("cuda:0", None)
        ctx = cuda.CUcontext()
        cuda._check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(C.byref(ctx), dev))
        cuda._check("cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(ctx))
        prop = cuda.CUmemAllocationProp()
        prop.type = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
        prop.requestedHandleTypes = cuda.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        prop.location.type, prop.location.id = cuda.CU_MEM_LOCATION_TYPE_DEVICE, dev
        g_ = C.c_size_t()
        cuda._check("cuMemGetAllocationGranularity", lib.cuMemGetAllocationGranularity(C.byref(g_), C.byref(prop), 0))
        g = g_.value
        handles, fds, base = [], [], cuda.CUdeviceptr()
        try:
            for size in (4 * g, 2 * g):  # physical allocations A and B
                h = cuda.CUmemGenericAllocationHandle()
                cuda._check("cuMemCreate", lib.cuMemCreate(C.byref(h), size, C.byref(prop), 0))
                handles.append(h.value)
            # fill them through a mapping of this process: A at 0, B at 4g
            cuda._check("cuMemAddressReserve", lib.cuMemAddressReserve(C.byref(base), 6 * g, g, 0, 0))
            cuda._check("cuMemMap A", lib.cuMemMap(base.value, 4 * g, 0, handles[0], 0))
            cuda._check("cuMemMap B", lib.cuMemMap(base.value + 4 * g, 2 * g, 0, handles[1], 0))
            desc = cuda.CUmemAccessDesc()
            desc.location.type, desc.location.id, desc.flags = cuda.CU_MEM_LOCATION_TYPE_DEVICE, dev, cuda.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            cuda._check("cuMemSetAccess", lib.cuMemSetAccess(base.value, 6 * g, C.byref(desc), 1))
            data = os.urandom(6 * g)
            cuda._check("cuMemcpyHtoD", lib.cuMemcpyHtoD_v2(base.value, data, 6 * g))
            # B, then A: each whole, with its own descriptor
            for h in (handles[1], handles[0]):
                fd = C.c_int()
                cuda._check("cuMemExportToShareableHandle", lib.cuMemExportToShareableHandle(C.byref(fd), h, cuda.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0))
                fds.append(fd.value)
            segs = [{"offset": 0, "size_bytes": 2 * g, "file_offset": 0},
                    {"offset": 2 * g, "size_bytes": 4 * g, "file_offset": 0}]
            raw = cuda.CUuuid()
            get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
            cuda._check("cuDeviceGetUuid", get_uuid(C.byref(raw), dev))
            info = self.export(6 * g, segs, fds, device_uuid=cuda.uuid_string(bytes(raw.bytes)))
            out = subprocess.run([sys.executable, "-c", _CHILD, str(CLIENT_DIR), json.dumps(info.raw)],
                                 capture_output=True, text=True, timeout=120)
            self.assertEqual(out.returncode, 0, out.stderr)
            got = json.loads(out.stdout)
            want = hashlib.sha256(data[4 * g:] + data[0:4 * g]).hexdigest()
            self.assertEqual(got["sha256"], want, "the second process reads each segment in its place")
            self.assertEqual(got["granularity"], g)
        finally:
            for fd in fds:
                os.close(fd)
            if base.value:
                lib.cuMemUnmap(base.value, 4 * g)
                lib.cuMemUnmap(base.value + 4 * g, 2 * g)
                lib.cuMemAddressFree(base.value, 6 * g)
            for h in handles:
                lib.cuMemRelease(h)
            lib.cuCtxPopCurrent_v2(C.byref(cuda.CUcontext()))
            lib.cuDevicePrimaryCtxRelease_v2(dev)

    export = CudaAttachFakeDriverTest.export

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.server = FakeClaimServer(self.tmp.name)

    def tearDown(self) -> None:
        self.server.close()
        self.tmp.cleanup()


if __name__ == "__main__":
    unittest.main()
