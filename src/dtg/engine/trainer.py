"""The training loop: draw a mixed batch, take one step, then the after-step hooks
(logging, checkpoint, evaluation). Every method runs this same loop; the step
(:mod:`dtg.engine.step`) adds the method's unlabeled loss and the trainer never asks which
method it runs.

The same loop runs in one process or in each of ``W`` torchrun processes (:mod:`dtg.dist`):
each rank draws its own share of the global batch, the student is synchronised by DDP, the
teacher is EMA'd identically everywhere, evaluation is sharded, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtg.config import Config, ConfigError
from dtg.data.coco import DatasetError
from dtg.data.dataset import Sources, load_sources, train_loader
from dtg.dist import all_gather_objects, init_distributed, mean_scalars, run_on_main, sync_batchnorm
from dtg.engine.checkpoint import (
    CheckpointError, atomic_save, init_weights, load_checkpoint, restore_training, rng_state, training_state,
)
from dtg.engine.runtime import (  # noqa: F401  (TrainingError, resolve_device: public here too)
    TrainingError, prepare_output_dir, resolve_device, seed_everything, use_cpu_kernels,
)
from dtg.engine.step import TrainStep
from dtg.evaluation.coco_eval import write_results
from dtg.evaluation.inference import evaluate_model
from dtg.methods import build_method
from dtg.models.detector import Detector
from dtg.models.ema import make_teacher
from dtg.progress import progress_line, progress_state
from dtg.run_identity import dataset_fingerprint, iteration_checkpoint, provenance


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
        # What this run ran on (commit, data, versions, threads, CPU), for metrics.json.
        self.provenance = provenance(cfg, torch.get_num_threads(), dataset_fingerprint(cfg.data))
        self.model = Detector.from_config(cfg.model, self.labels.num_classes, cfg.data.test_size, cfg.data.test_max_size)
        self.model.to(self.device).train()
        # The teacher is copied from the student at iteration 0; on resume it is restored, not re-copied.
        self.teacher: Detector = make_teacher(self.model)
        if self.dist.enabled:  # the teacher (eval mode only) keeps plain BN layers
            self.model = sync_batchnorm(self.model, self.device)
        self.step = TrainStep(cfg, self.model, self.teacher, self.method, self.dist, self.device, self.log)
        self.target_records = self._target_records()
        self.iteration = 0
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []
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
        given = len(self.cfg.semi.class_thresholds)
        if given not in (0, n):
            raise TrainingError(f"config key 'semi.class_thresholds': {given} values for the {n} categories of "
                                f"{self.cfg.data.train_json} (one per category, in id order, or [])")

    def _target_records(self) -> list:
        """Unlabeled images with boxes whose target quality goes to TensorBoard (empty: off)."""
        cfg = self.cfg
        if not (self.is_main and self.method.uses_unlabeled and cfg.target_images > 0 and cfg.data.full_json):
            return []
        if not Path(cfg.data.full_json).is_file():
            self.log(f"target quality not logged: {cfg.data.full_json} (data.full_json) not found")
            return []
        from dtg.evaluation.target_quality import unlabeled_with_boxes

        try:
            return unlabeled_with_boxes(cfg, cfg.target_images)
        except (ConfigError, DatasetError) as e:  # full_json is not these unlabeled images' boxes
            self.log(f"target quality not logged: {e}")
            return []

    def log_target_quality(self, writer: SummaryWriter) -> None:
        """``targets/<stage>_<method>/<ratio>`` scalars of both methods' targets (docs/method.md, "Target quality")."""
        from dtg.evaluation.target_quality import score_models

        student = self.model.eval()
        try:
            summary = score_models(self.teacher, student, self.target_records, self.labels, self.cfg).summary()
        finally:
            self.model.train()
        for key, ratios in summary["quality"].items():
            for name, value in ratios.items():
                if value is not None:
                    writer.add_scalar(f"targets/{key.replace('/', '_')}/{name}", value, self.iteration)
        for level, share in enumerate(summary["paired_per_level"]):
            writer.add_scalar(f"targets/rpn_paired/P{level + 2}", share, self.iteration)

    def _loader(self, start_batch: int) -> torch.utils.data.DataLoader:
        n_u = self.cfg.data.batch_unlabeled if self.method.uses_unlabeled else 0
        return train_loader(self.data, self.cfg.data, n_u, self.cfg.seed, self.dist.rank, self.dist.world_size, start_batch)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state; identical on every rank (a collective under torchrun)."""
        rngs = all_gather_objects(self.dist, rng_state())  # every rank's generators: exact resume per rank
        return training_state(self.model, self.teacher, self.step, self.iteration, self.cfg, self.labels.categories,
                              self.best_ap, self.history, rngs, self.dist.world_size)

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
        self.iteration, self.best_ap, self.history, note = restore_training(
            ckpt, path, self.model, self.teacher, self.step, self.labels.categories, self.cfg.data.train_json,
            self.cfg.seed, self.dist.rank, self.dist.world_size,
        )
        if note:
            self.log(note)
        self.step.last_checkpoint = (Path(path), self.iteration)
        self.log(f"resumed from {path} at iteration {self.iteration}")

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
        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.iteration or None) if self.is_main else None
        loader = iter(self._loader(start_batch=self.iteration))
        # A redrawn bar on a terminal; in a log file (no terminal), plain progress lines instead.
        self._plain = self.progress and not sys.stderr.isatty()
        bar = tqdm(
            total=cfg.solver.max_iter, initial=self.iteration, desc=f"train {cfg.method}",
            disable=not self.progress or self._plain, dynamic_ncols=True, file=sys.stderr,
        )
        self._clock = (time.perf_counter(), self.iteration, time.perf_counter())  # start, its iteration, last line
        try:
            t0 = time.perf_counter()
            while self.iteration < end:
                scalars = self.step(next(loader), self.iteration)
                self.iteration += 1
                bar.update(1)
                self._after_step(scalars, writer, bar)
            bar.close()
            elapsed = time.perf_counter() - t0
            if self.iteration < cfg.solver.max_iter:  # stopped early on request
                self.save("last.pth")
                return None
            metrics = self.evaluate(writer, final=True)
            self.save("last.pth")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        summary = {
            "method": cfg.method, "iterations": self.iteration, "train_seconds": round(elapsed, 1),
            "world_size": self.dist.world_size, "nonfinite_steps": self.step.nonfinite.total, **metrics,
            "provenance": self.provenance,
        }
        if self.is_main:
            (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _after_step(self, scalars: dict[str, float], writer: SummaryWriter | None, bar: tqdm) -> None:
        """Logging, periodic evaluation and checkpoints after iteration ``self.iteration``."""
        cfg, it = self.cfg, self.iteration
        if it % cfg.log_period == 0 or it == cfg.solver.max_iter:
            scalars = mean_scalars(self.dist, scalars)
            for k, v in scalars.items() if writer is not None else ():
                writer.add_scalar(f"train/{k}", v, it)
            bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items() if k.endswith(("cls", "reg")) or k == "loss"})
            if self.is_main:
                self._report_progress(scalars)
        if cfg.eval_period > 0 and it % cfg.eval_period == 0 and it < cfg.solver.max_iter:
            self.evaluate(writer)
        if it % cfg.checkpoint_period == 0 or it == cfg.solver.max_iter:
            self.save("last.pth")
        if it in cfg.checkpoint_at:
            self.save(iteration_checkpoint(it))

    def _report_progress(self, scalars: dict[str, float]) -> None:
        """``progress.json`` (read by ``dtg demo`` / ``dtg bench reproduce``) and, without a terminal,
        a plain line at most every 30 s (and at the end)."""
        start, start_it, last_line = self._clock
        now, it, total = time.perf_counter(), self.iteration, self.cfg.solver.max_iter
        state = progress_state(self.cfg.method, it, total, now - start, it - start_it, scalars)
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.out / "progress.json")
        if self._plain and (now - last_line >= 30.0 or it == total):
            print(f"[train] {progress_line(state)}", file=sys.stderr, flush=True)
            self._clock = (start, start_it, now)

    def evaluate(self, writer: SummaryWriter | None = None, final: bool = False) -> dict[str, Any]:
        """COCO metrics of the student and the teacher on the val set (every rank calls)."""
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
        if writer is not None and self.target_records:
            self.log_target_quality(writer)
        out["reported"] = "teacher"
        ap = out["teacher"]["AP"]
        self.history.append({"iteration": self.iteration, **{k: out[k]["AP"] for k in models}})
        if ap > self.best_ap and not math.isnan(ap):
            self.best_ap = ap
            self.save("best.pth")
        return out
