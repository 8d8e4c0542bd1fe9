"""The training loop: draw a mixed batch, take one step, then the hooks (:mod:`dtg.engine.hooks`:
TensorBoard, the watch of the teacher's targets, progress, evaluation and ``best.pth``, target
quality, checkpoints), each keeping its own state. Every method runs this same loop; the step
(:mod:`dtg.engine.step`) adds the method's unlabeled loss, the method names the figures of its
targets that are watched, and the trainer never asks which method it runs.

The same loop runs in one process or in each of ``W`` torchrun processes (:mod:`dtg.dist`):
each rank draws its own share of the global batch, the student is synchronised by DDP, the
teacher is EMA'd identically everywhere, evaluation is sharded, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from dtg.config import Config
from dtg.data.dataset import Sources, load_sources, train_loader
from dtg.dist import all_gather_objects, init_distributed, mean_scalars, run_on_main, sync_batchnorm
from dtg.engine.checkpoint import (
    CheckpointError, atomic_save, init_weights, load_checkpoint, restore_training, rng_state, training_state,
)
from dtg.engine.hooks import (
    CheckpointHook, EvalHook, HookBase, ProgressHook, TargetQualityHook, TensorBoardHook, is_log_iteration,
    target_records,
)
from dtg.engine.runtime import (  # noqa: F401  (TrainingError, resolve_device: public here too)
    TrainingError, prepare_output_dir, resolve_device, seed_everything, use_cpu_kernels,
)
from dtg.engine.step import TrainStep
from dtg.engine.target_watch import TargetWatchHook
from dtg.evaluation.coco_eval import write_results
from dtg.evaluation.inference import evaluate_model
from dtg.methods import build_method
from dtg.models.detector import Detector
from dtg.models.ema import make_teacher
from dtg.run_identity import dataset_fingerprint, provenance

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class Trainer:
    """Builds data, models and the step from a :class:`Config` and runs the loop.

    Under torchrun it joins the process group first; ``log`` and ``progress`` then
    apply to rank 0 only.

    Args:
        cfg: the resolved configuration.
        log: where one-line messages go (validation problems, summaries).
        progress: show a progress bar.
    """

    def __init__(self, cfg: Config, log: Callable[[str], None] = print, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.is_main = self.dist.is_main
        self.log: Callable[[str], None] = log if self.is_main else (lambda m: None)
        self.progress = progress and self.is_main
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        use_cpu_kernels(cfg.cpu_kernels)
        seed_everything(cfg.seed, cfg.deterministic)
        self.method = build_method(cfg, self.device)
        if self.method.uses_unlabeled and cfg.data.batch_unlabeled < 1:
            raise TrainingError(f"method '{cfg.method}' needs data.batch_unlabeled >= 1")
        self.data: Sources = load_sources(cfg.data, self.method.uses_unlabeled, self.log,
                                          self.method.needs_unlabeled_boxes)
        self._check_classes()
        self.log(self.data.summary())
        weights = self.method.loss_weights()
        if weights:
            self.log("unlabeled loss terms and their weights (alpha(t) multiplies the weighted sum): "
                     + ", ".join(f"{k} {w:g}" for k, w in weights.items()))
        # What this run ran on (commit, data, versions, threads, CPU), for metrics.json.
        self.provenance = provenance(cfg, torch.get_num_threads(), dataset_fingerprint(cfg.data))
        self.model = Detector.from_config(cfg.model, self.labels.num_classes, cfg.data.test_size, cfg.data.test_max_size)
        self.model.to(self.device).train()
        # The teacher is copied from the student at iteration 0; on resume it is restored, not re-copied.
        self.teacher: Detector = make_teacher(self.model)
        if self.dist.enabled:  # the teacher (eval mode only) keeps plain BN layers
            self.model = sync_batchnorm(self.model, self.device)
        self.step = TrainStep(cfg, self.model, self.teacher, self.method, self.dist, self.device, self.log)
        self.iteration = 0
        self.scalars: dict[str, float] = {}  # this rank's values of the last step
        self.logged: dict[str, float] | None = None  # every rank's mean of them, at a log iteration
        self.stopped_early = False
        self.hooks: list[HookBase] = []
        self.register_hooks(self.default_hooks())
        need = sum(p.numel() for p in self.model.parameters()) * 4 * 4 + (64 << 20)
        error = run_on_main(self.dist, lambda: prepare_output_dir(self.out, need, cfg, self.log), (TrainingError,))
        if error:
            raise TrainingError(error)

    @property
    def labels(self):  # noqa: ANN201 - LabelMap
        return self.data.labels

    def _check_classes(self) -> None:
        n = self.labels.num_classes
        if self.cfg.model.num_classes not in (None, n):
            raise TrainingError(
                f"{self.cfg.data.train_json}: declares {n} categories but model.num_classes is {self.cfg.model.num_classes}"
            )
        given = len(self.cfg.sparse.class_thresholds)
        if given not in (0, n):
            raise TrainingError(f"config key 'sparse.class_thresholds': {given} values for the {n} categories of "
                                f"{self.cfg.data.train_json} (one per category, in id order, or [])")

    # ------------------------------------------------------------------ hooks
    def default_hooks(self) -> list[HookBase]:
        """TensorBoard, the watch of the method's targets, progress, evaluation (+ ``best.pth``), target
        quality, checkpoints, in that order."""
        cfg = self.cfg
        tb = TensorBoardHook(self.out / "tb", enabled=self.is_main)
        progress = ProgressHook(self.out, show=self.progress, write=self.is_main)
        records = target_records(cfg, self.is_main and self.method.uses_unlabeled, self.log)
        return [
            tb,
            # before the progress hook, so that its lines are in this iteration's progress.json
            TargetWatchHook(self.method.target_figures(), say=progress.note),
            progress,
            EvalHook(cfg.eval_period, tb),
            TargetQualityHook(records, tb),
            CheckpointHook(cfg.checkpoint_period, list(cfg.checkpoint_at)),
        ]

    def register_hooks(self, hooks: list[HookBase]) -> None:
        """Append ``hooks`` (called in list order after those already registered)."""
        for h in hooks:
            h.trainer = self
        self.hooks.extend(hooks)

    def _loader(self, start_batch: int) -> torch.utils.data.DataLoader:
        n_u = self.cfg.data.batch_unlabeled if self.method.uses_unlabeled else 0
        return train_loader(self.data, self.cfg.data, n_u, self.cfg.seed, self.dist.rank, self.dist.world_size, start_batch)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state; identical on every rank (a collective under torchrun)."""
        rngs = all_gather_objects(self.dist, rng_state())  # every rank's generators: exact resume per rank
        hook_state: dict[str, Any] = {}
        for h in self.hooks:
            hook_state.update(h.state_dict())
        return training_state(self.model, self.teacher, self.step, self.iteration, self.cfg, self.labels.categories,
                              hook_state, rngs, self.dist.world_size)

    def save(self, name: str) -> Path:
        """Rank 0 writes ``checkpoints/NAME`` atomically; a failed write fails every rank (one line)."""
        path = self.out / "checkpoints" / name
        state = self.state_dict()
        error = run_on_main(self.dist, lambda: atomic_save(state, path), (CheckpointError,))
        if error:
            raise CheckpointError(error)
        if name == "last.pth":
            self.step.last_checkpoint = (path, self.iteration)
        return path

    def resume(self, path: str | Path) -> None:
        """Continue exactly where the checkpoint at ``path`` stopped."""
        ckpt = load_checkpoint(path)
        self.iteration, note = restore_training(
            ckpt, path, self.model, self.teacher, self.step, self.labels.categories, self.cfg.data.train_json,
            self.cfg.seed, self.dist.rank, self.dist.world_size,
        )
        for h in self.hooks:
            h.load_state_dict(ckpt)
        if note:
            self.log(note)
        self.step.last_checkpoint = (Path(path), self.iteration)
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def start(self, resume: str | None, init_from: str | None = None, init_iteration: int | None = None) -> None:
        """Where ``dtg train`` starts: ``resume`` (a checkpoint, or ``auto``: ``checkpoints/last.pth`` when it
        exists), else the weights of ``init_from`` (:meth:`init_from`), else scratch."""
        if resume:
            path = self.out / "checkpoints" / "last.pth" if resume == "auto" else Path(resume)
            if resume != "auto" or path.is_file():
                self.resume(path)
                return  # a resumed run continues from its own checkpoint, not from init_from
            self.log(f"no checkpoint at {path}; starting from {'--init-from' if init_from else 'scratch'}")
        if init_from:
            self.init_from(init_from, init_iteration)

    def init_from(self, path: str | Path, iteration: int | None = None) -> None:
        """Start from the weights of the checkpoint at ``path`` (:func:`~dtg.engine.checkpoint.init_weights`).

        The schedule continues at ``iteration`` (default: the checkpoint's own iteration, so a
        supervised run's checkpoint at the end of burn-in starts the unlabeled phase at once);
        the optimizer starts fresh (its momentum belongs to the loss it was built for) with the
        learning rate of that iteration.
        """
        ckpt = load_checkpoint(path)
        start = init_weights(ckpt, path, self.model, self.teacher, self.labels.categories)
        self.iteration = start if iteration is None else int(iteration)
        if not 0 <= self.iteration < self.cfg.solver.max_iter:
            raise TrainingError(f"--init-iteration {self.iteration} is not in [0, solver.max_iter "
                                f"{self.cfg.solver.max_iter})")
        self.step.start_at(self.iteration)
        self.log(f"initialised from {path} (iteration {start}); training from iteration {self.iteration}")

    # ------------------------------------------------------------------ loop
    def train(self, stop_at: int | None = None) -> dict[str, Any] | None:
        """Run from ``self.iteration`` to ``solver.max_iter``; return the final metrics (on every rank).

        With ``stop_at`` below ``solver.max_iter``, stop after that iteration with ``last.pth``
        written and return None (no final evaluation, no ``metrics.json``): ``--resume``
        continues the same run, e.g. with another thread count.
        """
        cfg = self.cfg
        end = cfg.solver.max_iter if stop_at is None else min(stop_at, cfg.solver.max_iter)
        try:
            for h in self.hooks:
                h.before_train()
            loader = iter(self._loader(start_batch=self.iteration))
            t0 = time.perf_counter()
            while self.iteration < end:
                self.scalars = self.step(next(loader), self.iteration)
                self.iteration += 1
                self.logged = mean_scalars(self.dist, self.scalars) if is_log_iteration(cfg, self.iteration) else None
                for h in self.hooks:
                    h.after_step()
            elapsed = time.perf_counter() - t0
            self.stopped_early = self.iteration < cfg.solver.max_iter  # stopped early on request
            for h in self.hooks:
                h.after_train()
        finally:
            for h in self.hooks:
                h.close()
        if self.stopped_early:
            return None
        evaluation = next((h for h in self.hooks if isinstance(h, EvalHook)), None)
        metrics = evaluation.final if evaluation is not None else {}
        summary = {
            "method": cfg.method, "iterations": self.iteration, "train_seconds": round(elapsed, 1),
            "world_size": self.dist.world_size, "nonfinite_steps": self.step.nonfinite.total, **metrics,
            "provenance": self.provenance,
        }
        if self.is_main:
            (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary

    def evaluate(self, writer: SummaryWriter | None = None, final: bool = False) -> dict[str, Any]:
        """COCO metrics of the student and the teacher on the val set (every rank calls); ``{}`` without one.

        Their scalars go to ``writer`` (``student/*``, ``teacher/*``); ``final`` also writes
        ``results_<model>.json`` (rank 0). The AP history and ``best.pth`` are :class:`EvalHook`'s.
        """
        if self.data.val is None:
            return {}
        models = {"student": self.model, "teacher": self.teacher}
        out: dict[str, Any] = {}
        d = self.cfg.data
        for name, model in models.items():
            metrics, results = evaluate_model(
                model, self.data.val, self.labels, d.test_size, d.test_max_size, self.device,
                dist=self.dist, progress=self.progress and sys.stderr.isatty(), desc=f"eval {name}",
            )
            out[name] = metrics
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"{name}/{k}", v, self.iteration)
            if final and self.is_main:
                write_results(self.out / f"results_{name}.json", results)
        out["reported"] = "teacher"
        return out
