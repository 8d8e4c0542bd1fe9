"""A run folder belongs to one config and one process at a time (:mod:`dtg.engine.run_folder`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtg.cli import main
from dtg.config import load_config, save_config
from dtg.engine.run_folder import LOCK_NAME, RunFolderError, RunLock, claim, held_run
from dtg.run_exec import ProgressMonitor, Run, run_one
from dtg.run_identity import run_difference, run_key

from conftest import tiny_config

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- which configs are one run


def test_same_run_exactly_when_the_run_key_is_the_same():
    base = ["method=dtg", "solver.max_iter=100", "solver.steps=[70]"]
    sup = ["solver.max_iter=100", "solver.steps=[70]"]
    pairs = [  # (first, second, first differing key or None)
        (base, [*base, "threads=3", "output_dir=x", "log_period=7", "checkpoint_period=9", "checkpoint_at=[5]"], None),
        (base, [*base, "dtg.rcnn.tau=0.4"], "dtg.rcnn.tau: 0.45 there, 0.4 here"),
        (base, [*base, "solver.steps=[60]"], "solver.steps: [70] there, [60] here"),
        (base, ["method=sparse", *base[1:]], "method: dtg there, sparse here"),
        (base, [*base, "semi.alpha=2"], "semi.alpha: 1.0 there, 2.0 here"),
        (base, [*base, "eval_period=10"], "eval_period: 0 there, 10 here"),  # the AP curve and best.pth
        (sup, [*sup, "semi.alpha=2", "sparse.pseudo_score_thresh=0.9", "dtg.rm_weight=1"], None),  # not read
        (sup, [*sup, "semi.ema_momentum=0.9"], "semi.ema_momentum: 0.99 there, 0.9 here"),  # the teacher
        (sup, [*sup, "data.batch_labeled=2"], "data.batch_labeled: 4 there, 2 here"),
    ]
    for first, second, expected in pairs:
        a, b = load_config(None, first), load_config(None, second)
        assert run_difference(a, b) == expected, (first, second)
        assert (run_key(a, "fp") == run_key(b, "fp")) == (expected is None), (first, second)


# ----------------------------------------------------------------------------- one process


_HOLD = "import sys, time; from dtg.engine.run_folder import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_the_lock_is_one_process_at_a_time_and_goes_with_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, env=ENV,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunFolderError) as e:
            RunLock(tmp_path / "run").acquire()
        assert str(e.value) == (f"{tmp_path / 'run'}: in use by another process (PID {holder.pid}); wait for it to "
                                f"end, or use another output folder")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = RunLock(tmp_path / "run").acquire()  # released by the OS, kill -9 included
        assert (tmp_path / "run" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        holder.kill()
    # A forked child (a DataLoader worker) does not keep it: it goes when the process that took it lets go.
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(told, b"up")  # after fork's hooks
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(ready, 2) == b"up"
        assert not RunLock(tmp_path / "run").try_acquire()
        lock.release()
        assert RunLock(tmp_path / "run").try_acquire(), "the living child still held the lock"
    finally:
        os.waitpid(pid, 0)


# ----------------------------------------------------------------------------- one config


def _held(tmp_path: Path, cfg, finished: bool = False, record: str = "config.yaml") -> Path:
    """A folder that holds a run of ``cfg``: its config record, a last.pth, metrics.json when finished."""
    out = Path(cfg.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    save_config(cfg, out / record)
    (out / "checkpoints" / "last.pth").write_bytes(b"weights")
    if finished:
        (out / "metrics.json").write_text(json.dumps({"method": cfg.method, "teacher": {"AP": 0.5}}))
    return out


def _claim(cfg, resume=None, overwrite=False, force=False, log=None):
    held = claim(cfg, resume, overwrite, force, (log if log is not None else []).append)
    held.release()
    return held


def test_a_folder_is_refused_to_another_config_and_kept_for_its_own(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "method=dtg"])
    out = _held(tmp_path, cfg)
    other = load_config(None, [f"output_dir={out}", "method=sparse", "threads=2"])
    with pytest.raises(RunFolderError) as e:
        _claim(other)
    assert str(e.value) == (f"{out}: holds a run with another config (method: dtg there, sparse here); use another "
                            f"--output-dir, or --overwrite to replace it")
    with pytest.raises(RunFolderError, match="another config"):
        _claim(other, force=True)  # --force retrains this config's run only
    with pytest.raises(RunFolderError) as e:  # unfinished: only --resume continues it
        _claim(load_config(None, [f"output_dir={out}", "method=dtg", "threads=2"]))
    assert str(e.value) == (f"{out}: holds an unfinished run of this config (checkpoints/last.pth); continue it "
                            f"with --resume auto, or start it over with --force")
    assert not _claim(cfg, resume="auto").finished
    (out / "metrics.json").write_text(json.dumps({"teacher": {"AP": 0.5}}))
    log: list[str] = []
    done = _claim(cfg, resume="auto", log=log)
    assert done.finished and done.summary == {"teacher": {"AP": 0.5}}
    assert log == [f"{out}: holds the finished run of this config (metrics.json); nothing to train (--force trains "
                   f"it again)"]
    assert (out / "checkpoints" / "last.pth").is_file()
    log.clear()
    assert not _claim(cfg, force=True, log=log).finished
    assert not held_run(out).holds and not (out / "checkpoints").exists() and (out / LOCK_NAME).is_file()
    assert log[-1] == f"removed the previous run's checkpoints/, metrics.json, config.yaml from {out}"
    _held(tmp_path, cfg, finished=True)
    log.clear()
    assert not _claim(other, overwrite=True, log=log).finished and not held_run(out).holds
    assert "--overwrite; it held a run with another config, method: dtg there, sparse here" in log[0]


def test_a_sweeps_run_yaml_speaks_for_a_folder_the_trainer_has_not_written_yet(tmp_path):
    # dtg bench reproduce copies a twin's checkpoints and writes run.yaml before dtg train ever ran there.
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "method=supervised"])
    out = _held(tmp_path, cfg, record="run.yaml")
    assert not _claim(cfg, resume="auto").finished
    # A supervised run is the same run for configs that differ only in what it does not read.
    assert not _claim(load_config(None, [f"output_dir={out}", "semi.alpha=3"]), resume="auto").finished
    (out / "run.yaml").write_text("not: [yaml")
    with pytest.raises(RunFolderError, match="its config cannot be read from run.yaml"):
        _claim(cfg, resume="auto")


# ----------------------------------------------------------------------------- dtg train, as a new user would


def _sha(folder: Path) -> dict[str, str]:
    files = [*sorted((folder / "checkpoints").iterdir()), folder / "metrics.json", folder / "config.yaml"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _train(config: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dtg", "train", "--config", str(config), "--output-dir", str(out),
                             "--no-progress", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


@pytest.mark.slow
def test_two_train_commands_on_one_folder_the_second_is_refused_and_changes_nothing(tiny_dataset, tmp_path):
    out = tmp_path / "X"
    semi = ("data.batch_unlabeled=1", "semi.burn_in=2", "semi.alpha_warmup=1", "threads=1", "checkpoint_period=1")
    configs = {}
    for method in ("dtg", "sparse"):
        configs[method] = tmp_path / f"{method}.yaml"
        save_config(tiny_config(tiny_dataset, tmp_path / "unused", f"method={method}", "solver.max_iter=12",
                                "solver.steps=[9]", *semi), configs[method])
    first = _train(configs["dtg"], out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoints" / "last.pth").is_file():
        time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # still training (paused, so that it cannot end before the second starts)
    try:
        assert first.poll() is None, first.communicate()
        second = _train(configs["sparse"], out)
        stdout, stderr = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and stdout == ""
    assert stderr.splitlines() == [f"dtg: error: {out}: in use by another process (PID {first.pid}); wait for it "
                                   f"to end, or use another output folder"]
    assert first.communicate(timeout=300) and first.returncode == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "dtg"
    before = _sha(out)
    # the finished dtg run, then another config into its folder
    second = _train(configs["sparse"], out)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 2 and stdout == ""
    assert stderr.splitlines() == [f"dtg: error: {out}: holds a run with another config (method: dtg there, sparse "
                                   f"here); use another --output-dir, or --overwrite to replace it"]
    assert _sha(out) == before
    # the same config again: said, not trained
    again = _train(configs["dtg"], out, "--set", "threads=2")
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0 and "| dtg (teacher) |" in stdout
    assert stderr.splitlines() == [f"{out}: holds the finished run of this config (metrics.json); nothing to train "
                                   f"(--force trains it again)"]
    assert _sha(out) == before


@pytest.mark.slow
def test_an_unfinished_run_is_continued_only_with_resume(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "run", "solver.max_iter=3", "solver.steps=[2]"), config)
    assert main(["train", "--config", str(config), "--stop-at", "1", "--no-progress"]) == 0
    last = (tmp_path / "run" / "checkpoints" / "last.pth").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"dtg: error: {tmp_path / 'run'}: holds an unfinished run of this config (checkpoints/last.pth); "
                   f"continue it with --resume auto, or start it over with --force"]
    assert (tmp_path / "run" / "checkpoints" / "last.pth").read_bytes() == last
    assert main(["train", "--config", str(config), "--no-progress", "--resume", "--force"]) == 2
    assert "--force starts the run over and --resume continues it" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--no-progress", "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iterations"] == 3


# ----------------------------------------------------------------------------- sweeps: a run another process trains


def test_a_sweep_waits_for_a_run_another_process_holds_then_reads_it_as_cached(tmp_path, monkeypatch):
    import threading

    run = Run("k", load_config(None, [f"output_dir={tmp_path / 'k'}"]), tmp_path / "k", [("supervised", 0)])
    other = RunLock(run.out).acquire()  # another sweep's lock (a lock of this process is another holder too)
    (run.out / "progress.json").write_text(json.dumps({"method": "supervised", "iteration": 3, "total": 10,
                                                       "it_per_s": 2.0, "eta_s": 4, "losses": {}}))
    lines = ProgressMonitor({}, print, waiting={run.key: (run, "4242")}).lines()
    assert lines == ["supervised/seed 0 (waiting: PID 4242 trains it) 3/10 (30 %), 2.00 it/s, ETA 0:04"]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("trained a run another process holds"))
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(run_one(run, threads=1)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not result
    run.metrics_path.write_text("{}")  # the other process finished it
    other.release()
    waiter.join(timeout=10)
    assert result == [("cached", 0.0)]


# ----------------------------------------------------------------------------- under torchrun


def _rank(rank: int, port: int, cfgs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    seen = {}
    for name, cfg in cfgs.items():
        try:
            held = claim(cfg, None, False, False, lambda m: None)
            seen[name] = {"finished": held.finished, "locked": held.lock is not None, "summary": held.summary}
            held.release()
        except RunFolderError as e:
            seen[name] = {"error": str(e)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_under_torchrun_rank_0_claims_the_folder_and_every_rank_follows_its_decision(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = load_config(None, [f"output_dir={tmp_path / 'done'}", "device=cpu"])
    _held(tmp_path, done, finished=True)
    other = load_config(None, [f"output_dir={tmp_path / 'other'}", "device=cpu", "method=sparse"])
    _held(tmp_path, load_config(None, [f"output_dir={tmp_path / 'other'}"]))
    fresh = load_config(None, [f"output_dir={tmp_path / 'fresh'}", "device=cpu"])
    mp.start_processes(_rank, args=(port, {"done": done, "other": other, "fresh": fresh}, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    summary = {"method": "supervised", "teacher": {"AP": 0.5}}
    assert r0["done"] == {"finished": True, "locked": True, "summary": summary}
    assert r1["done"] == {"finished": True, "locked": False, "summary": None}  # rank 0 alone takes the lock
    assert r0["other"] == r1["other"] and "holds a run with another config (method: supervised there" in r0["other"]["error"]
    assert r0["fresh"] == {"finished": False, "locked": True, "summary": None} and r1["fresh"]["finished"] is False
