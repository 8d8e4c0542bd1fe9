"""A run's identity and provenance, and the execution of runs as subprocesses.

* Identity: :func:`config_hash` of the resolved config (without the keys that cannot change
  what a run learns, :data:`VOLATILE_KEYS`) plus the dataset fingerprint, so that a cached run
  is reused only for the same config on the same data.
* Provenance: :func:`provenance` records what a run ran on (git commit and dirty flag of the
  source tree, dataset fingerprint, library versions, threads, CPU); the trainer writes it
  into ``metrics.json``.
* Execution: :func:`execute` trains runs as ``python -m dtg train`` subprocesses, ``jobs`` at a
  time; a run whose ``metrics.json`` exists is not trained again, one with a checkpoint is
  resumed. ``dtg demo`` and ``dtg bench reproduce`` both run on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dtg.config import Config, DataConfig, save_config, to_dict
from dtg.data.coco import IMAGE_EXTENSIONS
from dtg.fingerprint import files_fingerprint

# Keys that cannot change what a run learns; left out of the run hash. eval_period is not
# among them: it decides the AP curve and best.pth of a run (not its final weights).
VOLATILE_KEYS = ("output_dir", "threads", "log_period", "checkpoint_period", "checkpoint_at", "target_images")


# Keys added after runs were first cached, with the value that keeps the code's behaviour from
# before they existed: at that value they are left out of the hash, so those runs stay valid.
# A new key goes here with its neutral default; a key whose default changes behaviour must not.
NEUTRAL_KEYS: dict[str, Any] = {
    "cpu_kernels": "fast",
    "semi.class_thresholds": [],
    "semi.strong_bn_stats": True,
}


def _without(data: dict[str, Any], keys: Iterable[str]) -> None:
    """Remove dotted ``keys`` from the nested dict ``data`` in place (missing ones are fine)."""
    for key in keys:
        head, _, tail = key.partition(".")
        (data.get(head, {}).pop(tail, None) if tail else data.pop(head, None))


def hashed_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as hashed: without :data:`VOLATILE_KEYS` and neutral :data:`NEUTRAL_KEYS`."""
    data = json.loads(json.dumps(to_dict(cfg)))
    _without(data, VOLATILE_KEYS)
    flat = {k: data[k.split(".")[0]].get(k.split(".")[1]) if "." in k else data.get(k) for k in NEUTRAL_KEYS}
    _without(data, [k for k, v in NEUTRAL_KEYS.items() if flat[k] == v])
    return data


def config_hash(cfg: Config) -> str:
    """12 hex digits of the resolved config without :data:`VOLATILE_KEYS` (and neutral :data:`NEUTRAL_KEYS`)."""
    return hashlib.sha1(json.dumps(hashed_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def run_key(cfg: Config, fingerprint: str) -> str:
    """A run's identity: 12 hex digits of its :func:`config_hash` and its dataset fingerprint.

    A supervised run is identified by the keys it reads only (:func:`supervised_part`), so that
    configs that differ in a semi-supervised key share their supervised run.
    """
    if cfg.method == "supervised":
        part = hashlib.sha1(json.dumps(supervised_part(cfg), sort_keys=True).encode()).hexdigest()[:12]
        return hashlib.sha1(f"supervised:{part}:{fingerprint}".encode()).hexdigest()[:12]
    return hashlib.sha1(f"{config_hash(cfg)}:{fingerprint}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- fingerprints


def _images_of(json_path: Path, image_dir: Path) -> list[Path]:
    try:
        data = json.loads(json_path.read_text())
        names = [im["file_name"] for im in data.get("images", []) if isinstance(im, dict) and "file_name" in im]
    except (OSError, ValueError, TypeError):
        return []
    return [image_dir / n for n in names if (image_dir / n).is_file()]


def dataset_fingerprint(d: DataConfig, with_unlabeled: bool = True) -> str:
    """Fingerprint of what a run reads: the json files and the bytes of every image they name.

    The labeled json, the unlabeled json (or every image of the unlabeled folder), the val
    json and the full json, with their images. Missing files are left out (the run itself
    reports them).
    """
    pairs = [(d.train_json, d.train_images)] + ([(d.unlabeled, d.unlabeled_images)] if with_unlabeled else [])
    pairs += [(d.val_json, d.val_images)] if d.val_json else []
    pairs += [(d.full_json, d.train_images)] if d.full_json else []
    return _fingerprint(pairs)


def val_fingerprint(d: DataConfig) -> str:
    """Fingerprint of the evaluation set alone (val json and its images); "-" without one."""
    return _fingerprint([(d.val_json, d.val_images)]) if d.val_json else "-"


def _fingerprint(pairs: list[tuple[str, str]]) -> str:
    """16 hex digits over the (json or image folder, image folder) pairs' files."""
    jsons: list[Path] = []
    images: set[Path] = set()
    for src, folder in pairs:
        src_p, folder_p = Path(src), Path(folder)
        if src_p.is_dir():
            images.update(p for p in src_p.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif src_p.is_file():
            jsons.append(src_p)
            images.update(_images_of(src_p, folder_p))
    h = hashlib.sha256()
    h.update(files_fingerprint(jsons).encode())
    h.update(files_fingerprint(images).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- provenance


def git_state(path: Path) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path``; ``("unknown", None)`` outside one."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(status.strip())


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "Pillow", "faster-coco-eval", "dtg"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(cfg: Config, threads: int, fingerprint: str) -> dict[str, Any]:
    """What a run ran on, for its ``metrics.json`` (``threads``: torch's intra-op threads)."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    return {
        "commit": commit, "dirty": dirty, "dataset_fingerprint": fingerprint,
        "val_fingerprint": val_fingerprint(cfg.data), "versions": library_versions(),
        "threads": threads, "cpu": cpu_name(), "cpu_capability": cpu_capability(), "cores": _cores(),
        "cpu_kernels": {"MKL_CBWR": os.environ.get("MKL_CBWR", ""), "onednn": _onednn_enabled()},
        "config_hash": config_hash(cfg),
    }


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (``AVX512``, ``AVX2``, ...; env ``ATEN_CPU_CAPABILITY``).

    Kernels of different ISAs round differently, and 1000 training steps amplify that into
    different weights: runs agree bit for bit only on the same capability and thread count.
    """
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _onednn_enabled() -> bool:
    import torch

    return bool(torch.backends.mkldnn.enabled)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- execution


def iteration_checkpoint(iteration: int) -> str:
    """The file name under ``checkpoints/`` of the checkpoint kept at ``iteration`` (config ``checkpoint_at``)."""
    return f"iter_{iteration:07d}.pth"


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

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.json"


# What a supervised run never reads: a semi-supervised config that differs from a supervised one
# only here trains exactly like it until its burn-in ends (semi.ema_momentum is read: the teacher).
SUPERVISED_IGNORES = ("method", "checkpoint_at", "dtg", "semi", "data.batch_unlabeled", "data.weak_view",
                      "data.strong_view")
SUPERVISED_READS = ("semi.ema_momentum",)


def supervised_part(cfg: Config, until: int | None = None) -> dict[str, Any]:
    """``cfg`` as a plain dict without the keys a supervised run does not read (:data:`SUPERVISED_IGNORES`)
    or that never change what it learns (:data:`VOLATILE_KEYS`).

    With ``until``, only what decides its first ``until`` iterations: ``solver.max_iter``, the
    learning-rate steps at or after ``until`` and ``eval_period`` are left out too.
    """
    full = json.loads(json.dumps(to_dict(cfg)))
    kept = {key: full[key.split(".")[0]][key.split(".")[1]] for key in SUPERVISED_READS}
    data = hashed_dict(cfg)
    _without(data, SUPERVISED_IGNORES)
    if until is not None:
        data["solver"].pop("max_iter")
        data["solver"]["steps"] = [s for s in data["solver"]["steps"] if s < until]
        data.pop("eval_period")
    return {**data, "reads": kept}


# What a supervised run reads only to evaluate itself (val set, curve points) or not at all
# (the unlabeled data, the ceiling's json): two runs that differ only here train the same weights.
EVALUATION_ONLY = ("data.val_json", "data.val_images", "data.unlabeled", "data.unlabeled_images", "data.full_json",
                   "eval_period")


def training_key(cfg: Config) -> str | None:
    """The identity of a supervised run's *training* (its weights), or None for other methods: its
    :func:`supervised_part` without :data:`EVALUATION_ONLY`, and the labeled data's fingerprint."""
    if cfg.method != "supervised":
        return None
    data = supervised_part(cfg)
    _without(data, EVALUATION_ONLY)
    labeled = _fingerprint([(cfg.data.train_json, cfg.data.train_images)])
    return hashlib.sha1(f"{json.dumps(data, sort_keys=True)}:{labeled}".encode()).hexdigest()[:12]


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


def branch_key(key: str, parent: str, iteration: int) -> str:
    """The identity of a run that starts from ``parent``'s checkpoint at ``iteration`` instead of its own burn-in."""
    return hashlib.sha1(f"{key}:from {parent}@{iteration}".encode()).hexdigest()[:12]


def branch_from(child: Run, parent: Run, iteration: int) -> None:
    """Make ``child`` start from ``parent``'s checkpoint at ``iteration`` (``dtg train --init-from``).

    The parent keeps that checkpoint (``checkpoint_at``); the child waits for it (:func:`execute`).
    """
    if iteration not in parent.cfg.checkpoint_at:
        parent.cfg.checkpoint_at = sorted([*parent.cfg.checkpoint_at, iteration])
    child.parent, child.needs = parent.key, parent.out / "checkpoints" / iteration_checkpoint(iteration)
    child.extra_args = ["--init-from", str(child.needs)]


MAIN_LOSSES = ("loss", "sup_rcnn_cls", "unsup_rcnn_cls", "unsup_rpn_cls")


def progress_state(method: str, iteration: int, total: int, seconds: float, steps: int,
                   scalars: dict[str, float]) -> dict[str, Any]:
    """What ``progress.json`` holds: method, iteration / total, it/s and ETA over this process's
    ``steps`` in ``seconds``, and the main losses of the last logged step."""
    rate = steps / seconds if seconds > 0 and steps > 0 else 0.0
    return {"method": method, "iteration": iteration, "total": total, "it_per_s": rate,
            "eta_s": (total - iteration) / rate if rate > 0 else None,
            "losses": {k: float(scalars[k]) for k in MAIN_LOSSES if k in scalars}}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_line(state: dict[str, Any], label: str | None = None) -> str:
    """One line: ``dtg 420/1000 (42 %), 1.83 it/s, ETA 5:17, loss 0.812 unsup_rcnn_cls 0.101``."""
    it, total = state["iteration"], state["total"]
    losses = " ".join(f"{k} {v:.3f}" for k, v in state.get("losses", {}).items())
    return (f"{label or state['method']} {it}/{total} ({100 * it // max(total, 1)} %), {state['it_per_s']:.2f} it/s, "
            f"ETA {_clock(state['eta_s'])}{', ' + losses if losses else ''}")


def read_progress(run: Run) -> dict[str, Any] | None:
    """The run's ``progress.json``, or None before its first logged step (or mid-replace)."""
    try:
        return json.loads((run.out / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def run_one(run: Run, threads: int) -> tuple[str, float]:
    """Train (or resume) one run in a subprocess unless its metrics exist: ``(status, seconds)``.

    With ``run.stop_at`` the subprocess stops there (status ``stopped``) and a later call resumes it.
    """
    if run.metrics_path.is_file():
        return "cached", 0.0
    run.out.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, run.out / "run.yaml")
    if run.twin is not None and not (run.out / "checkpoints" / "last.pth").is_file():
        _adopt(run)  # the same weights were trained already: copy them, only evaluate here
    resume = (run.out / "checkpoints" / "last.pth").is_file()
    stop = ["--stop-at", str(run.stop_at)] if run.stop_at is not None else []
    cmd = [sys.executable, "-m", "dtg", "train", "--config", str(run.out / "run.yaml"),
           "--set", f"threads={threads}", "--no-progress", *(["--resume", "auto"] if resume else run.extra_args), *stop]
    t0 = time.perf_counter()
    with open(run.out / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
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
    meanwhile); it fails, without training, when its parent failed or ended without it.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    todo = [r for r in runs.values() if not r.metrics_path.is_file()]
    status = {k: ("cached" if r.metrics_path.is_file() else "pending") for k, r in runs.items()}
    running: dict[str, Run] = {}
    monitor = ProgressMonitor(running, log)
    monitor.say(f"{len(runs)} runs: {len(runs) - len(todo)} cached, {len(todo)} to train ({jobs} at a time, "
                f"{threads} threads each)")

    def work(run: Run) -> None:
        label = ", ".join(f"{row}/seed {s}" for row, s in run.uses) or "supervised burn-in"
        monitor.say(f"start {run.key} ({label})" + (f" from {run.needs}" if run.needs else ""))
        running[run.key] = run
        try:
            status[run.key], seconds = run_one(run, threads)
        finally:
            running.pop(run.key, None)
        monitor.say(f"{status[run.key]} {run.key} ({label}) in {seconds:.0f} s")

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
                    pending.remove(run)
                    if state == "ready":
                        status[run.key] = "running"
                        futures.add(pool.submit(work, run))
                    else:
                        status[run.key] = state
                        monitor.say(f"{state}: {run.key}")
                if futures:
                    done, futures = wait(futures, timeout=2.0, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                elif pending:
                    time.sleep(0.5)
    finally:
        monitor.stop()
    return status


class ProgressMonitor:
    """A thread that shows one progress line per running run: redrawn in place on a terminal
    (every 2 s), printed as plain lines through ``log`` otherwise (every ``every`` seconds)."""

    def __init__(self, running: dict[str, Run], log: Callable[[str], None], every: float = 30.0) -> None:
        import threading

        self.running, self.log, self.tty = running, log, sys.stderr.isatty()
        self.every = 2.0 if self.tty else every
        self.drawn = 0
        self.last: dict[str, str] = {}  # per run, the line last printed (a log gets a line only when it changed)
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
        for run in list(self.running.values()):
            state = read_progress(run)
            label = ", ".join(f"{row}/seed {s}" for row, s in run.uses) or f"burn-in {run.key}"
            line = progress_line(state, label) if state else f"{label}: starting"
            if not changed_only or self.last.get(run.key) != line:
                out.append(line)
            self.last[run.key] = line
        return out

    def _erase(self) -> None:
        if self.tty and self.drawn:
            sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
            sys.stderr.flush()
            self.drawn = 0

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self.tty:
                    lines = self.lines()
                    self._erase()
                    sys.stderr.write("".join(f"  {ln}\n" for ln in lines))
                    sys.stderr.flush()
                    self.drawn = len(lines)
                else:
                    for ln in self.lines(changed_only=True):
                        self.log(ln)


def ensure_generated(cfgs: Iterable[Config], log: Callable[[str], None]) -> None:
    """Generate (or regenerate, when stale) each distinct embedded dataset these configs read."""
    from dtg.data.synth import generate

    for cfg in {json.dumps(to_dict(c.synth), sort_keys=True): c for c in cfgs}.values():
        if Path(cfg.synth.out_dir).resolve() in Path(cfg.data.train_json).resolve().parents:
            log(f"checking the generated dataset in {cfg.synth.out_dir} (made again if its config or content changed)")
            generate(cfg.synth, progress=False)  # returns at once when it is complete and current
