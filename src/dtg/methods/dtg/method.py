"""``method=dtg``: Dense Teacher Guidance in the R-CNN and RPN stages (docs/method.md).

Orchestration only: the math lives beside it in :mod:`dtg.methods.dtg` (clusters, correspondence,
INC targets, losses and Rank Matching). Per unlabeled batch: :meth:`DTGMethod.teacher_targets` makes one
teacher pass on the weak views (dense RPN outputs, proposals, R-CNN outputs on its own
proposals) and builds each enabled stage's INC targets (:class:`DTGTargets`); the student's
side of the batch (its image sizes, its anchors) is known from the strong views' shapes
(:meth:`Detector.dense_layout`), so no student pass is needed for them.
:meth:`DTGMethod.student_losses` makes one student pass on the strong views and, per enabled
stage, ``L_u = L_cls + L_reg + rm_weight * L_RM``. Every key of a stage is read from its section
of the config (``dtg.rcnn``, ``dtg.rpn``: :class:`dtg.config.RcnnStageConfig`,
:class:`dtg.config.RpnStageConfig`), which the target builders of :mod:`dtg.methods.dtg.image_targets` take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dtg.config import Config
from dtg.geometry import teacher_to_student
from dtg.losses.pseudo_label import background_to_ignore
from dtg.methods.base import BoxTargets, Method, TargetFigure, strong_images, strong_sizes, weak_images
from dtg.methods.dtg.correspondence import AnchorGrid, anchor_grid
from dtg.methods.dtg.image_targets import (
    RcnnImageTargets, concat_targets, keep_members_and_sample_background, rcnn_image_targets,
    rpn_image_targets, take_samples,
)
from dtg.methods.dtg.losses import (
    inc_classification_loss, inc_objectness_loss, inc_rank_matching_loss, inc_regression_loss, select_class_deltas,
)
from dtg.methods.dtg.targets import IncTargets
from dtg.methods.sparse import pseudo_box_figure, pseudo_box_targets
from dtg.models.detector import DenseLayout, DenseOutputs, Detector


@dataclass
class TeacherPass:
    """The teacher's forward on the weak views of a batch (no gradient).

    Attributes:
        dense: backbone, FPN, dense RPN outputs and proposals (per image (P_i, 4)).
        logits: (P, K + 1) R-CNN class logits on its own proposals, P = sum P_i, image-major.
        deltas: (P, (K + 1) * 4) R-CNN box deltas on them.
    """

    dense: DenseOutputs
    logits: Tensor
    deltas: Tensor


@torch.no_grad()
def teacher_pass(teacher: Detector, weak: list[Tensor], train_top_n: bool | None = True) -> TeacherPass:
    """The teacher on the (3, H, W) ``weak`` views: :meth:`Detector.forward_dense` (proposals with the
    training top-N by default, as DTG builds its targets; ``None``: the module's mode) and the
    R-CNN on its own proposals."""
    t = teacher.forward_dense(weak, train_top_n=train_top_n)
    logits, deltas = teacher.roi_forward(t.features, t.proposals, t.images.image_sizes)
    return TeacherPass(t, logits, deltas)


@dataclass
class RcnnTargets:
    """DTG's R-CNN stage targets of a batch.

    Attributes:
        images: per image the full :class:`RcnnImageTargets` (every teacher proposal mapped into
            the strong view as a RoI, its INC targets, the clustering, the RoIs that left the view).
        rois: per image (R_i, 4) the RoIs the student scores: all of ``images[i].rois`` or, with
            ``dtg.rcnn.subsample``, the members and a background sample of them.
        targets: INC targets over ``cat(rois)`` (R = sum R_i), clusters numbered across the batch.
        teacher_logits: (R, K + 1) the teacher's logits of those RoIs' proposals (``dtg.rm_input=logit``).
    """

    images: list[RcnnImageTargets]
    rois: list[Tensor]
    targets: IncTargets
    teacher_logits: Tensor


@dataclass
class RpnTargets:
    """DTG's RPN stage targets of a batch.

    Attributes:
        layout: the student's pass on the strong views as its shapes (:meth:`Detector.dense_layout`):
            image sizes, padded size, feature sizes, anchors.
        grid: the student's anchors as a grid (:func:`anchor_grid` of ``layout``), A_s anchors per image.
        images: per image INC targets over the A_s student anchors.
        targets: ``images`` concatenated (B * A_s samples, image-major), clusters numbered across the batch.
        teacher_anchors: (A_t, 4) the teacher's anchors (weak view), which ``grid``'s anchors were paired with.
    """

    layout: DenseLayout
    grid: AnchorGrid
    images: list[IncTargets]
    targets: IncTargets
    teacher_anchors: Tensor


@dataclass
class DTGTargets:
    """Everything :meth:`DTGMethod.student_losses` needs of the teacher, per enabled stage.

    Attributes:
        teacher: the teacher's pass on the weak views.
        mats: per image the (3, 3) teacher-to-student matrix ``M`` (weak view -> strong view).
        student_sizes: per image ``(H, W)`` of the strong view.
        rcnn: R-CNN stage targets (``dtg.rcnn.enabled``), else None.
        rpn: RPN stage INC targets (``dtg.rpn.enabled`` with ``dtg.rpn.targets=dtg``), else None.
        rpn_boxes: sparse's pseudo boxes for the RPN stage (``dtg.rpn.targets=sparse``, the table 2(c)
            hybrid), else None.
    """

    teacher: TeacherPass
    mats: list[Tensor]
    student_sizes: list[tuple[int, int]]
    rcnn: RcnnTargets | None = None
    rpn: RpnTargets | None = None
    rpn_boxes: BoxTargets | None = None


class DTGMethod(Method):
    """Dense-to-dense guidance; every switch is a ``dtg.*`` config key."""

    name = "dtg"
    uses_unlabeled = True
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device, self.cfg, self.d = device, cfg, cfg.dtg
        self.canonical = float(cfg.model.anchor_sizes[0])  # the anchor size of FPN level 0 (RPN correspondence)

    def target_figures(self) -> tuple[TargetFigure, ...]:
        """Clusters and members per image of each enabled stage (keys ``dtg.<stage>.tau`` and the ignore
        band's ``dtg.<stage>.uncertain``); the hybrid RPN's pseudo boxes (``sparse.*``)."""
        out: list[TargetFigure] = []
        for stage, label, cfg in (("rcnn", "R-CNN", self.d.rcnn), ("rpn", "RPN", self.d.rpn)):
            if not cfg.enabled:
                continue
            if stage == "rpn" and self.d.rpn.targets == "sparse":
                out.append(pseudo_box_figure(self.cfg.sparse, "RPN pseudo boxes"))
                continue
            keys = (f"dtg.{stage}.tau", f"dtg.{stage}.uncertain")
            out += [TargetFigure(f"{stage}_{w}_per_image", f"{label} {w}", keys) for w in ("clusters", "members")]
        return tuple(out)

    @torch.no_grad()
    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> DTGTargets:
        """One teacher pass on the weak views and the INC targets of each enabled stage (with
        ``dtg.rcnn.subsample`` the background draw uses torch's global generator, as training does)."""
        t = teacher_pass(teacher, weak_images(items, self.device))
        mats = [teacher_to_student(it["weak_matrix"], it["strong_matrix"]).to(self.device) for it in items]
        out = DTGTargets(t, mats, strong_sizes(items))
        if self.d.rcnn.enabled:
            out.rcnn = self.rcnn_targets(teacher, out)
        if self.d.rpn.enabled and self.d.rpn.targets == "sparse":  # the table 2(c) hybrid
            out.rpn_boxes = pseudo_box_targets(teacher, items, self.cfg.sparse, self.device, weak_pass=t.dense)
        elif self.d.rpn.enabled:
            out.rpn = self.rpn_targets(teacher, out)
        return out

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: DTGTargets
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One student pass on the strong views; the INC (and Rank Matching) losses of each stage
        ``targets`` holds, in the order R-CNN, RPN; per-image cluster / member statistics."""
        s = student.forward_dense(strong_images(items, self.device))
        losses: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        if targets.rcnn is not None:
            losses.update(self._rcnn(student, s, targets.rcnn, stats))
        if targets.rpn_boxes is not None:  # the table 2(c) hybrid
            cls, reg = student.rpn_losses(s, targets.rpn_boxes.images, ignore_rule=background_to_ignore)
            losses.update({"unsup_rpn_cls": cls, "unsup_rpn_reg": reg})
            stats["pseudo_boxes_per_image"] = targets.rpn_boxes.boxes_per_image()
        elif targets.rpn is not None:
            losses.update(self._rpn(s, targets.rpn, stats))
        return losses, stats

    # ------------------------------------------------------------------ R-CNN
    def rcnn_targets(self, teacher: Detector, tt: DTGTargets) -> RcnnTargets:
        """The teacher's proposals mapped into the strong views as RoIs, and their INC targets
        (:func:`rcnn_image_targets` per image; ``dtg.rcnn.subsample``: every member, background
        sampled to ``model.roi_batch_size_per_image`` RoIs per image)."""
        t = tt.teacher.dense
        counts = [len(p) for p in t.proposals]
        images, rois, parts, t_used = [], [], [], []
        for i, (logits, deltas) in enumerate(zip(tt.teacher.logits.split(counts), tt.teacher.deltas.split(counts))):
            built = rcnn_image_targets(logits, deltas, t.proposals[i], tt.mats[i], tt.student_sizes[i],
                                       t.images.image_sizes[i], teacher.rcnn_box_coder, self.d.rcnn)
            rois_i, tg_i = built.rois, built.targets
            if self.d.rcnn.subsample:  # the cost switch: every member, background sampled to the RoI budget
                keep = keep_members_and_sample_background(tg_i, self.cfg.model.roi_batch_size_per_image)
                rois_i, tg_i, logits = rois_i[keep], take_samples(tg_i, keep), logits[keep]
            images.append(built)
            rois.append(rois_i)
            parts.append(tg_i)
            t_used.append(logits)
        return RcnnTargets(images, rois, concat_targets(parts), torch.cat(t_used))

    def _rcnn(self, student: Detector, s: DenseOutputs, rt: RcnnTargets, stats: dict[str, float]) -> dict[str, Tensor]:
        d, rois, tgt = self.d, rt.rois, rt.targets
        s_logits, s_deltas = student.roi_forward(s.features, rois, s.images.image_sizes)
        den = len(rois) * self.cfg.model.roi_batch_size_per_image  # the supervised R-CNN denominator
        out = {
            "unsup_rcnn_cls": inc_classification_loss(s_logits, tgt, d.normalize, self.cfg.model.focal_gamma,
                                                      denominator=den),
            "unsup_rcnn_reg": inc_regression_loss(select_class_deltas(s_deltas, tgt.classes), tgt, d.normalize,
                                                  denominator=den),
        }
        if d.rcnn.rank_matching:
            member = tgt.cluster >= 0
            cls = tgt.classes[member].clamp(min=0)
            if d.rm_input == "prob":
                p_s = torch.softmax(s_logits[member], -1).gather(1, cls[:, None]).squeeze(1)
                p_t = tgt.teacher_scores[member]
            else:
                p_s = s_logits[member].gather(1, cls[:, None]).squeeze(1)
                p_t = rt.teacher_logits[member].gather(1, cls[:, None]).squeeze(1)
            out["unsup_rcnn_rm"] = d.rm_weight * self._rank_matching(p_s, p_t, tgt, den)
        n = max(len(rois), 1)
        stats["rcnn_clusters_per_image"] = tgt.num_clusters / n
        stats["rcnn_members_per_image"] = float((tgt.cluster >= 0).sum()) / n
        return out

    def _rank_matching(self, p_s: Tensor, p_t: Tensor, tgt: IncTargets, denominator: int) -> Tensor:
        """L_RM of a stage's (M,) member scores, on the scale ``dtg.rm_scale`` says (:func:`inc_rank_matching_loss`)."""
        d = self.d
        return inc_rank_matching_loss(p_s, p_t, tgt.cluster[tgt.cluster >= 0], d.normalize, d.T, d.rm_scale,
                                      denominator, labelled=int((tgt.classes >= 0).sum()))

    # ------------------------------------------------------------------ RPN
    def rpn_targets(self, teacher: Detector, tt: DTGTargets) -> RpnTargets:
        """The student's anchors (from the strong views' sizes, :meth:`Detector.dense_layout`, in the
        dtype and on the device of the teacher's features, as the student's pass makes them) and
        their INC targets from the teacher's dense RPN outputs (:func:`rpn_image_targets` per image)."""
        t = tt.teacher.dense
        feat = next(iter(t.features.values()))
        layout = teacher.dense_layout(tt.student_sizes, feat.dtype, feat.device)
        grid = anchor_grid(layout.anchors, layout.num_anchors_per_level, layout.feature_sizes, layout.padded_size)
        parts = [
            rpn_image_targets(t.rpn.objectness[i], t.rpn.deltas[i], t.rpn.anchors, t.rpn.levels, grid, m,
                              tt.student_sizes[i], t.images.image_sizes[i], teacher.rpn_box_coder, self.canonical, self.d.rpn)
            for i, m in enumerate(tt.mats)
        ]
        return RpnTargets(layout, grid, parts, concat_targets(parts), t.rpn.anchors)

    def _rpn(self, s: DenseOutputs, rt: RpnTargets, stats: dict[str, float]) -> dict[str, Tensor]:
        d, tgt, n_img = self.d, rt.targets, len(rt.images)
        check_layout(s, rt.layout)
        obj = s.rpn.objectness.reshape(-1)  # (B, A_s) -> (B * A_s,), image-major like the targets
        den = n_img * self.cfg.model.rpn_batch_size_per_image  # the supervised RPN denominator
        out = {
            "unsup_rpn_cls": inc_objectness_loss(obj, tgt, d.normalize, denominator=den,
                                                 gamma=0.0 if d.rpn.cls_loss == "bce" else 2.0),
            "unsup_rpn_reg": inc_regression_loss(s.rpn.deltas.reshape(-1, 4), tgt, d.normalize, denominator=den),
        }
        if d.rpn.rank_matching:
            member = tgt.cluster >= 0
            if d.rm_input == "prob":
                p_s, p_t = obj[member].sigmoid(), tgt.teacher_scores[member]
            else:
                p_s, p_t = obj[member], torch.logit(tgt.teacher_scores[member], eps=1e-6)
            out["unsup_rpn_rm"] = d.rm_weight * self._rank_matching(p_s, p_t, tgt, den)
        n = max(n_img, 1)
        stats["rpn_clusters_per_image"] = tgt.num_clusters / n
        stats["rpn_members_per_image"] = float((tgt.cluster >= 0).sum()) / n
        return out


def check_layout(s: DenseOutputs, layout: DenseLayout) -> None:
    """Raise when the student's pass ``s`` does not have the shapes the RPN targets were built for
    (a backbone whose strides :meth:`Detector.dense_layout` does not know): sizes only, no tensor read."""
    got = (list(s.images.image_sizes), tuple(s.images.tensors.shape[-2:]),
           [tuple(f.shape[-2:]) for f in s.features.values()], list(s.rpn.num_anchors_per_level))
    want = (layout.image_sizes, layout.padded_size, layout.feature_sizes, layout.num_anchors_per_level)
    if got != want:
        raise RuntimeError(f"the student's pass has image sizes / padded size / feature sizes / anchors per level "
                           f"{got}, the RPN targets were built for {want}")
