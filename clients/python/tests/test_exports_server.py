"""Exports against the real worker (PROTOCOL 8.3), this test process being the second process.

A model on ``shm`` is exported, claimed here, and every tensor read through ``memcoord.shm.attach``
equals the file's bytes, with the dtype and shape its header gives (the header is parsed here, not
taken from memcoord). Also: an exported allocation stays put through a defragment and refuses a
deallocate; a secret works once; wrong claims get ``EXPORT_NOT_FOUND``; an export ends with its
lease; torch views of the same model, where PyTorch is installed.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
import unittest
from typing import Any, Dict, List, Tuple

from mc_testutil import MiB, PAGE, find_binary, safetensors_bytes

import memcoord
from memcoord import Client, ExportInfo, MemcoordError, shm
from memcoord.shm import storage_format

try:
    import torch
except ImportError:
    torch = None

WORKER_ARGS = ["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"]
DTYPES = [("F16", 2), ("BF16", 2), ("F32", 4), ("F64", 8), ("I8", 1), ("I16", 2), ("I32", 4), ("I64", 8),
          ("U8", 1), ("BOOL", 1), ("F8_E4M3", 1), ("F8_E5M2", 1)]


def model_tensors(seed: int = 14) -> List[Tuple[str, str, List[int], bytes]]:
    """60 tensors of every dtype, from one element to about 300 KiB, random bytes (BOOL: 0 or 1)."""
    rnd = random.Random(seed)
    out = []
    for i in range(60):
        dtype, size = DTYPES[i % len(DTYPES)]
        shape = [rnd.randint(1, 40) for _ in range(rnd.randint(1, 3))] if i % 7 else [rnd.randint(1, 600), 128]
        n = 1
        for d in shape:
            n *= d
        data = bytes(rnd.getrandbits(1) for _ in range(n)) if dtype == "BOOL" else rnd.randbytes(n * size)
        out.append((f"layers.{i}.{dtype.lower()}", dtype, shape, data))
    out.append(("scalar", "F32", [], struct.pack("<f", 3.5)))
    out.append(("empty", "F16", [0, 8], b""))
    return out


def header_of(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


class ExportsAgainstTheWorker(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.tensors = model_tensors()
        blob, self.data_start, _ = safetensors_bytes(self.tensors)
        self.path = os.path.join(self.tmp.name, "m.safetensors")
        with open(self.path, "wb") as f:
            f.write(blob)
        self.c = Client.spawn(find_binary(), [*WORKER_ARGS, "--model-root", self.tmp.name], stderr="devnull")
        try:
            self.c.list_exports()
        except MemcoordError as e:
            self.c.close()
            self.tmp.cleanup()
            if e.code == "UNKNOWN_ACTION":
                self.skipTest("SKIPPED: this memcoord has no memory.export yet (PROTOCOL 8.3)")
            raise

    def tearDown(self) -> None:
        self.assertEqual(self.c.close(), 0)
        self.assertEqual(self.c.garbage, [])
        self.tmp.cleanup()

    def file_bytes(self, name: str) -> bytes:
        h = header_of(self.path)[name]
        b, e = h["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            return f.read(e - b)

    def test_model_on_shm_read_in_place_equals_the_file(self) -> None:
        c = self.c
        c.model_load("m", "m.safetensors", "shm")
        lease = c.model_acquire("m")["lease_id"]
        info = c.export(model_name="m", lease_id=lease, claim_seconds=30)
        self.assertEqual((info.device_id, info.device_uuid), ("shm", None))
        header = header_of(self.path)
        self.assertEqual(sorted(t.name for t in info.tensors), sorted(header))
        with shm.attach(info) as m:
            self.assertGreaterEqual(len(m.segments), 1)
            for t in info.tensors:
                h = header[t.name]
                self.assertEqual((t.dtype, list(t.shape)), (h["dtype"], h["shape"]), t.name)
                want = self.file_bytes(t.name)
                self.assertEqual(t.size_bytes, len(want), t.name)
                self.assertTrue(m.tensor_bytes(t.name) == want, f"{t.name}: bytes differ from the file")
                v = m.tensor_memoryview(t.name)
                self.assertEqual(v.format, storage_format(h["dtype"]), t.name)
                if 0 not in h["shape"]:
                    self.assertEqual(list(v.shape), h["shape"], t.name)
                self.assertEqual(v.tobytes(), want, t.name)
                v.release()
            self.assertEqual(m.tensor_memoryview("scalar").tolist(), 3.5)
        listed = {e["export_id"]: e for e in c.list_exports()}
        self.assertTrue(listed[info.export_id]["claimed"])
        with self.assertRaises(MemcoordError) as cm:
            memcoord.claim(info)
        self.assertEqual(cm.exception.code, "EXPORT_NOT_FOUND", "a secret works once")
        with self.assertRaises(MemcoordError) as cm:
            c.model_unload("m")
        self.assertIn(cm.exception.code, ("MODEL_IN_USE",))
        # The export ends with its lease.
        second = c.export(model_name="m", lease_id=lease)
        c.model_release(lease)
        self.assertNotIn(second.export_id, [e["export_id"] for e in c.list_exports()])
        with self.assertRaises(MemcoordError) as cm:
            memcoord.claim(second)
        self.assertEqual(cm.exception.code, "EXPORT_NOT_FOUND", "an export ended with its lease cannot be claimed")
        c.model_unload("m")

    def test_wrong_claims_get_export_not_found_and_no_descriptor(self) -> None:
        a = self.c.allocate("shm", 3 * PAGE)["allocation"]["allocation_id"]
        info = self.c.export(allocation_id=a)
        before = len(os.listdir("/proc/self/fd"))
        for bad in ({**info.raw, "secret": "0" * len(info.secret)}, {**info.raw, "export_id": "00000000-0000-4000-8000-000000000000"}):
            with self.assertRaises(MemcoordError) as cm:
                memcoord.claim(ExportInfo.from_dict(bad))
            self.assertEqual((cm.exception.code, cm.exception.status), ("EXPORT_NOT_FOUND", 404))
        self.assertEqual(len(os.listdir("/proc/self/fd")), before, "a refused claim passes no descriptor")
        with shm.attach(info) as m:  # the right secret still works after wrong ones
            self.assertEqual(len(m.memoryview()), 3 * PAGE)
        self.c.unexport(info.export_id)
        self.c.deallocate(a)

    def test_exported_allocation_stays_put_through_a_defragment(self) -> None:
        c = self.c
        ids = [c.allocate("shm", MiB, purpose=f"frag{i}")["allocation"] for i in range(8)]
        target, movable = ids[4], ids[1]
        pattern = random.Random(5).randbytes(MiB)
        with open(target["handle"]["path"], "r+b") as f:
            f.seek(target["handle"]["offset"])
            f.write(pattern)
        info = c.export(allocation_id=target["allocation_id"])
        with shm.attach(info) as m:
            for i in (0, 2, 3, 5):  # holes before and after both
                c.deallocate(ids[i]["allocation_id"])
            d = c.defragment("shm")
            self.assertGreaterEqual(d["moved_count"], 1, "the allocations around the export move")
            after = {x["allocation_id"]: x for x in c.get_allocations("shm")["allocations"]}
            self.assertEqual(after[target["allocation_id"]]["handle"], target["handle"], "the exported allocation did not move")
            self.assertNotEqual(after[movable["allocation_id"]]["handle"], movable["handle"], "its neighbour did")
            self.assertTrue(m.memoryview() == pattern, "the importer still sees its bytes")
            # In place both ways: a write here is in memcoord's file at the allocation's place.
            mv = m.memoryview()
            mv[0] = pattern[0] ^ 0xFF
            with open(target["handle"]["path"], "rb") as f:
                f.seek(target["handle"]["offset"])
                self.assertEqual(f.read(1)[0], pattern[0] ^ 0xFF)
            mv.release()
            with self.assertRaises(MemcoordError) as cm:
                c.deallocate(target["allocation_id"])
            self.assertEqual(cm.exception.code, "ALLOCATION_IN_USE")
            self.assertIn(info.export_id, cm.exception.message)
        self.assertEqual(c.unexport(info.export_id)["export_id"], info.export_id)
        c.deallocate(target["allocation_id"])

    def test_torch_state_dict_of_a_model_on_shm(self) -> None:
        if torch is None:
            self.skipTest("SKIPPED: PyTorch is not installed")
        import memcoord.torch as mtorch

        self.c.model_load("m", "m.safetensors", "shm")
        header = header_of(self.path)
        with mtorch.state_dict(self.c, "m") as sd:
            self.assertEqual(sorted(sd), sorted(header))
            for name, t in sd.items():
                self.assertEqual(list(t.shape), header[name]["shape"], name)
                self.assertEqual(t.dtype, mtorch.torch_dtype(header[name]["dtype"]), name)
                self.assertEqual(bytes(t.reshape(-1).view(torch.uint8).tolist()), self.file_bytes(name), name)
            del t
        self.assertEqual(self.c.list_exports(), [])
        self.c.model_unload("m")


if __name__ == "__main__":
    unittest.main()
