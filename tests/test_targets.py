"""``dtg bench targets``: target-quality scoring on hand-made cases, and the command on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import Matcher

from dtg.cli import main
from dtg.engine.trainer import Trainer
from dtg.evaluation.targets import paired_share, positive_weights, pseudo_assignment, stage_counts, summarize

from conftest import tiny_config

T = torch.tensor
GT = T([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
GT_LABELS = T([1, 2])


def test_stage_counts_on_a_hand_made_image():
    samples = T([
        [0.0, 0.0, 10.0, 10.0],    # on GT 0 (class 1)
        [1.0, 0.0, 11.0, 10.0],    # IoU 0.82 with GT 0
        [20.0, 20.0, 40.0, 40.0],  # on GT 1 (class 2)
        [60.0, 60.0, 70.0, 70.0],  # on nothing
        [20.0, 20.0, 30.0, 30.0],  # IoU 0.25 with GT 1: not GT positive
    ])
    labels = T([1, 0, 1, 2, -1])  # right, background on an object, wrong class, false positive, ignored
    targets = T([[0.0, 0.0, 10.0, 10.0], [0.0] * 4, [20.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.0, 10.0], [0.0] * 4])
    mask = T([True, False, True, True, False])
    c = stage_counts(samples, labels, targets, mask, GT, GT_LABELS)
    assert c["samples"] == 5 and c["positives"] == 3 and c["correct"] == 1 and c["wrong_class"] == 1
    assert c["gt_positive"] == 3 and c["recalled"] == 1 and c["gt_pos_background"] == 1 and c["gt_pos_ignored"] == 0
    assert c["reg_targets"] == 3
    assert c["reg_iou_sum"] == pytest.approx(1.0 + 0.5 + 0.5)  # exact box, half of GT 1, half of GT 0
    s = summarize(c, images=1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["gt_pos_background"] == pytest.approx(1 / 3) and s["target_iou"] == pytest.approx(2 / 3)
    assert s["positives_per_image"] == 3


def test_stage_counts_without_ground_truth_or_samples():
    c = stage_counts(T([[0.0, 0.0, 5.0, 5.0]]), T([1]), None, None, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert c["positives"] == 1 and c["correct"] == 0 and c["gt_positive"] == 0
    s = summarize(c, images=1)
    assert s["precision"] == 0.0 and s["recall"] is None and s["target_iou"] is None
    c = stage_counts(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), None, None, GT, GT_LABELS)
    assert c["samples"] == 0 and c["gt_positive"] == 0


def test_pseudo_boxes_equal_to_the_ground_truth_give_perfect_rcnn_labels():
    """Sparse's R-CNN matcher (0.5 / 0.5) against pseudo boxes == GT reproduces the GT assignment exactly."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 40
    samples = torch.cat([xy, xy + 4 + torch.rand(200, 2, generator=g) * 16], dim=1)
    labels, target = pseudo_assignment(samples, GT, GT_LABELS, Matcher(0.5, 0.5, False))
    c = stage_counts(samples, labels, target, labels > 0, GT, GT_LABELS)
    assert c["gt_positive"] > 0 and c["positives"] == c["correct"] == c["recalled"] == c["gt_positive"]
    assert c["reg_iou_sum"] == pytest.approx(c["reg_targets"])  # every target is its GT box


def test_pseudo_assignment_thresholds_and_ignore_regions():
    samples = T([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 2.0], [50.0, 50.0, 60.0, 60.0]])
    rpn = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    labels, target = pseudo_assignment(samples, GT[:1], T([1]), rpn)
    assert labels.tolist() == [1, -1, 0, 0]  # IoU 1, 0.5 (between), 0.2 (below), 0
    assert torch.equal(target[0], GT[0]) and torch.equal(target[3], samples[3])
    labels, _ = pseudo_assignment(samples, GT[:1], T([1]), rpn, ignore_boxes=T([[50.0, 50.0, 60.0, 61.0]]), ignore_iou=0.3)
    assert labels.tolist() == [1, -1, 0, -1]  # background near an uncertain box is ignored
    labels, target = pseudo_assignment(samples, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), rpn)
    assert labels.tolist() == [0, 0, 0, 0] and torch.equal(target, samples)


def test_positive_weights_under_both_normalisations():
    labels = T([3, 3, 3, 1, 0, 0, -1, 0])
    cluster = T([0, 0, 0, 1, -1, -1, -1, -1])
    w = positive_weights(labels, cluster, "cluster")
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])  # 2 clusters: 1 / (C N_j)
    assert float(w.sum()) == pytest.approx(1.0)  # the positives together weigh as one mean
    assert positive_weights(labels, cluster, "samples").tolist() == pytest.approx([1 / 7] * 4)  # 7 labelled
    assert positive_weights(labels, cluster, "supervised", 512).tolist() == pytest.approx([1 / 512] * 4)
    assert positive_weights(T([0, -1]), T([-1, -1]), "cluster").numel() == 0
    with pytest.raises(ValueError):
        positive_weights(labels, cluster, "sum")


def test_paired_share_per_level():
    # 2 levels: anchors 0..3 and 4..5; teacher anchors pair with 0, 0, 2 and 5
    assert paired_share(T([0, 0, 2, -1, 5]), [0, 4], 6) == pytest.approx([0.5, 0.5])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def dtg_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    cfg = tiny_config(
        tiny_dataset, tmp_path_factory.mktemp("targets") / "run", "method=dtg", "solver.max_iter=2",
        "data.batch_unlabeled=2", "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}",
        "data.val_json=", f"data.full_json={tiny_dataset.train_full}", "semi.burn_in=0", "sparse.pseudo_score_thresh=0.05",
        "sparse.uncertain_score_thresh=0.01", "dtg.rcnn.tau=0.05", "dtg.rpn.tau=0.3",
    )
    Trainer(cfg, log=lambda m: None, progress=False).train()
    return Path(cfg.output_dir) / "checkpoints" / "last.pth"


def test_command_scores_both_methods_on_the_same_samples(dtg_checkpoint, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["bench", "targets", "--checkpoint", str(dtg_checkpoint), "--out", str(out), "--max-images", "4"]) == 0
    text = capsys.readouterr().out
    assert "precision of positives" in text and "student anchors paired" in text
    summary = json.loads((out / "targets.json").read_text())
    assert (out / "targets.md").read_text() == text
    assert summary["images"] == 4  # 8 unlabeled images in the tiny set, 4 asked for (2 full batches)
    q = summary["quality"]
    for stage in ("rcnn", "rpn"):  # one teacher, one set of student samples: the same GT positives
        assert q[f"{stage}/dtg"]["gt_positive_per_image"] == q[f"{stage}/sparse"]["gt_positive_per_image"] > 0
    for row in q.values():
        for key in ("precision", "recall", "gt_pos_background", "gt_pos_ignored", "target_iou"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    assert len(summary["paired_per_level"]) == 5 and all(0.0 < x <= 1.0 for x in summary["paired_per_level"])
    w = summary["positive_weight"]
    # sparse: alpha x (B_l x per-image samples) / (B_u x per-image samples) with B_l = B_u = 2, alpha 1
    assert w["rcnn/sparse"] == pytest.approx(1.0) and w["rpn/sparse"] == pytest.approx(1.0)
    # DTG under the supervised denominators weighs a positive exactly like a supervised one
    for stage in ("rcnn", "rpn"):
        assert w[f"{stage}/dtg-supervised"] == pytest.approx(1.0)
    pb = summary["pseudo_boxes"]  # the teacher's detections per class and threshold
    assert pb["thresholds"][0] == 0.3 and len(pb["precision"]) == len(pb["thresholds"])
    assert all(len(row) == 6 for row in pb["precision"])  # 5 classes + all
    assert sum(pb["gt_boxes"]) > 0 and len(pb["suggested"]) == 5
    assert "Teacher detections as pseudo boxes" in text and "| score >= | circle |" in text


def test_command_on_labeled_images_and_bad_input(dtg_checkpoint, tmp_path, capsys):
    assert main(["bench", "targets", "--checkpoint", str(dtg_checkpoint), "--on", "labeled",
                 "--out", str(tmp_path / "l")]) == 0
    assert json.loads((tmp_path / "l" / "targets.json").read_text())["images"] == 4  # the 4 labeled images
    capsys.readouterr()
    assert main(["bench", "targets", "--checkpoint", str(dtg_checkpoint), "--target-precision", "1.5"]) == 2
    assert "--target-precision must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "targets", "--checkpoint", str(tmp_path / "none.pth")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.pth" in err and "not found" in err
    assert main(["bench", "targets", "--checkpoint", str(dtg_checkpoint), "--set", "data.full_json=",
                 "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.full_json" in err


def test_training_logs_target_quality_to_tensorboard(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(out, *extra):
        cfg = tiny_config(tiny_dataset, out, "method=dtg", "solver.max_iter=2", "data.batch_unlabeled=2",
                          "semi.burn_in=0", f"data.full_json={tiny_dataset.train_full}", "target_images=4", *extra)
        Trainer(cfg, log=lambda m: None, progress=False).train()
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        return acc, acc.Tags()["scalars"]

    acc, names = tags(tmp_path / "on")
    # an untrained teacher has few positives (precision undefined); what GT alone defines is always there
    assert {"targets/rcnn_dtg/recall", "targets/rcnn_sparse/recall", "targets/rpn_dtg/gt_pos_background",
            "targets/rpn_sparse/positives_per_image", "targets/rpn_paired/P2"} <= set(names)
    assert [e.step for e in acc.Scalars("targets/rcnn_dtg/gt_positive_per_image")] == [2]  # the final evaluation
    _, names = tags(tmp_path / "off", "target_images=0")
    assert not [n for n in names if n.startswith("targets/")]
