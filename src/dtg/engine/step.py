"""One training step of the Mean Teacher, the same for every method.

Per step: the student's labeled losses (``sup_*``), then, once the burn-in is over, the
method's teacher targets and the student's unlabeled losses against them (``unsup_*``); ``L = sum(sup_*) + alpha(t) * sum(unsup_*)``; SGD,
the LR schedule and the EMA teacher. A step whose loss (or gradient norm) is not finite on
any rank is skipped on every rank: no optimizer step, no EMA update, the BatchNorm
statistics of its forward undone; the LR schedule still advances. Skips are logged and
counted; ``solver.max_nonfinite`` skips in a row stop the run (:class:`NonFiniteGuard`).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtg.config import Config
from dtg.dist import DistInfo, all_true
from dtg.engine.runtime import NonFiniteGuard
from dtg.engine.solver import build_optimizer, build_scheduler, lr_factor, teacher_momentum, unsup_weight
from dtg.methods import Batch, Method, labeled_losses
from dtg.models.detector import Detector
from dtg.models.ema import bn_stats_frozen, ema_update


class StudentLoss(nn.Module):
    """The whole loss computation of a step as this module's ``forward``, so that DDP syncs the student.

    DDP all-reduces gradients only in a backward that follows a call of the DDP
    module's own ``forward`` (that call arms its reducer). The methods never call the
    student's ``forward``: they call its pieces (``supervised_losses``,
    ``forward_dense``, ``roi_forward``), once or twice per step. Wrapping the
    ``Detector`` itself would therefore silently let every rank train on its own
    gradients. Wrapping this module instead, whose ``forward`` runs the method on the
    student it holds, arms the reducer once per step for every student pass inside
    it, and DDP's usual bucketed all-reduce (overlapped with backward) averages all
    student gradients. This is simpler and safer than an explicit all-reduce after
    backward: no per-parameter bookkeeping, no forgotten gradients, and DDP's own
    check that every trainable parameter received a gradient. The teacher is an
    argument, not a submodule: it has no gradients and is never synchronised (it is
    the same EMA on every rank by construction).
    """

    def __init__(self, student: Detector, method: Method, device: torch.device, strong_bn_stats: bool = True) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.device = device
        self.strong_bn_stats = strong_bn_stats  # False: the unlabeled branch leaves BN running statistics alone

    def forward(
        self, teacher: Detector, batch: Batch, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Labeled losses, then (when ``batch["unsup"]`` holds items) the method's unlabeled ones:
        its teacher's targets (:meth:`Method.teacher_targets`), then the student's losses against
        them (:meth:`Method.student_losses`). ``iteration`` is not read by any method (alpha(t) is
        the step's)."""
        losses = labeled_losses(self.student, batch["sup"], self.device)
        stats: dict[str, float] = {}
        if batch["unsup"]:
            keep = nullcontext() if self.strong_bn_stats else bn_stats_frozen(self.student)
            with keep:
                targets = self.method.teacher_targets(teacher, batch["unsup"])  # no gradient
                unsup, stats = self.method.student_losses(self.student, batch["unsup"], targets)
            losses.update(unsup)
        return losses, stats


def wrap_student(module: StudentLoss, info: DistInfo) -> nn.Module:
    """``module`` wrapped in DDP under torchrun, else itself.

    ``device_ids=None`` keeps DDP from moving the batch (the methods move what they
    use); buffers are not re-broadcast at every forward because the only trainable
    buffers, BatchNorm statistics, are computed from the global batch on every rank.
    """
    if not info.enabled:
        return module
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DistributedDataParallel(module, device_ids=None, forward_sync_buffers=False)  # torch >= 2.12
    return DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)




class TrainStep:
    """What one optimisation step needs: optimizer, LR schedule, AMP scaler, the (DDP) loss, the guard.

    Constructed by the trainer for its method, or by a benchmark for the method it times.

    Args:
        cfg: the run's config (``solver``, ``semi``).
        model: the student; teacher: its EMA copy.
        method: the method whose unlabeled loss the step adds.
        dist: this process's rank info; device: where the models live.
        log: one-line messages (skipped steps).
    """

    def __init__(self, cfg: Config, model: Detector, teacher: Detector, method: Method, dist: DistInfo,
                 device: torch.device, log: Callable[[str], None]) -> None:
        self.cfg, self.model, self.teacher, self.method = cfg, model, teacher, method
        self.dist, self.device = dist, device
        self.optimizer = build_optimizer(model, cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.use_amp = cfg.solver.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.student_loss = wrap_student(StudentLoss(model, method, device, cfg.semi.strong_bn_stats), dist)
        self.nonfinite = NonFiniteGuard(cfg.solver.max_nonfinite, log)
        self.last_checkpoint: tuple[Path, int] | None = None  # named in the message of a fatal skip streak

    def unsup_weight(self, iteration: int) -> float:
        """alpha(t) of ``iteration``; 0 for a method without an unlabeled branch."""
        return unsup_weight(iteration, self.cfg.semi) if self.method.uses_unlabeled else 0.0

    def __call__(self, batch: Batch, iteration: int) -> dict[str, float]:
        """One optimisation step (or a skipped one, see the module docstring); returns the logged scalars."""
        autocast = torch.autocast("cuda", enabled=True) if self.use_amp else nullcontext()
        alpha = self.unsup_weight(iteration)
        if alpha == 0.0:  # burn-in or no unlabeled branch: skip the teacher and the unlabeled loss
            batch = {**batch, "unsup": []}
        buffers = [(b, b.clone()) for b in self.model.buffers()]  # BN statistics, restored if the step is skipped
        with autocast:
            losses, stats = self.student_loss(self.teacher, batch, iteration)
        zero = torch.zeros((), device=self.device)
        sup = sum((v for k, v in losses.items() if k.startswith("sup_")), zero)
        unsup = sum((v for k, v in losses.items() if k.startswith("unsup_")), zero)
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
                ema_update(self.teacher, self.model, teacher_momentum(iteration, self.cfg.semi, self.method.uses_unlabeled))
                self.nonfinite.ok()
            else:
                self._skip(iteration, "gradient norm", scalars, buffers)
        else:
            self._skip(iteration, "loss", scalars, buffers)
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
    def _skip(self, iteration: int, what: str, scalars: dict[str, float],
              buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The step leaves no trace (its forward's BN statistics undone); counted, maybe the end of the run."""
        for b, before in buffers:
            b.copy_(before)
        last = self.last_checkpoint
        kept = f"the last checkpoint {last[0]} (iteration {last[1]}) is intact" if last else "no checkpoint was written"
        self.nonfinite.skip(iteration, what, scalars, self.dist.rank, kept)

    def start_at(self, iteration: int) -> None:
        """Put the learning-rate schedule at ``iteration`` (a fresh optimizer, ``dtg train --init-from``)."""
        self.scheduler.last_epoch = iteration
        factor = lr_factor(iteration, self.cfg.solver)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler, scaler and skip counters (the checkpoint's step part)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "nonfinite": self.nonfinite.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
