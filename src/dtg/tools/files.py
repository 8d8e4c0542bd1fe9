"""Staged output for the tools: everything is written into a hidden temporary folder
beside the destination and moved into place only once all of it is complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """Deterministic JSON (sorted keys, UTF-8, trailing newline); compact unless ``indent``."""
    seps = (",", ":") if indent is None else (",", ": ")
    return (json.dumps(obj, sort_keys=True, indent=indent, separators=seps, ensure_ascii=False) + "\n").encode("utf-8")


class Staged:
    """``with Staged(out_dir) as st: st.path("a.json").write_bytes(...)``.

    Files go to ``out_dir/.dtg-tmp-*/``; on a clean exit each is moved to ``out_dir`` with
    ``os.replace`` (atomic per file); on an exception the temporary folder is removed and
    nothing in ``out_dir`` changes.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.names: list[str] = []
        self.tmp: Path | None = None

    def __enter__(self) -> "Staged":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".dtg-tmp-", dir=self.out_dir))
        return self

    def path(self, name: str) -> Path:
        """The staging path of output file ``name`` (a plain file name, no folders)."""
        assert self.tmp is not None and "/" not in name and os.sep not in name, name
        self.names.append(name)
        return self.tmp / name

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                for name in self.names:
                    os.replace(self.tmp / name, self.out_dir / name)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
