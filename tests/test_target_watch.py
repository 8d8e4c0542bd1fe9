"""The watch of the teacher's targets (:mod:`dtg.engine.target_watch`): the pure detector of episodes on
hand-made period means, the hook on a fake target stream, the methods' figures, one short real run."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
import torch

from dtg.config import load_config
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.target_watch import Event, FigureWatch, TargetWatchHook, WatchRule
from dtg.methods import build_method
from dtg.run_exec import Run, run_one

from conftest import tiny_config

START = "teacher targets per image at the start of the unlabeled phase"


def feed(watch: FigureWatch, values: list[float]) -> list[tuple[int, str]]:
    """(period index, event kind) of every event ``values`` cause."""
    return [(i, e.kind) for i, v in enumerate(values) for e in watch.update(v)]


def noisy(rng: random.Random, level: float, n: int, spread: float = 0.3) -> list[float]:
    return [level * rng.uniform(1 - spread, 1 + spread) for _ in range(n)]


def test_a_healthy_figure_only_gets_its_start():
    rng = random.Random(0)
    # noise of +-30 % per period, a slow drift to 1.8x, one period at 0 and one at 4x: no episode
    values = noisy(rng, 10, 10) + [0.0] + noisy(rng, 12, 10) + [40.0] + [10 + 0.4 * i for i in range(20)]
    watch = FigureWatch()
    assert feed(watch, values) == [(2, "start")]
    assert watch.reference == pytest.approx(sum(values[:3]) / 3) and watch.episode is None


def test_nothing_from_the_start_warns_at_the_start_and_once():
    watch = FigureWatch()
    assert feed(watch, [0.0] * 10) == [(2, "start"), (2, "nothing")]
    assert feed(watch, [0.5, 0.5, 0.5]) == [(0, "normal")]  # anything at all ends "nothing" of a 0 start
    assert feed(watch, [0.0] * 5) == [(2, "nothing")]  # re-armed


def test_a_collapse_warns_once_then_once_more_at_nothing_and_rearms_when_back():
    watch = FigureWatch()
    values = [12.0, 11.0, 12.5, 9.0, 6.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    events = feed(watch, values)
    assert events == [(2, "start"), (7, "collapse"), (10, "nothing")]  # (3 + 1 + 0.5) / 3 < 11.83 / 4
    back = feed(watch, [4.0, 8.0, 10.0, 11.0, 12.0])
    assert back == [(2, "normal")]  # the window's mean 7.3 >= half the start (the re-arm band), not at 4.0
    assert feed(watch, [1.0, 1.0, 1.0, 1.0]) == [(2, "collapse")]  # a second episode, a second line


def test_an_explosion_warns_once_and_a_small_start_has_a_floor():
    watch = FigureWatch()
    values = [5.5, 5.7, 5.9] + [8.0, 12.0, 18.0, 24.0, 30.0, 34.0, 34.0, 33.0]
    assert feed(watch, values) == [(2, "start"), (6, "explosion")]  # (12 + 18 + 24) / 3 > 3 x 5.7
    assert feed(watch, [6.0, 6.0, 6.0]) == [(2, "normal")]
    small = FigureWatch()  # 0.3 pseudo boxes at the start growing to 2.5: 8x, but under 3 x the floor of 1
    assert feed(small, [0.3, 0.3, 0.3, 1.0, 2.0, 2.5, 2.5, 2.5]) == [(2, "start")]
    assert feed(small, [6.0, 6.0, 6.0]) == [(0, "explosion")]  # (2.5 + 2.5 + 6) / 3 > 3


def test_the_rule_is_a_parameter_and_the_state_round_trips():
    rule = WatchRule(reference_periods=1, window=1, low=0.5)
    watch = FigureWatch(rule)
    assert watch.update(10.0) == [Event("start", 10.0, 10.0)]
    assert watch.update(4.9) == [Event("collapse", 10.0, 4.9)]
    copy = FigureWatch(rule)
    copy.load_state_dict(json.loads(json.dumps(watch.state_dict())))  # plain JSON: fits a checkpoint
    assert copy.update(10.0) == watch.update(10.0) == [Event("normal", 10.0, 10.0)]


# ----------------------------------------------------------------------------- the hook on a fake stream


class FakeTrainer:
    """What the hook reads of a trainer: ``cfg``, ``iteration``, ``scalars``, ``logged``, ``log``."""

    def __init__(self, *overrides: str) -> None:
        self.cfg = load_config(None, list(overrides))
        self.iteration, self.scalars, self.logged, self.lines = 0, {}, None, []
        self.log = self.lines.append


def drive(hook: TargetWatchHook, trainer: FakeTrainer, stream: list[dict[str, float]], log_period: int = 2,
          start: int = 0) -> list[str]:
    """One step per entry of ``stream`` (its stats; {} in the burn-in), logging every ``log_period``."""
    hook.trainer = trainer
    for i, stats in enumerate(stream, start=start + 1):
        trainer.iteration, trainer.scalars = i, {"loss": 1.0, **stats}
        trainer.logged = trainer.scalars if i % log_period == 0 else None
        hook.after_step()
    return trainer.lines


def dtg_hook(*overrides: str) -> tuple[TargetWatchHook, FakeTrainer]:
    trainer = FakeTrainer("method=dtg", "dtg.rpn.targets=dtg", *overrides)  # dense in both stages
    return TargetWatchHook(build_method(trainer.cfg, torch.device("cpu")).target_figures()), trainer


Curve = Callable[[float], float]


def dtg_stream(rng: random.Random, n: int, rcnn: Curve, rpn: Curve) -> list[dict[str, float]]:
    """Per step: R-CNN / RPN clusters at ``rcnn(t)`` / ``rpn(t)`` (t in 0..1) with noise, 4x as many members."""
    out = []
    for i in range(n):
        c, r = rcnn(i / n) * rng.uniform(0.6, 1.4), rpn(i / n) * rng.uniform(0.6, 1.4)
        out.append({"rcnn_clusters_per_image": c, "rcnn_members_per_image": 4 * c,
                    "rpn_clusters_per_image": r, "rpn_members_per_image": 4 * r})
    return out


def test_a_healthy_dtg_stream_gets_the_start_line_only():
    rng = random.Random(1)
    hook, trainer = dtg_hook()
    stream = [{}] * 10 + dtg_stream(rng, 200, lambda t: 4 + 3 * t, lambda t: 15 - 5 * t)  # a drift, no episode
    lines = drive(hook, trainer, stream)
    assert len(lines) == 1 and lines[0].startswith(f"{START} (iterations 11-16): R-CNN clusters ")
    assert all(f"{name} " in lines[0] for name in ("R-CNN members", "RPN clusters", "RPN members"))


def test_the_testbed_row_warns_per_stage_with_its_figures_and_keys():
    """``dtg-paper`` on the testbed: RPN clusters 11.8 -> 0, R-CNN clusters 5.7 -> 34 (the issue's numbers)."""
    rng = random.Random(2)
    overrides = ("dtg.normalize=cluster", "dtg.rpn.tau=0.9", "dtg.rpn.uncertain=1.0", "dtg.rcnn.uncertain=1.0")
    hook, trainer = dtg_hook(*overrides)
    stream = [{}] * 10 + dtg_stream(rng, 300, lambda t: 5.7 + 28.3 * t, lambda t: 11.8 * max(0.0, 1 - 3 * t))
    lines = drive(hook, trainer, stream, log_period=10)
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    assert lines[0].startswith(START) and len(warnings) == 3, lines
    rpn = [ln for ln in warnings if "RPN clusters" in ln]
    assert ["collapsed below 0.25x" in rpn[0], "none for 3 logged periods" in rpn[1]] == [True, True]
    assert all(ln.endswith("set by dtg.rpn.tau=0.9, dtg.rpn.uncertain=1.0") and "RPN members" in ln for ln in rpn)
    assert "-> 0.00" in rpn[1] and "R-CNN" not in "".join(rpn)
    (rcnn,) = [ln for ln in warnings if "R-CNN clusters" in ln]
    assert "exploded above 3x" in rcnn and rcnn.endswith("set by dtg.rcnn.tau=0.45, dtg.rcnn.uncertain=1.0")
    start = float(rcnn.split("R-CNN clusters ")[1].split(" ->")[0])
    assert 4 < start < 8  # the reference: the first 3 logged periods of the unlabeled phase


def test_a_sparse_stream_that_dries_up_names_the_threshold_and_goes_to_the_progress_hook():
    trainer = FakeTrainer("method=sparse", "sparse.pseudo_score_thresh=0.9")
    said: list[str] = []
    hook = TargetWatchHook(build_method(trainer.cfg, torch.device("cpu")).target_figures(), say=said.append)
    stream = [{}] * 4 + [{"pseudo_boxes_per_image": 0.75}] * 6 + [{"pseudo_boxes_per_image": 0.0}] * 10
    drive(hook, trainer, stream)
    assert trainer.lines == [] and said[0] == f"{START} (iterations 5-10): pseudo boxes 0.75"
    # a sudden drop: three logged periods at 0 say "nothing" at once (no "collapsed" line before it)
    assert len(said) == 2 and said[1].startswith("WARNING teacher targets at iteration 16: none for 3 logged periods")
    assert said[1].endswith("pseudo boxes 0.75 -> 0.00 per image (the start of the unlabeled phase -> the mean of "
                            "the last 3 logged periods); set by sparse.pseudo_score_thresh=0.9, "
                            "sparse.uncertain_score_thresh=0.3")


def test_the_hook_resumes_where_it_stopped_and_methods_without_figures_are_silent():
    rng = random.Random(3)
    stream = [{}] * 4 + dtg_stream(rng, 60, lambda t: 6.0, lambda t: 10 * (1 - t))
    whole = drive(*dtg_hook(), stream)
    first, trainer = dtg_hook()
    drive(first, trainer, stream[:21])  # stops mid-period (log_period 2)
    second, resumed = dtg_hook()
    second.load_state_dict(json.loads(json.dumps({"iteration": 21, **first.state_dict()})))
    assert trainer.lines + drive(second, resumed, stream[21:], start=21) == whole
    assert any("collapsed" in ln for ln in whole)
    fresh, t = dtg_hook()
    fresh.load_state_dict({"iteration": 3})  # a checkpoint from before the watch: it starts over
    assert fresh.first is None
    for method in ("supervised", "oracle"):
        trainer = FakeTrainer(f"method={method}")
        hook = TargetWatchHook(build_method(trainer.cfg, torch.device("cpu")).target_figures())
        assert drive(hook, trainer, [{"pseudo_boxes_per_image": 0.0}] * 20) == []


def test_each_method_names_its_figures_and_keys():
    def figures(*overrides: str) -> list[tuple[str, str, tuple[str, ...]]]:
        cfg = load_config(None, list(overrides))
        return [(f.stat, f.label, f.keys) for f in build_method(cfg, torch.device("cpu")).target_figures()]

    assert figures("method=sparse") == [
        ("pseudo_boxes_per_image", "pseudo boxes", ("sparse.pseudo_score_thresh", "sparse.uncertain_score_thresh"))]
    rpn = ("dtg.rpn.tau", "dtg.rpn.uncertain")
    assert figures("method=dtg", "dtg.rpn.targets=dtg", "dtg.rcnn.enabled=false") == [
        ("rpn_clusters_per_image", "RPN clusters", rpn), ("rpn_members_per_image", "RPN members", rpn)]
    hybrid = figures("method=dtg", "dtg.rpn.targets=sparse", "sparse.class_thresholds=[0.5]")
    assert [s for s, _, _ in hybrid] == ["rcnn_clusters_per_image", "rcnn_members_per_image", "pseudo_boxes_per_image"]
    assert hybrid[-1][1:] == ("RPN pseudo boxes", ("sparse.class_thresholds", "sparse.uncertain_score_thresh"))
    assert figures("method=supervised") == figures("method=oracle") == []


@pytest.mark.slow
def test_a_short_real_run_writes_the_burn_in_line_into_train_log(tiny_dataset, tmp_path):
    """``dtg train`` as ``dtg bench reproduce`` runs it: the line in train.log and in progress.json's notes."""
    cfg = tiny_config(tiny_dataset, tmp_path / "r", "method=dtg", "dtg.rpn.targets=dtg", "semi.burn_in=2", "solver.max_iter=7",
                      "solver.steps=[]", "data.batch_unlabeled=1", "checkpoint_period=100", "target_images=0",
                      "dtg.rcnn.tau=0.1", "dtg.rcnn.uncertain=0.05", "dtg.rpn.tau=0.3", "dtg.rpn.uncertain=0.2")
    run = Run("r", cfg, tmp_path / "r")
    assert run_one(run, threads=1)[0] == "trained"
    log = (run.out / "train.log").read_text()
    (line,) = [ln for ln in log.splitlines() if ln.startswith(START)]
    assert line.startswith(f"{START} (iterations 3-5): R-CNN clusters ")
    assert "RPN members" in line and "WARNING" not in log  # these thresholds leave targets on a random teacher
    assert json.loads((run.out / "progress.json").read_text())["notes"] == [line]
    watch = load_checkpoint(run.out / "checkpoints" / "last.pth")["target_watch"]  # what a resume reads back
    assert watch["first"] == 3 and watch["figures"]["rpn_clusters_per_image"]["reference"] > 0
