"""SGD and its learning-rate schedule: linear warm-up, then step decay (detectron2's WarmupMultiStepLR)."""

from __future__ import annotations

import torch
from torch import nn

from dtg.config import SemiConfig, SolverConfig
from dtg.models.ema import ema_momentum


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``iteration`` (0-based).

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, times
    ``gamma ** (number of steps <= iteration)``.
    """
    decay = cfg.gamma ** sum(1 for s in cfg.steps if iteration >= s)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        return decay * (cfg.warmup_factor * (1 - alpha) + alpha)
    return decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler: call ``step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def unsup_weight(iteration: int, semi: SemiConfig) -> float:
    """alpha(t) of ``L = L_l + alpha(t) * L_u`` at 0-based ``iteration``.

    0 during ``semi.burn_in`` iterations, then a linear ramp reaching
    ``semi.alpha`` after ``semi.alpha_warmup`` more iterations, then constant.
    """
    t = iteration - semi.burn_in
    if t < 0:
        return 0.0
    if semi.alpha_warmup <= 0:
        return semi.alpha
    return semi.alpha * min(1.0, (t + 1) / semi.alpha_warmup)


def teacher_momentum(iteration: int, semi: SemiConfig, unlabeled: bool) -> float:
    """EMA momentum after optimizer step ``iteration``: the ramp ``min(m, 1 - 1/(t + 1))`` of
    ``semi.ema_momentum``, or ``semi.ema_momentum_unsup`` once a method with an unlabeled branch
    (``unlabeled``) is past ``semi.burn_in``."""
    if unlabeled and semi.ema_momentum_unsup is not None and iteration >= semi.burn_in:
        return semi.ema_momentum_unsup
    return ema_momentum(iteration, semi.ema_momentum)
