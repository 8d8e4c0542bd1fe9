"""Pseudo-box quality per class and threshold (:mod:`dtg.evaluation.pseudo_boxes`) on hand-made detections."""

import math

import torch

from dtg.evaluation.pseudo_boxes import detection_counts, precision_recall, suggest_class_thresholds

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
GT_LABELS = torch.tensor([1, 2])


def test_counts_per_threshold_and_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # class 1 on the class-1 box: correct
                          [20.0, 20.0, 30.0, 31.0],   # class 1 on the class-2 box: located, wrong class
                          [20.0, 20.0, 30.0, 30.0],   # class 2 on the class-2 box: correct
                          [50.0, 50.0, 60.0, 60.0]])  # class 2 on nothing
    scores = torch.tensor([0.95, 0.6, 0.45, 0.9])
    labels = torch.tensor([1, 1, 2, 2])
    c = detection_counts(boxes, scores, labels, GT, GT_LABELS, 2, thresholds=(0.4, 0.5, 0.9))
    # fields: detections, correct, located, gt boxes, recalled
    assert c[0, 0].tolist() == [2, 1, 2, 1, 1] and c[0, 1].tolist() == [2, 1, 1, 1, 1]
    assert c[1, 0].tolist() == [2, 1, 2, 1, 1] and c[1, 1].tolist() == [1, 0, 0, 1, 0]  # the 0.45 box is out
    assert c[2, 0].tolist() == [1, 1, 1, 1, 1] and c[2, 1].tolist() == [1, 0, 0, 1, 0]
    r = precision_recall(c)
    assert r["precision"][0].tolist() == [0.5, 0.5, 0.5] and r["box_precision"][0].tolist() == [1.0, 0.5, 0.75]
    assert r["recall"][1].tolist() == [1.0, 0.0, 0.5] and r["precision"][2, 0] == 1.0


def test_no_detections_or_no_ground_truth():
    empty = torch.zeros(0, 4)
    c = detection_counts(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), GT, GT_LABELS, 3, (0.5,))
    assert c[0, :, 3].tolist() == [1, 1, 0] and c[..., :3].sum() == 0 and c[..., 4].sum() == 0
    r = precision_recall(c)
    assert math.isnan(r["precision"][0, 0]) and r["recall"][0, 0] == 0.0 and math.isnan(r["recall"][0, 2])
    c = detection_counts(GT, torch.tensor([0.9, 0.9]), GT_LABELS, empty, torch.zeros(0, dtype=torch.int64), 2, (0.5,))
    assert c[0, :, 0].tolist() == [1, 1] and c[0, :, 1].sum() == 0


def test_suggested_threshold_is_the_lowest_reaching_the_target_with_enough_detections():
    th = (0.3, 0.5, 0.7, 0.9)
    counts = torch.zeros(4, 3, 5)
    counts[:, 0, 0], counts[:, 0, 1] = torch.tensor([20.0, 10, 8, 4]), torch.tensor([10.0, 7, 7, 4])
    counts[:, 1, 0], counts[:, 1, 1] = torch.tensor([10.0, 6, 4, 2]), torch.tensor([5.0, 3, 4, 2])
    counts[:, 2, 0], counts[:, 2, 1] = torch.tensor([10.0, 10, 10, 10]), torch.tensor([9.0, 9, 9, 9])
    # class 1: 0.5 (7/10); class 2: 0.7 has precision 1 but 4 < 5 detections, none qualifies; class 3: 0.3
    assert suggest_class_thresholds(counts, th, 0.7, min_detections=5) == [0.5, None, 0.3]
    assert suggest_class_thresholds(counts, th, 0.7, min_detections=2) == [0.5, 0.7, 0.3]
