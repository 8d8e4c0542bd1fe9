"""What the training loop needs around it: its error type, device and seeding, the output-folder
checks, and the guard that skips non-finite steps.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dtg.config import Config, save_config
from dtg.engine.checkpoint import remove_stale_temps


class TrainingError(RuntimeError):
    """Training cannot start or go on (one-line message)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA request without CUDA is a :class:`TrainingError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def use_cpu_kernels(mode: str) -> None:
    """``portable``: CPU kernels that do not pick their code path by CPU model, so that runs can
    agree across machines (docs/testbed.md, "Numbers that travel"): MKL's conditional numerical
    reproducibility in its compatible mode (``MKL_CBWR=COMPATIBLE``, read by MKL at its first
    call, so set before any computation) and torch's own convolutions instead of oneDNN's.
    ``fast``: the libraries' defaults. Must run before the first MKL call of the process.
    """
    if mode == "portable":
        os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
        torch.backends.mkldnn.enabled = False
    elif mode != "fast":
        raise TrainingError(f"config key 'cpu_kernels': {mode!r} is not one of ['fast', 'portable']")


def check_output_dir(path: Path, need_bytes: int) -> None:
    """Fail before training if ``path`` or its ``checkpoints/`` is not writable or lacks space for a checkpoint."""
    for folder in (path, path / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write_test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"{folder}: output directory is not writable ({e.strerror})") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise TrainingError(f"{path}: only {free / 2**20:.0f} MiB free, a checkpoint needs ~{need_bytes / 2**20:.0f} MiB")


def prepare_output_dir(path: Path, need_bytes: int, cfg: Config, log: Callable[[str], None]) -> None:
    """:func:`check_output_dir`, write the resolved ``config.yaml``, clear temp files of killed checkpoint writes."""
    check_output_dir(path, need_bytes)
    try:
        save_config(cfg, path / "config.yaml")
    except OSError as e:
        raise TrainingError(f"{path / 'config.yaml'}: cannot write the config ({e.strerror})") from None
    for p in remove_stale_temps(path / "checkpoints"):
        log(f"removed {p}, left by an interrupted checkpoint write")


class NonFiniteGuard:
    """Counts skipped (non-finite) steps and stops the run after ``limit`` in a row.

    Args:
        limit: ``solver.max_nonfinite``; 0 stops at the first non-finite step.
        log: where the one-line note of each skip goes.
    """

    def __init__(self, limit: int, log: Callable[[str], None]) -> None:
        self.limit, self.log = limit, log
        self.total = self.streak = 0

    def ok(self) -> None:
        """A step was taken: the streak ends."""
        self.streak = 0

    def skip(self, iteration: int, what: str, scalars: dict[str, float], rank: int, kept: str) -> None:
        """Count a skipped step at ``iteration``; raise :class:`TrainingError` once the streak reaches the limit.

        Args:
            what: ``"loss"`` or ``"gradient norm"``.
            scalars: this rank's logged values of the step (losses shown in the note).
            kept: what is left on disk, for the stop message.
        """
        self.total += 1
        self.streak += 1
        limit = max(self.limit, 1)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in scalars.items() if k.startswith(("sup_", "unsup_")) or k == "loss")
        self.log(f"iteration {iteration}: non-finite {what} ({shown} on rank {rank}); step skipped "
                 f"({self.streak} in a row of at most {limit}, {self.total} in all)")
        if self.streak >= limit:
            raise TrainingError(f"stopped at iteration {iteration}: {self.streak} steps in a row with a non-finite "
                                f"{what} (solver.max_nonfinite={self.limit}); {kept}")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "streak": self.streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.streak = int(state.get("total", 0)), int(state.get("streak", 0))
