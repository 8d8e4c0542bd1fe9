"""DTG's losses: INC classification and regression (paper Eq. (2)-(3)) and Rank Matching, on
:class:`~dtg.methods.dtg.targets.IncTargets` (docs/method.md, "Normalisation" and "Rank Matching").

INC: three normalisations (**switch** ``normalize``):

* ``"cluster"`` (paper): the members' per-sample losses are averaged within each cluster,
  then over clusters, so a cluster of 3 members weighs as much as a singleton. The
  classification losses add the mean over background samples (label 0) to that; each part
  is 0 when it has no sample.
* ``"samples"`` (mmdet / PseCo): per-sample losses summed over the used samples and divided
  by the number of labelled samples (``classes >= 0``, i.e. everything but ignored samples).
* ``"supervised"``: summed and divided by the ``denominator`` the supervised loss of the
  stage uses (torchvision: B x ``roi_batch_size_per_image`` sampled RoIs for the R-CNN, B x
  ``rpn_batch_size_per_image`` sampled anchors for the RPN), so that a DTG positive weighs
  what a supervised (or sparse) positive weighs, whatever the number of labelled samples.

Ignored samples (label -1) never contribute. With per-sample weights (``IncTargets.weight``, set by
the background draw of ``dtg.rcnn.background``) the classification losses weigh each sample's term,
and the ``samples`` and ``cluster`` means become weighted means (sums divided by the weights' sum).
Every loss returns a scalar connected to its input's graph (``0 * sum`` when nothing applies, so
``backward()`` works).

Rank Matching: match the student's within-cluster score ranking to the teacher's with a KL
divergence between per-cluster softmax distributions. For each cluster with members ``i``:
``D_t(i) = softmax_i(p_t(i) / T)``, ``D_s(i) = softmax_i(p_s(i) / T)``,
``L_j = sum_i D_t(i) * (log D_t(i) - log D_s(i))`` (0 for a one-member cluster).
:func:`cluster_kl` gives ``L_j`` and the member counts ``N_j`` per cluster;
:func:`inc_rank_matching_loss` combines them on the scale ``dtg.rm_scale`` names
(:func:`rank_matching_loss`: the mean of ``L_j`` over clusters of at least ``min_size`` members).
Everything is vectorised as segment operations over the cluster ids (no loop over clusters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from dtg.losses.focal import softmax_focal_loss
from dtg.methods.dtg.targets import IncTargets

NORMALIZATIONS = ("cluster", "samples", "supervised")


def select_class_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """Class-specific deltas of each sample's class.

    Args:
        deltas: (N, (K + 1) * 4) R-CNN box deltas.
        labels: (N,) int64 class per sample (use ``IncTargets.classes``); rows with label <= 0
            (background or ignored) get class 0's deltas, which no loss uses.

    Returns:
        (N, 4), differentiable w.r.t. ``deltas``.
    """
    n = deltas.shape[0]
    rows = torch.arange(n, device=deltas.device)
    return deltas.reshape(n, deltas.shape[1] // 4, 4)[rows, labels.clamp(min=0)]  # n may be 0


def cluster_mean(values: Tensor, cluster: Tensor) -> Tensor:
    """Mean over clusters of the mean of ``values`` within each cluster.

    Args:
        values: (M,) per-member losses; cluster: (M,) int64 ids (any integers).

    Returns:
        A scalar; ``0 * values.sum()`` when M == 0.
    """
    if values.numel() == 0:
        return values.sum() * 0.0
    _, segment, counts = torch.unique(cluster, return_inverse=True, return_counts=True)
    sums = values.new_zeros(counts.numel()).index_add(0, segment, values)
    return (sums / counts.to(values.dtype)).mean()


def _mean(values: Tensor) -> Tensor:
    return values.sum() / max(values.numel(), 1)


def _check_normalize(normalize: str, denominator: int | None) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "supervised" and (denominator is None or denominator < 1):
        raise ValueError(f"normalize='supervised' needs a denominator >= 1, got {denominator!r}")


def labelled_count(targets: IncTargets) -> float:
    """The number of labelled samples (``classes >= 0``) that ``"samples"`` divides by, each counted
    with its weight (``IncTargets.weight``; 1 without), so that a weighted draw keeps the scale."""
    used = targets.classes >= 0
    if targets.weight is None:
        return float(used.sum())
    return float(targets.weight[used].sum())


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return _mean(values)
    return (values * weight).sum() / weight.sum().clamp(min=1e-12)


def _normalized_cls(per_sample: Tensor, labels: Tensor, cluster: Tensor, normalize: str, zero: Tensor,
                    denominator: int | None = None, weight: Tensor | None = None) -> Tensor:
    """Combine (M,) per-sample losses of the labelled samples (``labels`` (M,) >= 0), weighted by
    ``weight`` (M,) when given (``IncTargets.weight``)."""
    if per_sample.numel() == 0:
        return zero
    if normalize == "samples":
        return zero + _weighted_mean(per_sample, weight)
    if normalize == "supervised":
        return zero + (per_sample if weight is None else per_sample * weight).sum() / denominator
    pos = labels > 0
    members = cluster_mean(per_sample[pos] if weight is None else per_sample[pos] * weight[pos], cluster[pos])
    return zero + members + _weighted_mean(per_sample[~pos], None if weight is None else weight[~pos])


def inc_classification_loss(logits: Tensor, targets: IncTargets, normalize: str = "cluster",
                            gamma: float = 2.0, denominator: int | None = None) -> Tensor:
    """R-CNN INC classification: softmax focal loss (Eq. (2)).

    Args:
        logits: (N, K + 1) student class logits on the N RoIs (class 0 = background).
        targets: the RoIs' :class:`IncTargets` (``labels`` in -1..K).
        normalize: ``"cluster"`` | ``"samples"`` | ``"supervised"`` (module docstring). gamma: focal gamma.
        denominator: the supervised denominator (B x sampled RoIs per image); ``"supervised"`` only.

    Returns:
        A scalar.
    """
    _check_normalize(normalize, denominator)
    zero = logits.sum() * 0.0
    used = (targets.labels >= 0).nonzero().squeeze(1)
    labels = targets.labels[used]
    per_sample = softmax_focal_loss(logits[used], labels, gamma, reduction="none")
    weight = None if targets.weight is None else targets.weight[used].to(per_sample.dtype)
    return _normalized_cls(per_sample, labels, targets.cluster[used], normalize, zero, denominator, weight)


def inc_objectness_loss(logits: Tensor, targets: IncTargets, normalize: str = "cluster",
                        gamma: float = 2.0, alpha: float = -1.0, denominator: int | None = None) -> Tensor:
    """RPN INC objectness: sigmoid focal loss (``torchvision.ops.sigmoid_focal_loss``).

    ``alpha=-1`` (default) applies no positive/negative weighting: the ``cluster``
    normalisation already gives positives and background equal total weight, and the R-CNN
    softmax focal loss has no alpha either; pass ``alpha=0.25`` for RetinaNet's weighting.

    Args:
        logits: (N,) student objectness logits on the N student anchors.
        targets: the anchors' :class:`IncTargets` (``labels`` in {1, 0, -1}).
        denominator: the supervised denominator (B x sampled anchors per image); ``"supervised"`` only.

    Returns:
        A scalar.
    """
    _check_normalize(normalize, denominator)
    zero = logits.sum() * 0.0
    used = (targets.labels >= 0).nonzero().squeeze(1)
    labels = targets.labels[used]
    x = logits.reshape(-1)[used]
    per_sample = sigmoid_focal_loss(x, labels.to(x.dtype), alpha=alpha, gamma=gamma, reduction="none")
    weight = None if targets.weight is None else targets.weight[used].to(per_sample.dtype)
    return _normalized_cls(per_sample, labels, targets.cluster[used], normalize, zero, denominator, weight)


def inc_regression_loss(deltas: Tensor, targets: IncTargets, normalize: str = "cluster",
                        beta: float = 1 / 9, denominator: int | None = None) -> Tensor:
    """INC regression: smooth L1 (summed over the 4 coordinates) toward ``reg_targets`` (Eq. (3)).

    Args:
        deltas: (N, 4) student deltas, already selected for the member's class (R-CNN,
            :func:`select_class_deltas` with ``targets.classes``) or the anchor's (RPN).
        targets: :class:`IncTargets`; only ``reg_mask`` rows are used.
        normalize: ``"cluster"``: mean within each cluster (over its members with a target),
            then over clusters; ``"samples"``: sum / number of labelled samples (:func:`labelled_count`);
            ``"supervised"``: sum / ``denominator`` (as torchvision divides its box loss).
        beta: smooth L1 beta (torchvision's R-CNN uses 1/9).

    Returns:
        A scalar.
    """
    _check_normalize(normalize, denominator)
    zero = deltas.sum() * 0.0
    idx = targets.reg_mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return zero
    target = targets.reg_targets[idx].to(deltas.dtype)
    per_sample = F.smooth_l1_loss(deltas[idx], target, beta=beta, reduction="none").sum(dim=1)
    if normalize == "samples":
        return zero + per_sample.sum() / max(labelled_count(targets), 1.0)
    if normalize == "supervised":
        return zero + per_sample.sum() / denominator
    return zero + cluster_mean(per_sample, targets.cluster[idx])


# ----------------------------------------------------------------------------- Rank Matching


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


RM_SCALES = ("inc", "clusters")


def inc_rank_matching_loss(student_scores: Tensor, teacher_scores: Tensor, cluster: Tensor,
                           normalize: str = "cluster", T: float = 1.0, scale: str = "inc",
                           denominator: int | None = None, labelled: float = 0) -> Tensor:
    """Rank Matching over clusters, on the scale of the INC losses (docs/method.md, "Rank Matching").

    ``scale="inc"`` combines the per-cluster KL ``L_j`` (:func:`cluster_kl`) the way ``normalize``
    combines INC's per-member losses, so that ``L_RM / L_cls`` does not depend on the
    normalisation and ``rm_weight`` is the paper's beta: ``cluster``: the mean of ``L_j`` over
    every cluster (a one-member cluster adds 0 and counts, as the paper writes); ``samples``:
    ``sum_j N_j L_j / labelled``; ``supervised``: ``sum_j N_j L_j / denominator``. A cluster of
    ``N_j`` members thus weighs in RM what its members weigh in INC. ``scale="clusters"`` (before
    issue 25): the mean of ``L_j`` over clusters of at least 2 members, whatever ``normalize``.

    Args:
        student_scores: (M,) the student's score of each cluster member for its cluster's class
            (or its objectness); teacher_scores: (M,) the teacher's (no gradient reaches them).
        cluster: (M,) int64 cluster id of each member (``IncTargets.cluster`` of the members).
        denominator: the supervised denominator; ``"supervised"`` only.
        labelled: the number of labelled samples (:func:`labelled_count`); ``"samples"`` only.

    Returns:
        A scalar attached to ``student_scores``'s graph.
    """
    _check_normalize(normalize, denominator)
    if scale not in RM_SCALES:
        raise ValueError(f"scale must be one of {RM_SCALES}, got {scale!r}")
    if scale == "clusters":
        return rank_matching_loss(student_scores, teacher_scores, cluster, T)
    zero = (student_scores.to(torch.promote_types(student_scores.dtype, torch.float32)) * 0.0).sum()
    if cluster.numel() == 0:
        return zero
    kl, counts = cluster_kl(student_scores, teacher_scores, cluster, T)
    if normalize == "cluster":
        return zero + kl.mean()
    den = denominator if normalize == "supervised" else max(labelled, 1.0)
    return zero + (kl * counts.to(kl.dtype)).sum() / den
