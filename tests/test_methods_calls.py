"""The methods' two calls: ``teacher_targets`` (the teacher's typed targets) and ``student_losses``.

DTG's ``student_losses`` is checked bit for bit against the loss functions of :mod:`dtg.methods.dtg.losses` on the
targets ``teacher_targets`` built (the targets themselves: tests/test_inc.py, tests/test_methods_dtg.py).
"""

from __future__ import annotations

import pytest
import torch

from dtg.config import ModelConfig, load_config
from dtg.engine.trainer import Trainer
from dtg.geometry import teacher_to_student
from dtg.methods.dtg.losses import (
    inc_classification_loss, inc_objectness_loss, inc_rank_matching_loss, inc_regression_loss, select_class_deltas,
)
from dtg.losses.pseudo_label import background_to_ignore, pseudo_targets
from dtg.methods.base import BoxTargets
from dtg.methods.dtg.teacher import DTGTargets
from dtg.methods.oracle import ground_truth_targets
from dtg.models.detector import Detector

from conftest import tiny_config


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "mobilenet_v2"])
def test_dense_layout_is_the_forward_pass_shapes(backbone):
    det = Detector.from_config(ModelConfig(backbone=backbone, pretrained=None), 3).eval()
    for sizes in ([(128, 160)], [(97, 131), (150, 201)], [(160, 224), (33, 45)], [(64, 64)]):
        with torch.no_grad():
            out = det.forward_dense([torch.rand(3, *s) for s in sizes])
        lay = det.dense_layout(sizes)
        assert lay.image_sizes == out.images.image_sizes
        assert lay.padded_size == tuple(out.images.tensors.shape[-2:])
        assert lay.feature_sizes == [tuple(f.shape[-2:]) for f in out.features.values()]
        assert lay.num_anchors_per_level == out.rpn.num_anchors_per_level
        assert torch.equal(lay.anchors, out.rpn.anchors) and lay.anchors.dtype == out.rpn.anchors.dtype


def _losses_of(method, student, items, targets):
    """What ``DTGMethod.student_losses`` must give on ``targets``: the loss functions of :mod:`dtg.methods.dtg.losses`
    on the student's pass (and the hybrid's sparse RPN loss, :meth:`Detector.rpn_losses`), per stage
    ``L_cls + L_reg + rm_weight * L_RM`` (docs/method.md) with the supervised denominators."""
    d, m, n = method.d, method.cfg.model, len(items)
    s = student.forward_dense([it["strong"] for it in items])
    losses, stats = {}, {}

    def rm(p_s, p_t, tgt, den):
        member = tgt.cluster >= 0
        return d.rm_weight * inc_rank_matching_loss(p_s, p_t, tgt.cluster[member], d.normalize, d.T, d.rm_scale, den,
                                                    labelled=int((tgt.classes >= 0).sum()))

    if targets.rcnn is not None:
        tgt, den = targets.rcnn.targets, n * m.roi_batch_size_per_image
        logits, deltas = student.roi_forward(s.features, targets.rcnn.rois, s.images.image_sizes)
        losses["unsup_rcnn_cls"] = inc_classification_loss(logits, tgt, d.normalize, m.focal_gamma, denominator=den)
        losses["unsup_rcnn_reg"] = inc_regression_loss(select_class_deltas(deltas, tgt.classes), tgt, d.normalize,
                                                       denominator=den)
        if d.rcnn.rank_matching:
            member = tgt.cluster >= 0
            cls = tgt.classes[member].clamp(min=0)[:, None]
            if d.rm_input == "prob":  # the student's softmax probability of the cluster's class, the teacher's p
                p_s, p_t = torch.softmax(logits[member], -1).gather(1, cls).squeeze(1), tgt.teacher_scores[member]
            else:  # both logits of that class
                p_s = logits[member].gather(1, cls).squeeze(1)
                p_t = targets.rcnn.teacher_logits[member].gather(1, cls).squeeze(1)
            losses["unsup_rcnn_rm"] = rm(p_s, p_t, tgt, den)
        stats["rcnn_clusters_per_image"] = tgt.num_clusters / n
    if targets.rpn_boxes is not None:
        cls_loss, reg_loss = student.rpn_losses(s, targets.rpn_boxes.images, ignore_rule=background_to_ignore)
        losses.update({"unsup_rpn_cls": cls_loss, "unsup_rpn_reg": reg_loss})
    elif targets.rpn is not None:
        tgt, den, obj = targets.rpn.targets, n * m.rpn_batch_size_per_image, s.rpn.objectness.reshape(-1)
        losses["unsup_rpn_cls"] = inc_objectness_loss(obj, tgt, d.normalize, denominator=den,
                                                      gamma=0.0 if d.rpn.cls_loss == "bce" else 2.0)
        losses["unsup_rpn_reg"] = inc_regression_loss(s.rpn.deltas.reshape(-1, 4), tgt, d.normalize, denominator=den)
        if d.rpn.rank_matching:
            member = tgt.cluster >= 0
            p_t = tgt.teacher_scores[member]
            p_s, p_t = (obj[member].sigmoid(), p_t) if d.rm_input == "prob" else (obj[member], torch.logit(p_t, eps=1e-6))
            losses["unsup_rpn_rm"] = rm(p_s, p_t, tgt, den)
        stats["rpn_clusters_per_image"] = tgt.num_clusters / n
    return losses, stats


def _trainer(tiny_dataset, tmp_path, *overrides):
    cfg = tiny_config(tiny_dataset, tmp_path, "data.batch_labeled=1", "data.batch_unlabeled=2",
                      "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}", "dtg.rpn.tau=0.3",
                      "dtg.rcnn.tau=0.05", "sparse.pseudo_score_thresh=0.05", "sparse.uncertain_score_thresh=0.01",
                      "data.val_json=", *overrides)
    t = Trainer(cfg, log=lambda m: None, progress=False)
    return t, next(iter(t._loader(0)))["unsup"]


DTG_CASES = {
    "default": [],
    "rpn_sparse_hybrid": ["dtg.rpn.targets=sparse"],
    "rcnn_subsample_logit_rm": ["dtg.rcnn.subsample=true", "dtg.rcnn.background=0", "dtg.rm_input=logit",
                                "dtg.rpn.rank_matching=false"],
    "per_stage": ["dtg.rcnn.reg_target=own", "dtg.rpn.inc_cls=false"],
}


@pytest.mark.parametrize("name", list(DTG_CASES))
def test_dtg_student_losses_are_the_loss_functions_on_its_targets(tiny_dataset, tmp_path, name):
    t, items = _trainer(tiny_dataset, tmp_path / name, "method=dtg", "dtg.rpn.targets=dtg", *DTG_CASES[name])
    torch.manual_seed(0)  # rcnn_subsample draws from the global generator
    targets = t.method.teacher_targets(t.teacher, items)
    assert isinstance(targets, DTGTargets)
    rng = torch.get_rng_state()  # the hybrid's RPN sampler draws from it too
    got, stats = t.method.student_losses(t.model, items, targets)
    torch.set_rng_state(rng)
    want, want_stats = _losses_of(t.method, t.model, items, targets)
    assert list(got) == list(want)  # the same losses in the same order (the step sums them in order)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k, v in want_stats.items():
        assert stats[k] == v
    assert (targets.rpn_boxes is not None) == (name == "rpn_sparse_hybrid")
    if targets.rpn is not None:
        assert stats["rpn_clusters_per_image"] > 0
        assert targets.rpn.targets.labels.shape[0] == len(items) * targets.rpn.layout.anchors.shape[0]
    assert stats["rcnn_clusters_per_image"] > 0


def test_teacher_targets_read_no_student_and_leave_no_gradient(tiny_dataset, tmp_path):
    t, items = _trainer(tiny_dataset, tmp_path, "method=dtg", "dtg.rpn.targets=dtg")
    targets = t.method.teacher_targets(t.teacher, items)
    for tensor in (targets.teacher.logits, targets.rcnn.targets.teacher_scores, targets.rpn.targets.reg_targets,
                   *targets.rcnn.rois):
        assert not tensor.requires_grad
    assert targets.student_sizes == [tuple(it["strong"].shape[-2:]) for it in items]


def test_sparse_targets_are_the_pseudo_labels_of_the_teacher_detections(tiny_dataset, tmp_path):
    t, items = _trainer(tiny_dataset, tmp_path, "method=sparse")
    targets = t.method.teacher_targets(t.teacher, items)
    assert isinstance(targets, BoxTargets)
    dets = t.teacher.predict([it["weak"] for it in items])
    semi = t.cfg.sparse
    for it, det, got_det, got in zip(items, dets, targets.detections, targets.images):
        assert all(torch.equal(det[k], got_det[k]) for k in det)
        want = pseudo_targets(det, teacher_to_student(it["weak_matrix"], it["strong_matrix"]),
                              tuple(it["strong"].shape[-2:]), semi.pseudo_score_thresh, semi.uncertain_score_thresh)
        assert set(got) == set(want) == {"boxes", "labels", "ignore"}
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert sum(len(x["boxes"]) for x in targets.images) > 0
    torch.manual_seed(0)
    losses, stats = t.method.student_losses(t.model, items, targets)
    torch.manual_seed(0)
    want = t.model.supervised_losses([it["strong"] for it in items], targets.images, cls_loss=semi.unsup_cls_loss,
                                     ignore_rule=background_to_ignore)
    assert all(torch.equal(losses[f"unsup_{k}"], v) for k, v in want.items())
    assert stats["pseudo_boxes_per_image"] == sum(len(x["boxes"]) for x in targets.images) / len(items)


def test_oracle_targets_are_the_ground_truth_without_a_teacher(tiny_dataset, tmp_path):
    t, items = _trainer(tiny_dataset, tmp_path, "method=oracle", f"data.full_json={tiny_dataset.train_full}")
    targets = t.method.teacher_targets(None, items)  # a target source: the teacher is never read
    assert targets.detections is None
    for got, want in zip(targets.images, ground_truth_targets(items, t.device)):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="carry no ground truth"):
        t.method.teacher_targets(None, [{k: v for k, v in it.items() if k != "gt_boxes"} for it in items])


def test_supervised_has_no_targets_and_no_losses(tiny_dataset, tmp_path):
    t, items = _trainer(tiny_dataset, tmp_path, "method=supervised")
    assert t.method.teacher_targets(None, items) is None
    assert t.method.student_losses(t.model, items, None) == ({}, {})


def test_per_stage_overrides_reach_bench_targets_and_explain():
    from dtg.evaluation.target_quality import scoring_methods
    from dtg.bench.explain import rcnn_method

    cfg = load_config(None, ["method=sparse", "dtg.rcnn.reg_target=own", "dtg.rpn.inc_cls=false",
                             "dtg.rcnn.subsample=true", "dtg.rcnn.background=0", "dtg.rpn.targets=sparse",
                             "dtg.rpn.enabled=false"])
    dtg, sparse = scoring_methods(cfg, torch.device("cpu"))
    assert (dtg.name, sparse.name) == ("dtg", "sparse")
    assert (dtg.d.rcnn.reg_target, dtg.d.rpn.reg_target) == ("own", "kept")
    assert (dtg.d.rcnn.inc_cls, dtg.d.rpn.inc_cls) == (True, False)
    # both stages scored, every RoI kept, DTG's own RPN targets: whatever the checkpoint trained with
    assert dtg.d.rcnn.enabled and dtg.d.rpn.enabled and dtg.d.rpn.targets == "dtg" and not dtg.d.rcnn.subsample
    assert cfg.dtg.rcnn.subsample and cfg.method == "sparse"  # the caller's config is left alone
    ex = rcnn_method(cfg, 0.2, torch.device("cpu"))
    assert ex.d.rcnn.reg_target == "own" and ex.d.rcnn.tau == 0.2 and not ex.d.rpn.enabled


def test_bench_targets_scores_with_the_per_stage_options(tiny_dataset, tmp_path, monkeypatch):
    """``score_models`` builds its R-CNN targets with the R-CNN stage's options (a spy on the INC call)."""
    import dtg.methods.dtg.stages as dtg_mod
    from dtg.data.dataset import LabelMap
    from dtg.evaluation.target_quality import score_models, unlabeled_with_boxes

    t, _ = _trainer(tiny_dataset, tmp_path, "method=dtg", f"data.full_json={tiny_dataset.train_full}",
                    "dtg.rcnn.reg_target=own", "dtg.rpn.inc_reg=false")
    seen = []
    real_rcnn, real_rpn = dtg_mod.rcnn_image_targets, dtg_mod.rpn_image_targets
    monkeypatch.setattr(dtg_mod, "rcnn_image_targets", lambda *a: seen.append(("rcnn", a[-1])) or real_rcnn(*a))
    monkeypatch.setattr(dtg_mod, "rpn_image_targets", lambda *a: seen.append(("rpn", a[-1])) or real_rpn(*a))
    records = unlabeled_with_boxes(t.cfg, 2)
    report = score_models(t.teacher.eval(), t.model.eval(), records, t.labels, t.cfg)
    assert report.images == 2 and {"rcnn/dtg", "rpn/dtg", "rcnn/sparse", "rpn/sparse"} <= set(report.counts)
    assert {s for s, _ in seen} == {"rcnn", "rpn"}
    assert all(o.reg_target == ("own" if s == "rcnn" else "kept") for s, o in seen)
    assert all(o.inc_reg == (s == "rcnn") for s, o in seen)
    assert isinstance(t.labels, LabelMap)
