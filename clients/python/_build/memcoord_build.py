"""The package's build backend (PEP 517, and PEP 660 for editable installs), standard library only.

Why not setuptools: building a wheel with setuptools before 70.1 needs the separate ``wheel``
package, which many offline machines lack (CPython's venv ships setuptools without it), so
``pip install ./clients/python`` would need an index. This backend needs nothing: ``requires = []``
in pyproject.toml, so pip's build isolation installs nothing either. The package is pure Python:
the wheel is the ``memcoord`` folder, ``memcoord_client.py`` and the metadata read from
pyproject.toml's ``[project]`` table.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "memcoord"
MODULES = ["memcoord_client.py"]
TAG = "py3-none-any"


def _project() -> Dict[str, Any]:
    """pyproject.toml's [project] (with optional-dependencies); tomllib where there is one (3.11+)."""
    path = os.path.join(ROOT, "pyproject.toml")
    try:
        import tomllib  # type: ignore[import-not-found]

        with open(path, "rb") as f:
            return dict(tomllib.load(f)["project"])
    except ImportError:
        pass
    # Python 3.9/3.10: the few shapes pyproject.toml uses (strings, one-line lists, inline tables).
    project: Dict[str, Any] = {}
    table = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"^\[(.+)\]$", line)
            if m:
                table = m.group(1).strip()
                continue
            m = re.match(r'^([A-Za-z0-9_-]+)\s*=\s*(.+)$', line)
            if not m or table not in ("project", "project.optional-dependencies"):
                continue
            key, value = m.group(1), m.group(2).strip()
            if value.startswith('"'):
                parsed: Any = value[1 : value.index('"', 1)]
            elif value.startswith("["):
                parsed = re.findall(r'"([^"]*)"', value)
            else:
                continue
            if table == "project":
                project[key] = parsed
            else:
                project.setdefault("optional-dependencies", {})[key] = parsed
    return project


def _dist_info() -> str:
    p = _project()
    return f"{p['name']}-{p['version']}.dist-info"


def _metadata() -> str:
    p = _project()
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {p['name']}",
        f"Version: {p['version']}",
        f"Summary: {p.get('description', '')}",
    ]
    lic = p.get("license")
    if isinstance(lic, dict) and lic.get("text"):
        lines.append(f"License: {lic['text']}")
    if p.get("requires-python"):
        lines.append(f"Requires-Python: {p['requires-python']}")
    for dep in p.get("dependencies") or []:
        lines.append(f"Requires-Dist: {dep}")
    for extra, deps in (p.get("optional-dependencies") or {}).items():
        lines.append(f"Provides-Extra: {extra}")
        for dep in deps:
            lines.append(f'Requires-Dist: {dep}; extra == "{extra}"')
    readme = os.path.join(ROOT, "README.md")
    body = ""
    if os.path.exists(readme):
        lines.append("Description-Content-Type: text/markdown")
        with open(readme, encoding="utf-8") as f:
            body = f.read()
    return "\n".join(lines) + "\n\n" + body


def _wheel_name() -> str:
    p = _project()
    return f"{p['name']}-{p['version']}-{TAG}.whl"


def _sources() -> List[Tuple[str, str]]:
    """(path in the wheel, path on disk) of every file the package ships."""
    out = []
    pkg = os.path.join(ROOT, PACKAGE)
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            out.append((f"{PACKAGE}/{name}", os.path.join(pkg, name)))
    for name in MODULES:
        out.append((name, os.path.join(ROOT, name)))
    return out


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(directory: str, files: List[Tuple[str, bytes]]) -> str:
    info = _dist_info()
    files = files + [
        (f"{info}/METADATA", _metadata().encode()),
        (f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: memcoord_build\nRoot-Is-Purelib: true\nTag: {TAG}\n".encode()),
        (f"{info}/top_level.txt", (PACKAGE + "\n" + "".join(m[:-3] + "\n" for m in MODULES)).encode()),
    ]
    record = "".join(f"{path},{_digest(data)},{len(data)}\n" for path, data in files) + f"{info}/RECORD,,\n"
    name = _wheel_name()
    with zipfile.ZipFile(os.path.join(directory, name), "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files + [(f"{info}/RECORD", record.encode())]:
            zi = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return name


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- PEP 517 -----------------------------------------------------------------------------------


def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    """Nothing: the standard library builds the wheel."""
    return []


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    """Nothing."""
    return []


def get_requires_for_build_editable(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    """Nothing."""
    return []


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    """Write the .dist-info folder pip reads before building."""
    info = _dist_info()
    os.makedirs(os.path.join(metadata_directory, info), exist_ok=True)
    with open(os.path.join(metadata_directory, info, "METADATA"), "w", encoding="utf-8") as f:
        f.write(_metadata())
    return info


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None) -> str:
    """The wheel: the package's files and its metadata."""
    return _write_wheel(wheel_directory, [(arc, _read(path)) for arc, path in _sources()])


def build_editable(wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None, metadata_directory: Optional[str] = None) -> str:
    """An editable wheel: a .pth file putting this folder on sys.path."""
    return _write_wheel(wheel_directory, [(f"__editable__.{PACKAGE}.pth", (ROOT + "\n").encode())])


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    """The source archive: pyproject.toml, README.md, the package and this backend."""
    p = _project()
    base = f"{p['name']}-{p['version']}"
    name = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as t:
        entries = [("pyproject.toml", os.path.join(ROOT, "pyproject.toml")), ("README.md", os.path.join(ROOT, "README.md")),
                   ("_build/memcoord_build.py", os.path.abspath(__file__))] + _sources()
        for arc, path in entries:
            t.add(path, arcname=f"{base}/{arc}")
        pkg_info = _metadata().encode()
        ti = tarfile.TarInfo(f"{base}/PKG-INFO")
        ti.size, ti.mode = len(pkg_info), 0o644
        t.addfile(ti, io.BytesIO(pkg_info))
    return name
