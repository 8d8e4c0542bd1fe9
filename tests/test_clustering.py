"""``nms_clusters``: keep equals torchvision's batched_nms, cluster equals greedy NMS's suppressor.

Scores are distinct in every random case: with exact ties torchvision's processing order
is its unstable sort's, which a reference cannot reproduce (see ``nms_clusters``'s docstring).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms, box_iou

from dtg.methods.dtg.clusters import cluster_sizes, nms_clusters


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                  thr: float) -> tuple[list[int], list[int]]:
    """Plain greedy NMS: visit boxes by descending score; a kept box suppresses every later
    unsuppressed box of its label with IoU > thr and is recorded as its suppressor.

    IoU comes from ``box_iou`` (float32, the same arithmetic as torchvision's kernel) and is
    compared with ``thr`` as a Python float (double), as the kernel does.
    """
    n = len(scores)
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    iou = box_iou(boxes, boxes).tolist() if n else []
    lab = labels.tolist()
    suppressor = [-1] * n
    keep: list[int] = []
    for i in order:
        if suppressor[i] >= 0:
            continue
        keep.append(i)
        suppressor[i] = i
        for j in order:
            if suppressor[j] < 0 and lab[j] == lab[i] and iou[i][j] > thr:
                suppressor[j] = i
    position = {k: p for p, k in enumerate(keep)}
    return keep, [position[suppressor[i]] for i in range(n)]


def pair_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (P, 4) xyxy ``a[p]`` with ``b[p]``, with ``box_iou``'s float operations."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def check_invariants(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, thr: float,
                     keep: torch.Tensor, cluster: torch.Tensor) -> None:
    """Properties every result must have, whatever the reference."""
    n, k = len(boxes), len(keep)
    assert keep.dtype == cluster.dtype == torch.int64
    assert cluster.shape == (n,)
    assert torch.equal(keep, batched_nms(boxes, scores, labels, thr))
    if n == 0:
        return
    assert int(cluster.min()) >= 0 and int(cluster.max()) < k
    assert torch.equal(cluster[keep], torch.arange(k))
    head = keep[cluster]  # the kept box of each candidate's cluster
    assert torch.equal(labels[head], labels)  # labels never cross
    assert bool((scores[head] >= scores).all())  # suppressed by a higher-scoring box
    members = head != torch.arange(n)
    iou = pair_iou(boxes[members], boxes[head[members]])
    assert bool((iou.double() > thr).all())  # in double, as the kernel compares
    assert int(cluster_sizes(cluster, k).sum()) == n


def brute_force_cluster(boxes: torch.Tensor, labels: torch.Tensor, thr: float, keep: torch.Tensor) -> torch.Tensor:
    """Definition, vectorised with a full IoU matrix: first kept box (keep order) of the same
    label with IoU > thr; kept boxes map to themselves."""
    hit = (box_iou(boxes, boxes[keep]).double() > thr) & (labels[:, None] == labels[keep][None, :])
    cluster = hit.to(torch.uint8).argmax(dim=1)
    cluster[keep] = torch.arange(len(keep))
    return cluster


def random_case(g: torch.Generator, n: int, grid: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes (float, or on a small integer grid so IoUs hit thresholds exactly),
    distinct scores, 1-3 labels."""
    if grid:
        xy = torch.randint(0, 6, (n, 2), generator=g).float()
        wh = torch.randint(1, 5, (n, 2), generator=g).float()
    else:
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 40 + 0.5
    scores = torch.randperm(n, generator=g).float().add_(1).div_(n + 1)
    labels = torch.randint(0, int(torch.randint(1, 4, (1,), generator=g)), (n,), generator=g)
    return torch.cat([xy, xy + wh], 1), scores, labels


THRESHOLDS = [0.1, 0.2, 0.25, 1 / 3, 0.5, 0.6, 0.7, 0.9]


def test_random_cases_match_reference_and_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    for case in range(1500):
        n = int(torch.randint(0, 30, (1,), generator=g))
        boxes, scores, labels = random_case(g, n, grid=case % 2 == 1)
        thr = THRESHOLDS[case % len(THRESHOLDS)] if case % 3 else float(torch.rand(1, generator=g))
        keep, cluster = nms_clusters(boxes, scores, labels, thr)
        ref_keep, ref_cluster = reference_nms(boxes, scores, labels, thr)
        assert keep.tolist() == ref_keep, case
        assert cluster.tolist() == ref_cluster, case
        check_invariants(boxes, scores, labels, thr, keep, cluster)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 6), st.integers(1, 6),
                       st.integers(0, 2)), max_size=25),
    st.sampled_from(THRESHOLDS),
    st.randoms(use_true_random=False),
)
def test_hypothesis_grid_boxes(rows: list[tuple[int, ...]], thr: float, rnd) -> None:
    n = len(rows)
    t = torch.tensor(rows, dtype=torch.float32).reshape(n, 5)
    boxes = torch.cat([t[:, :2], t[:, :2] + t[:, 2:4]], 1)
    labels = t[:, 4].long()
    perm = list(range(n))
    rnd.shuffle(perm)
    scores = torch.tensor(perm, dtype=torch.float32).add(1).div(n + 1)
    keep, cluster = nms_clusters(boxes, scores, labels, thr)
    assert (keep.tolist(), cluster.tolist()) == reference_nms(boxes, scores, labels, thr)
    check_invariants(boxes, scores, labels, thr, keep, cluster)


@pytest.mark.parametrize("n", [1200, 2500])
def test_large_inputs_per_label_path(n: int) -> None:
    """N > 1000 takes batched_nms's per-label path on CPU; dense jittered clusters."""
    g = torch.Generator().manual_seed(n)
    centres = torch.rand(n // 20, 2, generator=g) * 500
    size = torch.rand(n // 20, 2, generator=g) * 100 + 10
    pick = torch.randint(0, n // 20, (n,), generator=g)
    xy = centres[pick] + torch.randn(n, 2, generator=g) * 0.1 * size[pick]
    wh = size[pick] * (1 + 0.1 * torch.randn(n, 2, generator=g)).clamp(min=0.5)
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randperm(n, generator=g).float() / n
    labels = torch.randint(0, 5, (n,), generator=g)
    for thr in (0.5, 0.7):
        keep, cluster = nms_clusters(boxes, scores, labels, thr)
        assert len(keep) < n * 0.8  # the case really has clusters
        check_invariants(boxes, scores, labels, thr, keep, cluster)
        assert torch.equal(cluster, brute_force_cluster(boxes, labels, thr, keep))


def test_empty_input() -> None:
    keep, cluster = nms_clusters(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert keep.shape == cluster.shape == (0,)
    assert keep.dtype == cluster.dtype == torch.int64
    assert cluster_sizes(cluster, 0).shape == (0,)


def test_hand_drawn_case() -> None:
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # 0: top of cluster A
        [1.0, 0.0, 11.0, 10.0],    # 1: IoU with 0 = 90 / 110 = 0.818 -> A
        [0.0, 1.0, 10.0, 11.0],    # 2: IoU with 0 = 0.818, with 1 = 81 / 119 -> A (0 scores higher)
        [100.0, 100.0, 110.0, 110.0],  # 3: far away -> its own cluster
        [0.0, 0.0, 10.0, 10.0],    # 4: same place as 0, other label -> its own cluster
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 1, 1, 1, 2])
    keep, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert keep.tolist() == [0, 3, 4]
    assert cluster.tolist() == [0, 0, 0, 1, 2]
    assert cluster_sizes(cluster, len(keep)).tolist() == [3, 1, 1]
    # Box 1 ranked first: it heads the cluster and still takes 0 and 2.
    keep, cluster = nms_clusters(boxes, torch.tensor([0.8, 0.9, 0.7, 0.6, 0.5]), labels, 0.5)
    assert keep.tolist() == [1, 3, 4]
    assert cluster.tolist() == [0, 0, 0, 1, 2]


def test_suppressor_is_highest_scoring_overlapping_kept_box() -> None:
    """Candidate 2 overlaps kept boxes 0 and 1 (which do not overlap each other above the
    threshold): it belongs to the higher-scoring one, whichever index it has."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0], [3.0, 0.0, 13.0, 10.0]])
    labels = torch.zeros(3, dtype=torch.int64)
    # IoU(0, 1) = 40 / 160 = 0.25; IoU(2, 0) = IoU(2, 1) = 70 / 130 = 0.538.
    keep, cluster = nms_clusters(boxes, torch.tensor([0.9, 0.8, 0.1]), labels, 0.5)
    assert keep.tolist() == [0, 1] and cluster.tolist() == [0, 1, 0]
    keep, cluster = nms_clusters(boxes, torch.tensor([0.8, 0.9, 0.1]), labels, 0.5)
    assert keep.tolist() == [1, 0] and cluster.tolist() == [1, 0, 0]


def test_threshold_is_strict() -> None:
    """IoU exactly 0.5 does not suppress at threshold 0.5 (torchvision: IoU > threshold)."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU = 1 / 2
    scores, labels = torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.int64)
    keep, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert keep.tolist() == [0, 1] and cluster.tolist() == [0, 1]
    keep, cluster = nms_clusters(boxes, scores, labels, math.nextafter(0.5, 0.0))
    assert keep.tolist() == [0] and cluster.tolist() == [0, 0]


def test_labels_never_cross() -> None:
    g = torch.Generator().manual_seed(1)
    boxes = torch.rand(50, 2, generator=g) * 5
    boxes = torch.cat([boxes, boxes + 20], 1).repeat(3, 1)  # heavy overlap, 3 label copies
    scores = torch.randperm(150, generator=g).float()
    labels = torch.arange(3).repeat_interleave(50)
    keep, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert len(keep) >= 3
    assert torch.equal(labels[keep[cluster]], labels)
    assert set(labels[keep].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_chunking_does_not_change_the_result(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(2)
    n = 500
    centres = torch.rand(25, 2, generator=g) * 300
    xy = centres[torch.randint(0, 25, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 3
    wh = torch.rand(n, 2, generator=g) * 20 + 30
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randperm(n, generator=g).float()
    labels = torch.randint(0, 3, (n,), generator=g)
    keep, cluster = nms_clusters(boxes, scores, labels, 0.6)
    assert len(keep) < n // 2
    keep_c, cluster_c = nms_clusters(boxes, scores, labels, 0.6, chunk_size=chunk_size)
    assert torch.equal(keep, keep_c) and torch.equal(cluster, cluster_c)
    assert torch.equal(cluster, brute_force_cluster(boxes, labels, 0.6, keep))


def test_extreme_thresholds() -> None:
    g = torch.Generator().manual_seed(3)
    boxes, scores, labels = random_case(g, 40, grid=False)
    # Threshold 0: any overlap suppresses.
    keep, cluster = nms_clusters(boxes, scores, labels, 0.0)
    assert (keep.tolist(), cluster.tolist()) == reference_nms(boxes, scores, labels, 0.0)
    assert len(keep) < 40
    # Threshold 1: nothing is suppressed.
    keep, cluster = nms_clusters(boxes, scores, labels, 1.0)
    assert len(keep) == 40 and torch.equal(keep[cluster], torch.arange(40))
    with pytest.raises(ValueError):
        nms_clusters(boxes, scores, labels, -0.1)


def test_float64_and_identical_boxes() -> None:
    boxes = torch.tensor([[5.0, 5.0, 9.0, 9.0]] * 4 + [[5.0, 5.0, 9.0, 9.5]], dtype=torch.float64)
    scores = torch.tensor([0.1, 0.5, 0.3, 0.4, 0.2], dtype=torch.float64)
    labels = torch.zeros(5, dtype=torch.int64)
    keep, cluster = nms_clusters(boxes, scores, labels, 0.5)
    assert keep.tolist() == [1] and cluster.tolist() == [0] * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(4)
    boxes, scores, labels = random_case(g, 800, grid=False)
    keep, cluster = nms_clusters(boxes, scores, labels, 0.5)
    keep_d, cluster_d = nms_clusters(boxes.cuda(), scores.cuda(), labels.cuda(), 0.5)
    assert keep_d.is_cuda and cluster_d.is_cuda
    assert torch.equal(keep_d.cpu(), keep) and torch.equal(cluster_d.cpu(), cluster)
