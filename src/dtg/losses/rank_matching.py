"""Rank Matching loss (docs/method.md, "Rank Matching"): match the student's within-cluster score ranking
to the teacher's with a KL divergence between per-cluster softmax distributions.

For each cluster with at least ``min_size`` members ``i``:
``D_t(i) = softmax_i(p_t(i) / T)``, ``D_s(i) = softmax_i(p_s(i) / T)``,
``L = sum_i D_t(i) * (log D_t(i) - log D_s(i))``; the loss is the mean of ``L`` over clusters.
Everything is vectorised as segment operations over the cluster ids (no loop over clusters).
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


def rank_matching_loss(student_scores: Tensor, teacher_scores: Tensor, cluster: Tensor,
                       T: float = 1.0, min_size: int = 2) -> Tensor:
    """Mean over clusters of ``KL(softmax(teacher / T) || softmax(student / T))``.

    Args:
        student_scores: (M,) float student score per cluster member (the probability of the
            cluster's class or the objectness; the caller picks probabilities or logits).
        teacher_scores: (M,) float teacher score per member; detached here, so the gradient
            reaches only ``student_scores``.
        cluster: (M,) int64 cluster id per member; any non-negative ints, not necessarily
            contiguous (e.g. ``nms_clusters``'s ``cluster`` restricted to candidates).
        T: softmax temperature (> 0).
        min_size: clusters with fewer members are ignored (a singleton's KL is always 0).

    Returns:
        A scalar: the mean KL over clusters of at least ``min_size`` members, or ``0.0``
        attached to ``student_scores``'s graph (``.backward()`` works) if there is none.
        Computed in at least float32.
    """
    if not student_scores.shape == teacher_scores.shape == cluster.shape or student_scores.dim() != 1:
        raise ValueError(f"expected equal (M,) shapes, got {tuple(student_scores.shape)}, "
                         f"{tuple(teacher_scores.shape)}, {tuple(cluster.shape)}")
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    zero = (student_scores.to(dtype) * 0.0).sum()
    if cluster.numel() == 0:
        return zero

    ids, segment, counts = torch.unique(cluster, return_inverse=True, return_counts=True)
    big = counts >= min_size  # (S,)
    member = big[segment]  # (M,)
    num_big = int(big.sum())
    if num_big == 0:
        return zero
    # Keep only members of big clusters and renumber their clusters 0..num_big-1.
    new_id = torch.cumsum(big, 0) - 1
    segment = new_id[segment[member]]
    z_s = student_scores[member].to(dtype) / T
    z_t = teacher_scores.detach()[member].to(dtype) / T

    log_ds = segment_log_softmax(z_s, segment, num_big)
    log_dt = segment_log_softmax(z_t, segment, num_big)
    kl = log_dt.exp() * (log_dt - log_ds)  # (M',) per-member terms; per cluster they sum to KL
    return kl.sum() / num_big
