"""The checkpoint format, whole: what a training checkpoint holds, how it is written and read back.

A training checkpoint is a dict:

* ``student``, ``teacher``: plain torchvision ``FasterRCNN`` state dicts;
* ``optimizer``, ``scheduler``, ``scaler``, ``nonfinite``: the step's state (:class:`~dtg.engine.step.TrainStep`);
* ``iteration``; ``sampler``: ``{"batches_drawn", "seed", "world_size"}``;
* ``rng`` (rank 0's generators) and, under torchrun, ``rng_ranks`` (every rank's);
* ``config`` (the resolved config as a dict), ``categories`` (COCO categories, by id);
* the trainer's hooks' state (:meth:`dtg.engine.hooks.HookBase.state_dict`): ``best_ap`` and
  ``history`` (per evaluation: iteration and AP of each model) of the evaluation hook.

Checkpoints are written atomically: to a temporary file in the same folder, fsynced, then
renamed. A reader therefore sees either the previous complete file or the new complete
file, never a partial one, even if the process is killed mid-write.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from dtg.config import Config
    from dtg.models.detector import Detector


class StepState(Protocol):
    """What a checkpoint needs of the training step (:class:`dtg.engine.step.TrainStep`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
            writer = _Writes(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write as "unexpected pos ..."
                    raise writer.error from None
                raise
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


class _Writes:
    """A file for ``torch.save`` that keeps the first ``OSError`` of its writes: torch's zip writer turns
    it into a ``RuntimeError`` without the OS's reason (disk full, file too large)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


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


def init_weights(
    ckpt: dict[str, Any], path: str | Path, student: "Detector", teacher: "Detector", categories: list[dict],
) -> int:
    """Load the weights of ``ckpt`` into a new run's student and teacher (``dtg train --init-from``).

    A training checkpoint gives its student to the student and its (EMA) teacher to the teacher,
    or its student to both when it has no teacher; a plain torchvision ``FasterRCNN`` state dict
    (e.g. ``dtg export``'s ``model.pt``) goes into both. Nothing else is taken: optimizer,
    scheduler position and random streams start fresh.

    Raises:
        CheckpointError: (one line naming ``path``) the categories differ from the run's, or the
            weights do not fit its architecture (the first mismatching key).

    Returns:
        The checkpoint's iteration (0 for a plain state dict).
    """
    if "student" in ckpt:
        if ckpt.get("categories") is not None and ckpt["categories"] != categories:
            names = [c.get("name") for c in ckpt["categories"]]
            raise CheckpointError(f"{path}: categories {names} differ from this run's {[c['name'] for c in categories]}")
        weights = {"student": ckpt["student"], "teacher": ckpt.get("teacher", ckpt["student"])}
        iteration = int(ckpt.get("iteration", 0))
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        weights, iteration = {"student": ckpt, "teacher": ckpt}, 0
    else:
        raise CheckpointError(f"{path}: neither a dtg training checkpoint nor a FasterRCNN state dict")
    for name, model in (("student", student), ("teacher", teacher)):
        try:
            model.net.load_state_dict(weights[name])
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise CheckpointError(f"{path}: {name} weights do not fit this run's model ({detail[:200]})") from None
    return iteration


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


# ----------------------------------------------------------------------------- training checkpoints


def training_state(
    student: "Detector", teacher: "Detector", step: StepState, iteration: int, cfg: "Config",
    categories: list[dict], hook_state: dict[str, Any], rngs: list[dict[str, Any]], world_size: int,
) -> dict[str, Any]:
    """The whole training state as a checkpoint dict (see the module docstring).

    Args:
        hook_state: the hooks' top-level entries (``best_ap``, ``history``).
        rngs: :func:`rng_state` of every rank, in rank order (one entry in a single process).
    """
    from dtg.config import to_dict

    state = {
        "student": student.net.state_dict(),
        **step.state_dict(),
        "iteration": iteration,
        "sampler": {"batches_drawn": iteration, "seed": cfg.seed, "world_size": world_size},
        "rng": rngs[0],
        "config": to_dict(cfg),
        "categories": categories,
        **hook_state,
        "teacher": teacher.net.state_dict(),
    }
    if world_size > 1:
        state["rng_ranks"] = rngs
    return state


def restore_training(
    ckpt: dict[str, Any], path: str | Path, student: "Detector", teacher: "Detector", step: StepState,
    categories: list[dict], train_json: str, seed: int, rank: int, world_size: int,
) -> tuple[int, str | None]:
    """Load a training checkpoint into the models and the step; set this rank's RNG state (the
    hooks read their own entries: :meth:`dtg.engine.hooks.HookBase.load_state_dict`).

    Raises:
        CheckpointError: (one line naming ``path``) categories or seed differ, or no teacher.

    Returns:
        ``(iteration, note)``; ``note`` says when the world size changed
        (the data order and random streams then differ from an uninterrupted run).
    """
    if ckpt.get("categories") != categories:
        raise CheckpointError(f"{path}: checkpoint categories differ from {train_json}")
    if "teacher" not in ckpt:
        raise CheckpointError(f"{path}: has no teacher")
    if ckpt["sampler"]["seed"] != seed:
        raise CheckpointError(f"{path}: saved with seed {ckpt['sampler']['seed']}, this run uses {seed}")
    student.net.load_state_dict(ckpt["student"])
    teacher.net.load_state_dict(ckpt["teacher"])
    step.load_state_dict(ckpt)
    note = None
    saved_world = int(ckpt["sampler"].get("world_size", 1))
    if saved_world == world_size:
        set_rng_state(ckpt["rng_ranks"][rank] if "rng_ranks" in ckpt else ckpt["rng"])
    else:
        set_rng_state(ckpt["rng"])
        note = (f"{path}: written by {saved_world} processes, resumed by {world_size}: "
                "the data order and random streams differ from an uninterrupted run")
    return int(ckpt["iteration"]), note
