"""``memcoord.torch``: the views it builds and the order it gives things back in.

Where PyTorch is installed, ``RealTorchTest`` checks every tensor against the file's bytes with real
torch tensors. Everywhere, ``FakeTorchTest`` runs the same code against a small stand-in ``torch``
module (views over real shared memory: slicing, ``view(dtype)``, ``as_strided``) that checks what a
real one would: the element offset is a whole number of elements, the strides are C-contiguous, the
bytes read are the tensor's. It also checks the release order with a stand-in client.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
import unittest
import uuid
from typing import Any, Dict, List, Optional, Tuple

from mc_testutil import FakeClaimServer, sample_tensors

import memcoord
from memcoord import ExportInfo, MemcoordError, shm
from memcoord import torch as mtorch

try:
    import torch as real_torch
except ImportError:
    real_torch = None

# safetensors dtype -> (torch attribute, bytes)
TORCH_NAMES = {name: (d.torch, d.itemsize) for name, d in memcoord.DTYPES.items()}


class FakeDtype:
    def __init__(self, name: str, itemsize: int) -> None:
        self.name, self.itemsize = name, itemsize

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class FakeTensor:
    """A strided view of a byte buffer (a memoryview), in elements of ``dtype``."""

    def __init__(self, buf: memoryview, dtype: FakeDtype, offset: int, shape: Tuple[int, ...], strides: Tuple[int, ...]) -> None:
        self.buf, self.dtype, self.offset, self.shape, self.strides = buf, dtype, offset, tuple(shape), tuple(strides)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __getitem__(self, s: slice) -> "FakeTensor":
        assert len(self.shape) == 1 and isinstance(s, slice) and s.step is None
        start, stop, _ = s.indices(self.shape[0])
        return FakeTensor(self.buf, self.dtype, self.offset + start, (max(stop - start, 0),), (1,))

    def view(self, dtype: FakeDtype) -> "FakeTensor":
        k = self.dtype.itemsize
        nbytes = self.numel() * k
        if (self.offset * k) % dtype.itemsize or nbytes % dtype.itemsize:
            raise RuntimeError("view: misaligned")
        return FakeTensor(self.buf, dtype, self.offset * k // dtype.itemsize, (nbytes // dtype.itemsize,), (1,))

    def as_strided(self, shape: Any, strides: Any, offset: int) -> "FakeTensor":
        t = FakeTensor(self.buf, self.dtype, offset, tuple(shape), tuple(strides))
        expect, step = [], 1
        for d in reversed(t.shape):
            expect.append(step)
            step *= max(d, 1)
        assert t.strides == tuple(reversed(expect)), (t.shape, t.strides)
        assert (offset + t.numel()) * self.dtype.itemsize <= len(self.buf)
        return t

    def tobytes(self) -> bytes:
        k = self.dtype.itemsize
        return bytes(self.buf[self.offset * k : (self.offset + self.numel()) * k])


def fake_torch(missing: Tuple[str, ...] = ()) -> types.ModuleType:
    m = types.ModuleType("torch")
    m.__version__ = "0.fake"  # type: ignore[attr-defined]
    for _, (name, size) in TORCH_NAMES.items():
        if name not in missing:
            setattr(m, name, FakeDtype(name, size))

    def frombuffer(buf: Any, dtype: FakeDtype) -> FakeTensor:
        mv = memoryview(buf).cast("B")
        return FakeTensor(mv, dtype, 0, (len(mv),), (1,))

    def as_tensor(obj: Any, device: str) -> FakeTensor:
        raise AssertionError("no CUDA here")

    def empty(n: int, dtype: FakeDtype) -> FakeTensor:
        return FakeTensor(memoryview(b""), dtype, 0, (0,), (1,))

    m.frombuffer, m.as_tensor, m.empty = frombuffer, as_tensor, empty  # type: ignore[attr-defined]
    return m


class ExportFixture(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.server = FakeClaimServer(self.tmp.name)
        self.fds: List[int] = []

    def tearDown(self) -> None:
        self.server.close()
        for fd in self.fds:
            os.close(fd)
        self.tmp.cleanup()

    def model_export(self, tensors: List[Tuple[str, str, List[int], bytes]], align: int = 64) -> ExportInfo:
        """An shm export of ``tensors`` laid out as memcoord lays a model out: each at an ``align``-byte
        boundary of the export (its own allocation), the export at a page of the file."""
        spans: Dict[str, Tuple[int, int]] = {}
        data = bytearray()
        for name, _, _, b in tensors:
            data += bytes(-len(data) % align)
            spans[name] = (len(data), len(data) + len(b))
            data += b
        path = os.path.join(self.tmp.name, f"shm-{uuid.uuid4()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(path)
        os.pwrite(fd, bytes(data), 4096)
        self.fds.append(fd)
        size = len(data)
        eid, secret = str(uuid.uuid4()), uuid.uuid4().hex
        self.server.add(eid, secret, "shm", size, [{"offset": 0, "size_bytes": size, "file_offset": 4096}], [fd])
        return ExportInfo.from_dict({
            "export_id": eid, "device_id": "shm", "device_uuid": None, "size_bytes": size,
            "socket_path": self.server.path, "secret": secret, "expires_at": None, "allocations": [],
            "tensors": [{"name": n, "dtype": d, "shape": s, "allocation_id": None, "offset": spans[n][0],
                         "size_bytes": spans[n][1] - spans[n][0]} for n, d, s, _ in tensors],
        })


class FakeTorchTest(ExportFixture):
    def setUp(self) -> None:
        super().setUp()
        self.saved = sys.modules.get("torch")
        sys.modules["torch"] = fake_torch()

    def tearDown(self) -> None:
        if self.saved is None:
            sys.modules.pop("torch", None)
        else:
            sys.modules["torch"] = self.saved
        super().tearDown()

    def test_every_tensor_views_its_bytes_with_its_dtype_and_shape(self) -> None:
        tensors = sample_tensors() + [
            ("w.f64", "F64", [2], bytes(range(16))),
            ("w.i8", "I8", [4], bytes([1, 255, 3, 128])),
            ("w.i16", "I16", [1, 2], bytes([1, 2, 3, 4])),
            ("w.i32", "I32", [1], bytes([9, 8, 7, 6])),
            ("w.f8a", "F8_E4M3", [3], bytes([1, 2, 3])),
            ("w.f8b", "F8_E5M2", [1, 1, 2], bytes([4, 5])),
            ("w.u16", "U16", [2], bytes([1, 2, 3, 4])),
        ]
        info = self.model_export(tensors)
        with shm.attach(info) as m:
            views = mtorch.tensors_of(info, m)
            self.assertEqual(list(views), [t[0] for t in tensors])
            for name, dtype, shape, data in tensors:
                v = views[name]
                self.assertEqual(v.dtype.name, memcoord.DTYPES[dtype].torch, name)
                self.assertEqual(list(v.shape), shape, name)
                self.assertEqual(v.tobytes(), data, name)
            del views, v

    def test_missing_dtype_and_misaligned_tensor_are_named(self) -> None:
        sys.modules["torch"] = fake_torch(missing=("float8_e4m3fn",))
        info = self.model_export([("a", "F32", [1], b"abcd"), ("w.f8", "F8_E4M3", [1], b"x")])
        with shm.attach(info) as m:
            with self.assertRaises(ValueError) as cm:
                mtorch.tensors_of(info, m)
            self.assertIn("float8_e4m3fn", str(cm.exception))
        sys.modules["torch"] = fake_torch()
        info = self.model_export([("pad", "U8", [1], b"p"), ("w", "F32", [1], b"abcd"), ("z", "U8", [3], b"zzz")], align=1)
        with shm.attach(info) as m:
            with self.assertRaises(ValueError) as cm:
                mtorch.tensors_of(info, m)
            self.assertIn("'w' (F32) starts at byte 1", str(cm.exception))

    def test_state_dict_release_order_and_failure_gives_back(self) -> None:
        log: List[str] = []
        info = self.model_export(sample_tensors())
        test = self

        class StubClient:
            fail_export = False

            def model_acquire(self, name: str, **kw: Any) -> Dict[str, Any]:
                log.append(f"acquire {name}")
                return {"lease_id": "L1"}

            def export(self, **kw: Any) -> ExportInfo:
                test.assertEqual((kw["model_name"], kw["lease_id"]), ("m", "L1"))
                if self.fail_export:
                    raise MemcoordError("MODEL_NOT_FOUND", "gone", 404)
                log.append("export")
                return info

            def unexport(self, export_id: str) -> Dict[str, Any]:
                log.append("unexport")
                return {"export_id": export_id}

            def model_release(self, lease_id: str) -> Dict[str, Any]:
                log.append(f"release {lease_id}")
                return {}

        c = StubClient()
        sd = mtorch.state_dict(c, "m")
        self.assertIsInstance(sd, dict)
        self.assertEqual((sd.lease_id, sd.device, len(sd)), ("L1", "cpu", len(sample_tensors())))
        mapping = sd.mapping
        sd.release()
        self.assertTrue(mapping.closed, "unmapped before the export ends")
        self.assertEqual(log, ["acquire m", "export", "unexport", "release L1"])
        self.assertEqual(len(sd), 0)
        sd.release()  # idempotent
        self.assertEqual(len(log), 4)
        log.clear()
        c.fail_export = True
        with self.assertRaises(MemcoordError):
            mtorch.state_dict(c, "m")
        self.assertEqual(log, ["acquire m", "release L1"], "a failed export gives the lease back")


class RealTorchTest(ExportFixture):
    def test_real_torch_views(self) -> None:
        if real_torch is None:
            self.skipTest("SKIPPED: PyTorch is not installed (FakeTorchTest covers the same views)")
        tensors = sample_tensors()
        info = self.model_export(tensors)
        sd = mtorch.attach(info)
        try:
            for name, dtype, shape, data in tensors:
                t = sd[name]
                self.assertEqual((t.device.type, list(t.shape)), ("cpu", shape), name)
                self.assertEqual(t.dtype, getattr(real_torch, memcoord.DTYPES[dtype].torch), name)
                self.assertEqual(bytes(t.reshape(-1).view(real_torch.uint8).tolist()), data, name)
            module = real_torch.nn.Linear(2, 2, device="meta")
            module.load_state_dict({"weight": sd["w.f16"][:2, :2].float().reshape(2, 2), "bias": sd["w.f32"][:2]}, assign=True)
            self.assertEqual(module.bias.tolist(), [1.5, -2.5])
            del module, t
        finally:
            sd.release()


if __name__ == "__main__":
    unittest.main()
