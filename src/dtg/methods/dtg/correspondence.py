"""Teacher -> student correspondences for DTG (docs/method.md, "Correspondence").

RPN stage: each teacher anchor box, mapped into the student view, gets at most one partner
student anchor: the anchor with the largest IoU among the anchors of its FPN level whose
grid cells lie around the mapped centre. R-CNN stage: teacher proposals map one to one
onto student RoIs (:func:`map_proposals`).

All boxes are ``xyxy`` in continuous pixel coordinates (see :mod:`dtg.geometry`).

Anchor layout (torchvision ``AnchorGenerator``): level ``l`` has an ``H_l x W_l`` feature map,
stride ``s_l = padded_size // feature_size`` per axis (floor division, so it is NOT always
a power of two: P6 of a 800-high padded image has 13 rows and stride 800 // 13 = 61), and
``R`` cell anchors (one size x R aspect ratios) centred at the origin and rounded. The
anchor of cell ``(y, x)`` and cell anchor ``r`` is ``base[r] + (x s_x, y s_y, x s_x, y s_y)``,
at flat index ``offset_l + (y W_l + x) R + r``. Anchor centres sit on the cell's top-left
corner ``(x s_x, y s_y)``, not on the cell centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dtg.geometry import map_points, project_boxes

MAX_CANDIDATES_PER_CHUNK = 1 << 21  # rows x candidates gathered at once (~32 MB of float32 boxes)


@dataclass
class AnchorGrid:
    """The student anchor layout of one padded batch (identical for all its images).

    Attributes:
        sizes: ``(H_l, W_l)`` feature map size per level.
        strides: ``(stride_y, stride_x)`` per level, ``padded_size // feature_size``.
        base_anchors: per level ``(R, 4)`` xyxy cell anchors centred at the origin.
        offsets: index of each level's first anchor in the flat list.
        anchors: ``(A, 4)`` xyxy, the flat anchors themselves.
    """

    sizes: list[tuple[int, int]]
    strides: list[tuple[int, int]]
    base_anchors: list[Tensor]
    offsets: list[int]
    anchors: Tensor

    @property
    def num_levels(self) -> int:
        return len(self.sizes)


def level_anchors(base: Tensor, size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``(H W R, 4)`` anchors of one level in torchvision's order: cell (y, x) row-major, then r.

    Args:
        base: (R, 4) xyxy cell anchors centred at the origin.
        size: ``(H, W)`` feature map size.
        stride: ``(stride_y, stride_x)``.
    """
    (h, w), (sy, sx) = size, stride
    ys = torch.arange(h, device=base.device) * sy
    xs = torch.arange(w, device=base.device) * sx
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4).to(base.dtype)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


def anchor_grid(
    anchors: Tensor,
    num_anchors_per_level: list[int],
    feature_sizes: list[tuple[int, int]],
    image_size: tuple[int, int],
) -> AnchorGrid:
    """Recover the layout of torchvision's flat anchors (e.g. ``RPNOutputs.anchors``).

    Args:
        anchors: (A, 4) xyxy anchors of one image, all levels concatenated.
        num_anchors_per_level: ``A_l`` per level, summing to A.
        feature_sizes: ``(H_l, W_l)`` of each level's feature map.
        image_size: ``(H, W)`` of the padded batch tensor.

    Raises:
        ValueError: when the anchors are not the regular grid this describes.
    """
    if len(num_anchors_per_level) != len(feature_sizes) or sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError(f"{len(feature_sizes)} levels / {num_anchors_per_level} do not cover {anchors.shape[0]} anchors")
    sizes, strides, bases, offsets = [], [], [], []
    start = 0
    for n, (h, w) in zip(num_anchors_per_level, feature_sizes):
        h, w = int(h), int(w)
        if h * w == 0 or n % (h * w):
            raise ValueError(f"{n} anchors do not tile a {h}x{w} grid")
        stride = (int(image_size[0]) // h, int(image_size[1]) // w)
        base = anchors[start : start + n // (h * w)].clone()  # cell (0, 0): no shift
        if not torch.equal(level_anchors(base, (h, w), stride), anchors[start : start + n]):
            raise ValueError(f"level {len(sizes)} anchors are not torchvision's {h}x{w} grid of stride {stride}")
        sizes.append((h, w))
        strides.append(stride)
        bases.append(base)
        offsets.append(start)
        start += n
    if len({b.shape[0] for b in bases}) > 1:
        raise ValueError(f"levels have different numbers of cell anchors: {[b.shape[0] for b in bases]}")
    return AnchorGrid(sizes, strides, bases, offsets, anchors)


def fpn_level(boxes: Tensor, num_levels: int, canonical: float = 32.0) -> Tensor:
    """FPN level ``clamp(round(log2(sqrt(w h) / canonical)), 0, L - 1)`` of each box (docs/method.md, "Correspondence").

    Args:
        boxes: (N, 4) xyxy.
        num_levels: L.
        canonical: the anchor size of level 0 (32 for anchors 32..512; 16 for our 16..256).

    Returns:
        (N,) int64 in ``[0, L - 1]``; degenerate boxes (zero area) get level 0.
    """
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    side = area.to(torch.float64).clamp(min=1e-12).sqrt()
    return torch.round(torch.log2(side / canonical)).clamp(0, num_levels - 1).to(torch.int64)


def area_levels(anchors: Tensor, teacher_to_student: Tensor, num_levels: int, canonical: float = 32.0) -> Tensor:
    """FPN level of each teacher anchor's image in the student view, from its area (docs/method.md, "Correspondence").

    The level of a box of side ``sqrt(|det A| w h)``, ``A`` the 2x2 linear part of the affine
    ``teacher_to_student``: the area the anchor really covers in the student view, whereas the
    min/max box of its rotated or sheared corners (:func:`map_anchors`) is larger and can move
    every anchor up a level.

    Args:
        anchors: (N, 4) xyxy teacher anchors (teacher view).
        teacher_to_student: (3, 3) affine matrix ``M``.

    Returns:
        (N,) int64 in ``[0, L - 1]``.
    """
    det = float(torch.linalg.det(teacher_to_student[:2, :2].to(torch.float64)).abs())
    w = (anchors[:, 2] - anchors[:, 0]).clamp(min=0).to(torch.float64)
    h = (anchors[:, 3] - anchors[:, 1]).clamp(min=0).to(torch.float64)
    side = (det * w * h).sqrt()
    equal = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], dim=-1)
    return fpn_level(equal, num_levels, canonical)


def _grid_tables(grid: AnchorGrid, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-level ``sizes (L, 2)``, ``strides (L, 2)`` (both (y, x)) and ``offsets (L,)`` as int64 tensors."""
    sizes = torch.tensor(grid.sizes, dtype=torch.int64, device=device).reshape(-1, 2)
    strides = torch.tensor(grid.strides, dtype=torch.int64, device=device).reshape(-1, 2)
    offsets = torch.tensor(grid.offsets, dtype=torch.int64, device=device)
    return sizes, strides, offsets


def _window_offsets(radius: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(dy (1, K), dx (1, K))`` cell offsets of the window, nearest to the centre cell first."""
    d = torch.arange(-radius, radius + 1, device=device)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(d, d, indexing="ij"))
    order = torch.argsort(dy * dy + dx * dx, stable=True)
    return dy[order].reshape(1, -1), dx[order].reshape(1, -1)


def window_candidates(boxes: Tensor, levels: Tensor, grid: AnchorGrid, radius: int,
                      half_up: bool = False) -> tuple[Tensor, Tensor]:
    """Flat indices of the anchors in the cell window around each box centre.

    The centre's cell is the one whose anchor centre ``(x s_x, y s_y)`` is nearest, clamped
    into the grid (a centre exactly half-way: the even cell, or with ``half_up`` the next one,
    so that a grid shifted by half a stride, as a flip of a width ``(k + 1/2) s`` makes it,
    covers every cell); the window holds the ``(2 radius + 1)^2`` cells around it, all R anchors each,
    ordered by distance from the centre cell (so ties in IoU go to the centred anchor).

    Args:
        boxes: (N, 4) xyxy in the student view.
        levels: (N,) int64 level of each box.

    Returns:
        ``(index (N, C), valid (N, C) bool)`` with ``C = (2 radius + 1)^2 R``; invalid slots
        (cells off the grid, or a centre outside the level's extent ``[0, W_l s_x) x [0, H_l s_y)``)
        hold index 0.
    """
    sizes, strides, offsets = _grid_tables(grid, boxes.device)
    num_cell = grid.base_anchors[0].shape[0]
    hw, s = sizes[levels], strides[levels]  # (N, 2) as (y, x)
    centre = torch.stack([boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], dim=-1) / 2  # (N, 2) (y, x)
    inside = ((centre >= 0) & (centre < hw * s)).all(dim=-1)
    pos = centre / s
    near = torch.floor(pos + 0.5) if half_up else torch.round(pos)  # torch.round: half to even
    cell = torch.minimum(near.clamp(min=0).to(torch.int64), hw - 1)  # (N, 2) nearest anchor centre
    dy, dx = _window_offsets(radius, boxes.device)
    yy = cell[:, :1] + dy  # (N, K)
    xx = cell[:, 1:] + dx
    ok = (yy >= 0) & (yy < hw[:, :1]) & (xx >= 0) & (xx < hw[:, 1:]) & inside[:, None]
    flat = (yy * hw[:, 1:] + xx) * num_cell + offsets[levels][:, None]  # (N, K)
    index = flat[:, :, None] + torch.arange(num_cell, device=boxes.device)  # (N, K, R)
    valid = ok[:, :, None].expand_as(index)
    return torch.where(valid, index, 0).reshape(len(boxes), -1), valid.reshape(len(boxes), -1)


def paired_iou(boxes: Tensor, candidates: Tensor) -> Tensor:
    """IoU of each box with each of its candidates: (N, 4) x (N, C, 4) -> (N, C)."""
    b = boxes[:, None, :]
    lt = torch.maximum(b[..., :2], candidates[..., :2])
    rb = torch.minimum(b[..., 2:], candidates[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).prod(dim=-1)
    area_c = (candidates[..., 2:] - candidates[..., :2]).prod(dim=-1)
    return inter / (area_b + area_c - inter).clamp(min=1e-12)


def _candidate_ious(boxes: Tensor, grid: AnchorGrid, canonical: float, radius: int,
                    levels: Tensor | None = None, half_up: bool = False) -> tuple[Tensor, Tensor]:
    """``(index (N, C), iou (N, C))`` of each box's window candidates (:func:`window_candidates`);
    invalid slots have IoU -1."""
    levels = fpn_level(boxes, grid.num_levels, canonical) if levels is None else levels
    index, valid = window_candidates(boxes, levels, grid, radius, half_up)
    dtype = torch.promote_types(boxes.dtype, grid.anchors.dtype)
    flat = index.reshape(-1)
    cand = torch.stack([grid.anchors[:, k].to(dtype).index_select(0, flat) for k in range(4)], -1)
    iou = paired_iou(boxes.to(dtype), cand.reshape(*index.shape, 4))
    return index, torch.where(valid, iou, -1.0)


def _match_chunk(boxes: Tensor, grid: AnchorGrid, canonical: float, radius: int,
                 levels: Tensor | None = None, half_up: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`match_anchors` on one chunk; also returns the partner's (N,) IoU (0 without partner)."""
    index, iou = _candidate_ious(boxes, grid, canonical, radius, levels, half_up)
    best, slot = iou.max(dim=1)
    partner = index.gather(1, slot[:, None]).squeeze(1)
    proper = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (best > 0)
    return torch.where(proper, partner, -1), torch.where(proper, best, 0.0)


def match_anchors_with_iou(
    mapped_boxes: Tensor, grid: AnchorGrid, canonical: float, radius: int = 1, levels: Tensor | None = None,
    half_up: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`match_anchors` plus the (N,) IoU of each box with its partner (0 where none)."""
    n = mapped_boxes.shape[0]
    num_cand = (2 * radius + 1) ** 2 * grid.base_anchors[0].shape[0]
    step = max(1, MAX_CANDIDATES_PER_CHUNK // num_cand)
    if n == 0:
        empty = mapped_boxes.new_zeros((0,))
        return empty.to(torch.int64), empty
    parts = [_match_chunk(mapped_boxes[i : i + step], grid, canonical, radius,
                          None if levels is None else levels[i : i + step], half_up) for i in range(0, n, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def match_anchors(mapped_boxes: Tensor, grid: AnchorGrid, canonical: float, radius: int = 1,
                  levels: Tensor | None = None, half_up: bool = False) -> Tensor:
    """Partner student anchor of each teacher anchor mapped into the student view (docs/method.md, "Correspondence").

    The box's level is ``m = fpn_level(box, L, canonical)``; the candidates are the R anchors of
    every level-``m`` cell within ``radius`` cells of the cell nearest the box centre, and the
    partner is the candidate of largest IoU (on ties, the one whose cell is nearest the centre
    cell, then the lower cell-anchor index). Work is ``O(N (2 radius + 1)^2 R)``
    in chunks of bounded memory; no N x A IoU matrix is formed.

    Args:
        mapped_boxes: (N, 4) xyxy teacher anchors in student coordinates (unclipped or clipped,
            possibly outside the image or degenerate). N may be 0.
        grid: the student anchor layout (:func:`anchor_grid`).
        canonical: anchor size of level 0 (16 with our anchors 16..256).
        radius: half-width of the cell window.
        levels: (N,) int64 level of each box instead of ``fpn_level`` of the box itself (e.g.
            :func:`area_levels`).
        half_up: break centre ties toward the next cell (see :func:`window_candidates`).

    Returns:
        (N,) int64 index into ``grid.anchors``, or -1 when the box is degenerate (w or h <= 0),
        its centre lies outside the level's extent ``[0, W_m s_x) x [0, H_m s_y)``, or the best
        IoU is 0.
    """
    return match_anchors_with_iou(mapped_boxes, grid, canonical, radius, levels, half_up)[0]


def map_anchors(anchors: Tensor, teacher_to_student: Tensor) -> Tensor:
    """Teacher anchors (A, 4) xyxy -> (A, 4) boxes in the student view, NOT clipped.

    The 4 corners are mapped and min/max taken; clipping would shrink anchors at the
    border and could change their FPN level, so partners are searched unclipped.
    """
    x1, y1, x2, y2 = anchors.unbind(-1)
    corners = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                           torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], 1)  # (A, 4, 2)
    pts = map_points(corners, teacher_to_student).to(anchors.dtype)
    return torch.cat([pts.min(1).values, pts.max(1).values], -1)


def map_proposals(proposals: Tensor, teacher_to_student: Tensor, student_size: tuple[int, int]) -> Tensor:
    """R-CNN correspondence: teacher proposals become student RoIs, one to one, in the same order.

    Args:
        proposals: (P, 4) xyxy teacher-view proposals; P may be 0.
        teacher_to_student: (3, 3) matrix ``H_s @ inv(H_t)``.
        student_size: ``(H, W)`` of the student view.

    Returns:
        (P, 4) xyxy in ``proposals.dtype``: the min/max of the 4 mapped corners, clipped to the
        student image (:func:`dtg.geometry.project_boxes`); degenerate RoIs are kept so
        that row ``i`` always corresponds to teacher proposal ``i``.
    """
    return project_boxes(proposals, teacher_to_student, student_size)


def assign_one_to_one(index: Tensor, iou: Tensor, priority: Tensor, num_student: int) -> Tensor:
    """An injective pairing: in decreasing ``priority``, each teacher anchor takes its candidate of
    largest IoU that no teacher anchor before it took (serial dictatorship).

    Computed as deferred acceptance in rounds (each free teacher anchor proposes to its next
    candidate, a student anchor keeps its highest-priority proposer and frees the one it held),
    which gives exactly the serial result since every student anchor ranks teacher anchors by
    the same ``priority``; at most ``N C`` proposals in all.

    Args:
        index: (N, C) int64 candidate student anchors of each teacher anchor.
        iou: (N, C) IoU of each candidate, <= 0 for a slot that is no candidate.
        priority: (N,) float teacher objectness; ties go to the higher teacher index.
        num_student: A_s.

    Returns:
        (N,) int64 student anchor of each teacher anchor, -1 when every candidate was taken by a
        teacher anchor of higher priority (or it has none); no student anchor appears twice.
    """
    n, c = index.shape
    partner = torch.full((n,), -1, dtype=torch.int64, device=index.device)
    if n == 0 or c == 0:
        return partner
    order = torch.argsort(iou, dim=1, descending=True, stable=True)  # nearer cells first on IoU ties
    pref = index.gather(1, order)  # (N, C) candidates, best first
    usable = (iou.gather(1, order) > 0).sum(1)  # (N,) candidates with IoU > 0
    rank = torch.empty(n, dtype=torch.int64, device=index.device)
    rank[torch.argsort(priority, stable=True)] = torch.arange(n, device=index.device)
    holder_rank = torch.full((num_student,), -1, dtype=torch.int64, device=index.device)
    holder = torch.full((num_student,), -1, dtype=torch.int64, device=index.device)
    nxt = torch.zeros(n, dtype=torch.int64, device=index.device)
    while True:
        free = ((partner < 0) & (nxt < usable)).nonzero().squeeze(1)
        if free.numel() == 0:
            return partner
        want = pref[free, nxt[free]]
        best = holder_rank.scatter_reduce(0, want, rank[free], reduce="amax", include_self=True)
        won = best[want] == rank[free]
        taken = want[won]
        displaced = holder[taken]
        displaced = displaced[displaced >= 0]
        partner[displaced] = -1
        nxt[displaced] += 1
        nxt[free[~won]] += 1
        partner[free[won]] = taken
        holder[taken], holder_rank[taken] = free[won], rank[free[won]]


def match_anchors_one_to_one(mapped_boxes: Tensor, priority: Tensor, grid: AnchorGrid, canonical: float,
                             radius: int = 1, levels: Tensor | None = None, half_up: bool = False) -> Tensor:
    """:func:`match_anchors` made injective (``dtg.rpn.transfer=one_to_one``): the same candidates
    (level, cell window, IoU > 0), paired by :func:`assign_one_to_one` in decreasing ``priority``.

    Args:
        mapped_boxes: (N, 4) teacher anchors in the student view; priority: (N,) their objectness.
        Others: as :func:`match_anchors`.

    Returns:
        (N,) int64 index into ``grid.anchors`` or -1; no index appears twice.
    """
    if mapped_boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=mapped_boxes.device)
    index, iou = _candidate_ious(mapped_boxes, grid, canonical, radius, levels, half_up)
    proper = (mapped_boxes[:, 2] > mapped_boxes[:, 0]) & (mapped_boxes[:, 3] > mapped_boxes[:, 1])
    iou = torch.where(proper[:, None], iou, -1.0)
    return assign_one_to_one(index, iou, priority, grid.anchors.shape[0])
