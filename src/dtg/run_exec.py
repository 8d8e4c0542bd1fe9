"""The execution of runs as subprocesses, and the progress monitor that watches them.

:func:`execute` trains runs as ``python -m dtg train`` subprocesses, ``jobs`` at a time; a run
whose ``metrics.json`` exists is not trained again, one with a checkpoint is resumed. ``dtg demo``
and ``dtg bench reproduce`` both run on it (``dtg demo`` in two phases, :func:`execute_phased`). What a run *is* (its hash, fingerprints, provenance)
is :mod:`dtg.run_identity`; the training engine never imports this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dtg.config import Config, save_config, to_dict
from dtg.engine.run_folder import LOCK_FD_ENV, PARENT_ENV, RunLock
from dtg.progress import progress_line
from dtg.run_identity import iteration_checkpoint, training_key


@dataclass
class Run:
    """One training run (a resolved config), shared by every (row, seed) that resolves to it.

    A run that starts from another run's checkpoint (a semi-supervised run branching off its
    supervised burn-in, :func:`branch_from`) names it in ``parent`` and waits for the file
    ``needs`` before it starts.
    """

    key: str
    cfg: Config
    out: Path
    uses: list[tuple[str, int]] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)  # more ``dtg train`` arguments (e.g. --init-from)
    parent: str | None = None  # key of the run whose checkpoint this one starts from
    needs: Path | None = None  # that checkpoint
    stop_at: int | None = None  # train only up to this iteration (``dtg train --stop-at``); resumed later
    twin: Path | None = None  # a finished run that trained the same weights (:func:`trained_twin`): evaluate only
    branch_at: int | None = None  # the iteration of ``parent``'s checkpoint it starts from (:func:`branch_from`)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.json"


def trained_twin(run: Run, cache: Path) -> Path | None:
    """A finished supervised run under ``cache`` that trained the same weights as ``run`` (same
    :func:`training_key`) and kept every checkpoint ``run`` keeps; None when there is none."""
    key = training_key(run.cfg)
    if key is None or run.metrics_path.is_file():
        return None
    from dtg.config import from_dict
    import yaml

    for other in sorted(Path(cache).glob("*/run.yaml")):
        folder = other.parent
        if folder == run.out or not (folder / "metrics.json").is_file():
            continue
        try:
            cfg = from_dict(yaml.safe_load(other.read_text()))
        except Exception:  # noqa: BLE001 - an unreadable neighbour is simply not a twin
            continue
        kept = all((folder / "checkpoints" / iteration_checkpoint(i)).is_file() for i in run.cfg.checkpoint_at)
        if kept and training_key(cfg) == key:
            return folder
    return None


def branch_from(child: Run, parent: Run, iteration: int) -> None:
    """Make ``child`` start from ``parent``'s checkpoint at ``iteration`` (``dtg train --init-from``).

    The parent keeps that checkpoint (``checkpoint_at``); the child waits for it (:func:`execute`).
    """
    if iteration not in parent.cfg.checkpoint_at:
        parent.cfg.checkpoint_at = sorted([*parent.cfg.checkpoint_at, iteration])
    child.parent, child.needs = parent.key, parent.out / "checkpoints" / iteration_checkpoint(iteration)
    child.branch_at = iteration
    child.extra_args = ["--init-from", str(child.needs)]


def read_progress(run: Run) -> dict[str, Any] | None:
    """The run's ``progress.json``, or None before its first logged step (or mid-replace)."""
    try:
        return json.loads((run.out / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def run_one(run: Run, threads: int, lock: RunLock | None = None) -> tuple[str, float]:
    """Train (or resume) one run in a subprocess unless its metrics exist: ``(status, seconds)``. The
    subprocess holds the run's ``lock`` (:func:`execute`'s, else taken here, waiting while another process
    holds it) and dies with this one. With ``run.stop_at`` it stops there (``stopped``); a later call resumes it."""
    if run.metrics_path.is_file():
        return "cached", 0.0
    held = lock or RunLock(run.out)
    while lock is None and not held.try_acquire():
        time.sleep(1.0)
    try:
        if run.metrics_path.is_file():  # trained meanwhile by the process that held it
            return "cached", 0.0
        return _train(run, threads, held)
    finally:
        if lock is None:
            held.release()


def _train(run: Run, threads: int, lock: RunLock) -> tuple[str, float]:
    run.out.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, run.out / "run.yaml")
    if run.twin is not None and not (run.out / "checkpoints" / "last.pth").is_file():
        _adopt(run)  # the same weights were trained already: copy them, only evaluate here
    resume = (run.out / "checkpoints" / "last.pth").is_file()
    stop = ["--stop-at", str(run.stop_at)] if run.stop_at is not None else []
    cmd = [sys.executable, "-m", "dtg", "train", "--config", str(run.out / "run.yaml"),
           "--set", f"threads={threads}", "--no-progress", *(["--resume", "auto"] if resume else run.extra_args), *stop]
    env = {**os.environ, LOCK_FD_ENV: str(lock.fd), PARENT_ENV: str(os.getpid())}
    t0 = time.perf_counter()
    with open(run.out / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lock.fd,)).returncode
    seconds = time.perf_counter() - t0
    if rc == 0 and run.stop_at is not None and not run.metrics_path.is_file():
        return "stopped", seconds
    if rc != 0 or not run.metrics_path.is_file():
        return f"failed (exit {rc}, see {run.out / 'train.log'})", seconds
    return ("resumed" if resume else "trained"), seconds


def _adopt(run: Run) -> None:
    """Copy the twin's final and kept checkpoints into ``run`` (then ``--resume`` only evaluates)."""
    import shutil

    assert run.twin is not None
    (run.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    names = ["last.pth", *(iteration_checkpoint(i) for i in run.cfg.checkpoint_at)]
    for name in names:
        src = run.twin / "checkpoints" / name
        tmp = run.out / "checkpoints" / f".{name}.copy"
        shutil.copyfile(src, tmp)
        os.replace(tmp, run.out / "checkpoints" / name)
    with open(run.out / "train.log", "a") as log:
        log.write(f"# the weights of {run.twin} (same training, other evaluation set): evaluation only\n")


def _readiness(run: Run, runs: dict[str, Run], status: dict[str, str]) -> str | None:
    """``"ready"``, None (wait: its parent is pending or training) or a failure message."""
    if run.needs is None or run.needs.is_file():
        return "ready"
    state = status.get(run.parent or "")
    if state in ("pending", "running"):
        return None
    if state is None or state.startswith("failed"):
        return f"failed (the run it starts from, {run.parent}, failed or is not planned)"
    return (f"failed ({run.needs} does not exist: remove {runs[run.parent or ''].out} to train that run again "
            f"with this checkpoint)")


def execute(runs: dict[str, Run], jobs: int, threads: int, log: Callable[[str], None]) -> dict[str, str]:
    """Run everything, ``jobs`` at a time, with a progress line per running run; returns each run's status.

    A run with ``needs`` starts once that checkpoint exists (its parent is still training
    meanwhile); it fails, without training, when its parent failed or ended without it. A run whose
    lock another process holds is waited for (its progress line says so) and then read as cached,
    or trained here when that process ended without finishing it.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    todo = [r for r in runs.values() if not r.metrics_path.is_file()]
    status = {k: ("cached" if r.metrics_path.is_file() else "pending") for k, r in runs.items()}
    running: dict[str, Run] = {}
    waiting: dict[str, tuple[Run, str]] = {}  # runs another process holds, with its PID
    monitor = ProgressMonitor(running, log, waiting=waiting)
    monitor.say(f"{len(runs)} runs: {len(runs) - len(todo)} cached, {len(todo)} to train ({jobs} at a time, "
                f"{threads} threads each)")

    label_of = lambda run: ", ".join(f"{r}/seed {s}" for r, s in run.uses) or "supervised burn-in"  # noqa: E731

    def work(run: Run, lock: RunLock) -> None:
        monitor.say(f"start {run.key} ({label_of(run)})" + (f" from {run.needs}" if run.needs else ""))
        running[run.key] = run
        try:
            status[run.key], seconds = run_one(run, threads, lock)
        finally:
            running.pop(run.key, None)
            lock.release()
            monitor.flush_notes(run)  # what it said since the monitor's last round
        monitor.say(f"{status[run.key]} {run.key} ({label_of(run)}) in {seconds:.0f} s")

    def claim(run: Run) -> RunLock | None:
        """The run's lock, or None while another process holds it (then it waits, its line says so)."""
        lock = RunLock(run.out)
        if not lock.try_acquire():
            if run.key not in waiting:
                waiting[run.key] = (run, lock.holder())
                monitor.say(f"waiting for {run.key} ({label_of(run)}): another process (PID {lock.holder()}) "
                            f"is training it")
            return None
        was = waiting.pop(run.key, None)
        if run.metrics_path.is_file():
            lock.release()
            status[run.key] = "cached"
            monitor.say(f"cached {run.key} ({label_of(run)})" + (f": trained by PID {was[1]}" if was else ""))
            return None
        return lock

    monitor.start()
    # Branches whose checkpoint exists first (they finish what is started), then seed by seed.
    order = {id(r): i for i, r in enumerate(todo)}
    pending = sorted(todo, key=lambda r: (r.needs is None or not r.needs.is_file(), r.cfg.seed, order[id(r)]))
    futures: set = set()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            while pending or futures:
                pending.sort(key=lambda r: (r.needs is None or not r.needs.is_file(), r.cfg.seed, order[id(r)]))
                for run in list(pending):
                    if len(futures) >= max(1, jobs):
                        break
                    state = _readiness(run, runs, status)
                    if state is None:
                        continue
                    if state != "ready":
                        pending.remove(run)
                        status[run.key] = state
                        monitor.say(f"{state}: {run.key}")
                        continue
                    lock = claim(run)
                    if lock is not None:
                        pending.remove(run)
                        status[run.key] = "running"
                        futures.add(pool.submit(work, run, lock))
                    elif status[run.key] == "cached":
                        pending.remove(run)
                if futures:
                    done, futures = wait(futures, timeout=2.0, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                elif pending:
                    time.sleep(0.5)
    finally:
        monitor.stop()
    return status


def execute_phased(runs: dict[str, Run], jobs: int, threads: int, first_threads: int,
                   log: Callable[[str], None]) -> tuple[dict[str, str], dict[str, float]]:
    """:func:`execute` in two phases; returns each run's status and the seconds of each phase.

    Phase 1 (``"burn-in"``, only when there is one to train): each run others branch from
    (:func:`branch_from`) whose checkpoint they start from does not exist yet and which is not
    finished trains alone, with ``first_threads``, up to that checkpoint (``dtg train --stop-at``).
    Phase 2 (``"methods"``): the runs that serve a row (``uses``), ``jobs`` at a time with ``threads``
    each; the branches start from the checkpoint of phase 1 while their parent continues. A run that
    serves no row is trained only as far as its branches need (in phase 2 only when phase 1 did not
    train it: its checkpoints come from a twin, :func:`trained_twin`).
    """
    status: dict[str, str] = {}
    seconds: dict[str, float] = {}
    firsts: dict[str, Run] = {}
    for child in runs.values():
        if child.parent is None or child.branch_at is None or child.parent not in runs:
            continue
        parent = runs[child.parent]
        if parent.metrics_path.is_file() or parent.twin is not None or (child.needs is not None and child.needs.is_file()):
            continue  # finished, or copies a twin's checkpoints (phase 2), or the checkpoint is there
        at = max(child.branch_at, firsts[parent.key].stop_at or 0) if parent.key in firsts else child.branch_at
        firsts[parent.key] = Run(parent.key, parent.cfg, parent.out, parent.uses, stop_at=at)
    for run in firsts.values():
        log(f"phase 1: the {run.cfg.method} burn-in, {run.stop_at} iterations, {first_threads} thread"
            f"{'s' if first_threads > 1 else ''}")
    t0 = time.perf_counter()
    if firsts:
        status.update(execute(firsts, 1, first_threads, log))
        seconds["burn-in"] = time.perf_counter() - t0
    rest = {k: r for k, r in runs.items() if r.uses or (k not in firsts and any(
        c.parent == k and c.uses and c.needs is not None and not c.needs.is_file() for c in runs.values()))}
    if any(r.parent is not None for r in rest.values()):
        names = dict.fromkeys(row for r in rest.values() for row, _ in r.uses)
        log(f"phase 2: {', '.join(names)} side by side, {threads} thread{'s' if threads > 1 else ''} each")
    t0 = time.perf_counter()
    status.update(execute(rest, jobs, threads, log))
    seconds["methods"] = time.perf_counter() - t0
    return status, seconds


def _label(run: Run) -> str:
    return ", ".join(f"{row}/seed {s}" for row, s in run.uses) or f"burn-in {run.key}"


class ProgressMonitor:
    """A thread that shows one progress line per running run: redrawn in place on a terminal
    (every 2 s), printed as plain lines through ``log`` otherwise (every ``every`` seconds); and,
    once each, through ``log``, the notes a run writes into its ``progress.json`` (the teacher
    targets' lines, :mod:`dtg.engine.target_watch`)."""

    def __init__(self, running: dict[str, Run], log: Callable[[str], None], every: float = 30.0,
                 waiting: dict[str, tuple[Run, str]] | None = None) -> None:
        import threading

        self.running, self.log, self.tty = running, log, sys.stderr.isatty()
        self.waiting = waiting if waiting is not None else {}  # runs trained by another process, with its PID
        self.every = 2.0 if self.tty else every
        self.drawn = 0
        self.last: dict[str, str] = {}  # per run, the line last printed (a log gets a line only when it changed)
        self.seen: dict[str, set[str]] = {}  # per run, the notes already printed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def say(self, message: str) -> None:
        """``log(message)`` above the progress lines (which are redrawn below it on a terminal)."""
        with self._lock:
            self._erase()
            self.log(message)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._erase()

    def lines(self, changed_only: bool = False) -> list[str]:
        """One line per running run; with ``changed_only``, only those that differ from the last one shown."""
        out = []
        shown = [(run, "") for run in list(self.running.values())]
        shown += [(run, f" (waiting: PID {pid} trains it)") for run, pid in list(self.waiting.values())]
        for run, suffix in shown:
            state = read_progress(run)
            label = _label(run) + suffix
            line = progress_line(state, label) if state else f"{label}: starting"
            if not changed_only or self.last.get(run.key) != line:
                out.append(line)
            self.last[run.key] = line
        return out

    def new_notes(self, runs: Iterable[Run] | None = None) -> list[str]:
        """``label: note`` for each note of the runs' (default: the running ones') ``progress.json``
        not returned before."""
        out = []
        for run in list(self.running.values()) if runs is None else runs:
            seen = self.seen.setdefault(run.key, set())
            for note in (read_progress(run) or {}).get("notes", []):
                if note not in seen:
                    seen.add(note)
                    out.append(f"{_label(run)}: {note}")
        return out

    def flush_notes(self, run: Run) -> None:
        """Log ``run``'s notes not shown yet (it ended between two rounds)."""
        with self._lock:
            notes = self.new_notes([run])
            if notes:
                self._erase()
            for note in notes:
                self.log(note)

    def _erase(self) -> None:
        if self.tty and self.drawn:
            sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
            sys.stderr.flush()
            self.drawn = 0

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                notes = self.new_notes()
                if self.tty:
                    lines = self.lines()
                    self._erase()
                    for note in notes:
                        self.log(note)
                    sys.stderr.write("".join(f"  {ln}\n" for ln in lines))
                    sys.stderr.flush()
                    self.drawn = len(lines)
                else:
                    for ln in [*notes, *self.lines(changed_only=True)]:
                        self.log(ln)


def ensure_generated(cfgs: Iterable[Config], log: Callable[[str], None]) -> None:
    """Generate (or regenerate, when stale) each distinct embedded dataset these configs read."""
    from dtg.data.synth import generate

    for cfg in {json.dumps(to_dict(c.synth), sort_keys=True): c for c in cfgs}.values():
        if Path(cfg.synth.out_dir).resolve() in Path(cfg.data.train_json).resolve().parents:
            log(f"checking the generated dataset in {cfg.synth.out_dir} (made again if its config or content changed)")
            generate(cfg.synth, progress=False)  # returns at once when it is complete and current
