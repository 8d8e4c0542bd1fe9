"""A run folder belongs to one config and one process at a time.

* One process: ``dtg train`` holds an exclusive ``flock`` on ``OUTPUT_DIR/.run.lock`` while it
  runs (:class:`RunLock`); the OS releases it when the process ends, ``kill -9`` included. A second
  process finds it held and stops before any work, naming the folder and the holder's PID.
  ``dtg demo`` and ``dtg bench reproduce`` (:mod:`dtg.run_exec`) take a run's lock themselves and
  pass it down to their ``dtg train`` subprocess (:data:`LOCK_FD_ENV`), so that two sweeps sharing
  ``--out`` never train one run twice: one waits for the other's run and then reads it as cached.
* One config: :func:`claim` compares the config of the run a folder holds (``config.yaml``, else
  ``run.yaml``, else its ``last.pth``) with the new one, ignoring the keys that cannot change the
  result (:func:`dtg.run_identity.run_difference`): another config is refused unless ``--overwrite``;
  the same config finished is not trained again unless ``--force``; the same config unfinished is
  continued only with ``--resume``.

No torch at import: the lock is taken before the trainer is even imported.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dtg.config import Config

LOCK_NAME = ".run.lock"
LOCK_FD_ENV = "DTG_RUN_LOCK_FD"  # a lock taken by the parent process (dtg.run_exec), passed down to dtg train
PARENT_ENV = "DTG_PARENT_PID"  # dtg train dies with this parent process (a sweep killed with kill -9)
# What a training run writes into its folder (removed by --overwrite / --force); run.yaml and
# train.log belong to dtg.run_exec, the lock file stays.
RUN_OUTPUTS = ("checkpoints", "tb", "metrics.json", "progress.json", "config.yaml")


class RunFolderError(RuntimeError):
    """An output folder is in use by another process or holds another run (one-line message)."""


_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    """After ``fork`` (DataLoader workers): close the child's copy of each lock without unlocking it, so
    that the lock goes when the process that took it dies, not when its last worker notices."""
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.run.lock``; the file holds the holder's PID.

    Released by :meth:`release` or when the holder ends (``kill -9`` included). Never unlocked
    explicitly: a lock passed down to a subprocess is one lock shared by both until both let go.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock (or adopt the one the parent passed down); False when another process holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._inherited()
            if fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunFolderError(f"{self.folder}: output directory is not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD.add(self)
        return True

    def acquire(self) -> "RunLock":
        """:meth:`try_acquire` or a :class:`RunFolderError` naming the folder and the holder's PID."""
        if not self.try_acquire():
            raise RunFolderError(f"{self.folder}: in use by another process (PID {self.holder()}); wait for it "
                                 f"to end, or use another output folder")
        return self

    def holder(self) -> str:
        """The PID the holder wrote into the lock file ("?" when it cannot be read)."""
        try:
            return self.path.read_text().split()[0]
        except (OSError, IndexError):
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()

    def _inherited(self) -> int | None:
        """The parent's descriptor of this very lock file, when it passed one down (:data:`LOCK_FD_ENV`)."""
        value = os.environ.get(LOCK_FD_ENV, "")
        try:
            fd = int(value)
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except (ValueError, OSError):
            return None
        if same:
            del os.environ[LOCK_FD_ENV]
            return fd
        return None


def exit_with_parent() -> None:
    """In a ``dtg train`` started by a sweep (:data:`PARENT_ENV` set): die when the sweep dies, ``kill -9``
    included (Linux), so that a killed sweep leaves no training behind; started again, it resumes."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the prctl
        os._exit(1)


# ----------------------------------------------------------------------------- which run a folder holds


@dataclass
class Held:
    """What a run folder holds: ``holds`` (metrics.json or a checkpoint), ``finished`` (metrics.json),
    ``resumable`` (checkpoints/last.pth), the run's config and the file it was read from."""

    holds: bool
    finished: bool
    resumable: bool
    config: Config | None = None
    source: str = ""


def held_run(folder: str | Path) -> Held:
    """The run ``folder`` holds; its config from ``config.yaml`` (the trainer's), ``run.yaml`` (a
    sweep's) or ``checkpoints/last.pth``, whichever exists first (None when unreadable)."""
    folder = Path(folder)
    ckpts = folder / "checkpoints"
    finished = (folder / "metrics.json").is_file()
    resumable = (ckpts / "last.pth").is_file()
    holds = finished or (ckpts.is_dir() and any(ckpts.glob("*.pth")))
    if not holds:
        return Held(False, False, False)
    from dtg.config import from_dict

    for name in ("config.yaml", "run.yaml", "checkpoints/last.pth"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".pth":
                from dtg.engine.checkpoint import load_checkpoint

                data = load_checkpoint(path)["config"]
            else:
                import yaml

                data = yaml.safe_load(path.read_text())
            return Held(holds, finished, resumable, from_dict(data), name)
        except Exception:  # noqa: BLE001 - an unreadable record: the run's config is unknown
            return Held(holds, finished, resumable, None, name)
    return Held(holds, finished, resumable, None, "")


def other_config(folder: str | Path, cfg: Config, held: Held | None = None) -> str | None:
    """Why the run ``folder`` holds (``held``, read when not given) is not a run of ``cfg``
    (``"KEY: A there, B here"``); None when it holds none or the same run."""
    from dtg.run_identity import run_difference

    held = held or held_run(folder)
    if not held.holds:
        return None
    if held.config is None:
        return f"its config cannot be read{' from ' + held.source if held.source else ''}"
    return run_difference(held.config, cfg)


def check_same_run(folder: str | Path, cfg: Config, advice: str) -> None:
    """Refuse (:class:`RunFolderError`, one line ending in ``advice``) a folder that holds a run of another config."""
    difference = other_config(folder, cfg)
    if difference:
        raise RunFolderError(_another(folder, difference, advice))


def _another(folder: str | Path, difference: str, advice: str) -> str:
    return f"{folder}: holds a run with another config ({difference}); {advice}"


def clear_run(folder: Path, log: Callable[[str], None]) -> None:
    """Remove what a training run wrote into ``folder`` (:data:`RUN_OUTPUTS`, ``results_*.json``)."""
    removed = []
    for path in [*(folder / n for n in RUN_OUTPUTS), *sorted(folder.glob("results_*.json"))]:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(f"{path.name}/")
        elif path.exists():
            path.unlink()
            removed.append(path.name)
    if removed:
        log(f"removed the previous run's {', '.join(removed)} from {folder}")


@dataclass
class Claim:
    """A folder claimed by :func:`claim`: the lock (rank 0 only), whether its run is finished already
    and then (rank 0) its ``metrics.json``."""

    lock: RunLock | None
    finished: bool
    summary: dict | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(cfg: Config, resume: str | None, overwrite: bool, force: bool, log: Callable[[str], None]) -> Claim:
    """Lock ``cfg.output_dir`` and decide what ``dtg train`` may do there (module docstring).

    Under torchrun rank 0 decides and every rank gets its decision (the others take no lock).

    Raises:
        RunFolderError: (one line) the folder is locked, holds another config's run (without
            ``overwrite``), or this config's unfinished run (without ``resume`` or ``force``).
    """
    world = os.environ.get("WORLD_SIZE", "").strip()
    if not world.isdigit() or int(world) <= 1:
        return _claim(cfg, resume, overwrite, force, log)
    from dtg.dist import broadcast_from_main, init_distributed
    from dtg.engine.runtime import resolve_device

    info, _ = init_distributed(resolve_device(cfg.device))
    mine, error = None, None
    if info.is_main:
        try:
            mine = _claim(cfg, resume, overwrite, force, log)
        except (RunFolderError, OSError) as e:  # every rank stops with rank 0's line
            error = str(e)
    error, finished = broadcast_from_main(info, (error, mine is not None and mine.finished))
    if error:
        raise RunFolderError(error)
    return mine or Claim(None, finished)


def _claim(cfg: Config, resume: str | None, overwrite: bool, force: bool, log: Callable[[str], None]) -> Claim:
    folder = Path(cfg.output_dir)
    lock = RunLock(folder).acquire()
    try:
        held = held_run(folder)
        difference = other_config(folder, cfg, held)
        if difference and not overwrite:
            raise RunFolderError(_another(folder, difference, "use another --output-dir, or --overwrite to replace it"))
        if overwrite or force:
            if held.holds:
                log(f"{folder}: starting its run over ({'--overwrite' if overwrite else '--force'}"
                    f"{'; it held a run with another config, ' + difference if difference else ''})")
            clear_run(folder, log)
            return Claim(lock, False)
        if held.finished:
            log(f"{folder}: holds the finished run of this config (metrics.json); nothing to train "
                f"(--force trains it again)")
            try:
                return Claim(lock, True, json.loads((folder / "metrics.json").read_text()))
            except (OSError, ValueError):
                return Claim(lock, True, {})
        if held.resumable and not resume:
            raise RunFolderError(f"{folder}: holds an unfinished run of this config (checkpoints/last.pth); "
                                 f"continue it with --resume auto, or start it over with --force")
        return Claim(lock, False)
    except BaseException:
        lock.release()
        raise
