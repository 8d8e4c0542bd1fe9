"""Faults of a run: SIGKILL at random moments, non-finite losses, failing checkpoint writes (datasets: test_faults_data.py)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dtg.cli import main
from dtg.config import save_config
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer, TrainingError

from conftest import intercept_step, poison_losses, tiny_config

ROOT = Path(__file__).parent.parent


def _same_weights(a: dict, b: dict) -> None:
    for name in ("student", "teacher"):
        assert a[name].keys() == b[name].keys()
        for k, v in a[name].items():
            assert torch.equal(v, b[name][k]), (name, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


# ----------------------------------------------------------------------------- SIGKILL


def _fork_train(args: list[str], log: Path, kill_in_second_save: bool = False) -> int:
    """``dtg train ARGS`` in a forked child (it inherits the imports: ~0.3 s instead of ~5 s to start); its pid.

    With ``kill_in_second_save`` the child SIGKILLs itself half-way through writing its second checkpoint.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sys.stdout = sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115
        if kill_in_second_save:
            real, calls = torch.save, [0]

            def save(obj, f, *a, **k):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] == 2:
                    buf = io.BytesIO()
                    real(obj, buf)
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(obj, f, *a, **k)

            torch.save = save
        code = main(args)
    finally:
        os._exit(code)


def _kill_after_checkpoints(pid: int, ckpt: Path, n: int, phase: float, timeout: float = 60.0) -> None:
    """SIGKILL ``pid`` after it replaced ``ckpt`` ``n >= 2`` times, plus ``phase`` (0..1) of an iteration's time."""
    times, last = [], ckpt.stat().st_mtime_ns if ckpt.exists() else None
    deadline = time.monotonic() + timeout
    while len(times) < n and time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        now = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        if now != last:
            times, last = times + [time.monotonic()], now
        time.sleep(0.001)
    time.sleep(phase * (times[-1] - times[-2]) if len(times) >= 2 else 0.0)
    os.kill(pid, signal.SIGKILL)


def _killed(pid: int) -> bool:
    status = os.waitpid(pid, 0)[1]
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_auto_ends_like_an_uninterrupted_run(tiny_dataset, tmp_path):
    iters = 14
    cfg = tiny_config(tiny_dataset, tmp_path / "killed", f"solver.max_iter={iters}", "checkpoint_period=1", "threads=1")
    save_config(cfg, tmp_path / "killed.yaml")
    ckpts = tmp_path / "killed" / "checkpoints"
    args = ["train", "--config", str(tmp_path / "killed.yaml"), "--no-progress", "--resume"]
    before = torch.get_num_threads()
    try:
        # 1. killed while writing checkpoint 2: checkpoint 1 is what is on disk, a half temp file beside it.
        assert _killed(_fork_train(args, tmp_path / "log0", kill_in_second_save=True))
        assert load_checkpoint(ckpts / "last.pth")["iteration"] == 1
        assert len(list(ckpts.glob(".last.pth.*.tmp"))) == 1
        resumed_at = [1]
        # 2. killed at random moments: after 2-3 new checkpoints, at a random point of the next iteration (or save).
        seed = time.time_ns()
        rng = random.Random(seed)
        print("kill schedule seed", seed)
        for i in range(1, 4):
            pid = _fork_train(args, tmp_path / f"log{i}")
            _kill_after_checkpoints(pid, ckpts / "last.pth", rng.randint(2, 3), rng.random())
            assert _killed(pid), (tmp_path / f"log{i}").read_text()[-3000:]
            log = (tmp_path / f"log{i}").read_text()
            assert f"resumed from {ckpts / 'last.pth'} at iteration {resumed_at[-1]}" in log
            resumed_at.append(load_checkpoint(ckpts / "last.pth")["iteration"])  # complete, whatever the moment
            assert resumed_at[-1] > resumed_at[-2]
        assert "left by an interrupted checkpoint write" in (tmp_path / "log1").read_text()  # the half file of 1.
        # The uninterrupted run, in this process.
        Trainer(tiny_config(tiny_dataset, tmp_path / "whole", f"solver.max_iter={iters}", "threads=1"),
                log=lambda m: None, progress=False).train()
    finally:
        torch.set_num_threads(before)
    # 3. to the end, as a real `python -m dtg train --resume` process.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "dtg", *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    print("resumed at", resumed_at)
    assert resumed_at[-1] < iters and f"resumed from {ckpts / 'last.pth'} at iteration {resumed_at[-1]}" in r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pth", "last.pth"], "no temp file left"
    a, b = load_checkpoint(tmp_path / "whole/checkpoints/last.pth"), load_checkpoint(ckpts / "last.pth")
    assert a["iteration"] == b["iteration"] == iters and a["history"] == b["history"]
    _same_weights(a, b)


# ----------------------------------------------------------------------------- non-finite losses


def _poison(monkeypatch: pytest.MonkeyPatch, iterations: set[int] | range) -> None:
    """NaN in the labeled RPN loss at the given iterations."""
    def nan(losses, iteration):  # type: ignore[no-untyped-def]
        if iteration in iterations:
            losses = {**losses, "sup_rpn_cls": losses["sup_rpn_cls"] * float("nan")}
        return losses

    poison_losses(monkeypatch, nan)


def _snapshot(t: Trainer) -> dict:
    return {
        "student": {k: v.clone() for k, v in t.model.net.state_dict().items()},
        "teacher": {k: v.clone() for k, v in t.teacher.net.state_dict().items()},
        "optimizer": {"state": {k: {"momentum_buffer": s["momentum_buffer"].clone()} for k, s in t.step.optimizer.state.items()}},
    }


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(tiny_dataset, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    lines: list[str] = []
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "r", "solver.max_iter=5"), log=lines.append, progress=False)
    steps = []

    def recording(call, batch, iteration):  # type: ignore[no-untyped-def]
        before = _snapshot(t)
        scalars = call()
        steps.append((iteration, before, _snapshot(t), t.step.scheduler.last_epoch, scalars))
        return scalars

    intercept_step(t.step, recording)
    summary = t.train()
    assert [s[0] for s in steps] == [0, 1, 2, 3, 4] and [s[3] for s in steps] == [1, 2, 3, 4, 5]  # LR schedule advances
    for it, before, after, _, scalars in steps:
        if it in (2, 3):  # no optimizer step, no EMA update
            _same_weights(before, after)
            assert np.isnan(scalars["loss"])
        else:
            assert not torch.equal(before["student"]["rpn.head.conv.0.0.weight"], after["student"]["rpn.head.conv.0.0.weight"])
            assert not torch.equal(before["teacher"]["rpn.head.conv.0.0.weight"], after["teacher"]["rpn.head.conv.0.0.weight"])
    assert [s[4]["nonfinite_steps"] for s in steps] == [0, 0, 1, 2, 2]
    assert summary["nonfinite_steps"] == 2 and summary["iterations"] == 5
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["nonfinite_steps"] == 2
    skipped = [line for line in lines if "non-finite loss" in line]
    assert len(skipped) == 2 and skipped[0].startswith("iteration 2: non-finite loss (sup_rpn_cls=nan")
    assert "step skipped (2 in a row of at most 20, 2 in all)" in skipped[1]
    assert all(torch.isfinite(v).all() for v in t.model.net.state_dict().values() if v.is_floating_point())


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_with_one_line_and_keep_the_checkpoint(tiny_dataset, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, range(3, 100))
    cfg = tiny_config(tiny_dataset, tmp_path / "r", "solver.max_iter=10", "solver.steps=[7]", "checkpoint_period=1", "solver.max_nonfinite=3")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    ckpt = tmp_path / "r" / "checkpoints" / "last.pth"
    assert err[-1] == (f"dtg: error: stopped at iteration 5: 3 steps in a row with a non-finite loss "
                       f"(solver.max_nonfinite=3); the last checkpoint {ckpt} (iteration 5) is intact")
    assert sum("non-finite loss" in line for line in err) == 4  # 3 skip notes + the error
    last = load_checkpoint(ckpt)
    assert last["iteration"] == 5 and last["nonfinite"] == {"total": 2, "streak": 2}
    assert all(torch.isfinite(v).all() for v in last["student"].values() if v.is_floating_point())
    assert not (tmp_path / "r" / "metrics.json").exists()


# ----------------------------------------------------------------------------- disk full, unwritable output


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so_in_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    save_config(tiny_config(tiny_dataset, tmp_path / "r", "checkpoint_period=1"), tmp_path / "c.yaml")
    real, calls = torch.save, [0]

    def save(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] < 2:
            return real(obj, f, *a, **k)
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # part of it reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    monkeypatch.undo()
    ckpt = tmp_path / "r" / "checkpoints" / "last.pth"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtg: error:")]
    assert errors == [f"dtg: error: {ckpt}: cannot write checkpoint (No space left on device); the previous checkpoint is intact"]
    assert load_checkpoint(ckpt)["iteration"] == 1
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pth"], "temp file removed"


_FILE_LIMIT = """
import hashlib, resource, sys
import dtg.engine.trainer as trainer
from dtg.cli import main

real = trainer.atomic_save

def save(obj, path):  # the first checkpoint is written; then no file may grow past half its size
    real(obj, path)
    data = open(path, "rb").read()
    open(sys.argv[1], "w").write(hashlib.sha256(data).hexdigest())
    # not on a buffer boundary: torch's writer then fails with "unexpected pos", not the OSError
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(data) // 2 + 1000, resource.RLIM_INFINITY))

trainer.atomic_save = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_real_failed_write_keeps_the_previous_checkpoint_and_names_the_file_and_the_os_error(tiny_dataset, tmp_path):
    """torch.save's own writer meets the OS limit (RLIMIT_FSIZE, as a full disk would): one line, no traceback."""
    save_config(tiny_config(tiny_dataset, tmp_path / "r", "checkpoint_period=1"), tmp_path / "c.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _FILE_LIMIT, str(tmp_path / "sha"), "train", "--config",
                        str(tmp_path / "c.yaml"), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    ckpt = tmp_path / "r" / "checkpoints" / "last.pth"
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("dtg: error:")]
    assert errors == [f"dtg: error: {ckpt}: cannot write checkpoint (File too large); the previous checkpoint is intact"]
    assert "Traceback" not in r.stderr
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == (tmp_path / "sha").read_text()
    assert load_checkpoint(ckpt)["iteration"] == 1
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pth"], "temp file removed"


def test_too_little_free_space_fails_before_training(tiny_dataset, tmp_path, monkeypatch):
    import dtg.engine.runtime as runtime

    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda p: type("U", (), {"free": 3 << 20})())
    with pytest.raises(TrainingError, match=r"r: only 3 MiB free, a checkpoint needs ~\d+ MiB"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "r"), log=lambda m: None, progress=False)


def test_checkpoint_folder_that_is_a_file_fails_before_training(tiny_dataset, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoints").write_text("not a folder")
    with pytest.raises(TrainingError, match=r"r/checkpoints: output directory is not writable \(File exists\)"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "r"), log=lambda m: None, progress=False)
