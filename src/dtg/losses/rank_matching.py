"""Rank Matching loss (docs/method.md, "Rank Matching"): match the student's within-cluster score ranking
to the teacher's with a KL divergence between per-cluster softmax distributions.

For each cluster with members ``i``:
``D_t(i) = softmax_i(p_t(i) / T)``, ``D_s(i) = softmax_i(p_s(i) / T)``,
``L_j = sum_i D_t(i) * (log D_t(i) - log D_s(i))`` (0 for a one-member cluster).
:func:`cluster_kl` gives ``L_j`` and the member counts ``N_j`` per cluster; how clusters are then
combined is the caller's (:func:`dtg.losses.dtg_loss.inc_rank_matching_loss` scales them like the
INC losses); :func:`rank_matching_loss` is the mean of ``L_j`` over clusters of at least
``min_size`` members. Everything is vectorised as segment operations over the cluster ids (no loop
over clusters).
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_log_softmax(x: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Log-softmax of ``x`` within each segment.

    Args:
        x: (M,) float values.
        segment: (M,) int64 segment id per value, in [0, num_segments).
        num_segments: number of segments S.

    Returns:
        (M,) ``x[i] - logsumexp(x[j] for j in segment of i)``; differentiable w.r.t. ``x``.
    """
    # The per-segment max only stabilises the exponentials; its gradient contribution
    # cancels exactly, so it is detached.
    seg_max = torch.full((num_segments,), float("-inf"), dtype=x.dtype, device=x.device)
    seg_max = seg_max.scatter_reduce(0, segment, x.detach(), reduce="amax", include_self=True)
    shifted = x - seg_max[segment]
    seg_sum = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add(0, segment, shifted.exp())
    return shifted - seg_sum.log()[segment]


def _check_inputs(student_scores: Tensor, teacher_scores: Tensor, cluster: Tensor, T: float) -> None:
    if not student_scores.shape == teacher_scores.shape == cluster.shape or student_scores.dim() != 1:
        raise ValueError(f"expected equal (M,) shapes, got {tuple(student_scores.shape)}, "
                         f"{tuple(teacher_scores.shape)}, {tuple(cluster.shape)}")
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def cluster_kl(student_scores: Tensor, teacher_scores: Tensor, cluster: Tensor, T: float = 1.0) -> tuple[Tensor, Tensor]:
    """``KL(softmax(teacher / T) || softmax(student / T))`` of every cluster, and its member count.

    Args:
        student_scores: (M,) float student score per cluster member (the probability of the
            cluster's class or the objectness; the caller picks probabilities or logits).
        teacher_scores: (M,) float teacher score per member; detached here, so the gradient
            reaches only ``student_scores``.
        cluster: (M,) int64 cluster id per member (any integers, not necessarily contiguous).
        T: softmax temperature (> 0).

    Returns:
        ``(kl (S,), counts (S,) int64)`` over the S distinct ids of ``cluster`` in increasing
        order; a one-member cluster's KL is exactly 0. ``kl`` is in at least float32 and
        differentiable w.r.t. ``student_scores``.
    """
    _check_inputs(student_scores, teacher_scores, cluster, T)
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    _, segment, counts = torch.unique(cluster, return_inverse=True, return_counts=True)
    num = counts.numel()
    log_ds = segment_log_softmax(student_scores.to(dtype) / T, segment, num)
    log_dt = segment_log_softmax(teacher_scores.detach().to(dtype) / T, segment, num)
    terms = log_dt.exp() * (log_dt - log_ds)  # (M,) per-member terms; per cluster they sum to KL
    return torch.zeros(num, dtype=dtype, device=terms.device).index_add(0, segment, terms), counts


def rank_matching_loss(student_scores: Tensor, teacher_scores: Tensor, cluster: Tensor,
                       T: float = 1.0, min_size: int = 2) -> Tensor:
    """Mean over clusters of at least ``min_size`` members of :func:`cluster_kl`'s KL.

    ``min_size=2`` leaves one-member clusters out of the mean (``dtg.rm_scale=clusters``, before
    issue 25); ``min_size=1`` averages over every cluster as the paper writes.

    Returns:
        A scalar, or ``0.0`` attached to ``student_scores``'s graph (``.backward()`` works) if no
        cluster qualifies. Computed in at least float32.
    """
    _check_inputs(student_scores, teacher_scores, cluster, T)
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    zero = (student_scores.to(dtype) * 0.0).sum()
    if cluster.numel() == 0:
        return zero
    # Members of small clusters are dropped before the softmaxes (not a filter on cluster_kl's
    # output), so that runs made before issue 25 stay bit-identical.
    ids, segment, counts = torch.unique(cluster, return_inverse=True, return_counts=True)
    big = counts >= min_size  # (S,)
    member = big[segment]  # (M,)
    num_big = int(big.sum())
    if num_big == 0:
        return zero
    segment = (torch.cumsum(big, 0) - 1)[segment[member]]  # renumbered 0..num_big-1
    log_ds = segment_log_softmax(student_scores[member].to(dtype) / T, segment, num_big)
    log_dt = segment_log_softmax(teacher_scores.detach()[member].to(dtype) / T, segment, num_big)
    return (log_dt.exp() * (log_dt - log_ds)).sum() / num_big
