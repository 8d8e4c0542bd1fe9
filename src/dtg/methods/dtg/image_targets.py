"""INC targets of one image as training builds them, and operations on a batch's targets (docs/method.md, "INC in the R-CNN stage" and "INC in the RPN stage").

:func:`rcnn_image_targets` and :func:`rpn_image_targets` wrap the pure target builders of
:mod:`dtg.methods.dtg.targets` with the view correspondence (proposals mapped into the student view,
teacher anchors paired with student anchors) and the stage's config of a run
(:class:`dtg.config.RcnnStageConfig` ``dtg.rcnn``, :class:`dtg.config.RpnStageConfig` ``dtg.rpn``);
:func:`concat_targets`, :func:`ignore_samples`, :func:`keep_members_and_sample_background`,
:func:`weigh_and_sample_background`, :func:`sample_as_supervised`, :func:`append_kept_boxes` and
:func:`take_samples` combine and select targets. Called alike by
the stages of :class:`dtg.methods.dtg.DTGMethod`, ``dtg explain``, ``dtg bench targets`` and the benchmarks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from dtg.config import RcnnStageConfig, RpnStageConfig
from dtg.geometry import valid_boxes
from dtg.methods.dtg.correspondence import (
    AnchorGrid, area_levels, map_anchors, map_proposals, match_anchors, match_anchors_one_to_one,
)
from dtg.methods.dtg.targets import MIN_BOX_SIZE, IncTargets, check_choice, rcnn_inc_targets, rpn_inc_targets

ANCHOR_LEVELS = ("box", "area")
ANCHOR_TIES = ("even", "up")
TRANSFERS = ("max", "one_to_one")


class RcnnImageTargets(NamedTuple):
    """What :func:`rcnn_image_targets` builds for one image."""

    rois: Tensor  # (P, 4) xyxy student RoIs, row i = teacher proposal i mapped into the student view
    targets: IncTargets  # over the P RoIs, the RoIs that left the student view ignored: what the losses use
    clustered: IncTargets  # the same before that: every candidate's cluster (for drawing and diagnostics)
    outside: Tensor  # (P,) bool, RoIs that left the student view


def rcnn_image_targets(
    teacher_logits: Tensor, teacher_deltas: Tensor, proposals: Tensor, teacher_to_student: Tensor,
    student_size: tuple[int, int], teacher_size: tuple[int, int], box_coder: BoxCoder, stage: RcnnStageConfig,
) -> RcnnImageTargets:
    """The student RoIs of one image and their R-CNN INC targets, exactly as training builds them.

    The teacher's P proposals are mapped one to one into the student view
    (:func:`~dtg.methods.dtg.correspondence.map_proposals`); RoIs that left the view (narrower or
    shorter than 1 px) are ignored.

    Args:
        teacher_logits: (P, K + 1); teacher_deltas: (P, (K + 1) * 4) the teacher's R-CNN on its
            own (P, 4) xyxy ``proposals`` (weak view).
        teacher_to_student: (3, 3); student_size / teacher_size: ``(H, W)``.
        box_coder: the R-CNN box coder (:attr:`dtg.models.detector.Detector.rcnn_box_coder`).
        stage: the R-CNN stage's config (``dtg.rcnn``: ``tau``, ``nms``, ``uncertain``, ``inc_cls``,
            ``inc_reg``, ``reg_target``).

    Returns:
        :class:`RcnnImageTargets`.
    """
    rois = map_proposals(proposals, teacher_to_student, student_size)
    tg = rcnn_inc_targets(
        teacher_logits, teacher_deltas, proposals, rois, teacher_to_student, student_size, box_coder,
        tau=stage.tau, iou_threshold=stage.nms, reg_target=stage.reg_target,
        cls_labels=stage.inc_cls, reg_labels=stage.inc_reg, teacher_size=teacher_size,
        uncertain=stage.uncertain, member_iou=stage.member_iou, member_topk=stage.member_topk,
    )
    outside = ~valid_boxes(rois, MIN_BOX_SIZE)  # left the student view
    return RcnnImageTargets(rois, ignore_samples(tg, outside), tg, outside)


def anchor_partners(teacher_anchors: Tensor, teacher_to_student: Tensor, grid: AnchorGrid, canonical: float,
                    stage: RpnStageConfig, objectness: Tensor | None = None) -> Tensor:
    """(A_t,) int64 student anchor paired with each (A_t, 4) teacher anchor, -1 for none (``stage.anchor_level``,
    ``stage.anchor_ties``, ``stage.anchor_radius``, ``stage.transfer``); ``canonical`` is the anchor size of
    FPN level 0 (``model.anchor_sizes[0]``); ``objectness`` (A_t,) orders the teacher anchors for
    ``transfer=one_to_one`` (:func:`~dtg.methods.dtg.correspondence.match_anchors_one_to_one`)."""
    check_choice("anchor_level", stage.anchor_level, ANCHOR_LEVELS)
    levels = (area_levels(teacher_anchors, teacher_to_student, grid.num_levels, canonical)
              if stage.anchor_level == "area" else None)
    check_choice("anchor_ties", stage.anchor_ties, ANCHOR_TIES)
    check_choice("transfer", stage.transfer, TRANSFERS)
    mapped = map_anchors(teacher_anchors, teacher_to_student)
    if stage.transfer == "one_to_one":
        if objectness is None:
            raise ValueError("transfer='one_to_one' needs the teacher anchors' objectness")
        return match_anchors_one_to_one(mapped, objectness, grid, canonical, stage.anchor_radius, levels,
                                        stage.anchor_ties == "up")
    return match_anchors(mapped, grid, canonical, stage.anchor_radius, levels, stage.anchor_ties == "up")


def rpn_image_targets(
    teacher_objectness: Tensor, teacher_deltas: Tensor, teacher_anchors: Tensor, teacher_levels: Tensor,
    grid: AnchorGrid, teacher_to_student: Tensor, student_size: tuple[int, int], teacher_size: tuple[int, int],
    box_coder: BoxCoder, canonical: float, stage: RpnStageConfig,
) -> IncTargets:
    """RPN INC targets over the student anchors of one image, with the anchor correspondence.

    Each teacher anchor is mapped into the student view and paired with a student anchor
    (:func:`~dtg.methods.dtg.correspondence.match_anchors`), then :func:`rpn_inc_targets`.

    Args:
        teacher_objectness: (A_t,) logits; teacher_deltas: (A_t, 4); teacher_anchors: (A_t, 4)
            xyxy; teacher_levels: (A_t,) int64 FPN level.
        grid: the student anchor layout (:func:`~dtg.methods.dtg.correspondence.anchor_grid`).
        box_coder: the RPN box coder (:attr:`dtg.models.detector.Detector.rpn_box_coder`).
        canonical: the anchor size of FPN level 0 (``model.anchor_sizes[0]``).
        stage: the RPN stage's config (``dtg.rpn``: ``tau``, ``nms``, ``uncertain``, ``candidates``,
            ``inc_cls``, ``inc_reg``, ``reg_target`` and the ``anchor_*`` keys).

    Returns:
        :class:`IncTargets` over ``grid.anchors``.
    """
    partner = anchor_partners(teacher_anchors, teacher_to_student, grid, canonical, stage, teacher_objectness)
    return rpn_inc_targets(
        teacher_objectness, teacher_deltas, teacher_anchors, teacher_levels, partner, grid.anchors,
        teacher_to_student, student_size, teacher_size, box_coder,
        tau=stage.tau, iou_threshold=stage.nms, candidates=stage.candidates,
        cls_labels=stage.inc_cls, reg_labels=stage.inc_reg, reg_target=stage.reg_target,
        uncertain=stage.uncertain,
    )


def concat_targets(parts: list[IncTargets]) -> IncTargets:
    """Concatenate per-image targets; cluster ids are offset so that images never share a cluster."""
    offset, clusters = 0, []
    for p in parts:
        clusters.append(torch.where(p.cluster >= 0, p.cluster + offset, p.cluster))
        offset += int(p.cluster.max()) + 1 if p.cluster.numel() else 0  # max is -1 without members
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    weight = None
    if any(p.weight is not None for p in parts):
        weight = torch.cat([p.weight if p.weight is not None else p.teacher_scores.new_ones(p.labels.shape)
                            for p in parts])
    return IncTargets(
        labels=cat("labels"), reg_targets=cat("reg_targets"), reg_mask=cat("reg_mask"),
        cluster=torch.cat(clusters), teacher_scores=cat("teacher_scores"),
        num_clusters=sum(p.num_clusters for p in parts), classes=cat("classes"), weight=weight,
    )


def ignore_samples(t: IncTargets, ignore: Tensor) -> IncTargets:
    """Targets with the samples in the (N,) bool mask ``ignore`` removed from every loss."""
    neg = torch.full_like(t.labels, -1)
    cluster = torch.where(ignore, neg, t.cluster)
    return replace(
        t,
        labels=torch.where(ignore, neg, t.labels),
        classes=torch.where(ignore, neg, t.classes),
        reg_mask=t.reg_mask & ~ignore,
        cluster=cluster,
        num_clusters=int(cluster[cluster >= 0].unique().numel()),  # clusters with a member left
    )


def keep_members_and_sample_background(t: IncTargets, num: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of the samples one image keeps under the R-CNN cost switch (``dtg.rcnn.subsample``).

    Every cluster member is kept; background samples (label 0) are drawn at random, without
    replacement, to fill the image up to ``num`` samples (none when the members alone reach it);
    ignored samples are dropped (they carry no loss).

    Args:
        t: one image's :class:`IncTargets` over N samples.
        num: samples per image (``model.roi_batch_size_per_image``).
        generator: random source (default: torch's global one, seeded by the run).

    Returns:
        (K,) int64 sorted indices into the N samples, ``K = members + min(background, max(num - members, 0))``.
    """
    members = (t.cluster >= 0).nonzero().squeeze(1)
    background = ((t.classes == 0) & (t.cluster < 0)).nonzero().squeeze(1)
    room = max(num - members.numel(), 0)
    if background.numel() > room:
        pick = torch.randperm(background.numel(), generator=generator, device=background.device)[:room]
        background = background[pick]
    return torch.cat([members, background]).sort().values


def sample_as_supervised(t: IncTargets, num: int, generator: torch.Generator | None = None) -> IncTargets:
    """One image's targets with every sample outside a supervised-style draw ignored (``dtg.rpn.subsample``).

    The draw is :func:`keep_members_and_sample_background` (every member, background drawn at
    random to fill ``num``); the samples it leaves out get label -1, so the loss sees what the
    supervised RPN's sampler lets it see (``model.rpn_batch_size_per_image`` anchors per image)
    while the tensors keep one row per anchor.
    """
    keep = keep_members_and_sample_background(t, num, generator)
    out = torch.ones_like(t.labels, dtype=torch.bool)
    out[keep] = False
    return ignore_samples(t, out)


def weigh_and_sample_background(t: IncTargets, num: int,
                                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Indices and weights of the samples one image keeps under ``dtg.rcnn.background`` (a cost switch).

    Every cluster member is kept with weight 1; ignored samples are dropped (they carry no loss);
    ``num`` of the B background samples (label 0) are drawn at random, without replacement, each
    with weight ``B / num`` (all of them, weight 1, when ``B <= num``). The weighted background
    loss is then an unbiased estimate of the loss over all B, whatever the number of members:
    unlike :func:`keep_members_and_sample_background`, more members never take the negatives' place.

    Args:
        t: one image's :class:`IncTargets` over N samples.
        num: background samples drawn per image (>= 1).
        generator: random source (default: torch's global one, seeded by the run).

    Returns:
        ``(index, weight)``: (K,) int64 sorted indices into the N samples, ``K = members + min(B, num)``,
        and (K,) float weights in the dtype of ``t.teacher_scores``.
    """
    members = (t.cluster >= 0).nonzero().squeeze(1)
    background = ((t.classes == 0) & (t.cluster < 0)).nonzero().squeeze(1)
    scale = 1.0
    if background.numel() > num:
        scale = background.numel() / num
        draw = torch.randperm(background.numel(), generator=generator, device=background.device)[:num]
        background = background[draw]
    index, order = torch.cat([members, background]).sort()
    weight = torch.cat([t.teacher_scores.new_ones(members.numel()),
                        t.teacher_scores.new_full((background.numel(),), scale)])
    return index, weight[order]


def append_kept_boxes(rois: Tensor, t: IncTargets, box_coder: BoxCoder) -> tuple[Tensor, IncTargets, Tensor]:
    """Each cluster's target box appended as one more RoI of that cluster (``dtg.rcnn.append_kept``).

    As Faster R-CNN appends the ground-truth boxes to the proposals (and sparse its pseudo boxes),
    the student then scores one RoI per cluster that *is* the kept box: a positive whose
    regression target is zero deltas and that the student should score highest in its cluster.
    The box is decoded from the cluster's highest-scoring member with a regression target (every
    member regresses toward the kept box with ``reg_target=kept``; with ``own`` the top member is
    the kept proposal itself whenever it stayed a member). Clusters with no such member get none.

    Args:
        rois: (N, 4) xyxy student RoIs; t: their :class:`IncTargets` (one image).
        box_coder: the R-CNN box coder the targets were encoded with.

    Returns:
        ``(rois, targets, source)``: (N + C', 4) RoIs and targets, the C' appended samples last
        (label and class the cluster's, its cluster id, zero regression targets, the source
        member's teacher score and weight 1), and (N + C',) int64 the sample each row copies its
        teacher outputs from (``arange(N)`` then the source members).
    """
    n = rois.shape[0]
    cand = (t.reg_mask & (t.cluster >= 0)).nonzero().squeeze(1)
    if cand.numel() == 0:
        return rois, t, torch.arange(n, device=rois.device)
    # the top member of each cluster: sort by score (descending), then stably by cluster, first of each
    by_score = cand[torch.argsort(t.teacher_scores[cand], descending=True, stable=True)]
    by_cluster = by_score[torch.argsort(t.cluster[by_score], stable=True)]
    first = torch.ones_like(by_cluster, dtype=torch.bool)
    first[1:] = t.cluster[by_cluster[1:]] != t.cluster[by_cluster[:-1]]
    src = by_cluster[first]
    boxes = box_coder.decode_single(t.reg_targets[src].to(rois.dtype), rois[src])
    weight = t.weight
    if weight is not None:
        weight = torch.cat([weight, weight.new_ones(src.numel())])
    both = lambda x, tail: torch.cat([x, tail])  # noqa: E731
    extended = IncTargets(
        labels=both(t.labels, t.labels[src]), reg_targets=both(t.reg_targets, torch.zeros_like(t.reg_targets[src])),
        reg_mask=both(t.reg_mask, torch.ones_like(t.reg_mask[src])), cluster=both(t.cluster, t.cluster[src]),
        teacher_scores=both(t.teacher_scores, t.teacher_scores[src]), num_clusters=t.num_clusters,
        classes=both(t.classes, t.classes[src]), weight=weight,
    )
    return torch.cat([rois, boxes]), extended, torch.cat([torch.arange(n, device=rois.device), src])


def take_samples(t: IncTargets, index: Tensor, weight: Tensor | None = None) -> IncTargets:
    """The targets of the samples at ``index`` (cluster ids unchanged); ``weight`` (K,), when given,
    replaces the samples' weights (else they keep theirs)."""
    cluster = t.cluster[index]
    if weight is None and t.weight is not None:
        weight = t.weight[index]
    return IncTargets(
        labels=t.labels[index], reg_targets=t.reg_targets[index], reg_mask=t.reg_mask[index], cluster=cluster,
        teacher_scores=t.teacher_scores[index], num_clusters=int(cluster[cluster >= 0].unique().numel()),
        classes=t.classes[index], weight=weight,
    )
