"""DTG's stages: the places of the detector where the teacher guides the student, one object each.

A stage builds its targets from the teacher's pass (:meth:`Stage.targets`, no gradient), scores the
student's pass against them (:meth:`Stage.losses`: its raw, unweighted loss terms ``cls``, ``reg`` and,
with Rank Matching, ``rm``) and names the per-image counts training watches (:meth:`Stage.figures`).
:class:`~dtg.methods.dtg.method.DTGMethod` runs its stages in order (R-CNN, then RPN), logs each term
as ``unsup_<stage>_<term>`` and weighs it with its one weight dict. Three stages exist:

* :class:`RcnnStage` (``dtg.rcnn``; docs/method.md, "INC in the R-CNN stage"): INC on the teacher's
  proposals, mapped one to one into the strong view as the student's RoIs.
* :class:`RpnStage` (``dtg.rpn`` with ``dtg.rpn.targets=dtg``; "INC in the RPN stage"): INC on the
  student's anchors paired with the teacher's ("Correspondence").
* :class:`SparseRpnStage` (``dtg.rpn.targets=sparse``, the paper's table 2(c) hybrid): the sparse
  baseline's pseudo boxes and torchvision's RPN assignment and loss.

The two INC stages share :meth:`IncStage.losses`: ``L_cls``, ``L_reg`` and ``L_RM`` normalised by
``dtg.normalize`` with the stage's supervised denominator; they differ only in the student outputs
they score, the classification loss and the scores Rank Matching compares.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from dtg.config import Config, RcnnStageConfig, RpnStageConfig
from dtg.losses.pseudo_label import background_to_ignore
from dtg.methods.base import BoxTargets, TargetFigure
from dtg.methods.dtg.correspondence import anchor_grid
from dtg.methods.dtg.image_targets import (
    append_kept_boxes, concat_targets, keep_members_and_sample_background, rcnn_image_targets, rpn_image_targets,
    sample_as_supervised, take_samples, weigh_and_sample_background,
)
from dtg.methods.dtg.losses import (
    inc_classification_loss, inc_objectness_loss, inc_rank_matching_loss, inc_regression_loss, labelled_count,
    select_class_deltas,
)
from dtg.methods.dtg.targets import IncTargets
from dtg.methods.dtg.teacher import DTGTargets, RcnnTargets, RpnTargets
from dtg.methods.sparse import pseudo_box_figure, pseudo_box_targets
from dtg.models.detector import DenseLayout, DenseOutputs, Detector


class Stage(Protocol):
    """One stage of DTG's unlabeled loss.

    Attributes:
        name: ``"rcnn"`` | ``"rpn"``; its terms are logged as ``unsup_<name>_<term>``.
        slot: the :class:`DTGTargets` field its targets go to (``rcnn``, ``rpn``, ``rpn_boxes``).
        terms: the terms :meth:`losses` returns, in order: ``("cls", "reg")`` or ``("cls", "reg", "rm")``.
    """

    name: str
    slot: str
    terms: tuple[str, ...]

    def figures(self) -> tuple[TargetFigure, ...]:
        """The per-image counts of its targets that training watches, with the keys that set them."""
        ...

    def targets(self, teacher: Detector, tt: DTGTargets, items: list[dict[str, Any]]) -> Any:
        """Its targets from the teacher's pass ``tt.teacher`` on the weak views of ``items`` (no gradient)."""
        ...

    def losses(self, student: Detector, s: DenseOutputs, targets: Any) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Its raw loss terms (keys :attr:`terms`) on the student's pass ``s`` on the strong views, and
        per-image statistics."""
        ...


def build_stages(cfg: Config, device: torch.device) -> list[Stage]:
    """The enabled stages of ``cfg.dtg``, R-CNN first (the order of the targets, losses and figures)."""
    d, out = cfg.dtg, []
    if d.rcnn.enabled:
        out.append(RcnnStage(cfg))
    if d.rpn.enabled:
        out.append(SparseRpnStage(cfg, device) if d.rpn.targets == "sparse" else RpnStage(cfg))
    return out


class IncStage:
    """What the INC stages share: their figures and the loss of :meth:`losses`. A subclass sets ``name``,
    ``label``, ``slot`` and gives the student outputs it scores (:meth:`student_outputs`), its
    classification loss, its deltas selection and the scores Rank Matching compares."""

    name: str
    label: str  # how a log line names the stage, e.g. "R-CNN"
    slot: str

    def __init__(self, cfg: Config, stage: RcnnStageConfig | RpnStageConfig, batch_per_image: int) -> None:
        self.cfg, self.d, self.stage = cfg, cfg.dtg, stage
        self.batch_per_image = batch_per_image  # the supervised sampler's batch per image: the denominator
        self.terms = ("cls", "reg", "rm") if stage.rank_matching else ("cls", "reg")

    def figures(self) -> tuple[TargetFigure, ...]:
        """Clusters and members per image (keys ``dtg.<stage>.tau`` and the ignore band's ``dtg.<stage>.uncertain``)."""
        keys = (f"dtg.{self.name}.tau", f"dtg.{self.name}.uncertain")
        return tuple(TargetFigure(f"{self.name}_{w}_per_image", f"{self.label} {w}", keys) for w in ("clusters", "members"))

    def losses(self, student: Detector, s: DenseOutputs,
               rt: RcnnTargets | RpnTargets) -> tuple[dict[str, Tensor], dict[str, float]]:
        """``cls``, ``reg`` (and ``rm``) of the stage's student outputs against ``rt.targets``, each normalised
        by ``dtg.normalize`` with the supervised denominator B x :attr:`batch_per_image`; clusters and
        members per image."""
        d, tgt = self.d, rt.targets
        logits, deltas, images = self.student_outputs(student, s, rt)
        den = images * self.batch_per_image
        out = {"cls": self.classification(logits, tgt, den),
               "reg": inc_regression_loss(self.reg_deltas(deltas, tgt), tgt, d.normalize, denominator=den)}
        if self.stage.rank_matching:
            member = tgt.cluster >= 0
            p_s, p_t = self.rm_scores(logits, rt, member)
            out["rm"] = inc_rank_matching_loss(p_s, p_t, tgt.cluster[member], d.normalize, d.T, d.rm_scale,
                                               den, labelled=labelled_count(tgt))
        n = max(images, 1)
        stats = {f"{self.name}_clusters_per_image": tgt.num_clusters / n,
                 f"{self.name}_members_per_image": float((tgt.cluster >= 0).sum()) / n}
        return out, stats

    def student_outputs(self, student: Detector, s: DenseOutputs,
                        rt: RcnnTargets | RpnTargets) -> tuple[Tensor, Tensor, int]:
        """``(logits, deltas, B)``: the student's class logits and box deltas on the stage's N samples (in the
        order of ``rt.targets``) and the number of images B."""
        raise NotImplementedError

    def classification(self, logits: Tensor, tgt: IncTargets, den: int) -> Tensor:
        """The INC classification loss of the N samples' ``logits`` (a scalar), ``den`` the supervised denominator."""
        raise NotImplementedError

    def reg_deltas(self, deltas: Tensor, tgt: IncTargets) -> Tensor:
        """(N, 4) the deltas each sample regresses with."""
        raise NotImplementedError

    def rm_scores(self, logits: Tensor, rt: RcnnTargets | RpnTargets, member: Tensor) -> tuple[Tensor, Tensor]:
        """``(p_s, p_t)``: (M,) the student's and the teacher's score of each of the M members (``member``
        (N,) bool): probabilities with ``dtg.rm_input=prob``, logits with ``logit``."""
        raise NotImplementedError


class RcnnStage(IncStage):
    """INC in the R-CNN stage: the teacher's proposals as the student's RoIs, their INC targets."""

    name, label, slot = "rcnn", "R-CNN", "rcnn"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.dtg.rcnn, cfg.model.roi_batch_size_per_image)

    def targets(self, teacher: Detector, tt: DTGTargets, items: list[dict[str, Any]]) -> RcnnTargets:
        """The teacher's proposals mapped into the strong views as RoIs, and their INC targets
        (:func:`rcnn_image_targets` per image; ``dtg.rcnn.subsample``: every member, background
        sampled to ``model.roi_batch_size_per_image`` RoIs per image; ``dtg.rcnn.background``: every
        member and that many background RoIs, weighted up; both draw from torch's global generator;
        ``dtg.rcnn.append_kept``: each cluster's kept box appended as one more RoI)."""
        t = tt.teacher.dense
        counts = [len(p) for p in t.proposals]
        images, rois, parts, t_used = [], [], [], []
        for i, (logits, deltas) in enumerate(zip(tt.teacher.logits.split(counts), tt.teacher.deltas.split(counts))):
            built = rcnn_image_targets(logits, deltas, t.proposals[i], tt.mats[i], tt.student_sizes[i],
                                       t.images.image_sizes[i], teacher.rcnn_box_coder, self.stage)
            rois_i, tg_i = built.rois, built.targets
            if self.stage.subsample:  # the cost switch: every member, background sampled to the RoI budget
                keep = keep_members_and_sample_background(tg_i, self.batch_per_image)
                rois_i, tg_i, logits = rois_i[keep], take_samples(tg_i, keep), logits[keep]
            elif self.stage.background:  # the cost switch: every member, a weighted background draw
                keep, weight = weigh_and_sample_background(tg_i, self.stage.background)
                rois_i, tg_i, logits = rois_i[keep], take_samples(tg_i, keep, weight), logits[keep]
            if self.stage.append_kept:  # each cluster's kept box as one more RoI of the cluster
                rois_i, tg_i, source = append_kept_boxes(rois_i, tg_i, teacher.rcnn_box_coder)
                logits = logits[source]
            images.append(built)
            rois.append(rois_i)
            parts.append(tg_i)
            t_used.append(logits)
        return RcnnTargets(images, rois, concat_targets(parts), torch.cat(t_used))

    def student_outputs(self, student: Detector, s: DenseOutputs, rt: RcnnTargets) -> tuple[Tensor, Tensor, int]:
        """The student's R-CNN on the RoIs: (R, K + 1) logits, (R, (K + 1) * 4) deltas."""
        logits, deltas = student.roi_forward(s.features, rt.rois, s.images.image_sizes)
        return logits, deltas, len(rt.rois)

    def classification(self, logits: Tensor, tgt: IncTargets, den: int) -> Tensor:
        """Softmax focal loss (gamma ``model.focal_gamma``)."""
        return inc_classification_loss(logits, tgt, self.d.normalize, self.cfg.model.focal_gamma, denominator=den)

    def reg_deltas(self, deltas: Tensor, tgt: IncTargets) -> Tensor:
        """The deltas of each sample's class (``tgt.classes``)."""
        return select_class_deltas(deltas, tgt.classes)

    def rm_scores(self, logits: Tensor, rt: RcnnTargets, member: Tensor) -> tuple[Tensor, Tensor]:
        """The cluster's class: the student's softmax probability and the teacher's ``p``, or both logits."""
        tgt = rt.targets
        cls = tgt.classes[member].clamp(min=0)
        if self.d.rm_input == "prob":
            return torch.softmax(logits[member], -1).gather(1, cls[:, None]).squeeze(1), tgt.teacher_scores[member]
        return (logits[member].gather(1, cls[:, None]).squeeze(1),
                rt.teacher_logits[member].gather(1, cls[:, None]).squeeze(1))


class RpnStage(IncStage):
    """INC in the RPN stage: the student's anchors paired with the teacher's, their INC targets."""

    name, label, slot = "rpn", "RPN", "rpn"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.dtg.rpn, cfg.model.rpn_batch_size_per_image)
        self.canonical = float(cfg.model.anchor_sizes[0])  # the anchor size of FPN level 0 (correspondence)

    def targets(self, teacher: Detector, tt: DTGTargets, items: list[dict[str, Any]]) -> RpnTargets:
        """The student's anchors (from the strong views' sizes, :meth:`Detector.dense_layout`, in the
        dtype and on the device of the teacher's features, as the student's pass makes them) and
        their INC targets from the teacher's dense RPN outputs (:func:`rpn_image_targets` per image;
        ``dtg.rpn.subsample``: every member and background anchors drawn to ``model.rpn_batch_size_per_image``
        per image from torch's global generator, the other anchors ignored)."""
        t = tt.teacher.dense
        feat = next(iter(t.features.values()))
        layout = teacher.dense_layout(tt.student_sizes, feat.dtype, feat.device)
        grid = anchor_grid(layout.anchors, layout.num_anchors_per_level, layout.feature_sizes, layout.padded_size)
        parts = [
            rpn_image_targets(t.rpn.objectness[i], t.rpn.deltas[i], t.rpn.anchors, t.rpn.levels, grid, m,
                              tt.student_sizes[i], t.images.image_sizes[i], teacher.rpn_box_coder, self.canonical,
                              self.stage)
            for i, m in enumerate(tt.mats)
        ]
        if self.stage.subsample:  # as the supervised RPN samples: members + background to the budget, rest ignored
            parts = [sample_as_supervised(p, self.batch_per_image) for p in parts]
        return RpnTargets(layout, grid, parts, concat_targets(parts), t.rpn.anchors)

    def student_outputs(self, student: Detector, s: DenseOutputs, rt: RpnTargets) -> tuple[Tensor, Tensor, int]:
        """The student's RPN: (B * A_s,) objectness logits, image-major like the targets, and its (B, A_s, 4) deltas."""
        check_layout(s, rt.layout)
        return s.rpn.objectness.reshape(-1), s.rpn.deltas, len(rt.images)  # (B, A_s) -> (B * A_s,)

    def classification(self, logits: Tensor, tgt: IncTargets, den: int) -> Tensor:
        """Sigmoid focal loss (gamma 2), or binary cross-entropy with ``dtg.rpn.cls_loss=bce``."""
        return inc_objectness_loss(logits, tgt, self.d.normalize, denominator=den,
                                   gamma=0.0 if self.stage.cls_loss == "bce" else 2.0)

    def reg_deltas(self, deltas: Tensor, tgt: IncTargets) -> Tensor:
        return deltas.reshape(-1, 4)  # (B, A_s, 4) -> (B * A_s, 4)

    def rm_scores(self, logits: Tensor, rt: RpnTargets, member: Tensor) -> tuple[Tensor, Tensor]:
        """The objectness: both probabilities, or both logits (the teacher's from its probability)."""
        p_t = rt.targets.teacher_scores[member]
        if self.d.rm_input == "prob":
            return logits[member].sigmoid(), p_t
        return logits[member], torch.logit(p_t, eps=1e-6)


class SparseRpnStage:
    """The RPN stage of the table 2(c) hybrid (``dtg.rpn.targets=sparse``): the teacher's detections above
    ``sparse.pseudo_score_thresh`` as pseudo boxes (the uncertain band as ignore regions), torchvision's
    RPN assignment and loss on the student's anchors."""

    name, slot, terms = "rpn", "rpn_boxes", ("cls", "reg")

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.sparse, self.device = cfg.sparse, device

    def figures(self) -> tuple[TargetFigure, ...]:
        return (pseudo_box_figure(self.sparse, "RPN pseudo boxes"),)

    def targets(self, teacher: Detector, tt: DTGTargets, items: list[dict[str, Any]]) -> BoxTargets:
        """:func:`pseudo_box_targets`, reusing the teacher's DTG pass on the weak views."""
        return pseudo_box_targets(teacher, items, self.sparse, self.device, weak_pass=tt.teacher.dense)

    def losses(self, student: Detector, s: DenseOutputs, bt: BoxTargets) -> tuple[dict[str, Tensor], dict[str, float]]:
        """:meth:`Detector.rpn_losses` (its sampler draws from torch's global generator); pseudo boxes per image."""
        cls, reg = student.rpn_losses(s, bt.images, ignore_rule=background_to_ignore)
        return {"cls": cls, "reg": reg}, {"pseudo_boxes_per_image": bt.boxes_per_image()}


def check_layout(s: DenseOutputs, layout: DenseLayout) -> None:
    """Raise when the student's pass ``s`` does not have the shapes the RPN targets were built for
    (a backbone whose strides :meth:`Detector.dense_layout` does not know): sizes only, no tensor read."""
    got = (list(s.images.image_sizes), tuple(s.images.tensors.shape[-2:]),
           [tuple(f.shape[-2:]) for f in s.features.values()], list(s.rpn.num_anchors_per_level))
    want = (layout.image_sizes, layout.padded_size, layout.feature_sizes, layout.num_anchors_per_level)
    if got != want:
        raise RuntimeError(f"the student's pass has image sizes / padded size / feature sizes / anchors per level "
                           f"{got}, the RPN targets were built for {want}")
