"""Inverse NMS Clustering (INC) targets for the R-CNN and RPN stages (docs/method.md, "INC in the R-CNN stage" and "INC in the RPN stage").

The teacher's dense predictions are clustered by its own greedy NMS
(:mod:`dtg.methods.dtg.clusters`); every cluster member's student sample gets the
cluster's class and regresses toward the cluster's kept box mapped into the student view.
Target building is pure and gradient-free and reads no config (the stage's config is applied
in :mod:`dtg.methods.dtg.image_targets`); the losses live in :mod:`dtg.methods.dtg.losses`.

All boxes are ``xyxy`` in continuous pixel coordinates. A regression target is dropped
(``reg_mask`` False, the class label stays) when the mapped target box or the student's
reference box (RoI or anchor) is narrower or shorter than ``MIN_BOX_SIZE`` after clipping:
encoding relative to, or toward, a sub-pixel box gives meaningless (or infinite) codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image

from dtg.geometry import project_boxes, valid_boxes
from dtg.methods.dtg.clusters import nms_clusters, rpn_clusters
from dtg.methods.dtg.correspondence import paired_iou

MIN_BOX_SIZE = 1.0  # px; smaller mapped targets / reference boxes get no regression target
RPN_CANDIDATE_MODES = ("threshold_then_nms", "nms_then_threshold")
REG_TARGETS = ("kept", "own")


@dataclass
class IncTargets:
    """Dense targets for N student samples (R-CNN RoIs or student anchors).

    Attributes:
        labels: (N,) int64 training label: the cluster's class (R-CNN 1..K, RPN 1) for members,
            0 background, -1 ignored; all -1 when the INC classification labels are switched off.
        reg_targets: (N, 4) float codes (the stage's box coder) of the target box relative to
            the sample's own student box; zeros where ``reg_mask`` is False.
        reg_mask: (N,) bool, samples with a regression target (members with a proper target);
            all False when the INC regression labels are switched off.
        cluster: (N,) int64 cluster id of members (non-negative; 0..num_clusters-1 as built
            here), -1 otherwise. Kept whatever the switches, for normalisation and Rank Matching.
        teacher_scores: (N,) float teacher probability of the cluster's class (RPN: the
            objectness probability) for members, 0 otherwise.
        num_clusters: number of distinct cluster ids among the members.
        classes: (N,) int64 the assignment ``labels`` holds with the classification switch on
            (members' class, 0, -1), whatever the switch: use it to pick class-specific deltas
            (:func:`select_class_deltas`). Defaults to ``labels`` when not given.
        weight: (N,) float weight of each sample's classification term, or None (all 1). Set by
            the background draw of ``dtg.rcnn.background`` (a drawn background sample stands for
            the ones not drawn: weight = background samples / drawn ones), so the loss stays unbiased.
    """

    labels: Tensor
    reg_targets: Tensor
    reg_mask: Tensor
    cluster: Tensor
    teacher_scores: Tensor
    num_clusters: int
    classes: Tensor | None = None
    weight: Tensor | None = None

    def __post_init__(self) -> None:
        if self.classes is None:
            self.classes = self.labels


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError unless ``value`` is one of ``allowed`` (``name`` names the option)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _assemble(classes: Tensor, cluster: Tensor, scores: Tensor, target_boxes: Tensor, ref_boxes: Tensor,
              box_coder: BoxCoder, cls_labels: bool, reg_labels: bool) -> IncTargets:
    """Encode the members' regression targets and apply the switches.

    Args:
        classes: (N,) int64 class of members (> 0), 0 background, -1 ignored.
        cluster: (N,) int64 cluster id in [0, C) for members, -1 otherwise (contiguous ids).
        scores: (N,) teacher score for members (anything elsewhere; zeroed here).
        target_boxes: (N, 4) xyxy target boxes in the student view (only members' rows are read).
        ref_boxes: (N, 4) xyxy the samples' own student boxes (RoIs or anchors).
    """
    member = cluster >= 0
    dtype = torch.promote_types(ref_boxes.dtype, torch.float32)
    target_boxes, ref_boxes = target_boxes.to(dtype), ref_boxes.to(dtype)
    reg_mask = member & valid_boxes(target_boxes, MIN_BOX_SIZE) & valid_boxes(ref_boxes, MIN_BOX_SIZE)
    if not reg_labels:
        reg_mask = torch.zeros_like(reg_mask)
    reg_targets = ref_boxes.new_zeros(ref_boxes.shape)
    idx = reg_mask.nonzero().squeeze(1)
    if idx.numel():
        reg_targets[idx] = box_coder.encode_single(target_boxes[idx], ref_boxes[idx])
    labels = classes.clone() if cls_labels else torch.full_like(classes, -1)
    num_clusters = int(cluster.max()) + 1 if cluster.numel() else 0  # ids are contiguous 0..C-1
    teacher_scores = torch.where(member, scores.to(dtype), torch.zeros((), dtype=dtype, device=scores.device))
    return IncTargets(labels, reg_targets, reg_mask, cluster, teacher_scores, num_clusters, classes)


@torch.no_grad()
def rcnn_inc_targets(
    teacher_logits: Tensor,
    teacher_deltas: Tensor,
    teacher_proposals: Tensor,
    student_rois: Tensor,
    teacher_to_student: Tensor,
    student_size: tuple[int, int],
    box_coder: BoxCoder,
    tau: float = 0.45,
    iou_threshold: float = 0.5,
    reg_target: str = "kept",
    cls_labels: bool = True,
    reg_labels: bool = True,
    teacher_size: tuple[int, int] | None = None,
    uncertain: float | None = None,
    member_iou: float = 0.0,
    member_topk: bool = False,
) -> IncTargets:
    """INC targets of the R-CNN stage for the P student RoIs of one image (docs/method.md).

    Per teacher proposal: ``c`` = argmax over the foreground classes 1..K of the softmax, ``p``
    its probability, the box decoded with class ``c``'s deltas. Candidates (``p >= tau``) are
    clustered by class-aware greedy NMS; members get label ``c``, non-candidates background 0
    (nothing is ignored). A member regresses toward its cluster's kept box (``reg_target=
    "kept"``) or its own decoded box (``"own"``), mapped into the student view by
    ``project_boxes`` and encoded relative to its own student RoI.

    Args:
        teacher_logits: (P, K + 1) teacher class logits on its own proposals (class 0 = background).
        teacher_deltas: (P, (K + 1) * 4) teacher class-specific deltas.
        teacher_proposals: (P, 4) xyxy proposals in the teacher (weak) view.
        student_rois: (P, 4) xyxy the same proposals mapped into the student view (one to one).
        teacher_to_student: (3, 3) matrix ``M`` from the teacher view to the student view.
        student_size: ``(H, W)`` of the student view.
        box_coder: the R-CNN ``BoxCoder`` (weights 10, 10, 5, 5).
        tau: candidate threshold on ``p``; iou_threshold: NMS IoU (suppress when ``> iou``).
        reg_target: ``"kept"`` | ``"own"``.
        cls_labels / reg_labels: INC classification / regression labels on or off.
        teacher_size: ``(H, W)`` of the teacher view; when given, decoded boxes are clipped to
            it before NMS (as torchvision's post-processing does). Extension of the brief's API.
        uncertain: when given (< ``tau``), non-candidates with ``uncertain <= p < tau`` are
            ignored (-1) instead of background: an unsure teacher does not teach "background"
            on what may be an object. ``None`` (the paper): every non-candidate is background.
        member_iou / member_topk: which members stay positives (:func:`keep_members`); the others
            become background. ``0.0`` / ``False``: every member (the paper).

    Returns:
        :class:`IncTargets` over the P RoIs; cluster ids are 0..num_clusters-1 in NMS keep order
        (renumbered over the clusters that keep a member).
    """
    check_choice("reg_target", reg_target, REG_TARGETS)
    num = teacher_logits.shape[0]
    dtype = torch.promote_types(teacher_proposals.dtype, torch.float32)
    prob = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)).softmax(dim=-1)
    p, c = prob[:, 1:].max(dim=1)
    c = c + 1
    rows = torch.arange(num, device=c.device)
    deltas = teacher_deltas.reshape(num, -1, 4)[rows, c].to(dtype)
    boxes = box_coder.decode_single(deltas, teacher_proposals.to(dtype))
    if teacher_size is not None:
        boxes = clip_boxes_to_image(boxes, teacher_size)

    cand = (p >= tau).nonzero().squeeze(1)
    keep, clus = nms_clusters(boxes[cand], p[cand], c[cand], iou_threshold)
    kept_box = cand[keep[clus]]  # (C,) the proposal whose box is each candidate's cluster target
    if member_iou > 0 or member_topk:
        overlap = paired_iou(teacher_proposals[cand].to(dtype), boxes[kept_box][:, None])[:, 0]
        stay = keep_members(clus, overlap, p[cand], member_iou, member_topk)
        cand, kept_box = cand[stay], kept_box[stay]
        clus = torch.unique(clus[stay], return_inverse=True)[1]  # clusters left, in keep order
    cluster = torch.full((num,), -1, dtype=torch.int64, device=c.device)
    cluster[cand] = clus
    background = p < uncertain if uncertain is not None and uncertain < tau else torch.ones_like(p, dtype=torch.bool)
    background = background | (p >= tau)  # candidates that are no member any more (member_iou / member_topk)
    classes = torch.where(cluster >= 0, c, torch.where(background, 0, -1))
    target = boxes.clone()
    if reg_target == "kept":
        target[cand] = boxes[kept_box]
    target = project_boxes(target, teacher_to_student, student_size)
    return _assemble(classes, cluster, p, target, student_rois, box_coder, cls_labels, reg_labels)


TOPK_IOUS = 12  # the IoUs summed for a cluster's dynamic k (keep_members)


def keep_members(cluster: Tensor, overlap: Tensor, score: Tensor, min_iou: float = 0.0, topk: bool = False) -> Tensor:
    """Which cluster members stay positives (``dtg.rcnn.member_iou``, ``dtg.rcnn.member_topk``).

    ``min_iou > 0``: members whose *proposal* overlaps their cluster's kept box by at least
    ``min_iou`` (a member joins its cluster through its regressed box, so its proposal can cover
    a fraction of the object; torchvision's sampler calls such a proposal background below 0.5).
    ``topk``: in each cluster the ``k`` members of largest ``sqrt(overlap * score)``, with
    ``k = max(1, int(sum of the cluster's 12 largest overlaps)))``, the dynamic k of the
    DTG authors' later label assignment (PseCo); applied after ``min_iou``.

    Args:
        cluster: (M,) int64 cluster id of each member (any non-negative ids).
        overlap: (M,) IoU of each member's proposal with its cluster's kept box.
        score: (M,) the teacher's score of each member.

    Returns:
        (M,) bool, True for members that stay.
    """
    stay = overlap >= min_iou if min_iou > 0 else torch.ones_like(cluster, dtype=torch.bool)
    if not topk or cluster.numel() == 0:
        return stay
    _, seg = torch.unique(cluster, return_inverse=True)
    ov = torch.where(stay, overlap, 0.0)
    top_sum = torch.zeros(int(seg.max()) + 1, dtype=ov.dtype, device=ov.device).index_add(
        0, seg, torch.where(rank_within(seg, ov) < TOPK_IOUS, ov, 0.0))
    k = top_sum.floor().to(torch.int64).clamp(min=1)
    quality = torch.where(stay, (overlap * score).clamp(min=0).sqrt(), -1.0)
    return stay & (rank_within(seg, quality) < k[seg])


def rank_within(segment: Tensor, value: Tensor) -> Tensor:
    """(M,) int64 rank of each value within its segment, largest first (0 = largest; ties: lower index first).

    Args:
        segment: (M,) int64 ids in [0, S); value: (M,) float.
    """
    by_value = torch.argsort(value, descending=True, stable=True)
    order = by_value[torch.argsort(segment[by_value], stable=True)]  # by segment, then by value
    counts = torch.bincount(segment, minlength=int(segment.max()) + 1 if segment.numel() else 0)
    start = counts.cumsum(0) - counts
    rank = torch.empty_like(segment)
    rank[order] = torch.arange(segment.numel(), device=segment.device) - start[segment[order]]
    return rank


@torch.no_grad()
def rpn_inc_targets(
    teacher_objectness: Tensor,
    teacher_deltas: Tensor,
    teacher_anchors: Tensor,
    teacher_levels: Tensor,
    partner: Tensor,
    student_anchors: Tensor,
    teacher_to_student: Tensor,
    student_size: tuple[int, int],
    teacher_size: tuple[int, int],
    box_coder: BoxCoder,
    tau: float = 0.9,
    iou_threshold: float = 0.7,
    candidates: str = "threshold_then_nms",
    cls_labels: bool = True,
    reg_labels: bool = True,
    reg_target: str = "kept",
    pre_nms_top_n: int = 2000,
    uncertain: float | None = None,
) -> IncTargets:
    """INC targets of the RPN stage for the A_s student anchors of one image (docs/method.md).

    Teacher proposals are the RPN deltas decoded on the teacher anchors, clipped to
    ``teacher_size``; scores are ``sigmoid(objectness)``; NMS runs per FPN level.

    * ``threshold_then_nms`` (default): members are the anchors scoring ``>= tau``, clustered by
      NMS among themselves; every other teacher anchor is background.
    * ``nms_then_threshold`` (ablation): NMS per level over a pool (each level's
      ``pre_nms_top_n`` best anchors, plus every anchor scoring ``>= tau``); clusters whose kept
      box scores ``>= tau`` are positive with **all** their members (low-scoring ones too),
      everything else (other clusters, anchors outside the pool) is background. Since greedy
      NMS decides a box only from higher-scoring boxes, the clustering of the ``>= tau``
      anchors is the same in both modes; this mode adds the low-scoring members.

    Each teacher anchor votes for its ``partner`` student anchor: 1 if a member, else 0.
    When several teacher anchors share a partner, the one of highest objectness decides
    (ties: the higher teacher index), vectorised with ``scatter_reduce(amax)`` over score
    ranks. Student anchors without a voter are ignored (-1). A positive's cluster, teacher
    score and regression target come from its deciding teacher anchor; the target is that
    anchor's cluster's kept proposal (``reg_target="own"``: its own proposal) mapped into the
    student view, encoded relative to the student anchor with the RPN box coder.

    Args:
        teacher_objectness: (A_t,) logits over all teacher anchors of one image.
        teacher_deltas: (A_t, 4) RPN deltas. teacher_anchors: (A_t, 4) xyxy, teacher view.
        teacher_levels: (A_t,) int64 FPN level (>= 0) of each teacher anchor.
        partner: (A_t,) int64 student anchor index of each teacher anchor, -1 for none
            (:func:`dtg.methods.dtg.correspondence.match_anchors`).
        student_anchors: (A_s, 4) xyxy student anchors (student view).
        teacher_to_student: (3, 3); student_size / teacher_size: ``(H, W)`` of the views.
        box_coder: the RPN ``BoxCoder`` (weights 1, 1, 1, 1).
        tau: objectness probability threshold; iou_threshold: NMS IoU.
        candidates: ``"threshold_then_nms"`` | ``"nms_then_threshold"``.
        pre_nms_top_n: per-level pool size of ``nms_then_threshold`` (keeps its NMS cheap).
        uncertain: when given (< ``tau``), a partner whose deciding teacher anchor is not a
            member and scores ``uncertain <= score < tau`` is ignored (-1) instead of background.

    Returns:
        :class:`IncTargets` over the A_s student anchors; labels in {1, 0, -1}; cluster ids are
        renumbered 0..num_clusters-1 over the clusters that reach at least one student anchor.
    """
    check_choice("candidates", candidates, RPN_CANDIDATE_MODES)
    check_choice("reg_target", reg_target, REG_TARGETS)
    num_t, num_s = teacher_objectness.shape[0], student_anchors.shape[0]
    device = teacher_objectness.device
    if num_t == 0:  # no teacher anchor: every student anchor is ignored
        none = torch.full((num_s,), -1, dtype=torch.int64, device=device)
        return _assemble(none, none, student_anchors.new_zeros(num_s), student_anchors, student_anchors,
                         box_coder, cls_labels, reg_labels)
    dtype = torch.promote_types(teacher_anchors.dtype, torch.float32)
    score = teacher_objectness.to(torch.promote_types(teacher_objectness.dtype, torch.float32)).sigmoid()
    boxes = box_coder.decode_single(teacher_deltas.reshape(-1, 4).to(dtype), teacher_anchors.to(dtype))
    boxes = clip_boxes_to_image(boxes, teacher_size)
    kept_of = rpn_clusters(score, boxes, teacher_levels, tau, iou_threshold, candidates, pre_nms_top_n)
    decider = deciding_teacher_anchor(score, partner, num_s)
    d = decider.clamp(min=0)
    positive = (decider >= 0) & (kept_of[d] >= 0)
    negative = decider >= 0
    if uncertain is not None and uncertain < tau:
        negative = negative & (score[d] < uncertain)
    classes = torch.where(positive, 1, torch.where(negative, 0, -1))
    _, inverse = torch.unique(kept_of[d][positive], return_inverse=True)
    cluster = torch.full((num_s,), -1, dtype=torch.int64, device=device)
    cluster[positive] = inverse
    source = kept_of[d] if reg_target == "kept" else d
    target = student_anchors.to(dtype).clone()  # only the positive rows are read by _assemble
    rows = positive.nonzero().squeeze(1)
    target[rows] = project_boxes(boxes[source[rows]], teacher_to_student, student_size)
    return _assemble(classes, cluster, score[d], target, student_anchors, box_coder, cls_labels, reg_labels)


def deciding_teacher_anchor(score: Tensor, partner: Tensor, num_student: int) -> Tensor:
    """Per student anchor, the teacher anchor that decides its label: the partner of highest score.

    Args:
        score: (A_t,) teacher objectness probabilities; partner: (A_t,) int64 student anchor of
        each teacher anchor, -1 for none; num_student: A_s.

    Returns:
        (A_s,) int64 teacher anchor index, -1 where no teacher anchor chose the student anchor.
        Ties in score go to the higher teacher index (a stable ascending rank, ``amax``).
    """
    num_t = score.shape[0]
    order = torch.argsort(score, stable=True)  # ascending, so the higher rank wins
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_t, device=score.device)
    has = partner >= 0
    best = torch.full((num_student,), -1, dtype=torch.int64, device=score.device)
    best = best.scatter_reduce(0, partner[has], rank[has], reduce="amax", include_self=True)
    return torch.where(best >= 0, order[best.clamp(min=0)], -1)
