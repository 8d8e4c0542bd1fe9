"""One explicit, iteration-based training loop. Methods differ only in how they compute losses.

Per iteration: draw a mixed batch, ask the method for named losses, combine them
as ``L = sum(sup_*) + alpha(t) * sum(unsup_*)``, step SGD and the LR schedule,
then the after-step hooks (logging, checkpoint, evaluation).

The same loop runs in one process or in each of ``W`` torchrun processes
(:mod:`dtg.engine.distributed`): each rank draws its own share of the global batch,
the student is synchronised by DDP, the teacher is EMA'd identically everywhere,
evaluation is sharded, and only rank 0 writes files.

A step whose loss (or gradient norm) is not finite on any rank is skipped on every
rank: no optimizer step, no EMA update, BatchNorm statistics of its forward undone;
the LR schedule and the iteration count still advance. Skips are logged and counted (``nonfinite_steps`` in
``metrics.json``); ``solver.max_nonfinite`` skips in a row stop the run with a
:class:`TrainingError`, the last checkpoint left as it was.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dtg.config import Config, to_dict
from dtg.data.coco import CocoSource, load_labeled, load_unlabeled
from dtg.data.dataset import LabelMap, TrainData, collate
from dtg.data.sampler import MixedBatchSampler
from dtg.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from dtg.engine.distributed import (
    StudentLoss, all_gather_objects, all_true, init_distributed, mean_scalars, run_on_main, sync_batchnorm, wrap_student,
)
from dtg.engine.methods import build_method
from dtg.engine.runtime import (  # noqa: F401  (TrainingError, resolve_device: public here too)
    NonFiniteGuard, TrainingError, prepare_output_dir, resolve_device, seed_everything,
)
from dtg.engine.solver import build_optimizer, build_scheduler, unsup_weight
from dtg.evaluation.coco_eval import write_results
from dtg.evaluation.inference import evaluate_model
from dtg.models.detector import Detector
from dtg.models.ema import ema_momentum, ema_update, make_teacher


def model_state(model: Detector) -> dict[str, torch.Tensor]:
    """The plain torchvision ``FasterRCNN`` state dict of a wrapped model."""
    return model.net.state_dict()


class Trainer:
    """Builds data, model and optimiser from a :class:`Config` and runs the loop.

    Under torchrun it joins the process group first; ``log`` and ``progress`` then
    apply to rank 0 only.

    Args:
        cfg: the resolved configuration.
        log: where one-line messages go (validation problems, summaries).
        progress: show tqdm bars.
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
        seed_everything(cfg.seed, cfg.deterministic)
        self.method = build_method(cfg, self.device)
        self._load_data()
        self.model = Detector.from_config(cfg.model, self.labels.num_classes, cfg.data.test_size, cfg.data.test_max_size)
        self.model.to(self.device).train()
        # The teacher is copied from the student at iteration 0; on resume it is restored, not re-copied.
        self.teacher: Detector | None = make_teacher(self.model) if self.method.uses_teacher else None
        if self.dist.enabled:  # the teacher (eval mode only) keeps plain BN layers
            self.model = sync_batchnorm(self.model, self.device)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.use_amp = cfg.solver.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.student_loss = wrap_student(StudentLoss(self.model, self.method), self.dist)
        self.iteration = 0
        self.best_ap = -1.0
        self.history: list[dict[str, Any]] = []
        self.nonfinite = NonFiniteGuard(cfg.solver.max_nonfinite, self.log)
        self.last_checkpoint: tuple[Path, int] | None = None
        need = sum(p.numel() for p in self.model.parameters()) * 4 * 4 + (64 << 20)
        error = run_on_main(self.dist, lambda: prepare_output_dir(self.out, need, cfg, self.log), (TrainingError,))
        if error:
            raise TrainingError(error)

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> None:
        d, kw = self.cfg.data, {"skip_bad": self.cfg.data.skip_bad, "log": self.log}
        self.labeled = load_labeled(d.train_json, d.train_images, **kw)
        self.labels = LabelMap(self.labeled.categories)
        if self.cfg.model.num_classes not in (None, self.labels.num_classes):
            raise TrainingError(
                f"{d.train_json}: declares {self.labels.num_classes} categories but model.num_classes is "
                f"{self.cfg.model.num_classes}"
            )
        self.unlabeled: CocoSource | None = None
        if self.method.uses_unlabeled:
            if d.batch_unlabeled < 1:
                raise TrainingError(f"method '{self.cfg.method}' needs data.batch_unlabeled >= 1")
            self.unlabeled = load_unlabeled(d.unlabeled, d.unlabeled_images, **kw)
        self.val = load_labeled(d.val_json, d.val_images, **kw) if d.val_json else None
        self.log(
            f"data: {len(self.labeled.records)} labeled, "
            f"{len(self.unlabeled.records) if self.unlabeled else 0} unlabeled, "
            f"{len(self.val.records) if self.val else 0} val images; {self.labels.num_classes} classes"
        )

    def _loader(self, start_batch: int) -> DataLoader:
        d = self.cfg.data
        n_u = d.batch_unlabeled if self.method.uses_unlabeled else 0
        sampler = MixedBatchSampler(
            len(self.labeled.records),
            len(self.unlabeled.records) if self.unlabeled else 0,
            d.batch_labeled,
            n_u,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_batch=start_batch,
        )
        data = TrainData(self.labeled, self.unlabeled, self.labels, d.labeled_view, d.weak_view, d.strong_view)
        workers = d.num_workers
        return DataLoader(
            data,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # Its own generator: creating the loader must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole training state; identical on every rank (a collective under torchrun)."""
        rngs = all_gather_objects(self.dist, rng_state())  # every rank's generators: exact resume per rank
        state = {
            "student": model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "sampler": {"batches_drawn": self.iteration, "seed": self.cfg.seed, "world_size": self.dist.world_size},
            "rng": rngs[0],
            "nonfinite": self.nonfinite.state_dict(),
            "config": to_dict(self.cfg),
            "categories": self.labels.categories,
            "best_ap": self.best_ap,
            "history": self.history,
        }
        if self.dist.enabled:
            state["rng_ranks"] = rngs
        if self.teacher is not None:
            state["teacher"] = model_state(self.teacher)
        return state

    def save(self, name: str) -> Path:
        """Rank 0 writes ``checkpoints/NAME`` atomically; a failed write fails every rank (one line)."""
        path = self.out / "checkpoints" / name
        state = self.state_dict()
        error = run_on_main(self.dist, lambda: atomic_save(state, path), (CheckpointError,))
        if error:
            raise CheckpointError(error)
        if name == "last.pth":
            self.last_checkpoint = (path, self.iteration)
        return path

    def resume(self, path: str | Path) -> None:
        """Continue exactly where the checkpoint at ``path`` stopped."""
        ckpt = load_checkpoint(path)
        if ckpt.get("categories") != self.labels.categories:
            raise CheckpointError(f"{path}: checkpoint categories differ from {self.cfg.data.train_json}")
        self.model.net.load_state_dict(ckpt["student"])
        if self.teacher is not None:
            if "teacher" not in ckpt:
                raise CheckpointError(f"{path}: has no teacher, but method '{self.cfg.method}' needs one")
            self.teacher.net.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        if ckpt["sampler"]["seed"] != self.cfg.seed:
            raise CheckpointError(f"{path}: saved with seed {ckpt['sampler']['seed']}, this run uses {self.cfg.seed}")
        self.best_ap = float(ckpt.get("best_ap", -1.0))
        self.history = list(ckpt.get("history", []))
        self.nonfinite.load_state_dict(ckpt.get("nonfinite", {}))
        saved_world = int(ckpt["sampler"].get("world_size", 1))
        if saved_world == self.dist.world_size:
            set_rng_state(ckpt["rng_ranks"][self.dist.rank] if "rng_ranks" in ckpt else ckpt["rng"])
        else:
            set_rng_state(ckpt["rng"])
            self.log(f"{path}: written by {saved_world} processes, resumed by {self.dist.world_size}: "
                     "the data order and random streams differ from an uninterrupted run")
        self.last_checkpoint = (Path(path), self.iteration)
        self.log(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------ loop
    def step(self, batch: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
        """One optimisation step (or a skipped one, see the module docstring); returns the logged scalars."""
        autocast = torch.autocast("cuda", enabled=True) if self.use_amp else nullcontext()
        alpha = self.unsup_weight()
        if alpha == 0.0:  # burn-in or no unlabeled branch: skip the teacher and the unlabeled loss
            batch = {**batch, "unsup": []}
        buffers = [(b, b.clone()) for b in self.model.buffers()]  # BN statistics, restored if the step is skipped
        with autocast:
            losses, stats = self.student_loss(self.teacher, batch, self.iteration)
        sup = sum((v for k, v in losses.items() if k.startswith("sup_")), torch.zeros((), device=self.device))
        unsup = sum((v for k, v in losses.items() if k.startswith("unsup_")), torch.zeros((), device=self.device))
        total = sup + alpha * unsup
        scalars = {k: float(v.detach()) for k, v in losses.items()}
        scalars.update(stats)
        scalars["loss"] = float(total.detach())
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.method.uses_unlabeled:
            scalars["alpha"] = alpha
        # Every rank takes the same decision, or DDP's all-reduce would wait forever.
        if all_true(self.dist, bool(torch.isfinite(total))):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if self._finite_grads():
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.teacher is not None:
                    ema_update(self.teacher, self.model, ema_momentum(self.iteration, self.cfg.semi.ema_momentum))
                self.nonfinite.ok()
            else:
                self._skip("gradient norm", scalars, buffers)
        else:
            self._skip("loss", scalars, buffers)
        self.scheduler.step()
        scalars["nonfinite_steps"] = float(self.nonfinite.total)
        return scalars

    def _finite_grads(self) -> bool:
        """Clip if configured; whether the gradient norm is finite (AMP: the scaler skips inf steps itself)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.solver.clip_grad_norm
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif self.use_amp:
            return True
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return self.use_amp or bool(torch.isfinite(norm))  # grads are all-reduced: the same on every rank

    @torch.no_grad()
    def _skip(self, what: str, scalars: dict[str, float], buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The step leaves no trace (its forward's BN statistics undone); counted, maybe the end of the run."""
        for b, before in buffers:
            b.copy_(before)
        last = self.last_checkpoint
        kept = f"the last checkpoint {last[0]} (iteration {last[1]}) is intact" if last else "no checkpoint was written"
        self.nonfinite.skip(self.iteration, what, scalars, self.dist.rank, kept)

    def unsup_weight(self) -> float:
        """alpha(t) of this iteration; 0 without an unlabeled branch."""
        return unsup_weight(self.iteration, self.cfg.semi) if self.method.uses_unlabeled else 0.0

    def train(self) -> dict[str, Any]:
        """Run from ``self.iteration`` to ``solver.max_iter``; return the final metrics (on every rank)."""
        cfg = self.cfg
        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.iteration or None) if self.is_main else None
        loader = iter(self._loader(start_batch=self.iteration))
        bar = tqdm(
            total=cfg.solver.max_iter, initial=self.iteration, desc=f"train {cfg.method}",
            disable=not self.progress, dynamic_ncols=True, file=sys.stderr,
        )
        try:
            t0 = time.perf_counter()
            while self.iteration < cfg.solver.max_iter:
                scalars = self.step(next(loader))
                self.iteration += 1
                bar.update(1)
                if self.iteration % cfg.log_period == 0 or self.iteration == cfg.solver.max_iter:
                    scalars = mean_scalars(self.dist, scalars)
                    for k, v in scalars.items() if writer is not None else ():
                        writer.add_scalar(f"train/{k}", v, self.iteration)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items() if k.endswith(("cls", "reg")) or k == "loss"})
                if cfg.eval_period > 0 and self.iteration % cfg.eval_period == 0 and self.iteration < cfg.solver.max_iter:
                    self.evaluate(writer)
                if self.iteration % cfg.checkpoint_period == 0 or self.iteration == cfg.solver.max_iter:
                    self.save("last.pth")
            bar.close()
            elapsed = time.perf_counter() - t0
            metrics = self.evaluate(writer, final=True)
            self.save("last.pth")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        summary = {
            "method": cfg.method, "iterations": self.iteration, "train_seconds": round(elapsed, 1),
            "world_size": self.dist.world_size, "nonfinite_steps": self.nonfinite.total, **metrics,
        }
        if self.is_main:
            (self.out / "metrics.json").write_text(json.dumps(summary, indent=2))
        return summary

    def evaluate(self, writer: SummaryWriter | None = None, final: bool = False) -> dict[str, Any]:
        """COCO metrics of the student (and teacher, when there is one) on the val set (every rank calls)."""
        if self.val is None:
            return {}
        models = {"student": self.model}
        if self.teacher is not None:
            models["teacher"] = self.teacher
        out: dict[str, Any] = {}
        d = self.cfg.data
        for name, model in models.items():
            metrics, results = evaluate_model(
                model, self.val, self.labels, d.test_size, d.test_max_size, self.device,
                dist=self.dist, progress=self.progress, desc=f"eval {name}",
            )
            out[name] = metrics
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"{name}/{k}", v, self.iteration)
            if final and self.is_main:
                write_results(self.out / f"results_{name}.json", results)
        reported = "teacher" if "teacher" in out else "student"
        out["reported"] = reported
        ap = out[reported]["AP"]
        self.history.append({"iteration": self.iteration, **{k: out[k]["AP"] for k in models}})
        if ap > self.best_ap and not math.isnan(ap):
            self.best_ap = ap
            self.save("best.pth")
        return out
