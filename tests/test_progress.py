"""Progress: ``progress.json`` and plain lines from a run without a terminal, and the parent's per-run lines."""

from __future__ import annotations

import json
import time

from dtg.config import Config
from dtg.engine.trainer import Trainer
from dtg.progress import progress_line, progress_state
from dtg.run_exec import ProgressMonitor, Run

from conftest import tiny_config


def test_progress_line_and_state_on_hand_made_numbers():
    state = progress_state("dtg", 420, 1000, 210.0, 400, {"loss": 0.8123, "unsup_rcnn_cls": 0.1, "other": 5.0})
    assert state["it_per_s"] == 400 / 210.0 and abs(state["eta_s"] - 580 / (400 / 210.0)) < 1e-9
    assert state["losses"] == {"loss": 0.8123, "unsup_rcnn_cls": 0.1}  # the main losses only
    assert progress_line(state) == "dtg 420/1000 (42 %), 1.90 it/s, ETA 5:04, loss 0.812 unsup_rcnn_cls 0.100"
    assert progress_line(progress_state("sparse", 0, 10, 0.0, 0, {}), "sparse/seed 1") == \
        "sparse/seed 1 0/10 (0 %), 0.00 it/s, ETA ?"
    assert "ETA 1:02:05" in progress_line(progress_state("x", 0, 3725, 1.0, 1, {}))


def test_training_without_a_terminal_writes_progress_json_and_plain_lines(tiny_dataset, tmp_path, capsys):
    cfg = tiny_config(tiny_dataset, tmp_path / "r", "solver.max_iter=2")
    Trainer(cfg, log=lambda m: None, progress=True).train()
    err = capsys.readouterr().err
    assert "[train] supervised 2/2 (100 %)" in err and "\r" not in err  # no redrawn bar in a log (eval included)
    state = json.loads((tmp_path / "r" / "progress.json").read_text())
    assert state["iteration"] == state["total"] == 2 and state["method"] == "supervised" and "loss" in state["losses"]


def _write_progress(folder, state):
    """``progress.json`` written atomically, as the trainer writes it: the monitor's thread reads it meanwhile,
    and a half-written file (read under load) would be a run "starting"."""
    tmp = folder / "progress.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "progress.json")


def test_monitor_prints_one_line_per_running_run(tmp_path):
    a, b = Run("a", Config(), tmp_path / "a", [("dtg", 0)]), Run("b", Config(), tmp_path / "b", [("sparse", 1)])
    a.out.mkdir()
    _write_progress(a.out, progress_state("dtg", 5, 10, 2.0, 5, {"loss": 1.0}))
    lines: list[str] = []
    monitor = ProgressMonitor({"a": a, "b": b}, lines.append, every=0.05)
    assert monitor.lines() == ["dtg/seed 0 5/10 (50 %), 2.50 it/s, ETA 0:02, loss 1.000", "sparse/seed 1: starting"]
    monitor.last.clear()
    monitor.start()
    time.sleep(0.3)  # several rounds, nothing moved: each run's line is logged once
    _write_progress(a.out, progress_state("dtg", 6, 10, 2.4, 6, {"loss": 0.9}))
    time.sleep(0.3)  # run a moved: its new line, once
    monitor.say("trained a")
    monitor.stop()
    assert "trained a" in lines and lines.count("sparse/seed 1: starting") == 1
    assert [ln for ln in lines if ln.startswith("dtg/seed 0")] == [
        "dtg/seed 0 5/10 (50 %), 2.50 it/s, ETA 0:02, loss 1.000", "dtg/seed 0 6/10 (60 %), 2.50 it/s, ETA 0:02, loss 0.900"]


def test_monitor_prints_each_note_of_a_run_once(tmp_path):
    """The teacher targets' lines (progress.json's notes) reach ``dtg demo`` / ``dtg bench reproduce``: once
    each, before the progress lines, and those a run wrote after the last round when it ends."""
    a = Run("a", Config(), tmp_path / "a", [("dtg", 0)])
    a.out.mkdir()
    write = lambda it, notes: _write_progress(a.out, progress_state("dtg", it, 10, 1.0, it, {"loss": 1.0}, notes))  # noqa: E731
    write(5, ["start line"])
    lines: list[str] = []
    monitor = ProgressMonitor({"a": a}, lines.append, every=0.05)
    monitor.start()
    time.sleep(0.3)
    write(6, ["start line", "WARNING one"])
    time.sleep(0.3)
    write(7, ["start line", "WARNING one", "WARNING two"])  # written after the last round ...
    monitor.stop()
    monitor.flush_notes(a)  # ... shown when the run ends
    monitor.flush_notes(a)
    notes = [ln for ln in lines if not ln.startswith("dtg/seed 0 ")]
    assert notes == ["dtg/seed 0: start line", "dtg/seed 0: WARNING one", "dtg/seed 0: WARNING two"]
    assert lines.index("dtg/seed 0: start line") < lines.index("dtg/seed 0 5/10 (50 %), 5.00 it/s, ETA 0:01, loss 1.000")
