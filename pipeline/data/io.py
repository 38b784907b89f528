"""Small file helpers shared by the data tools: compressed reads, atomic writes, bundled paths."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import tempfile
from pathlib import Path
from typing import IO, Any

# data/ at the repository root: the bundled corpora and GPT-2 files (see data/README.md).
BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a text file, transparently decompressing .xz / .gz (the bundled corpora are xz)."""
    name = str(path)
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    name = str(path)
    if name.endswith(".xz"):
        return lzma.open(path, "rb").read()
    if name.endswith(".gz"):
        return gzip.open(path, "rb").read()
    return Path(path).read_bytes()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
