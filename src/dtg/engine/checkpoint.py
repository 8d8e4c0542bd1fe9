"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed.

A reader therefore sees either the previous complete file or the new complete
file, never a partial one, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from dtg.config import Config
    from dtg.models.detector import Detector


TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, written, or does not fit this run (one-line message)."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    A failing write (disk full, permissions, an interrupt) removes the temp file and
    leaves any previous file at ``path`` untouched; an ``OSError`` becomes a one-line
    :class:`CheckpointError` naming the file. Only a ``SIGKILL`` mid-write can leave a
    ``.NAME.*.tmp`` behind (never ``path`` itself); :func:`remove_stale_temps` clears it.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = "the previous checkpoint is intact" if path.is_file() else "no previous checkpoint"
            reason = e.strerror or type(e).__name__
            raise CheckpointError(f"{path}: cannot write checkpoint ({reason}); {kept}") from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temp files a killed :func:`atomic_save` left in ``folder``; return them."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save`; one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def model_from_checkpoint(ckpt: dict[str, Any], which: str, path: str | Path) -> tuple["Config", "Detector"]:
    """The run's config and its ``which`` (``teacher``/``student``) model, rebuilt from a training checkpoint."""
    from dtg.config import from_dict
    from dtg.models.detector import Detector

    for key in ("config", "categories", which):
        if key not in ckpt:
            raise CheckpointError(f"{path}: has no '{key}' entry (not a dtg training checkpoint of that kind)")
    cfg = from_dict(ckpt["config"])
    model = Detector.from_config(cfg.model, len(ckpt["categories"]), cfg.data.test_size, cfg.data.test_max_size)
    try:
        model.net.load_state_dict(ckpt[which])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {which} weights do not fit its config ({str(e).splitlines()[0]})") from None
    return cfg, model


def rng_state() -> dict[str, Any]:
    """States of python, numpy and torch (CPU and CUDA) generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
