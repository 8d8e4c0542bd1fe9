"""The trainer's hooks (:mod:`dtg.engine.hooks`): order, the evaluation hook's best.pth, state across a resume."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.hooks import (
    CheckpointHook, EvalHook, HookBase, ProgressHook, TargetQualityHook, TensorBoardHook,
)
from dtg.engine.target_watch import TargetWatchHook
from dtg.engine.trainer import Trainer

from conftest import tiny_config

ENGINE = Path(__file__).resolve().parents[1] / "src" / "dtg" / "engine"


class FakeTrainer:
    """What :class:`EvalHook` reads of a trainer: ``evaluate`` returns the scripted teacher APs in turn."""

    def __init__(self, aps: list[float]) -> None:
        self.aps, self.saved, self.iteration, self.stopped_early = list(aps), [], 0, False
        self.cfg = type("C", (), {"solver": type("S", (), {"max_iter": 100})()})()
        self.hooks: list[HookBase] = []

    def evaluate(self, writer=None, final: bool = False) -> dict:
        ap = self.aps.pop(0)
        return {"student": {"AP": ap / 2}, "teacher": {"AP": ap}, "reported": "teacher"}

    def save(self, name: str) -> None:
        self.saved.append((name, self.iteration))


def test_eval_hook_saves_best_only_when_the_reported_ap_improves():
    trainer = FakeTrainer([0.1, 0.05, 0.2, 0.2, math.nan, 0.15])
    hook = EvalHook(period=1, tb=TensorBoardHook(Path("unused"), enabled=False))
    hook.trainer = trainer
    trainer.hooks = [hook]
    for it in range(1, 7):
        trainer.iteration = it
        hook.after_step()
    assert trainer.saved == [("best.pth", 1), ("best.pth", 3)]  # not on a tie, a NaN or a drop
    assert hook.best_ap == 0.2
    assert [h["iteration"] for h in hook.history] == [1, 2, 3, 4, 5, 6]
    assert hook.history[0] == {"iteration": 1, "student": 0.05, "teacher": 0.1}


def test_eval_hook_period_skips_the_last_iteration_and_after_train_evaluates_unless_stopped_early():
    trainer = FakeTrainer([0.1, 0.3])
    hook = EvalHook(period=50, tb=TensorBoardHook(Path("unused"), enabled=False))
    hook.trainer = trainer
    trainer.hooks = [hook]
    for it in (49, 50, 100):  # 100 = max_iter: left to the final evaluation
        trainer.iteration = it
        hook.after_step()
    assert [h["iteration"] for h in hook.history] == [50]
    trainer.stopped_early = True
    hook.after_train()
    assert hook.final == {} and len(hook.history) == 1
    trainer.stopped_early = False
    hook.after_train()
    assert hook.final["teacher"]["AP"] == 0.3 and trainer.saved == [("best.pth", 50), ("best.pth", 100)]


def test_eval_hook_state_round_trips_and_defaults_for_old_checkpoints():
    hook = EvalHook(period=0, tb=TensorBoardHook(Path("unused"), enabled=False))
    hook.best_ap, hook.history = 0.4, [{"iteration": 2, "student": 0.3, "teacher": 0.4}]
    other = EvalHook(period=0, tb=TensorBoardHook(Path("unused"), enabled=False))
    other.load_state_dict({"iteration": 2, **hook.state_dict()})
    assert other.best_ap == 0.4 and other.history == hook.history
    other.load_state_dict({"iteration": 2})  # a checkpoint without the entries
    assert other.best_ap == -1.0 and other.history == []


class Recorder(HookBase):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_train(self) -> None:
        self.calls.append(("before_train", self.name, self.trainer.iteration))

    def after_step(self) -> None:
        self.calls.append(("after_step", self.name, self.trainer.iteration, self.trainer.logged is not None))

    def after_eval(self, metrics) -> None:
        self.calls.append(("after_eval", self.name, self.trainer.iteration))

    def after_train(self) -> None:
        self.calls.append(("after_train", self.name, self.trainer.stopped_early))

    def close(self) -> None:
        self.calls.append(("close", self.name))


@pytest.mark.slow
def test_hooks_run_in_order_around_the_loop(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "r", "solver.max_iter=3", "log_period=2", "eval_period=2")
    t = Trainer(cfg, log=lambda m: None, progress=False)
    assert [type(h) for h in t.hooks] == [TensorBoardHook, TargetWatchHook, ProgressHook, EvalHook, TargetQualityHook,
                                         CheckpointHook]
    calls: list = []
    t.register_hooks([Recorder("a", calls), Recorder("b", calls)])
    t.train()
    assert calls == [
        ("before_train", "a", 0), ("before_train", "b", 0),
        ("after_step", "a", 1, False), ("after_step", "b", 1, False),
        # iteration 2: the evaluation hook (before a and b) evaluates and tells every hook
        ("after_eval", "a", 2), ("after_eval", "b", 2),
        ("after_step", "a", 2, True), ("after_step", "b", 2, True),
        ("after_step", "a", 3, True), ("after_step", "b", 3, True),  # the last step logs
        ("after_eval", "a", 3), ("after_eval", "b", 3),  # the final evaluation
        ("after_train", "a", False), ("after_train", "b", False),
        ("close", "a"), ("close", "b"),
    ]


@pytest.mark.slow
def test_eval_state_and_best_pth_survive_a_resume(tiny_dataset, tmp_path):
    """An interrupted run with periodic evaluation ends with the history, best_ap and best.pth of
    an uninterrupted one."""
    extra = ("solver.max_iter=4", "eval_period=1")
    whole = Trainer(tiny_config(tiny_dataset, tmp_path / "whole", *extra), log=lambda m: None, progress=False)
    summary = whole.train()
    Trainer(tiny_config(tiny_dataset, tmp_path / "split", *extra), log=lambda m: None, progress=False).train(stop_at=2)
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "split", *extra), log=lambda m: None, progress=False)
    t.resume(tmp_path / "split" / "checkpoints" / "last.pth")
    evaluation = next(h for h in t.hooks if isinstance(h, EvalHook))
    assert [h["iteration"] for h in evaluation.history] == [1, 2]  # restored by the hook
    resumed = t.train()
    assert resumed["teacher"] == summary["teacher"] and resumed["student"] == summary["student"]
    for name in ("last.pth", "best.pth"):
        a = load_checkpoint(tmp_path / "whole" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "split" / "checkpoints" / name)
        assert a["iteration"] == b["iteration"] and a["best_ap"] == b["best_ap"] and a["history"] == b["history"]
        for model in ("student", "teacher"):
            assert all(torch.equal(v, b[model][k]) for k, v in a[model].items()), (name, model)
    last = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pth")
    assert [h["iteration"] for h in last["history"]] == [1, 2, 3, 4]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # lazy (function-level) imports included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_engine_imports_a_runs_identity_never_its_execution():
    files = sorted(ENGINE.glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in _imported_modules(path) if m == "dtg.run_exec" or m.startswith("dtg.run_exec.")}
        assert not bad, (path.name, bad)
