"""The EMA teacher of the Mean Teacher (docs/method.md, "The frame")."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def ema_momentum(iteration: int, momentum: float) -> float:
    """``min(m, 1 - 1 / (iteration + 1))``: a fast early ramp, then the configured momentum.

    ``iteration`` is the 0-based index of the optimizer step just taken.
    """
    return min(momentum, 1.0 - 1.0 / (iteration + 1))


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student``: eval mode, no gradients."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t = m * t + (1 - m) * s`` for every parameter.

    Floating-point buffers (BatchNorm running statistics) follow the same
    average, so a teacher whose backbone uses trainable BatchNorm gets
    statistics that match its weights; frozen-BN buffers are constants, so for
    them this is a no-op. Integer buffers (``num_batches_tracked``) are copied.
    """
    t_params = dict(teacher.named_parameters())
    for name, s in student.named_parameters():
        t_params[name].mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    t_bufs = dict(teacher.named_buffers())
    for name, s in student.named_buffers():
        t = t_bufs[name]
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)
        else:
            t.copy_(s)


@contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers of ``module`` still normalise with the batch's statistics in
    train mode but leave their running statistics (and so the EMA teacher's) unchanged."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
