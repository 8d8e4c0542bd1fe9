"""Ranks and collectives for ``torchrun`` jobs: process group, rank info, collectives, cross-rank BatchNorm.

``torchrun --nproc-per-node N -m dtg train ...`` (any number of nodes) starts one
process per device with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` set. :func:`init_distributed` joins them (NCCL on GPUs, gloo on
CPUs); without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) the run is one plain
process and every helper here is a no-op.

Semantics under ``W`` processes: each rank draws its own disjoint share of one
global sample stream (:class:`~dtg.data.sampler.MixedBatchSampler`), so the global
batch is ``W`` x the per-rank batch; gradients are averaged over ranks (DDP, see
:mod:`dtg.engine.step`), so a step equals a one-process step on the mean of the per-rank losses; trainable
BatchNorm layers normalise with the statistics of the global batch (SyncBatchNorm
on GPUs, :class:`CrossRankBatchNorm2d` on CPUs), so their running statistics, and
therefore the EMA teacher, are identical on every rank.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

_BN_GROUP: Any = None  # process group of the CPU BatchNorm collectives (kept apart from DDP's gradient all-reduce)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs, TensorBoard and progress bars."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by the environment; return this rank and its device.

    ``device`` is the resolved preference: on CUDA each rank takes ``cuda:LOCAL_RANK``
    and NCCL, on CPU gloo. The process group is destroyed at interpreter exit.
    """
    global _BN_GROUP
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(), device
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        atexit.register(_shutdown)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, the environment says {rank} of {world}")
    if device.type != "cuda" and _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend="gloo")
    return DistInfo(rank, world, local), device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives (no-ops in one process)


def _device() -> torch.device:
    """Where tensors for collectives of the default group must live (NCCL: the current GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_true(info: DistInfo, flag: bool) -> bool:
    """``flag`` and-ed over every rank (each rank must call)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(info: DistInfo, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; ``None`` elsewhere."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(info: DistInfo, fn: Callable[[], Any], errors: tuple[type[Exception], ...]) -> str | None:
    """Run ``fn`` on rank 0 only; on every rank, the message of one of ``errors`` it raised, else ``None``.

    Lets every rank fail with rank 0's one-line error instead of waiting for it forever.
    """
    error = None
    if info.is_main:
        try:
            fn()
        except errors as e:
            error = str(e)
    return broadcast_from_main(info, error)


def mean_scalars(info: DistInfo, scalars: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the ranks that report it (for logging)."""
    if not info.enabled:
        return scalars
    per_rank = all_gather_objects(info, scalars)
    keys = dict.fromkeys(k for d in per_rank for k in d)
    return {k: sum(d[k] for d in per_rank if k in d) / sum(1 for d in per_rank if k in d) for k in keys}


# ----------------------------------------------------------------------------- BatchNorm over the global batch


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is again a sum over ranks (the gradient of the total loss)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch (all ranks).

    torch's ``SyncBatchNorm`` refuses CPU tensors; this is its CPU counterpart over
    gloo: two-pass mean and variance from sums all-reduced over the ranks (a
    separate process group, so its collectives never interleave with DDP's). With
    equal per-rank batches it computes what one ``BatchNorm2d`` computes on the
    concatenated batch, running statistics (unbiased variance) included. Outside
    training, or in one process, it is a plain ``BatchNorm2d``. Same state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _BN_GROUP is not None and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        count = torch.full((1,), float(flat.shape[1]), dtype=flat.dtype, device=flat.device)
        sums = _SumOverRanks.apply(torch.cat([flat.sum(1), count]), _BN_GROUP)
        n = sums[c]
        mean = sums[:c] / n
        centered = flat - mean[:, None]
        var = _SumOverRanks.apply((centered * centered).sum(1), _BN_GROUP) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centered * torch.rsqrt(var + self.eps)[:, None]
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        return y.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1).contiguous()


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every trainable ``BatchNorm2d`` in ``module`` normalised over the global batch.

    GPU: torch's ``SyncBatchNorm``; CPU: :class:`CrossRankBatchNorm2d`. Parameters
    and buffers are shared with the replaced layers; frozen BN is left alone.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cross_rank(module)


def _to_cross_rank(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = CrossRankBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _to_cross_rank(child))
    return module
