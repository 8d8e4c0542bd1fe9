"""Content fingerprints of files: what a dataset or a run's inputs are, byte for byte.

Imports nothing of dtg, so that data (``dtg synth``) and runs (provenance) share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

FULL_HASH_LIMIT = 2 << 30  # bytes hashed in full; above, file names and sizes only


def files_fingerprint(files: Iterable[Path], root: Path | None = None, limit: int = FULL_HASH_LIMIT) -> str:
    """sha256 (16 hex digits) over the files' names (relative to ``root``, else the bare name) and bytes.

    Files are taken in sorted order. When their total size exceeds ``limit`` bytes, only
    names and sizes enter the hash and the result is prefixed ``"shallow:"``.
    """
    paths = sorted(Path(f) for f in files)
    sizes = [p.stat().st_size for p in paths]
    shallow = sum(sizes) > limit
    h = hashlib.sha256()
    for p, size in zip(paths, sizes):
        name = p.relative_to(root).as_posix() if root is not None else p.name
        h.update(f"{name}\0{size}\0".encode())
        if not shallow:
            h.update(p.read_bytes())
    return ("shallow:" if shallow else "") + h.hexdigest()[:16]


def tree_fingerprint(root: Path, suffixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
    """:func:`files_fingerprint` of every file under ``root`` whose suffix is in ``suffixes``, named relative to it.

    ``exclude``: paths relative to ``root`` (posix form) left out.
    """
    root = Path(root)
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
             and p.relative_to(root).as_posix() not in exclude]
    return files_fingerprint(files, root)
