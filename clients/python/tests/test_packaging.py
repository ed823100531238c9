"""``pip install ./clients/python`` offline: the in-tree build backend, and pip itself with no index."""

from __future__ import annotations

import base64
import builtins
import hashlib
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
import zipfile

from mc_testutil import CLIENT_DIR

sys.path.insert(0, str(CLIENT_DIR / "_build"))
import memcoord_build  # noqa: E402


class BackendTest(unittest.TestCase):
    def test_wheel_holds_every_module_with_a_valid_record(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            name = memcoord_build.build_wheel(d)
            self.assertEqual(name, "memcoord-0.14.0-py3-none-any.whl")
            with zipfile.ZipFile(os.path.join(d, name)) as z:
                names = set(z.namelist())
                shipped = {f"memcoord/{n}" for n in os.listdir(CLIENT_DIR / "memcoord") if n.endswith(".py")}
                self.assertTrue(shipped <= names, shipped - names)
                self.assertIn("memcoord/_dlpack.py", names)
                self.assertIn("memcoord_client.py", names)
                record = z.read("memcoord-0.14.0.dist-info/RECORD").decode().splitlines()
                for line in record:
                    path, digest, size = line.rsplit(",", 2)
                    if path.endswith("RECORD"):
                        continue
                    data = z.read(path)
                    want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                    self.assertEqual((digest, int(size)), (want, len(data)), path)
                meta = z.read("memcoord-0.14.0.dist-info/METADATA").decode()
        requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist:")]
        self.assertEqual(requires, ['Requires-Dist: numpy; extra == "numpy"', 'Requires-Dist: torch; extra == "torch"'],
                         "no required dependency; numpy and torch are extras")
        self.assertIn("Requires-Python: >=3.9", meta)

    def test_pyproject_read_the_same_without_tomllib(self) -> None:
        with_toml = memcoord_build._project()
        real_import = builtins.__import__

        def no_tomllib(name: str, *a, **kw):  # type: ignore[no-untyped-def]
            if name == "tomllib":
                raise ImportError("as on Python 3.9 and 3.10")
            return real_import(name, *a, **kw)

        builtins.__import__ = no_tomllib
        try:
            without = memcoord_build._project()
        finally:
            builtins.__import__ = real_import
        for key in ("name", "version", "description", "requires-python", "dependencies", "optional-dependencies"):
            self.assertEqual(without.get(key), with_toml.get(key), key)

    def test_version_matches_the_package(self) -> None:
        import memcoord

        self.assertEqual(memcoord_build._project()["version"], memcoord.__version__)

    def test_sdist(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            name = memcoord_build.build_sdist(d)
            with tarfile.open(os.path.join(d, name)) as t:
                names = set(t.getnames())
        for f in ("pyproject.toml", "README.md", "PKG-INFO", "_build/memcoord_build.py", "memcoord/__init__.py", "memcoord_client.py"):
            self.assertIn(f"memcoord-0.14.0/{f}", names)


class PipInstallTest(unittest.TestCase):
    def test_pip_installs_offline_and_the_package_imports(self) -> None:
        if importlib.util.find_spec("pip") is None:
            self.skipTest("SKIPPED: pip is not installed for this Python")
        with tempfile.TemporaryDirectory() as target:
            env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
            env.pop("PIP_FIND_LINKS", None)
            out = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-index", "--no-cache-dir", "--quiet", "--target", target, str(CLIENT_DIR)],
                capture_output=True, text=True, env=env, timeout=300,
            )
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
            check = subprocess.run(
                [sys.executable, "-c", "import memcoord, memcoord.cuda, memcoord.shm, memcoord.torch, memcoord_client; print(memcoord.__file__)"],
                capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=target), cwd=target, timeout=60,
            )
            self.assertEqual(check.returncode, 0, check.stderr)
            self.assertTrue(check.stdout.strip().startswith(target), check.stdout)


if __name__ == "__main__":
    unittest.main()
