"""NMS clusters, the "inverse NMS clustering" of INC: which kept box suppressed each candidate
(docs/method.md, "INC in the R-CNN stage" and "INC in the RPN stage").

:func:`nms_clusters` is greedy NMS that also returns each candidate's suppressor (the R-CNN stage
clusters its candidates with it, class-aware); :func:`rpn_clusters` is the RPN stage's clustering
(candidates above ``tau``, NMS per FPN level, or NMS first with ``nms_then_threshold``).

``nms_clusters`` runs ``torchvision.ops.batched_nms`` for the kept boxes and then, vectorised
and chunked, finds for every suppressed candidate its suppressor: the first kept box in
``keep`` order (= descending score) of the same label whose IoU with it is ``> iou_threshold``.

How the suppressor search stays cheap: only suppressed candidates are searched (kept boxes
point to themselves), and only against same-label kept boxes whose x-centre lies within a
window around the candidate. If ``IoU(a, b) > t`` then the x-overlap ``iw`` satisfies
``t * max(w_a, w_b) < iw <= min(w_a, w_b)`` and ``|cx_a - cx_b| <= (w_a + w_b) / 2 - iw``;
maximising over ``w_b <= w_a / t`` gives ``|cx_a - cx_b| < (1 - t) * max(1, 1 / (2 t)) * w_a``
for a candidate ``a`` of width ``w_a`` (``(1 - t) w_a`` for ``t >= 0.5``). Kept boxes are
sorted by (label, cx), so each window is a contiguous range found by ``searchsorted``; the
candidate x window pairs are gathered into padded (rows, width) blocks of bounded size,
candidates sorted by window length so that padding at most doubles the work.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

import torch
from torch import Tensor
from torchvision.ops import batched_nms

# Candidate x kept pairs per chunk: each pair costs ~45 bytes of temporaries, so ~24 MB.
PAIR_BUDGET = 1 << 19
# Chunks smaller than this are merged with their neighbours (per-chunk overhead ~ 30 us).
MIN_PAIRS = 1 << 13
# Relative slack on the threshold and on the window radius, far above float rounding.
_SLACK = 1e-3


def _strict_threshold(iou_threshold: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Largest value ``t`` of ``dtype`` with ``t <= iou_threshold``, as a 0-dim tensor.

    torchvision compares a float IoU with the threshold in double precision
    (``ovr > iou_threshold``); for a float ``x``, ``x > thr`` holds iff ``x > t``.
    """
    t = torch.tensor(iou_threshold, dtype=dtype)  # decided on the host: no device sync
    if t.item() > iou_threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t.to(device)


def _pair_iou(cand: Tensor, cand_area: Tensor, kept: list[Tensor]) -> Tensor:
    """IoU of (B, 4) xyxy candidates with their (B, M) gathered kept boxes -> (B, M).

    ``kept`` holds (B, M) x1, y1, x2, y2, area of the kept boxes. Same float operations as
    torchvision's NMS kernel and ``box_iou``: ``inter / (area_a + area_b - inter)`` with
    clamped-at-0 widths and heights.
    """
    kx1, ky1, kx2, ky2, k_area = kept
    w = torch.minimum(kx2, cand[:, 2:3]).sub_(torch.maximum(kx1, cand[:, 0:1])).clamp_(min=0)
    h = torch.minimum(ky2, cand[:, 3:4]).sub_(torch.maximum(ky1, cand[:, 1:2])).clamp_(min=0)
    inter = w.mul_(h)
    union = (k_area + cand_area[:, None]).sub_(inter)
    return inter.div_(union)


def _windows(boxes: Tensor, labels: Tensor, kept_idx: Tensor, sup_idx: Tensor,
             iou_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sort kept boxes by (label, cx) and find each suppressed candidate's search window.

    Args:
        boxes: (N, 4) xyxy; labels: (N,) int64.
        kept_idx: (K,) candidate indices of the kept boxes, in ``keep`` order.
        sup_idx: (S,) candidate indices of the suppressed candidates.
        iou_threshold: NMS IoU threshold, in [0, 1).

    Returns:
        order: (K,) positions in ``keep``, sorted by (label, cx);
        lo, hi: (S,) int64 half-open range into ``order`` of each candidate's window.
    """
    key_dtype = torch.float32 if boxes.device.type == "mps" else torch.float64
    cx = (boxes[:, 0] + boxes[:, 2]).to(key_dtype) * 0.5  # (N,)
    width = (boxes[:, 2] - boxes[:, 0]).to(key_dtype).clamp(min=0)
    t = max(iou_threshold * (1.0 - _SLACK), 1e-12)  # a little below the threshold
    reach = (1.0 - t) * max(1.0, 0.5 / t) * (1.0 + _SLACK)
    rounding = 64 * torch.finfo(boxes.dtype).eps * (cx[sup_idx].abs() + width[sup_idx] + 1.0)
    radius = width[sup_idx] * reach + rounding

    cmin, crange = cx.min(), cx.max() - cx.min()
    radius = torch.minimum(radius, crange + 1.0)  # a wider window is the whole label anyway
    # One float key, lexicographic in (label, cx): label blocks spaced wider than any window.
    labels = labels.long()
    lmin = labels.min()
    span = crange + 2.0 * radius.max() + 1.0
    kept_labels = labels[kept_idx]
    kept_key = (kept_labels - lmin).to(key_dtype) * span + (cx[kept_idx] - cmin)
    sorted_key, order = torch.sort(kept_key, stable=True)  # order: (K,) positions in keep
    sorted_labels = kept_labels[order]
    sup_labels = labels[sup_idx]
    centre = (sup_labels - lmin).to(key_dtype) * span + (cx[sup_idx] - cmin)
    block_lo = torch.searchsorted(sorted_labels, sup_labels, right=False)
    block_hi = torch.searchsorted(sorted_labels, sup_labels, right=True)
    lo = torch.searchsorted(sorted_key, centre - radius, right=False)
    hi = torch.searchsorted(sorted_key, centre + radius, right=True)
    # Never leave the candidate's label block (guards against rounding at block edges).
    lo, hi = torch.maximum(lo, block_lo), torch.minimum(hi, block_hi)
    return order, lo, torch.maximum(hi, lo)


def _chunks(lengths: list[int], chunk_size: int | None) -> Iterator[tuple[slice, int]]:
    """Split ascending window ``lengths`` into (rows slice, widest window) chunks.

    With ``chunk_size`` every chunk has that many rows. Otherwise a chunk holds the rows whose
    window is at most twice its first row's (so padding at most doubles the work), grown to
    ``MIN_PAIRS`` padded pairs if smaller (fewer tiny chunks) and cut to ``PAIR_BUDGET``.
    """
    start, total = 0, len(lengths)
    while start < total:
        if chunk_size is not None:
            end = min(total, start + max(1, chunk_size))
        else:
            ends = range(start + 1, total + 1)  # the padded size grows with the chunk's end
            def padded(e: int) -> int:
                return (e - start) * lengths[e - 1]
            end = max(bisect_right(lengths, 2 * lengths[start], lo=start),
                      start + bisect_right(ends, MIN_PAIRS, key=padded))
            end = max(start + 1, min(end, start + bisect_right(ends, PAIR_BUDGET, key=padded)))
        yield slice(start, end), max(lengths[end - 1], 1)
        start = end


def _assign_chunk(boxes: Tensor, area: Tensor, rows: Tensor, lo: Tensor, length: Tensor, width: int,
                  columns: list[Tensor], rank_sorted: Tensor, thr: Tensor) -> Tensor:
    """Suppressor (position in ``keep``) for one chunk of suppressed candidates.

    Args:
        boxes: (N, 4) xyxy; area: (N,) box areas.
        rows: (B,) candidate indices; lo, length: (B,) window start into the sorted kept
            boxes and window length (>= 1 for a suppressed candidate); width: max of ``length``.
        columns: five (K,) contiguous tensors x1, y1, x2, y2, area of the kept boxes in
            (label, cx) order (1-D ``index_select`` is much faster than advanced indexing).
        rank_sorted: (K,) their positions in ``keep``.
        thr: 0-dim strict threshold (see ``_strict_threshold``).

    Returns:
        (B,) int64 positions in ``keep``: the first in ``keep`` order with IoU > threshold, or,
        if float rounding left none (IoU on the shifted boxes of batched_nms's coordinate
        trick can differ in the last bit), the window's kept box of largest IoU.
    """
    num_kept = rank_sorted.numel()
    b = rows.numel()
    steps = torch.arange(width, device=boxes.device)
    inside = steps[None, :] < length[:, None]  # (B, M)
    pos = (lo[:, None] + steps[None, :]).clamp_(max=num_kept - 1).view(-1)  # (B * M,) into sorted kept
    kept = [c.index_select(0, pos).view(b, width) for c in columns]
    iou = _pair_iou(boxes.index_select(0, rows), area.index_select(0, rows), kept)
    del kept
    hit = (iou > thr).logical_and_(inside)
    rank = rank_sorted.index_select(0, pos).view(b, width).masked_fill_(~hit, num_kept)
    first = rank.amin(dim=1)  # (B,)
    missing = first == num_kept
    if bool(missing.any()):
        best = iou.masked_fill_(~inside, -1.0).nan_to_num_(-1.0).argmax(dim=1)
        fallback = rank_sorted[pos.view(b, width).gather(1, best[:, None]).squeeze(1)]
        first = torch.where(missing, fallback, first)
    return first


def nms_clusters(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
                 chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Class-aware greedy NMS that also reports which kept box suppressed each candidate.

    Args:
        boxes: (N, 4) float, xyxy (x1 <= x2, y1 <= y2).
        scores: (N,) float.
        labels: (N,) int64 class (or FPN level); NMS never crosses labels.
        iou_threshold: a box is suppressed when its IoU with a kept box is ``> iou_threshold``
            (compared in double precision, as torchvision does); must be >= 0.
        chunk_size: suppressed candidates per chunk. ``None`` (default) groups candidates of
            similar window length and caps a chunk at ``PAIR_BUDGET`` candidate x kept pairs,
            ~45 bytes each, so the extra memory stays under ~25 MB for any N.

    Returns:
        keep: (K,) int64, identical to ``torchvision.ops.batched_nms(boxes, scores, labels,
            iou_threshold)`` (indices of kept boxes, descending score).
        cluster: (N,) int64 in [0, K): ``keep[cluster[i]]`` is the kept box that suppressed
            candidate ``i`` (``cluster[keep] == arange(K)``), i.e. the same-label kept box of
            IoU > threshold that comes first in ``keep`` order (greedy NMS's processing order).

    Ties: with exactly equal scores torchvision's processing order is its (unstable) sort's
    order, which ``keep`` reproduces on the coordinate-trick path; on its per-label path
    (CPU, N > 1000) ``keep`` is re-sorted, so if two *equal-score* kept boxes of one label both
    overlap a candidate above the threshold, the one chosen may differ from the one NMS used.
    The result is still a same-label kept box with IoU > threshold.
    """
    if not iou_threshold >= 0:
        # batched_nms's coordinate trick would let disjoint boxes of other labels suppress.
        raise ValueError(f"iou_threshold must be >= 0, got {iou_threshold}")
    device = boxes.device
    keep = batched_nms(boxes, scores, labels, iou_threshold)
    n, k = boxes.shape[0], keep.numel()
    cluster = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return keep, cluster
    cluster[keep] = torch.arange(k, device=device)
    suppressed = torch.ones(n, dtype=torch.bool, device=device)
    suppressed[keep] = False
    sup_idx = suppressed.nonzero().squeeze(1)
    if sup_idx.numel() == 0:
        return keep, cluster

    order, lo, hi = _windows(boxes, labels, keep, sup_idx, iou_threshold)
    kept_sorted = keep[order]
    length = hi - lo
    # Similar window lengths share a chunk, so padding to the chunk's widest window is cheap.
    by_len = torch.argsort(length)
    sup_idx, lo, length = sup_idx[by_len], lo[by_len], length[by_len]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    thr = _strict_threshold(iou_threshold, boxes.dtype, device)

    columns = [c.contiguous() for c in boxes[kept_sorted].unbind(1)] + [area[kept_sorted]]
    for sl, width in _chunks(length.tolist(), chunk_size):
        cluster[sup_idx[sl]] = _assign_chunk(boxes, area, sup_idx[sl], lo[sl], length[sl], width,
                                             columns, order, thr)
    return keep, cluster


def cluster_sizes(cluster: Tensor, num_clusters: int) -> Tensor:
    """Members per cluster: (K,) int64 counts of ``cluster`` (N,) values in [0, num_clusters)."""
    return torch.bincount(cluster, minlength=num_clusters)


def rpn_clusters(score: Tensor, boxes: Tensor, levels: Tensor, tau: float, iou_threshold: float,
                 candidates: str, pre_nms_top_n: int) -> Tensor:
    """The kept teacher anchor of each member of an RPN cluster, -1 for non-members.

    Args:
        score: (A_t,) objectness probabilities; boxes: (A_t, 4) decoded, clipped proposals;
        levels: (A_t,) int64 FPN level (NMS runs per level).
        candidates: ``"threshold_then_nms"`` | ``"nms_then_threshold"``
            (:func:`~dtg.methods.dtg.targets.rpn_inc_targets`); pre_nms_top_n: the latter's per-level pool.

    Returns:
        (A_t,) int64 teacher anchor index of the member's kept box (members of clusters whose
        kept box scores ``>= tau``), -1 elsewhere.
    """
    above = score >= tau
    pool_mask = above if candidates == "threshold_then_nms" else above | top_n_per_level(score, levels, pre_nms_top_n)
    pool = pool_mask.nonzero().squeeze(1)
    keep, clus = nms_clusters(boxes[pool], score[pool], levels[pool], iou_threshold)
    kept_of = torch.full_like(levels, -1)
    kept_of[pool] = pool[keep[clus]]
    if candidates == "nms_then_threshold":
        kept_of = torch.where((kept_of >= 0) & above[kept_of.clamp(min=0)], kept_of, -1)
    return kept_of


def top_n_per_level(scores: Tensor, levels: Tensor, n: int) -> Tensor:
    """(A,) bool mask of the ``n`` highest scores of each level (ties: lower index first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(levels[order], stable=True)]
    lv = levels[order]
    counts = torch.bincount(lv)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lv.numel(), device=lv.device) - starts[lv]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order] = rank < n
    return mask
