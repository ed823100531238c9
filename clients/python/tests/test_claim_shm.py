"""``memcoord.claim`` and ``memcoord.shm.attach`` against an in-test claim server (PROTOCOL 8.3).

The server is a real Unix socket in a temp dir passing real descriptors of real temp files with
SCM_RIGHTS, answering as the contract says (one line, descriptors on its bytes, ≤ 250 per sendmsg,
EXPORT_NOT_FOUND with no descriptor for a wrong, used or unknown claim).
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import unittest
import uuid

from mc_testutil import PAGE, FakeClaimServer, open_fds, safetensors_bytes, sample_tensors

import memcoord
from memcoord import ExportInfo, MemcoordError, shm

try:
    import numpy
except ImportError:
    numpy = None


class ClaimShmTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.server = FakeClaimServer(self.tmp.name)
        self.files: list[int] = []

    def tearDown(self) -> None:
        self.server.close()
        for fd in self.files:
            os.close(fd)
        self.tmp.cleanup()

    # -- helpers ---------------------------------------------------------------------------

    def file_fd(self, content: bytes) -> int:
        path = os.path.join(self.tmp.name, f"shm-{uuid.uuid4()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, content)
        os.unlink(path)  # as a shm file may be: only the descriptor reaches it
        self.files.append(fd)
        return fd

    def export(self, size: int, segments: list[dict], fds: list[int], tensors: list[dict] | None = None,
               device_id: str = "shm") -> ExportInfo:
        eid, secret = str(uuid.uuid4()), uuid.uuid4().hex
        self.server.add(eid, secret, device_id, size, segments, fds)
        return ExportInfo.from_dict({
            "export_id": eid, "device_id": device_id, "device_uuid": None, "size_bytes": size,
            "socket_path": self.server.path, "secret": secret, "expires_at": "2026-12-03T00:00:00Z",
            "allocations": [{"allocation_id": str(uuid.uuid4()), "offset": 0, "size_bytes": size}],
            "tensors": tensors or [],
        })

    # -- claim -----------------------------------------------------------------------------

    def test_claim_returns_segments_and_working_descriptors(self) -> None:
        content = os.urandom(3 * PAGE)
        fd = self.file_fd(content)
        info = self.export(3 * PAGE, [{"offset": 0, "size_bytes": 3 * PAGE, "file_offset": 0}], [fd])
        self.assertEqual(self.server.requests, [])
        with memcoord.claim(info) as c:
            self.assertEqual(len(self.server.requests), 1)
            import json
            self.assertEqual(json.loads(self.server.requests[0]), {"export_id": info.export_id, "secret": info.secret})
            self.assertEqual(c.export_id, info.export_id)
            self.assertEqual(c.size_bytes, 3 * PAGE)
            self.assertEqual([(s.offset, s.size_bytes, s.file_offset) for s in c.segments], [(0, 3 * PAGE, 0)])
            self.assertEqual(len(c.fds), 1)
            self.assertNotEqual(c.fds[0], fd)  # a new descriptor of the same file
            self.assertEqual(os.pread(c.fds[0], 3 * PAGE, 0), content)

    def test_secret_works_once_and_wrong_claims_get_export_not_found(self) -> None:
        fd = self.file_fd(b"x" * PAGE)
        info = self.export(PAGE, [{"offset": 0, "size_bytes": PAGE, "file_offset": 0}], [fd])
        wrong = ExportInfo.from_dict({**info.raw, "secret": "nope"})
        before = open_fds()
        with self.assertRaises(MemcoordError) as cm:
            memcoord.claim(wrong)
        self.assertEqual(cm.exception.code, "EXPORT_NOT_FOUND")
        self.assertEqual(cm.exception.status, 404)
        self.assertIn(info.export_id, cm.exception.message)
        self.server.wait_handled(1)  # the server's end of the connection is in this process too
        self.assertEqual(open_fds(), before, "a refused claim must leave no descriptor behind")
        memcoord.claim(info).close()
        with self.assertRaises(MemcoordError) as cm:
            memcoord.claim(info)  # used secret
        self.assertEqual(cm.exception.code, "EXPORT_NOT_FOUND")
        unknown = ExportInfo.from_dict({**info.raw, "export_id": str(uuid.uuid4())})
        with self.assertRaises(MemcoordError) as cm:
            memcoord.claim(unknown)
        self.assertEqual(cm.exception.code, "EXPORT_NOT_FOUND")
        self.server.wait_handled(4)
        self.assertEqual(open_fds(), before)

    def test_more_than_250_descriptors_come_over_several_messages(self) -> None:
        n = 300
        content = random.Random(7).randbytes(n * PAGE)
        fd = self.file_fd(content)
        perm = list(range(n))
        random.Random(3).shuffle(perm)
        segs = [{"offset": i * PAGE, "size_bytes": PAGE, "file_offset": perm[i] * PAGE} for i in range(n)]
        info = self.export(n * PAGE, segs, [fd] * n)
        before = open_fds()
        with shm.attach(info) as m:
            self.assertEqual(self.server.sendmsg_fd_counts, [250, 50])
            self.assertTrue(m.contiguous)
            self.server.wait_handled(1)
            self.assertEqual(open_fds(), before, "attach must close the claimed descriptors once mapped")
            whole = m.memoryview()
            self.assertEqual(len(whole), n * PAGE)
            expect = b"".join(content[p * PAGE:(p + 1) * PAGE] for p in perm)
            self.assertTrue(whole == expect, "segments mapped back to back must reproduce the export's bytes in order")
            # In place: a write through the mapping is in the file.
            whole[5 * PAGE + 3] = (whole[5 * PAGE + 3] + 1) % 256
            self.assertEqual(os.pread(fd, 1, perm[5] * PAGE + 3)[0], whole[5 * PAGE + 3])
            whole.release()
        self.assertTrue(m.closed)

    def test_cut_answer_is_an_error_and_leaks_nothing(self) -> None:
        fd = self.file_fd(b"y" * PAGE)
        # The line announces two segments, the server passes one descriptor and closes.
        info = self.export(2 * PAGE, [{"offset": 0, "size_bytes": PAGE, "file_offset": 0},
                                      {"offset": PAGE, "size_bytes": PAGE, "file_offset": 0}], [fd])
        before = open_fds()
        with self.assertRaises(ConnectionError) as cm:
            memcoord.claim(info)
        self.assertIn("1 descriptor(s) received, 2 expected", str(cm.exception))
        self.server.wait_handled(1)
        self.assertEqual(open_fds(), before)

    # -- shm.attach ------------------------------------------------------------------------

    def test_model_export_tensors_read_in_place(self) -> None:
        tensors = sample_tensors()
        blob, data_start, spans = safetensors_bytes(tensors)
        fd = self.file_fd(blob)
        size = len(blob) - data_start
        infos = [{"name": n, "dtype": d, "shape": s, "allocation_id": None, "offset": spans[n][0],
                  "size_bytes": spans[n][1] - spans[n][0]} for n, d, s, _ in tensors]
        # One segment at a file offset that is not page-aligned: mapped alone, still in place.
        info = self.export(size, [{"offset": 0, "size_bytes": size, "file_offset": data_start}], [fd], infos)
        with shm.attach(info) as m:
            for name, dtype, shape, data in tensors:
                self.assertEqual(bytes(m.tensor_bytes(name)), data, name)
            f32 = m.tensor_memoryview("w.f32")
            self.assertEqual(f32.shape, (4,))
            self.assertEqual(f32.tolist(), [1.5, -2.5, 4096.0, 0.0])
            u8 = m.tensor_memoryview("bytes.u8")
            self.assertEqual(u8.shape, (3, 11))
            self.assertEqual(u8.tolist()[2][10], 7 + 32)
            self.assertEqual(struct.unpack("<6e", m.tensor_bytes("w.f16")), (0.5, -1.0, 2.0, 3.25, -0.125, 65504.0))
            del f32, u8
            self.assertEqual(m.tensor_memoryview("idx.i64").tolist(), [-1, 2**40, 7])
            self.assertEqual(m.tensor_memoryview("mask").tolist(), [True, False, True])
            # F16 and BF16 have no memoryview format: their raw bits, shaped.
            f16 = m.tensor_memoryview("w.f16")
            self.assertEqual((f16.format, f16.shape), ("H", (2, 3)))
            self.assertEqual(struct.unpack("<6e", f16.tobytes()), (0.5, -1.0, 2.0, 3.25, -0.125, 65504.0))
            bf16 = m.tensor_memoryview("w.bf16")
            self.assertEqual((bf16.format, bf16.shape, bf16.tolist()), ("H", (2,), [0x3F80, 0x4000]))
            empty = m.tensor_memoryview("empty")
            self.assertEqual((empty.format, len(empty)), ("f", 0))
            del f16, bf16, empty
            self.assertEqual(len(m.tensor_bytes("empty")), 0)
            with self.assertRaises(KeyError):
                m.tensor_bytes("missing")
            # Writing through the view changes the file: no copy in between.
            view = m.tensor_bytes("bytes.u8")
            view[0] = 200
            self.assertEqual(os.pread(fd, 1, data_start + spans["bytes.u8"][0]), bytes([200]))
            view.release()
            if numpy is not None:
                a = m.tensor("w.f32")
                self.assertEqual(a.dtype, numpy.float32)
                self.assertEqual(a.tolist(), [1.5, -2.5, 4096.0, 0.0])
                del a

    def test_close_refuses_while_views_live_unless_forced(self) -> None:
        fd = self.file_fd(bytes(range(256)) * (2 * PAGE // 256))
        info = self.export(2 * PAGE, [{"offset": 0, "size_bytes": PAGE, "file_offset": PAGE},
                                      {"offset": PAGE, "size_bytes": PAGE, "file_offset": 0}], [fd, fd])
        m = shm.attach(info)
        view = m.memoryview(PAGE - 2, 4)  # spans both segments: contiguous
        self.assertEqual(bytes(view), bytes([254, 255, 0, 1]))
        with self.assertRaises(BufferError):
            m.close()
        self.assertFalse(m.closed)
        m.close(force=True)
        self.assertTrue(m.closed)
        self.assertEqual(bytes(view), b"\0\0\0\0", "a view left after a forced close reads zeros, not others' data")
        view[0] = 9  # and writing does not reach the file
        self.assertEqual(os.pread(fd, 1, 2 * PAGE - 2), bytes([254]))
        view.release()
        with self.assertRaises(ValueError):
            m.memoryview()

    def test_numpy_view(self) -> None:
        if numpy is None:
            self.skipTest("SKIPPED: numpy is not installed")
        fd = self.file_fd(struct.pack("<1024f", *range(1024)))
        info = self.export(4096, [{"offset": 0, "size_bytes": 4096, "file_offset": 0}], [fd])
        with shm.attach(info) as m:
            a = m.numpy("<f4", offset=16, shape=(4, 8))
            self.assertEqual(a[0, 0], 4.0)
            a[0, 0] = -1
            self.assertEqual(struct.unpack("<f", os.pread(fd, 4, 16))[0], -1.0)
            del a

    def test_cuda_export_is_refused_by_shm_attach(self) -> None:
        info = self.export(PAGE, [{"offset": 0, "size_bytes": PAGE, "file_offset": 0}], [self.file_fd(b"z")],
                           device_id="cuda:0")
        with self.assertRaises(ValueError):
            shm.attach(info)
        self.assertEqual(self.server.requests, [], "the secret must not be used up by a refused attach")


if __name__ == "__main__":
    unittest.main()
