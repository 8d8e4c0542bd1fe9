"""Sweeps that share ``--out``: two ``dtg bench reproduce`` invocations never train one run twice, and a
sweep killed with ``kill -9`` leaves no training behind and resumes every unfinished run when started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dtg.config import save_config
from dtg.engine.run_folder import LOCK_NAME, RunLock

from conftest import tiny_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _sweep(config: Path, out: Path, rows: str, log: Path, jobs: int = 1) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dtg", "bench", "reproduce", "--config", str(config), "--rows", rows, "--seeds", "0",
            "--jobs", str(jobs), "--threads", "1", "--curve-points", "1", "--out", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV)  # noqa: SIM115


def _until(condition, what: str, timeout: float = 180.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _run_dir(out: Path, method: str) -> Path | None:
    for run in sorted(out.glob("runs/*/run.yaml")):
        if yaml.safe_load(run.read_text())["method"] == method:
            return run.parent
    return None


def _trainer(run: Path) -> int:
    """The PID of the dtg train that holds ``run`` (it writes its own PID into the lock file)."""
    return int((run / LOCK_NAME).read_text().split()[0])


def _commands(run: Path) -> list[str]:
    return [line for line in (run / "train.log").read_text().splitlines() if line.startswith("$ ")]


def _free(run: Path) -> bool:
    lock = RunLock(run)
    taken = lock.try_acquire()
    lock.release()
    return taken


@pytest.fixture()
def config(tiny_dataset, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "unused", "solver.max_iter=6", "solver.steps=[5]",
                            "checkpoint_period=1", "semi.burn_in=2", "semi.alpha_warmup=1",
                            "data.batch_unlabeled=1"), path)
    return path


def test_two_sweeps_sharing_out_train_their_shared_run_once(config, tmp_path):
    out = tmp_path / "rep"
    first = _sweep(config, out, "supervised,dtg", tmp_path / "first.log")
    sup = _until(lambda: _run_dir(out, "supervised"), "the supervised run's folder")
    _until(lambda: (sup / "checkpoints" / "last.pth").is_file(), "the supervised run's first checkpoint")
    trainer = _trainer(sup)
    os.kill(trainer, signal.SIGSTOP)  # the first sweep's supervised run stays unfinished while the second starts
    try:
        second = _sweep(config, out, "supervised,sparse", tmp_path / "second.log")
        _until(lambda: "waiting for" in (tmp_path / "second.log").read_text(), "the second sweep to wait")
    finally:
        os.kill(trainer, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    key = sup.name
    assert f"waiting for {key} (supervised/seed 0): another process (PID " in log
    assert f"cached {key} (supervised/seed 0): trained by PID " in log
    assert len(_commands(sup)) == 1, "the shared run was trained once"
    for method in ("dtg", "sparse"):  # each sweep's own run, from the shared burn-in
        run = _run_dir(out, method)
        assert (run / "metrics.json").is_file() and len(_commands(run)) == 1
        assert "--init-from" in _commands(run)[0]


def test_a_sweep_killed_with_kill_9_leaves_no_training_and_resumes_every_unfinished_run(config, tmp_path):
    out = tmp_path / "rep"
    sweep = _sweep(config, out, "supervised,sparse", tmp_path / "killed.log", jobs=2)
    sup = _until(lambda: _run_dir(out, "supervised"), "the supervised run's folder")
    _until(lambda: (sup / "checkpoints" / "iter_0000002.pth").is_file(), "the end of the burn-in")
    os.kill(_trainer(sup), signal.SIGSTOP)  # unfinished at the kill, whatever the machine's speed
    child = _until(lambda: _run_dir(out, "sparse"), "the sparse run's folder")
    _until(lambda: (child / "checkpoints" / "last.pth").is_file(), "the sparse run's first checkpoint")
    os.kill(_trainer(child), signal.SIGSTOP)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    for run in (sup, child):  # its trainers died with it: no lock held
        _until(lambda: _free(run), f"{run} to be released")
        assert not (run / "metrics.json").exists()
    again = _sweep(config, out, "supervised,sparse", tmp_path / "again.log", jobs=2)
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()
    log = (tmp_path / "again.log").read_text()
    assert "2 runs: 0 cached, 2 to train" in log and "waiting for" not in log
    for run in (sup, child):
        assert f"resumed {run.name}" in log
        commands = _commands(run)
        assert len(commands) == 2 and commands[1].endswith("--resume auto"), commands
        assert (run / "metrics.json").is_file()
