"""The teacher's side of a DTG batch: its pass on the weak views and the typed targets built from it.

:func:`teacher_pass` is the one teacher forward of an unlabeled batch (dense RPN outputs, proposals,
the R-CNN on its own proposals); :class:`DTGTargets` is what :meth:`DTGMethod.teacher_targets
<dtg.methods.dtg.method.DTGMethod.teacher_targets>` returns: that pass, the view matrices and, per
enabled stage (:mod:`dtg.methods.dtg.stages`), its targets (:class:`RcnnTargets`, :class:`RpnTargets`
or the hybrid's sparse pseudo boxes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dtg.methods.base import BoxTargets
from dtg.methods.dtg.correspondence import AnchorGrid
from dtg.methods.dtg.image_targets import RcnnImageTargets
from dtg.methods.dtg.targets import IncTargets
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
def teacher_pass(teacher: Detector, weak: list[Tensor], train_top_n: bool | None = True,
                 max_proposals: int = 0) -> TeacherPass:
    """The teacher on the (3, H, W) ``weak`` views: :meth:`Detector.forward_dense` (proposals with the
    training top-N by default, as DTG builds its targets; ``None``: the module's mode) and the
    R-CNN on its own proposals.

    ``max_proposals`` (``dtg.rcnn.proposals``; 0: all): keep only each image's first that many
    proposals, the highest-objectness ones (torchvision's proposal filter returns them by
    decreasing objectness), before the R-CNN runs; the RPN outputs stay whole."""
    t = teacher.forward_dense(weak, train_top_n=train_top_n)
    if max_proposals > 0:
        t = replace(t, proposals=[p[:max_proposals] for p in t.proposals],
                    proposal_scores=[p[:max_proposals] for p in t.proposal_scores])
    logits, deltas = teacher.roi_forward(t.features, t.proposals, t.images.image_sizes)
    return TeacherPass(t, logits, deltas)


@dataclass
class RcnnTargets:
    """DTG's R-CNN stage targets of a batch.

    Attributes:
        images: per image the full :class:`RcnnImageTargets` (every teacher proposal mapped into
            the strong view as a RoI, its INC targets, the clustering, the RoIs that left the view).
        rois: per image (R_i, 4) the RoIs the student scores: all of ``images[i].rois`` or, with
            ``dtg.rcnn.subsample`` / ``dtg.rcnn.background``, the members and a background sample of
            them; with ``dtg.rcnn.append_kept`` each cluster's kept box appended.
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
        grid: the student's anchors as a grid (:func:`~dtg.methods.dtg.correspondence.anchor_grid` of
            ``layout``), A_s anchors per image.
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
