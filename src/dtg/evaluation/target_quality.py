"""Target quality of a teacher/student pair on images with ground truth (docs/method.md, "Target quality").

Takes the targets from the methods themselves (the registry's ``dtg`` and ``sparse``
:meth:`teacher_targets` on weak and strong views drawn as training draws them: DTG's INC
targets, sparse's pseudo boxes with its ignore band, assigned to the same student samples) and
sums :mod:`dtg.evaluation.targets` counts. Used by ``dtg bench targets`` (a checkpoint) and by the trainer, which logs the same
numbers to TensorBoard (``targets/*``) at each evaluation when the unlabeled images have ground
truth (``data.full_json``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from dtg.config import Config, ConfigError
from dtg.data.coco import ImageRecord, load_labeled, load_unlabeled
from dtg.data.dataset import LabelMap
from dtg.models.detector import Detector

STAGES = ("rcnn", "rpn")
METHODS = ("dtg", "sparse")


@dataclass
class TargetReport:
    """Summed counts per (stage, method), per-level pairing and positive weights of one scoring."""

    images: int = 0
    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # "rcnn/dtg" -> stage_counts sums
    paired: list[list[float]] = field(default_factory=list)  # per image: share paired per FPN level
    weights: dict[str, list[float]] = field(default_factory=dict)  # "rcnn/dtg-samples" -> weights of positives
    detections: Any = None  # (T, K, 5) summed dtg.evaluation.pseudo_boxes.detection_counts of the teacher
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, target_precision: float = 0.7) -> dict[str, Any]:
        """Ratios per (stage, method), mean pairing per level, mean relative positive weight per rule,
        and the teacher's detections per class and threshold with the per-class thresholds whose
        precision reaches ``target_precision``."""
        from dtg.evaluation.targets import summarize

        levels = list(zip(*self.paired)) if self.paired else []
        return {
            "pseudo_boxes": self._pseudo_boxes(target_precision),
            "images": self.images,
            "quality": {k: summarize(v, self.images) for k, v in self.counts.items()},
            "paired_per_level": [sum(x) / len(x) for x in levels],
            "positive_weight": {k: (sum(v) / len(v) if v else None) for k, v in self.weights.items()},
            "meta": self.meta,
        }

    def _pseudo_boxes(self, target: float) -> dict[str, Any] | None:
        from dtg.evaluation.pseudo_boxes import THRESHOLDS, precision_recall, suggest_class_thresholds

        if self.detections is None:
            return None
        ratios = precision_recall(self.detections)
        listed = {k: [[None if v != v else round(float(v), 4) for v in row] for row in t.tolist()]
                  for k, t in ratios.items()}
        return {"thresholds": list(THRESHOLDS), **listed, "target_precision": target,
                "gt_boxes": [float(x) for x in self.detections[0, :, 3]],
                "suggested": suggest_class_thresholds(self.detections, THRESHOLDS, target)}


def unlabeled_with_boxes(cfg: Config, max_images: int) -> list[ImageRecord]:
    """The first ``max_images`` unlabeled images of ``cfg.data`` with their boxes from ``data.full_json``.

    Raises:
        ConfigError: ``data.full_json`` is empty or holds none of the unlabeled images.
    """
    if not cfg.data.full_json:
        raise ConfigError("config key 'data.full_json' is empty: --on unlabeled needs the unlabeled images' boxes "
                          "(use --on labeled on data without them)")
    full = load_labeled(cfg.data.full_json, cfg.data.unlabeled_images, log=lambda m: None)
    unlabeled = load_unlabeled(cfg.data.unlabeled, cfg.data.unlabeled_images, log=lambda m: None).records
    same = {(r.id, r.path) for r in unlabeled}  # the same image id and file: another set's json never matches
    recs = [r for r in full.records if (r.id, r.path) in same]
    if not recs:
        raise ConfigError(f"{cfg.data.full_json}: holds none of the unlabeled images of {cfg.data.unlabeled}")
    return recs[:max_images]


@torch.no_grad()
def score_models(teacher: Detector, student: Detector, records: list[ImageRecord], labels: LabelMap, cfg: Config,
                 seed: int = 0, report: TargetReport | None = None) -> TargetReport:
    """Score both methods' targets on ``records`` (batches of ``data.batch_unlabeled``, as in training).

    Both models should be in eval mode; nothing of theirs changes and no global random state is used.
    """
    report = report or TargetReport()
    device = next(teacher.parameters()).device
    batch = max(1, cfg.data.batch_unlabeled)
    for start in range(0, len(records), batch):
        _score_batch(records[start : start + batch], labels, cfg, teacher, student, seed, report, device)
    return report


def _views(rec: ImageRecord, labels: LabelMap, cfg: Config, seed: int, device: torch.device) -> dict[str, Any]:
    """One record as an unlabeled training item (weak and strong view, their matrices), plus the
    teacher-to-student matrix ``m`` and the GT in the student view."""
    from dtg.data.augment import make_view
    from dtg.data.coco import load_image
    from dtg.data.dataset import record_targets
    from dtg.geometry import project_targets, teacher_to_student

    rng = random.Random(seed * 1_000_003 + rec.id)
    img = load_image(rec.path)
    weak = make_view(img, rng, cfg.data.weak_view)
    strong = make_view(img, rng, cfg.data.strong_view)
    boxes, cls = record_targets(rec, labels)
    gt, gt_labels = project_targets(boxes, cls, strong.matrix, strong.size)
    return {"weak": weak.image.to(device), "strong": strong.image.to(device), "weak_matrix": weak.matrix,
            "strong_matrix": strong.matrix, "size": strong.size,
            "m": teacher_to_student(weak.matrix, strong.matrix).to(device), "gt": gt.to(device, torch.float32),
            "gt_labels": gt_labels.to(device)}


def scoring_methods(cfg: Config, device: torch.device) -> tuple[Any, Any]:
    """The registry's ``dtg`` and ``sparse`` methods for ``cfg`` (a checkpoint of any method), whose
    ``teacher_targets`` give the targets scored: DTG with both stages on, its RPN stage its own
    (``dtg.rpn.targets=dtg``) and every RoI kept (``dtg.rcnn.subsample``, ``dtg.rcnn.background`` and
    ``dtg.rcnn.append_kept`` off: no global random state
    is used); each stage with its own keys (``dtg.rcnn``, ``dtg.rpn``)."""
    from dataclasses import replace

    from dtg.methods import build_method

    d = replace(cfg.dtg, rcnn=replace(cfg.dtg.rcnn, enabled=True, subsample=False, background=0,
                                      append_kept=False),
                rpn=replace(cfg.dtg.rpn, enabled=True, targets="dtg"))
    return build_method(replace(cfg, method="dtg", dtg=d), device), build_method(replace(cfg, method="sparse"), device)


def _score_batch(records: list[ImageRecord], labels: LabelMap, cfg: Config, teacher: Detector, student: Detector,
                 seed: int, report: TargetReport, device: torch.device) -> None:
    """Add one batch's counts, pairing and positive weights to ``report``."""
    from dtg.evaluation.targets import add_counts, paired_share, pseudo_assignment, stage_counts
    from dtg.methods.dtg.image_targets import anchor_partners, concat_targets

    views = [_views(r, labels, cfg, seed, device) for r in records]
    dtg, sparse = scoring_methods(cfg, device)
    tt = dtg.teacher_targets(teacher, views)
    st = sparse.teacher_targets(teacher, views)
    rpn_m, roi_m = student.net.rpn.proposal_matcher, student.net.roi_heads.proposal_matcher
    grid = tt.rpn.grid
    rcnn_parts, rpn_parts = [], []
    for i, v in enumerate(views):
        gt, gl = v["gt"], v["gt_labels"]
        built = tt.rcnn.images[i]
        tg = built.targets
        boxes = teacher.rcnn_box_coder.decode_single(tg.reg_targets.float(), built.rois.float())
        add_counts(report.counts.setdefault("rcnn/dtg", {}),
                   stage_counts(built.rois, tg.classes, boxes, tg.reg_mask, gt, gl))
        rcnn_parts.append(tg)
        rpn_t = tt.rpn.images[i]
        boxes = teacher.rpn_box_coder.decode_single(rpn_t.reg_targets.float(), grid.anchors.float())
        ones = torch.ones_like(gl)
        add_counts(report.counts.setdefault("rpn/dtg", {}),
                   stage_counts(grid.anchors, rpn_t.classes, boxes, rpn_t.reg_mask, gt, ones))
        rpn_parts.append(rpn_t)
        partner = anchor_partners(tt.rpn.teacher_anchors, tt.mats[i], grid, dtg.canonical, dtg.d.rpn)
        report.paired.append(paired_share(partner, grid.offsets, grid.anchors.shape[0]))
        _add_detections(report, st.detections[i], v, labels.num_classes)
        pl = st.images[i]
        ign = pl.get("ignore")
        lab, tgt = pseudo_assignment(built.rois, pl["boxes"], pl["labels"], roi_m, ign, roi_m.high_threshold)
        lab[built.outside] = -1
        add_counts(report.counts.setdefault("rcnn/sparse", {}),
                   stage_counts(built.rois, lab, tgt, lab > 0, gt, gl))
        lab, tgt = pseudo_assignment(grid.anchors, pl["boxes"], torch.ones_like(pl["labels"]), rpn_m, ign,
                                     rpn_m.low_threshold)
        add_counts(report.counts.setdefault("rpn/sparse", {}),
                   stage_counts(grid.anchors, lab, tgt, lab > 0, gt, ones))
    _add_weights(report, cfg, concat_targets(rcnn_parts), concat_targets(rpn_parts), len(views))
    report.images += len(views)


def _add_detections(report: TargetReport, det: dict[str, torch.Tensor], view: dict[str, Any], num_classes: int) -> None:
    """The teacher's final detections mapped into the student view (as pseudo boxes), counted per class."""
    from dtg.evaluation.pseudo_boxes import detection_counts
    from dtg.geometry import project_boxes, valid_boxes

    boxes = project_boxes(det["boxes"].float().cpu(), view["m"].cpu(), view["size"])
    keep = valid_boxes(boxes)
    counts = detection_counts(boxes[keep], det["scores"].cpu()[keep], det["labels"].cpu()[keep], view["gt"].cpu(),
                              view["gt_labels"].cpu(), num_classes)
    report.detections = counts if report.detections is None else report.detections + counts


def _add_weights(report: TargetReport, cfg: Any, rcnn: Any, rpn: Any, batch: int) -> None:
    """Weights of positives relative to a supervised positive (``1 / (B_l x sampled per image)``)."""
    from dtg.evaluation.targets import positive_weights

    alpha, b_l = cfg.semi.alpha, max(1, cfg.data.batch_labeled)
    sup = {"rcnn": 1.0 / (b_l * cfg.model.roi_batch_size_per_image),
           "rpn": 1.0 / (b_l * cfg.model.rpn_batch_size_per_image)}
    for stage, tg in (("rcnn", rcnn), ("rpn", rpn)):
        per_image = cfg.model.roi_batch_size_per_image if stage == "rcnn" else cfg.model.rpn_batch_size_per_image
        for mode in ("samples", "cluster", "supervised"):
            w = positive_weights(tg.classes, tg.cluster, mode, batch * per_image) * alpha / sup[stage]
            report.weights.setdefault(f"{stage}/dtg-{mode}", []).extend(w.tolist())
        report.weights.setdefault(f"{stage}/sparse", []).append(alpha / (batch * per_image) / sup[stage])


