"""Inverse NMS Clustering: R-CNN / RPN targets on hand-drawn cases, the INC losses, invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder

from dtg.geometry import project_boxes
from dtg.methods.dtg.losses import (
    inc_classification_loss, inc_objectness_loss, inc_regression_loss, select_class_deltas,
)
from dtg.methods.dtg.targets import IncTargets, rcnn_inc_targets, rpn_inc_targets

torch.set_num_threads(1)

RCNN_CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))
RPN_CODER = BoxCoder((1.0, 1.0, 1.0, 1.0))
EYE = torch.eye(3, dtype=torch.float64)
LN2 = math.log(2.0)

# Decoded teacher boxes, class and probability: 3 overlapping class-2 boxes (p 0.9, 0.8, 0.5),
# one class-2 box below tau (0.3), one separate class-1 box (0.6).
BOXES = torch.tensor([[10, 10, 50, 50], [12, 10, 52, 50], [10, 12, 50, 54],
                      [11, 11, 51, 51], [100, 100, 140, 150]], dtype=torch.float64)
PROBS = torch.tensor([[0.05, 0.05, 0.9], [0.1, 0.1, 0.8], [0.2, 0.3, 0.5],
                      [0.5, 0.2, 0.3], [0.1, 0.6, 0.3]], dtype=torch.float64)
SHIFT = torch.tensor([[-2, 1, 3, -1], [1, 2, -3, 2], [0, -2, 2, 3], [2, 2, -2, -2], [-4, 3, 5, -6]],
                     dtype=torch.float64)


def rcnn_case(m: torch.Tensor = EYE, size: tuple[int, int] = (200, 200), **kwargs):
    """Teacher outputs whose class-c decoded boxes are BOXES, and the targets built from them."""
    proposals = BOXES + SHIFT
    deltas = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cls = PROBS[:, 1:].argmax(1) + 1
    deltas[torch.arange(5), cls] = RCNN_CODER.encode_single(BOXES, proposals)
    rois = project_boxes(proposals, m, size)
    t = rcnn_inc_targets(PROBS.log(), deltas.reshape(5, 12), proposals, rois, m, size, RCNN_CODER, **kwargs)
    return t, rois


def decode(coder: BoxCoder, t: IncTargets, refs: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return coder.decode_single(t.reg_targets[rows], refs[rows])


def test_rcnn_hand_drawn() -> None:
    t, rois = rcnn_case()
    assert t.labels.tolist() == [2, 2, 2, 0, 1]
    assert t.classes.tolist() == [2, 2, 2, 0, 1]
    assert t.cluster[0] == t.cluster[1] == t.cluster[2] >= 0
    assert t.cluster[3] == -1 and t.cluster[4] >= 0 and t.cluster[4] != t.cluster[0]
    assert t.num_clusters == 2
    assert t.reg_mask.tolist() == [True, True, True, False, True]
    assert torch.allclose(t.teacher_scores, torch.tensor([0.9, 0.8, 0.5, 0.0, 0.6], dtype=torch.float64))
    assert torch.allclose(decode(RCNN_CODER, t, rois, [0, 1, 2]), BOXES[[0, 0, 0]], atol=1e-6)
    assert torch.allclose(decode(RCNN_CODER, t, rois, [4]), BOXES[[4]], atol=1e-6)
    assert (t.reg_targets[3] == 0).all()
    own, _ = rcnn_case(reg_target="own")
    assert torch.allclose(decode(RCNN_CODER, own, rois, [0, 1, 2, 4]), BOXES[[0, 1, 2, 4]], atol=1e-6)
    assert torch.equal(own.labels, t.labels) and torch.equal(own.cluster, t.cluster)


def test_rcnn_flip_maps_targets_into_student_view() -> None:
    w = 200
    flip = torch.tensor([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    t, rois = rcnn_case(flip, (160, w))
    mirrored = torch.tensor([[w - 50, 10, w - 10, 50], [w - 140, 100, w - 100, 150]], dtype=torch.float64)
    assert t.labels.tolist() == [2, 2, 2, 0, 1]
    assert torch.allclose(decode(RCNN_CODER, t, rois, [0, 1, 2, 4]), mirrored[[0, 0, 0, 1]], atol=1e-6)


def test_rcnn_degenerate_target_keeps_label_drops_regression() -> None:
    # Shift left by 95 px: the class-2 cluster (and its RoIs) leaves the student image.
    shift = torch.tensor([[1.0, 0, -95], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    t, rois = rcnn_case(shift, (200, 200))
    assert t.labels.tolist() == [2, 2, 2, 0, 1]
    assert t.reg_mask.tolist() == [False, False, False, False, True]
    assert torch.isfinite(t.reg_targets).all()
    moved = BOXES[[4]] - torch.tensor([95.0, 0, 95, 0], dtype=torch.float64)
    assert torch.allclose(decode(RCNN_CODER, t, rois, [4]), moved, atol=1e-6)


def test_rcnn_switches() -> None:
    base, _ = rcnn_case()
    no_cls, _ = rcnn_case(cls_labels=False)
    assert (no_cls.labels == -1).all()
    assert torch.equal(no_cls.classes, base.labels) and torch.equal(no_cls.reg_mask, base.reg_mask)
    assert torch.equal(no_cls.cluster, base.cluster)
    no_reg, _ = rcnn_case(reg_labels=False)
    assert not no_reg.reg_mask.any() and (no_reg.reg_targets == 0).all()
    assert torch.equal(no_reg.labels, base.labels)
    with pytest.raises(ValueError):
        rcnn_case(reg_target="all")


# RPN hand case: teacher box, level, probability, partner student anchor.
T_BOXES = torch.tensor([[10, 10, 40, 40], [11, 10, 41, 40], [10, 11, 40, 41], [60, 60, 90, 90],
                        [60, 60, 90, 90], [0, 60, 30, 90], [20, 60, 50, 90], [12, 62, 40, 88],
                        [70, 5, 95, 30]], dtype=torch.float64)
T_LEVELS = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 0])
T_PROBS = torch.tensor([0.98, 0.95, 0.5, 0.92, 0.91, 0.2, 0.1, 0.3, 0.93], dtype=torch.float64)
T_PARTNER = torch.tensor([0, 1, 2, 3, 4, 5, -1, 3, 5])
S_ANCHORS = torch.tensor([[16, 16, 80, 80], [24, 24, 84, 84], [20, 24, 80, 84], [116, 116, 176, 176],
                          [110, 110, 190, 190], [0, 116, 56, 176], [140, 0, 198, 60], [0, 0, 32, 32]],
                         dtype=torch.float64)
SCALE2 = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))


def rpn_case(boxes=T_BOXES, probs=T_PROBS, levels=T_LEVELS, partner=T_PARTNER, **kwargs) -> IncTargets:
    anchors = boxes + SHIFT.repeat(2, 1)[: len(boxes)] / 2
    deltas = RPN_CODER.encode_single(boxes, anchors)
    return rpn_inc_targets(torch.logit(probs), deltas, anchors, levels, partner, S_ANCHORS, SCALE2,
                           (200, 200), (100, 100), RPN_CODER, **kwargs)


def test_rpn_threshold_then_nms() -> None:
    t = rpn_case()
    # s0, s1: t0 (kept) and t1 (suppressed by t0); s2: t2 below tau; s3: t3 beats t7; s4: t4,
    # same box as t3 on another level (own cluster); s5: t8 (0.93) beats t5 (0.2); s6, s7 unmatched.
    assert t.labels.tolist() == [1, 1, 0, 1, 1, 1, -1, -1]
    c = t.cluster.tolist()
    assert c[0] == c[1] and len({c[0], c[3], c[4], c[5]}) == 4 and c[2] == c[6] == c[7] == -1
    assert t.num_clusters == 4
    assert torch.allclose(t.teacher_scores, torch.tensor([0.98, 0.95, 0, 0.92, 0.91, 0.93, 0, 0]).double())
    kept_student = 2 * T_BOXES[[0, 0, 3, 4, 8]]
    assert torch.allclose(decode(RPN_CODER, t, S_ANCHORS, [0, 1, 3, 4, 5]), kept_student, atol=1e-6)
    assert t.reg_mask.tolist() == [True, True, False, True, True, True, False, False]
    own = rpn_case(reg_target="own")
    assert torch.allclose(decode(RPN_CODER, own, S_ANCHORS, [0, 1]), 2 * T_BOXES[[0, 1]], atol=1e-6)


def test_rpn_nms_then_threshold_adds_low_scoring_members() -> None:
    t = rpn_case(candidates="nms_then_threshold")
    # Only s2 changes: t2 (0.5) is suppressed by t0 (0.98) whose cluster passes tau.
    assert t.labels.tolist() == [1, 1, 1, 1, 1, 1, -1, -1]
    assert t.cluster[2] == t.cluster[0] and t.num_clusters == 4
    assert abs(float(t.teacher_scores[2]) - 0.5) < 1e-9
    assert torch.allclose(decode(RPN_CODER, t, S_ANCHORS, [2]), 2 * T_BOXES[[0]], atol=1e-6)
    # Outside the per-level top-1 pool (and below tau), t2 is background again.
    small = rpn_case(candidates="nms_then_threshold", pre_nms_top_n=1)
    assert small.labels.tolist() == [1, 1, 0, 1, 1, 1, -1, -1]


def test_rpn_conflicts_highest_objectness_decides() -> None:
    boxes = torch.tensor([[10, 10, 40, 40], [11, 10, 41, 40], [60, 60, 90, 90], [60, 10, 90, 40]]).double()
    probs = torch.tensor([0.95, 0.5, 0.6, 0.97], dtype=torch.float64)
    partner = torch.tensor([1, 0, 0, 1])  # u1, u2 -> s0; u0, u3 -> s1
    levels = torch.zeros(4, dtype=torch.int64)
    for mode in ("threshold_then_nms", "nms_then_threshold"):
        t = rpn_case(boxes, probs, levels, partner, candidates=mode)
        # s0: background u2 (0.6) beats u1 (0.5, a member in nms_then_threshold);
        # s1: u3 (0.97) beats u0 (0.95): u3's cluster, score and kept box.
        assert t.labels.tolist() == [0, 1, -1, -1, -1, -1, -1, -1]
        assert abs(float(t.teacher_scores[1]) - 0.97) < 1e-9 and t.num_clusters == 1
        assert torch.allclose(decode(RPN_CODER, t, S_ANCHORS, [1]), 2 * boxes[[3]], atol=1e-6)
    # Equal objectness: the higher teacher index decides.
    tie = rpn_case(boxes, torch.tensor([0.95, 0.5, 0.95, 0.2]).double(), levels, torch.tensor([0, 1, 0, 1]))
    assert torch.allclose(decode(RPN_CODER, tie, S_ANCHORS, [0]), 2 * boxes[[2]], atol=1e-6)
    assert tie.labels[1] == 0


def test_rpn_switches_and_empty() -> None:
    assert (rpn_case(cls_labels=False).labels == -1).all()
    assert not rpn_case(reg_labels=False).reg_mask.any()
    empty = rpn_case(T_BOXES[:0], T_PROBS[:0], T_LEVELS[:0], T_PARTNER[:0])
    assert (empty.labels == -1).all() and empty.num_clusters == 0 and not empty.reg_mask.any()
    with pytest.raises(ValueError):
        rpn_case(candidates="both")


def hand_targets() -> IncTargets:
    """Clusters 5 (sample 0) and 9 (samples 1-3), background 4-5, ignored 6-7."""
    labels = torch.tensor([1, 2, 2, 2, 0, 0, -1, -1])
    cluster = torch.tensor([5, 9, 9, 9, -1, -1, -1, -1])
    reg_mask = torch.tensor([True] * 4 + [False] * 4)
    reg = torch.zeros(8, 4)
    reg[:4, 0] = torch.tensor([4.0, 1.0, 2.0, 3.0])  # |delta - target| with zero deltas
    return IncTargets(labels, reg, reg_mask, cluster, torch.zeros(8), 2)


def logits_with_prob(labels: list[int], q: list[float]) -> torch.Tensor:
    """(N, 3) logits whose softmax gives probability q[i] to class labels[i]."""
    probs = torch.tensor([[(1 - qi) / 2] * 3 for qi in q], dtype=torch.float64)
    probs[torch.arange(len(q)), torch.tensor(labels)] = torch.tensor(q, dtype=torch.float64)
    return probs.log()


def test_classification_loss_hand_computed() -> None:
    t = hand_targets()
    # CE (gamma 0): ln2 | ln4, ln4, ln8 | ln2, ln4 | ignored rows predict the wrong class badly.
    q = [1 / 2, 1 / 4, 1 / 4, 1 / 8, 1 / 2, 1 / 4, 1e-6, 1e-6]
    logits = logits_with_prob([1, 2, 2, 2, 0, 0, 1, 1], q)
    logits.requires_grad_(True)
    cluster = inc_classification_loss(logits, t, "cluster", gamma=0.0)
    # (1 + 7/3) / 2 ln2 over the clusters + (1 + 2) / 2 ln2 over the background = 19/6 ln2.
    assert abs(cluster.item() - 19 / 6 * LN2) < 1e-9
    samples = inc_classification_loss(logits, t, "samples", gamma=0.0)
    assert abs(samples.item() - 11 / 6 * LN2) < 1e-9  # (1+2+2+3+1+2) ln2 / 6
    cluster.backward()
    assert (logits.grad[6:] == 0).all() and (logits.grad[:6] != 0).any()
    focal = inc_classification_loss(logits, t, "samples", gamma=2.0)
    per = [(1 - q) ** 2 * -math.log(q) for q in [1 / 2, 1 / 4, 1 / 4, 1 / 8, 1 / 2, 1 / 4]]
    assert abs(focal.item() - sum(per) / 6) < 1e-9
    # supervised denominator: the same sum over the 6 labelled RoIs, divided by B x sampled RoIs
    supervised = inc_classification_loss(logits, t, "supervised", gamma=0.0, denominator=256)
    assert abs(supervised.item() - 11 * LN2 / 256) < 1e-9
    with pytest.raises(ValueError, match="denominator"):
        inc_classification_loss(logits, t, "supervised")


def test_objectness_loss_hand_computed() -> None:
    t = hand_targets()
    t.labels = t.classes = torch.where(t.labels > 0, 1, t.labels)
    x = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, 0.5, 9.0, -9.0], dtype=torch.float64)
    bce = [math.log1p(math.exp(-v)) for v in x[:4].tolist()]  # positives: log(1 + e^-x)
    bce += [math.log1p(math.exp(v)) for v in x[4:6].tolist()]  # background: log(1 + e^x)
    cluster = inc_objectness_loss(x, t, "cluster", gamma=0.0)
    assert abs(float(cluster) - ((bce[0] + sum(bce[1:4]) / 3) / 2 + (bce[4] + bce[5]) / 2)) < 1e-9
    assert abs(float(inc_objectness_loss(x, t, "samples", gamma=0.0)) - sum(bce) / 6) < 1e-9
    assert abs(float(inc_objectness_loss(x, t, "supervised", gamma=0.0, denominator=512)) - sum(bce) / 512) < 1e-9
    ce = F.binary_cross_entropy_with_logits(x[:6], t.labels[:6].double(), reduction="none")
    p_t = torch.where(t.labels[:6] == 1, x[:6].sigmoid(), 1 - x[:6].sigmoid())
    focal = (ce * (1 - p_t) ** 2).sum() / 6  # gamma 2, alpha -1 (no weighting)
    assert abs(float(inc_objectness_loss(x, t, "samples")) - float(focal)) < 1e-9


def test_regression_loss_hand_computed() -> None:
    t = hand_targets()
    deltas = torch.zeros(8, 4, requires_grad=True)
    # L1 (beta 0): cluster 5 -> 4, cluster 9 -> (1 + 2 + 3) / 3 = 2; mean over clusters 3.
    assert abs(inc_regression_loss(deltas, t, "cluster", beta=0.0).item() - 3.0) < 1e-6
    assert abs(inc_regression_loss(deltas, t, "samples", beta=0.0).item() - 10 / 6) < 1e-6  # 6 labelled
    assert abs(inc_regression_loss(deltas, t, "supervised", beta=0.0, denominator=20).item() - 10 / 20) < 1e-6
    smooth = inc_regression_loss(deltas, t, "cluster")  # |x| - beta / 2 for |x| >= beta = 1/9
    assert abs(smooth.item() - (3.0 - 1 / 18)) < 1e-6
    smooth.backward()
    assert (deltas.grad[4:] == 0).all() and (deltas.grad[:4, 0] != 0).all()


def test_cluster_of_three_weighs_as_one() -> None:
    one = hand_targets()
    one.reg_targets[1:4, 0] = 2.0  # cluster 9 members all at loss 2
    three_as_one = IncTargets(one.labels, one.reg_targets, torch.tensor([True, True] + [False] * 6),
                              one.cluster, one.teacher_scores, 2)
    deltas = torch.zeros(8, 4)
    a = inc_regression_loss(deltas, one, "cluster", beta=0.0)
    b = inc_regression_loss(deltas, three_as_one, "cluster", beta=0.0)
    assert abs(float(a) - 3.0) < 1e-6 and abs(float(b) - 3.0) < 1e-6
    assert float(inc_regression_loss(deltas, one, "samples", beta=0.0)) != float(
        inc_regression_loss(deltas, three_as_one, "samples", beta=0.0))


def test_losses_zero_and_backward_without_members() -> None:
    t = hand_targets()
    ignored = IncTargets(torch.full((8,), -1), t.reg_targets, torch.zeros(8, dtype=torch.bool),
                         torch.full((8,), -1), t.teacher_scores, 0)
    logits, obj, deltas = (torch.randn(8, 3, requires_grad=True), torch.randn(8, requires_grad=True),
                           torch.randn(8, 4, requires_grad=True))
    for norm in ("cluster", "samples", "supervised"):
        losses = [inc_classification_loss(logits, ignored, norm, denominator=8),
                  inc_objectness_loss(obj, ignored, norm, denominator=8),
                  inc_regression_loss(deltas, ignored, norm, denominator=8)]
        assert all(v.item() == 0.0 and v.dim() == 0 for v in losses)
        sum(losses).backward()
    assert (logits.grad == 0).all() and (obj.grad == 0).all() and (deltas.grad == 0).all()
    background = IncTargets(torch.zeros(8, dtype=torch.int64), t.reg_targets,
                            torch.zeros(8, dtype=torch.bool), torch.full((8,), -1), t.teacher_scores, 0)
    assert inc_classification_loss(logits, background).item() > 0
    assert inc_regression_loss(deltas, background).item() == 0.0


def test_select_class_deltas() -> None:
    deltas = torch.arange(24.0).reshape(2, 12)
    out = select_class_deltas(deltas, torch.tensor([2, -1]))
    assert out.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
    # a batch that keeps no RoI (rcnn_subsample with every RoI ignored): (0, 4), and a loss of 0
    empty = select_class_deltas(torch.zeros(0, 12, requires_grad=True), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 4)


def test_rcnn_invariants_random() -> None:
    g = torch.Generator().manual_seed(0)
    for it in range(20):
        n, k = 60, 3
        xy = torch.rand(n, 2, generator=g) * 80
        props = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 40], 1)
        logits = torch.randn(n, k + 1, generator=g) * 3
        deltas = torch.randn(n, (k + 1) * 4, generator=g) * 0.3
        m = torch.tensor([[-1.2 if it % 2 else 0.8, 0, 110.0], [0, 1.1, -5], [0, 0, 1]])
        rois = project_boxes(props, m, (120, 110))
        t = rcnn_inc_targets(logits, deltas, props, rois, m, (120, 110), RCNN_CODER, tau=0.45)
        prob = logits.softmax(1)
        p, c = prob[:, 1:].max(1)
        member = t.cluster >= 0
        assert torch.equal(member, p >= 0.45) and torch.equal(t.labels[member], c[member] + 1)
        assert (t.labels[~member] == 0).all() and (t.teacher_scores[~member] == 0).all()
        assert torch.allclose(t.teacher_scores[member], p[member])
        assert (t.labels[t.reg_mask] > 0).all() and torch.isfinite(t.reg_targets).all()
        assert t.cluster[member].unique().numel() == t.num_clusters
        for cid in t.cluster[member].unique():
            rows = (t.cluster == cid).nonzero().squeeze(1)
            top = rows[t.teacher_scores[rows].argmax()]  # the kept box: the cluster's best score
            assert (t.labels[rows] == t.labels[top]).all()
            reg = rows[t.reg_mask[rows]]
            if reg.numel():
                decoded = RCNN_CODER.decode_single(t.reg_targets[reg], rois[reg])
                assert torch.allclose(decoded, decoded[:1].expand_as(decoded), atol=1e-3)


def test_uncertain_band_is_ignored_not_background() -> None:
    """Teacher scores in [uncertain, tau) give -1 (ignored); below stays background; members unchanged."""
    base, _ = rcnn_case()
    band, _ = rcnn_case(uncertain=0.25)  # row 3 scores 0.3: in [0.25, 0.45)
    assert band.labels.tolist() == [2, 2, 2, -1, 1] and band.classes.tolist() == [2, 2, 2, -1, 1]
    assert torch.equal(band.cluster, base.cluster) and torch.equal(band.reg_targets, base.reg_targets)
    assert rcnn_case(uncertain=0.35)[0].labels.tolist() == [2, 2, 2, 0, 1]  # 0.3 < 0.35: background
    assert rcnn_case(uncertain=0.9)[0].labels.tolist() == base.labels.tolist()  # >= tau: off
    rpn = rpn_case(tau=0.9, uncertain=0.4)  # s2 is decided by t2 (0.5): ignored; s5 by t8 (member)
    assert rpn.labels.tolist() == [1, 1, -1, 1, 1, 1, -1, -1]
    assert rpn_case(tau=0.9, uncertain=0.6).labels.tolist() == [1, 1, 0, 1, 1, 1, -1, -1]


def forty_samples(member_class: int = 2) -> tuple[int, IncTargets]:
    """40 samples of one image: members 3, 4 (cluster 0) and 10 (cluster 1) of ``member_class``,
    0 and 1 ignored, the other 35 background."""
    n = 40
    cluster = torch.full((n,), -1)
    cluster[[3, 4, 10]] = torch.tensor([0, 0, 1])
    classes = torch.zeros(n, dtype=torch.int64)
    classes[[3, 4, 10]] = member_class
    classes[[0, 1]] = -1  # ignored: dropped
    return n, IncTargets(classes.clone(), torch.zeros(n, 4), cluster >= 0, cluster, torch.zeros(n), 2, classes)


def test_cost_switch_keeps_every_member_and_samples_background_to_the_budget() -> None:
    from dtg.methods.dtg.image_targets import keep_members_and_sample_background, take_samples

    n, t = forty_samples()
    g = torch.Generator().manual_seed(0)
    keep = keep_members_and_sample_background(t, 16, g)
    assert keep.numel() == 16 and {3, 4, 10} <= set(keep.tolist()) and not {0, 1} & set(keep.tolist())
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == 16
    sub = take_samples(t, keep)
    assert sub.num_clusters == 2 and int((sub.cluster >= 0).sum()) == 3 and int((sub.classes == 0).sum()) == 13
    # members alone above the budget: all of them, no background; budget above the samples: all usable ones
    assert keep_members_and_sample_background(t, 2, g).tolist() == [3, 4, 10]
    assert keep_members_and_sample_background(t, 100, g).numel() == n - 2


def test_sample_as_supervised_ignores_what_the_draw_leaves_out() -> None:
    from dtg.methods.dtg.image_targets import sample_as_supervised

    n, t = forty_samples(member_class=1)
    out = sample_as_supervised(t, 16, torch.Generator().manual_seed(0))
    assert out.labels.shape == (n,) and int((out.labels >= 0).sum()) == 16  # one row per anchor, 16 labelled
    assert out.labels[[3, 4, 10]].tolist() == [1, 1, 1] and torch.equal(out.cluster, t.cluster)
    assert int((out.labels == 0).sum()) == 13 and out.num_clusters == 2 and out.labels[[0, 1]].tolist() == [-1, -1]
    assert torch.equal(out.reg_mask, t.reg_mask)
    assert int((sample_as_supervised(t, 100).labels >= 0).sum()) == n - 2  # a budget above the anchors: all


def test_weighted_background_draw_keeps_members_and_weighs_the_drawn_background_up() -> None:
    from dtg.methods.dtg.image_targets import take_samples, weigh_and_sample_background

    n, t = forty_samples()
    classes = t.classes
    g = torch.Generator().manual_seed(0)
    keep, weight = weigh_and_sample_background(t, 7, g)  # 35 background samples, 7 drawn: weight 5
    assert keep.numel() == weight.numel() == 10 and {3, 4, 10} <= set(keep.tolist()) and not {0, 1} & set(keep.tolist())
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == 10
    member = torch.isin(keep, torch.tensor([3, 4, 10]))
    assert weight[member].tolist() == [1.0, 1.0, 1.0] and weight[~member].tolist() == [5.0] * 7
    sub = take_samples(t, keep, weight)
    assert torch.equal(sub.weight, weight) and sub.num_clusters == 2
    assert float(sub.weight[sub.classes == 0].sum()) == 35.0  # the drawn background stands for all of it
    assert torch.equal(take_samples(sub, torch.tensor([0, 9])).weight, weight[[0, 9]])  # weights travel along
    # a draw of at least the background: every usable sample, weight 1
    keep, weight = weigh_and_sample_background(t, 35, g)
    assert keep.tolist() == list(range(2, n)) and (weight == 1).all()
    # more members never take the background's place (unlike keep_members_and_sample_background)
    crowded = IncTargets(classes.clone(), torch.zeros(n, 4), torch.zeros(n, dtype=torch.bool),
                         torch.where(torch.arange(n) < 30, torch.arange(n) // 3, -1), torch.zeros(n), 10, classes)
    keep, weight = weigh_and_sample_background(crowded, 4, g)
    assert int((weight > 1).sum()) == 4 and float(weight[weight > 1][0]) == 10 / 4


def test_weighted_background_loss_is_unbiased_over_draws() -> None:
    """The mean over draws of the weighted loss equals the loss over every sample, for each normalisation."""
    from dtg.methods.dtg.image_targets import take_samples, weigh_and_sample_background

    n, k = 12, 3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k + 1, generator=g, dtype=torch.float64)
    classes = torch.zeros(n, dtype=torch.int64)
    cluster = torch.full((n,), -1)
    classes[[2, 5, 6]], cluster[[2, 5, 6]] = torch.tensor([1, 3, 3]), torch.tensor([0, 1, 1])
    t = IncTargets(classes.clone(), torch.zeros(n, 4), cluster >= 0, cluster, torch.zeros(n, dtype=torch.float64), 2,
                   classes)
    from itertools import combinations

    background = [i for i in range(n) if cluster[i] < 0]
    for normalize in ("supervised", "samples", "cluster"):
        full = inc_classification_loss(logits, t, normalize, denominator=8)
        draws = []
        for pick in combinations(background, 3):  # every draw of 3 of the 9, equally likely
            keep = torch.tensor(sorted([2, 5, 6, *pick]))
            weight = torch.where(cluster[keep] >= 0, 1.0, 3.0).to(torch.float64)
            sub = take_samples(t, keep, weight)
            draws.append(inc_classification_loss(logits[keep], sub, normalize, denominator=8))
        mean = torch.stack(draws).mean()  # "samples", "cluster": the weights' sum is 12 / 9 in every draw
        assert torch.allclose(mean, full, atol=1e-12), normalize
    keep, weight = weigh_and_sample_background(t, 3, g)
    assert float(weight.sum()) == n  # 3 members + 3 background drawn x 3


def test_a_sample_of_weight_two_counts_as_two_samples() -> None:
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    classes = torch.tensor([2, 2, 0, 0, 1])
    cluster = torch.tensor([0, 0, -1, -1, 1])
    t = IncTargets(classes.clone(), torch.zeros(5, 4), cluster >= 0, cluster, torch.zeros(5, dtype=torch.float64), 2,
                   classes, weight=torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    twice = torch.tensor([0, 1, 2, 2, 3, 4])
    dup = IncTargets(classes[twice], torch.zeros(6, 4), cluster[twice] >= 0, cluster[twice], torch.zeros(6), 2, classes[twice])
    for normalize in ("supervised", "samples", "cluster"):
        assert torch.allclose(inc_classification_loss(logits, t, normalize, denominator=4),
                              inc_classification_loss(logits[twice], dup, normalize, denominator=4), atol=1e-12)
        x = logits[:, 1]
        objectness = IncTargets((classes > 0).long(), t.reg_targets, t.reg_mask, cluster, t.teacher_scores, 2,
                                weight=t.weight)
        dup_obj = IncTargets((classes[twice] > 0).long(), dup.reg_targets, dup.reg_mask, dup.cluster, dup.teacher_scores, 2)
        assert torch.allclose(inc_objectness_loss(x, objectness, normalize, denominator=4),
                              inc_objectness_loss(x[twice], dup_obj, normalize, denominator=4), atol=1e-12)
    unweighted = IncTargets(classes.clone(), torch.zeros(5, 4), cluster >= 0, cluster, torch.zeros(5), 2, classes)
    assert not torch.allclose(inc_classification_loss(logits, t, "samples"), inc_classification_loss(logits, unweighted, "samples"))


def test_append_kept_boxes_adds_one_exact_roi_per_cluster() -> None:
    from dtg.methods.dtg.image_targets import append_kept_boxes

    kept = {0: torch.tensor([10.0, 10.0, 50.0, 50.0]), 1: torch.tensor([100.0, 100.0, 140.0, 150.0])}
    rois = torch.tensor([[12, 9, 52, 48], [8, 12, 47, 55], [0, 0, 20, 20], [98, 104, 139, 146],
                         [60, 60, 80, 80], [101, 99, 142, 151]], dtype=torch.float32)
    cluster = torch.tensor([0, 0, -1, 1, -1, 1])
    classes = torch.tensor([2, 2, 0, 1, -1, 1])
    scores = torch.tensor([0.7, 0.9, 0.0, 0.8, 0.0, 0.6])
    reg_mask = cluster >= 0
    reg = torch.zeros(6, 4)
    for i in range(6):
        if cluster[i] >= 0:
            reg[i] = RCNN_CODER.encode_single(kept[int(cluster[i])][None], rois[i][None])[0]
    t = IncTargets(classes.clone(), reg, reg_mask, cluster, scores, 2, classes)
    out_rois, out, source = append_kept_boxes(rois, t, RCNN_CODER)
    assert out_rois.shape == (8, 4) and torch.equal(out_rois[:6], rois)
    assert source.tolist() == [0, 1, 2, 3, 4, 5, 1, 3]  # the top member of cluster 0 (0.9) then of cluster 1 (0.8)
    assert torch.allclose(out_rois[6], kept[0], atol=1e-4) and torch.allclose(out_rois[7], kept[1], atol=1e-4)
    assert out.labels[6:].tolist() == [2, 1] and out.classes[6:].tolist() == [2, 1] and out.cluster[6:].tolist() == [0, 1]
    assert out.reg_mask[6:].all() and (out.reg_targets[6:] == 0).all() and out.num_clusters == 2
    assert out.teacher_scores[6:].tolist() == pytest.approx([0.9, 0.8]) and out.weight is None
    assert torch.equal(out.labels[:6], t.labels) and torch.equal(out.reg_targets[:6], t.reg_targets)
    # a cluster whose members have no regression target gets no RoI; no member at all: unchanged
    t2 = IncTargets(classes.clone(), reg, reg_mask & (cluster != 1), cluster, scores, 2, classes)
    assert append_kept_boxes(rois, t2, RCNN_CODER)[2].tolist() == [0, 1, 2, 3, 4, 5, 1]
    none = IncTargets(torch.zeros(6, dtype=torch.int64), reg, torch.zeros(6, dtype=torch.bool), torch.full((6,), -1),
                      torch.zeros(6), 0)
    r, same_t, src = append_kept_boxes(rois, none, RCNN_CODER)
    assert r is rois and same_t is none and src.tolist() == list(range(6))
    # weights travel: the appended samples weigh 1
    weighted = IncTargets(classes.clone(), reg, reg_mask, cluster, scores, 2, classes, weight=torch.full((6,), 2.0))
    assert append_kept_boxes(rois, weighted, RCNN_CODER)[1].weight.tolist() == [2.0] * 6 + [1.0, 1.0]


# ----------------------------------------------------------------------------- which members stay positives

from dtg.methods.dtg.targets import keep_members, rank_within  # noqa: E402


def test_rank_within_segments() -> None:
    assert rank_within(torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0.1, 0.5, 0.9, 0.2, 0.5])).tolist() == [2, 0, 0, 1, 1]
    assert rank_within(torch.tensor([2, 2]), torch.tensor([0.3, 0.3])).tolist() == [0, 1]  # ties: lower index first


def test_keep_members_by_overlap_and_dynamic_topk() -> None:
    cluster = torch.tensor([3, 3, 3, 3, 7, 7])
    overlap = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.4, 0.2])
    score = torch.tensor([0.9, 0.5, 0.99, 0.6, 0.9, 0.9])
    assert keep_members(cluster, overlap, score).tolist() == [True] * 6
    assert keep_members(cluster, overlap, score, min_iou=0.5).tolist() == [True, True, False, True, False, False]
    # cluster 3: k = int(0.9 + 0.8 + 0.3 + 0.6) = 2, quality sqrt(IoU x score) = .90, .63, .55, .60 -> rows 0, 1;
    # cluster 7: k = max(1, int(0.6)) = 1 -> row 4 (quality .60 vs .42)
    assert keep_members(cluster, overlap, score, topk=True).tolist() == [True, True, False, False, True, False]
    # the IoU rule first: cluster 7 loses both; cluster 3's k from the IoUs left (0.9 + 0.8 + 0.6 -> 2)
    assert keep_members(cluster, overlap, score, 0.5, True).tolist() == [True, True, False, False, False, False]
    assert keep_members(cluster[:0], overlap[:0], score[:0], 0.5, True).numel() == 0


def test_rcnn_member_iou_makes_a_partial_proposal_background_and_renumbers() -> None:
    # Proposal 1 covers a quarter of the object; the teacher regressed it onto the object, so it
    # joins cluster 0 (kept box 0). With member_iou 0.5 it becomes background; proposal 4's
    # cluster stays, renumbered to 1 when needed.
    boxes = torch.tensor([[10, 10, 50, 50], [11, 10, 51, 50], [100, 100, 140, 150]], dtype=torch.float64)
    proposals = torch.tensor([[11, 11, 49, 51], [10, 10, 30, 30], [98, 102, 141, 149]], dtype=torch.float64)
    probs = torch.tensor([[0.05, 0.05, 0.9], [0.1, 0.1, 0.8], [0.1, 0.6, 0.3]], dtype=torch.float64)
    deltas = torch.zeros(3, 3, 4, dtype=torch.float64)
    cls = probs[:, 1:].argmax(1) + 1
    deltas[torch.arange(3), cls] = RCNN_CODER.encode_single(boxes, proposals)
    args = (probs.log(), deltas.reshape(3, 12), proposals, proposals, EYE, (200, 200), RCNN_CODER)
    every = rcnn_inc_targets(*args)
    assert every.labels.tolist() == [2, 2, 1] and every.cluster.tolist() == [0, 0, 1]
    pruned = rcnn_inc_targets(*args, member_iou=0.5)
    assert pruned.labels.tolist() == [2, 0, 1] and pruned.cluster.tolist() == [0, -1, 1]
    assert pruned.num_clusters == 2 and pruned.reg_mask.tolist() == [True, False, True]
    assert torch.equal(pruned.reg_targets[[0, 2]], every.reg_targets[[0, 2]])
    # IoUs with the kept boxes: 0.95, 0.25 (cluster 0) and 0.88 (cluster 1, gone at 0.9)
    gone = rcnn_inc_targets(*args, member_iou=0.9)
    assert gone.cluster.tolist() == [0, -1, -1] and gone.labels.tolist() == [2, 0, 0] and gone.num_clusters == 1
    banded = rcnn_inc_targets(*args, member_iou=0.5, uncertain=0.1, tau=0.45)  # a band ignores unsure non-candidates,
    assert banded.labels.tolist() == [2, 0, 1]  # not a pruned member: the teacher was sure of it
    topk = rcnn_inc_targets(*args, member_topk=True)  # cluster 0: k = int(IoUs 0.95 + 0.25) = 1
    assert topk.labels.tolist() == [2, 0, 1]
