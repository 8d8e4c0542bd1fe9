"""What happens around the training loop, one hook per job (detectron2's ``HookBase`` pattern).

The trainer builds the models, data, optimizer and method and runs the loop; after every step it
calls each hook's :meth:`HookBase.after_step` in order, and around the loop
:meth:`HookBase.before_train` / :meth:`HookBase.after_train`. Each hook keeps its own state; a hook
whose state must survive a resume returns it from :meth:`HookBase.state_dict` (the trainer puts it
into the checkpoint, :mod:`dtg.engine.checkpoint`) and reads it back in
:meth:`HookBase.load_state_dict`. The default hooks, in the order they run:

* :class:`TensorBoardHook`: the ``tb/`` event file and the logged ``train/*`` scalars;
* :class:`dtg.engine.target_watch.TargetWatchHook`: the teacher's targets per image at the start of
  the unlabeled phase, and a warning when they vanish, collapse or explode (through the progress hook);
* :class:`ProgressHook`: the progress bar, ``progress.json`` (with those lines) and the plain progress lines;
* :class:`EvalHook`: periodic and final evaluation, the AP history and ``best.pth``;
* :class:`TargetQualityHook`: ``targets/*`` scalars after each evaluation;
* :class:`CheckpointHook`: ``last.pth`` every ``checkpoint_period`` and at the end, kept ``iter_*.pth``.

Every rank runs every hook (evaluation and checkpoints are collectives); files are written by rank
0 only, as before.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dtg.config import Config, ConfigError
from dtg.data.coco import DatasetError
from dtg.progress import progress_line, progress_state
from dtg.run_identity import iteration_checkpoint

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm


class HookBase:
    """A hook the trainer calls around its loop; every method does nothing unless overridden.

    ``self.trainer`` is set when the trainer registers the hook. Within one call the trainer has
    ``iteration`` (steps done), ``scalars`` (this rank's values of the last step) and ``logged``
    (every rank's mean of them at a log iteration, else None).
    """

    trainer: Any  # the dtg.engine.trainer.Trainer that registered it (not imported: trainer imports hooks)

    def before_train(self) -> None:
        """Before the first step of this :meth:`dtg.engine.trainer.Trainer.train` call (fresh or resumed)."""

    def after_step(self) -> None:
        """After each step (``trainer.iteration`` already counts it)."""

    def after_eval(self, metrics: dict[str, Any]) -> None:
        """After each evaluation of :class:`EvalHook` (``metrics``: :meth:`dtg.engine.trainer.Trainer.evaluate`'s), before
        it updates the AP history and ``best.pth``."""

    def after_train(self) -> None:
        """After the last step, when the loop ended normally (``trainer.stopped_early`` says whether
        it stopped at ``stop_at`` before ``solver.max_iter``)."""

    def close(self) -> None:
        """Always, last, also when training failed: release files and bars."""

    def state_dict(self) -> dict[str, Any]:
        """Top-level checkpoint entries this hook needs after a resume (none by default)."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Read this hook's entries back from a whole training checkpoint ``ckpt``."""


def is_log_iteration(cfg: Config, iteration: int) -> bool:
    """Whether the step that ends at ``iteration`` logs its scalars (``log_period``, and the last step)."""
    return iteration % cfg.log_period == 0 or iteration == cfg.solver.max_iter


class TensorBoardHook(HookBase):
    """The TensorBoard writer (rank 0; ``writer`` is None elsewhere) and the ``train/*`` scalars."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder, self.enabled = folder, enabled
        self.writer: SummaryWriter | None = None

    def before_train(self) -> None:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            # Resuming at iteration i: what was logged at steps <= i (evaluation and checkpoint of i
            # included) is final; events after it are logged again, so TensorBoard drops the old ones from i + 1.
            it = self.trainer.iteration
            self.writer = SummaryWriter(str(self.folder), purge_step=it + 1 if it else None)

    def after_step(self) -> None:
        logged = self.trainer.logged
        if self.writer is not None and logged is not None:
            for k, v in logged.items():
                self.writer.add_scalar(f"train/{k}", v, self.trainer.iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressHook(HookBase):
    """The progress bar (a terminal), ``progress.json`` (rank 0; read by ``dtg demo`` / ``dtg bench
    reproduce``) and, without a terminal, a plain progress line at most every ``every`` s (and at the end).

    Args:
        out: the run's folder. show: show progress at all (rank 0 with ``progress``). write: write
            ``progress.json`` (rank 0).
    """

    def __init__(self, out: Path, show: bool, write: bool, every: float = 30.0) -> None:
        self.out, self.show, self.write, self.every = out, show, write, every
        self.plain = False
        self.bar: tqdm | None = None
        self.clock = (0.0, 0, 0.0)  # start time, its iteration, time of the last plain line
        self.notes: list[str] = []  # this process's lines for the user (progress.json keeps the last KEEP_NOTES)

    KEEP_NOTES = 20

    def note(self, line: str) -> None:
        """A line the user must see beside the progress (:mod:`dtg.engine.target_watch`): logged (above
        the bar on a terminal) and kept in ``progress.json``'s ``notes``, which the monitor of ``dtg demo``
        / ``dtg bench reproduce`` prints once (:class:`dtg.run_exec.ProgressMonitor`)."""
        self.notes = [*self.notes, line][-self.KEEP_NOTES:]
        if self.bar is not None and not self.bar.disable:
            with self.bar.external_write_mode(file=sys.stderr):
                self.trainer.log(line)
        else:
            self.trainer.log(line)

    def before_train(self) -> None:
        from tqdm import tqdm

        t, cfg = self.trainer, self.trainer.cfg
        # A redrawn bar on a terminal; in a log file (no terminal), plain progress lines instead.
        self.plain = self.show and not sys.stderr.isatty()
        self.bar = tqdm(
            total=cfg.solver.max_iter, initial=t.iteration, desc=f"train {cfg.method}",
            disable=not self.show or self.plain, dynamic_ncols=True, file=sys.stderr,
        )
        self.clock = (time.perf_counter(), t.iteration, time.perf_counter())

    def after_step(self) -> None:
        assert self.bar is not None
        self.bar.update(1)
        logged = self.trainer.logged
        if logged is None:
            return
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if k.endswith(("cls", "reg")) or k == "loss"})
        if self.write:
            self.report(logged)

    def report(self, scalars: dict[str, float]) -> None:
        """Write ``progress.json`` (atomically) and, when due, print a plain line."""
        start, start_it, last_line = self.clock
        cfg = self.trainer.cfg
        now, it, total = time.perf_counter(), self.trainer.iteration, cfg.solver.max_iter
        state = progress_state(cfg.method, it, total, now - start, it - start_it, scalars, self.notes)
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.out / "progress.json")
        if self.plain and (now - last_line >= self.every or it == total):
            print(f"[train] {progress_line(state)}", file=sys.stderr, flush=True)
            self.clock = (start, start_it, now)

    def after_train(self) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations (0: never; not at ``solver.max_iter``) and once at the end
    of the run; keeps the AP ``history`` and ``best_ap`` (in the checkpoint: they survive a resume)
    and writes ``best.pth`` whenever the reported (teacher) AP improves.

    Args:
        tb: where the metrics go (its ``writer``, rank 0).
    """

    def __init__(self, period: int, tb: TensorBoardHook) -> None:
        self.period, self.tb = period, tb
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}  # the final evaluation's metrics ({} without a val set)

    def after_step(self) -> None:
        it, max_iter = self.trainer.iteration, self.trainer.cfg.solver.max_iter
        if self.period > 0 and it % self.period == 0 and it < max_iter:
            self.evaluate()

    def after_train(self) -> None:
        if not self.trainer.stopped_early:
            self.final = self.evaluate(final=True)

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """One evaluation (every rank): metrics, every hook's :meth:`~HookBase.after_eval`, the
        history entry and, when the teacher's AP is the best so far, ``best.pth``."""
        t = self.trainer
        metrics = t.evaluate(self.tb.writer, final=final)
        if not metrics:  # no val set
            return metrics
        for hook in t.hooks:
            hook.after_eval(metrics)
        ap = metrics[metrics["reported"]]["AP"]
        self.history.append({"iteration": t.iteration, **{k: metrics[k]["AP"] for k in ("student", "teacher")}})
        if ap > self.best_ap and not math.isnan(ap):
            self.best_ap = ap
            t.save("best.pth")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"best_ap": self.best_ap, "history": self.history}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.best_ap = float(ckpt.get("best_ap", -1.0))
        self.history = list(ckpt.get("history", []))


def target_records(cfg: Config, enabled: bool, log: Callable[[str], None]) -> list:
    """Unlabeled images with boxes whose target quality goes to TensorBoard (empty: off)."""
    if not (enabled and cfg.target_images > 0 and cfg.data.full_json):
        return []
    if not Path(cfg.data.full_json).is_file():
        log(f"target quality not logged: {cfg.data.full_json} (data.full_json) not found")
        return []
    from dtg.evaluation.target_quality import unlabeled_with_boxes

    try:
        return unlabeled_with_boxes(cfg, cfg.target_images)
    except (ConfigError, DatasetError) as e:  # full_json is not these unlabeled images' boxes
        log(f"target quality not logged: {e}")
        return []


class TargetQualityHook(HookBase):
    """After each evaluation, ``targets/<stage>_<method>/<ratio>`` scalars of both methods' targets on
    ``records`` (docs/method.md, "Target quality"); nothing without records or a writer."""

    def __init__(self, records: list, tb: TensorBoardHook) -> None:
        self.records, self.tb = records, tb

    def after_eval(self, metrics: dict[str, Any]) -> None:
        if self.tb.writer is not None and self.records:
            self.log(self.tb.writer)

    def log(self, writer: SummaryWriter) -> None:
        from dtg.evaluation.target_quality import score_models

        t = self.trainer
        student = t.model.eval()
        try:
            summary = score_models(t.teacher, student, self.records, t.labels, t.cfg).summary()
        finally:
            t.model.train()
        for key, ratios in summary["quality"].items():
            for name, value in ratios.items():
                if value is not None:
                    writer.add_scalar(f"targets/{key.replace('/', '_')}/{name}", value, t.iteration)
        for level, share in enumerate(summary["paired_per_level"]):
            writer.add_scalar(f"targets/rpn_paired/P{level + 2}", share, t.iteration)


class CheckpointHook(HookBase):
    """``last.pth`` every ``period`` iterations, at ``solver.max_iter`` and when the loop ends (also at
    ``stop_at``, after the final evaluation otherwise); ``iter_NNNNNNN.pth`` at each iteration of ``keep``."""

    def __init__(self, period: int, keep: list[int]) -> None:
        self.period, self.keep = period, keep

    def after_step(self) -> None:
        t = self.trainer
        it = t.iteration
        if it % self.period == 0 or it == t.cfg.solver.max_iter:
            t.save("last.pth")
        if it in self.keep:
            t.save(iteration_checkpoint(it))

    def after_train(self) -> None:
        self.trainer.save("last.pth")
