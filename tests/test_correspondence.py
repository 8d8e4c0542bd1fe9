"""Teacher -> student anchor / proposal correspondence against real torchvision anchors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from dtg.geometry import hflip_matrix, map_points, project_boxes, rotate_matrix, scale_matrix, translate_matrix
from dtg.methods.dtg import correspondence as corr
from dtg.methods.dtg.correspondence import (
    AnchorGrid, anchor_grid, area_levels, fpn_level, map_proposals, match_anchors, match_anchors_with_iou,
    window_candidates,
)

SIZES = ((16,), (32,), (64,), (128,), (256,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
CANON = 16.0  # anchor size of level 0
R = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is ~20x faster than two next to busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def student(height: int, width: int) -> tuple[AnchorGrid, torch.Tensor]:
    """torchvision anchors of a padded (height, width) batch with FPN-shaped maps; returns (grid, levels (A,))."""
    maps = [torch.zeros(1, 1, height // s, width // s) for s in (4, 8, 16, 32)]
    maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2, padding=0))  # torchvision's LastLevelMaxPool
    anchors = AnchorGenerator(SIZES, RATIOS)(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), maps)[0]
    per_level = [m.shape[-2] * m.shape[-1] * R for m in maps]
    grid = anchor_grid(anchors, per_level, [tuple(m.shape[-2:]) for m in maps], (height, width))
    levels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)])
    return grid, levels


def map_unclipped(boxes: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> min/max of the 4 corners mapped by M, NOT clipped (teacher anchors may leave the image)."""
    x1, y1, x2, y2 = boxes.to(torch.float64).unbind(-1)
    corners = torch.stack([x1, y1, x2, y1, x2, y2, x1, y2], dim=-1).reshape(-1, 4, 2)
    p = map_points(corners, M)
    return torch.cat([p.amin(1), p.amax(1)], dim=-1).to(boxes.dtype)


def cells(grid: AnchorGrid, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x, r) of every anchor of ``level`` in flat order."""
    h, w = grid.sizes[level]
    y, x, r = torch.meshgrid(torch.arange(h), torch.arange(w), torch.arange(R), indexing="ij")
    return y.reshape(-1), x.reshape(-1), r.reshape(-1)


def flat(grid: AnchorGrid, level: int, y: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return grid.offsets[level] + (y * grid.sizes[level][1] + x) * R + r


def level_slice(grid: AnchorGrid, level: int) -> slice:
    h, w = grid.sizes[level]
    return slice(grid.offsets[level], grid.offsets[level] + h * w * R)


# ----------------------------------------------------------------------------- layout


def test_anchor_grid_recovers_torchvision_layout():
    grid, _ = student(128, 160)
    assert grid.sizes == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    # floor division: P6 has ceil(5 / 2) = 3 columns, so its x stride is 160 // 3 = 53, not 64
    assert grid.strides == [(4, 4), (8, 8), (16, 16), (32, 32), (64, 53)]
    assert grid.offsets == [0, 3840, 4800, 5040, 5100] and grid.anchors.shape == (5118, 4)
    rebuilt = torch.empty_like(grid.anchors)
    for level, (base, (sy, sx)) in enumerate(zip(grid.base_anchors, grid.strides)):
        assert base.shape == (R, 4)
        assert torch.equal(base, -base[:, [2, 3, 0, 1]])  # centred at the origin (rounding is symmetric)
        y, x, r = cells(grid, level)
        shift = torch.stack([x * sx, y * sy, x * sx, y * sy], dim=-1).float()
        rebuilt[flat(grid, level, y, x, r)] = base[r] + shift
    assert torch.equal(rebuilt, grid.anchors)


def test_anchor_grid_rejects_other_layouts():
    grid, levels = student(128, 160)
    per_level = torch.bincount(levels).tolist()
    with pytest.raises(ValueError):
        anchor_grid(grid.anchors, per_level, grid.sizes, (128, 192))  # wrong strides
    shuffled = grid.anchors.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]
    with pytest.raises(ValueError):
        anchor_grid(shuffled, per_level, grid.sizes, (128, 160))
    with pytest.raises(ValueError):
        anchor_grid(grid.anchors, per_level[:-1], grid.sizes[:-1], (128, 160))


def test_fpn_level_of_every_anchor_is_its_own_level():
    grid, levels = student(128, 160)
    assert torch.equal(fpn_level(grid.anchors, 5, CANON), levels)  # sqrt(w h) within 2% of the size, all ratios
    # with METHOD's S = 32 our 16..256 anchors would all drop one level (16 and 32 both -> 0)
    assert torch.equal(fpn_level(grid.anchors, 5, 32.0), (levels - 1).clamp(min=0))
    sides = torch.tensor([4.0, 32.0, 45.0, 46.0, 512.0, 2000.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), sides, sides], dim=-1)
    assert fpn_level(boxes, 5, 32.0).tolist() == [0, 0, 0, 1, 4, 4]
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 9.0], [5.0, 5.0, 1.0, 1.0]])
    assert fpn_level(degenerate, 5, 32.0).tolist() == [0, 0]


# ----------------------------------------------------------------------------- geometry


def test_identity_partner_is_the_anchor_itself():
    grid, _ = student(128, 160)
    mapped = map_unclipped(grid.anchors, torch.eye(3, dtype=torch.float64))
    partner, iou = match_anchors_with_iou(mapped, grid, CANON)
    assert torch.equal(partner, torch.arange(len(grid.anchors)))
    assert torch.all(iou == 1)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("dy, dx", [(1, 2), (-1, 0), (0, -3), (2, 1)])
def test_translation_by_whole_strides_shifts_the_cell(level, dy, dx):
    grid, _ = student(128, 160)
    (sy, sx), (h, w) = grid.strides[level], grid.sizes[level]
    boxes = grid.anchors[level_slice(grid, level)]
    partner = match_anchors(map_unclipped(boxes, translate_matrix(dx * sx, dy * sy)), grid, CANON)
    y, x, r = cells(grid, level)
    inside = (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w)
    expected = torch.where(inside, flat(grid, level, y + dy, x + dx, r), -1)
    assert torch.equal(partner, expected)
    assert (partner == -1).any() and (partner >= 0).any()


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_hflip(level):
    """Anchor centres sit at x s (cell corners), so a flip of the padded width W = W_l s maps
    column x to column W_l - x (exactly, base anchors are symmetric), and column 0 to x = W, just
    outside the grid. The (y, W_l - 1 - x, r) pairing is a flip about (W_l - 1) s instead."""
    grid, _ = student(128, 160)
    (_, sx), (_, w) = grid.strides[level], grid.sizes[level]
    boxes = grid.anchors[level_slice(grid, level)]
    y, x, r = cells(grid, level)
    partner, iou = match_anchors_with_iou(map_unclipped(boxes, hflip_matrix(160.0)), grid, CANON)
    assert torch.equal(partner, torch.where(x > 0, flat(grid, level, y, (w - x) % w, r), -1))
    assert torch.all(iou[x > 0] == 1)
    partner, iou = match_anchors_with_iou(map_unclipped(boxes, hflip_matrix(float((w - 1) * sx))), grid, CANON)
    assert torch.equal(partner, flat(grid, level, y, w - 1 - x, r)) and torch.all(iou == 1)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_hflip_half_a_stride_off_covers_every_cell_with_half_up_ties(level):
    """A flip about W = (W_l - 1/2) s puts every mapped centre half-way between two cells.
    torch.round (half to even) sends pairs of columns to one cell and leaves the other one
    unpaired; half-up ties move each column to the next cell, so every column but column 0
    (nothing maps left of it) gets exactly one teacher anchor per cell anchor."""
    grid, _ = student(128, 160)
    (_, sx), (_, w) = grid.strides[level], grid.sizes[level]
    boxes = grid.anchors[level_slice(grid, level)]
    mapped = map_unclipped(boxes, hflip_matrix((w - 0.5) * sx))
    y, x, r = cells(grid, level)

    def covered(half_up):
        p = match_anchors(mapped, grid, CANON, 1, None, half_up)
        hit = torch.zeros(len(grid.anchors), dtype=torch.bool)
        hit[p[p >= 0]] = True
        return hit[level_slice(grid, level)], p

    even, _ = covered(False)
    up, partner = covered(True)
    assert float(even.float().mean()) < 0.65
    assert torch.equal(up, x > 0)  # every student anchor of columns 1..W_l-1 is paired
    assert torch.equal(partner, flat(grid, level, y, w - x, r).clamp(max=flat(grid, level, y, w - 1, r)))


def test_hflip_p6_off_grid_stride():
    """P6 has x stride 53 over a 160 wide image: the flip lands 1 px off the grid, same cell pairing, IoU < 1."""
    grid, _ = student(128, 160)
    y, x, r = cells(grid, 4)
    partner, iou = match_anchors_with_iou(map_unclipped(grid.anchors[level_slice(grid, 4)], hflip_matrix(160.0)), grid, CANON)
    assert torch.equal(partner, torch.where(x > 0, flat(grid, 4, y, (3 - x) % 3, r), -1))
    assert torch.all((iou[x > 0] > 0.98) & (iou[x > 0] < 1))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_scale_by_two_moves_one_level_up(level):
    teacher, _ = student(128, 160)
    big, _ = student(256, 320)
    assert big.sizes[level + 1] == teacher.sizes[level]
    mapped = map_unclipped(teacher.anchors[level_slice(teacher, level)], scale_matrix(2.0, 2.0))
    partner, iou = match_anchors_with_iou(mapped, big, CANON)
    y, x, r = cells(teacher, level)
    assert torch.equal(partner, flat(big, level + 1, y, x, r))
    assert torch.all(iou > 0.85)  # 2 x round(size/2 ...) != round(size ...) for the 0.5 / 2 ratios


def test_area_level_keeps_rotated_anchors_on_their_level_and_pairs_student_p2():
    """25 degrees + 1.28x: the min/max box of rotated corners moves ~all anchors up a level, so
    student P2 gets no partner; the equal-area level keeps them (log2 1.28 = 0.36 rounds to 0)."""
    grid, levels = student(128, 160)
    M = rotate_matrix(25.0, (80.0, 64.0)) @ scale_matrix(1.28, 1.28)
    assert torch.equal(area_levels(grid.anchors, M, 5, CANON), levels)
    mapped = map_unclipped(grid.anchors, M)
    assert float((fpn_level(mapped, 5, CANON) == levels + 1).float().mean()) > 0.99
    assert torch.equal(area_levels(grid.anchors, torch.eye(3, dtype=torch.float64), 5, CANON), levels)

    def paired(lv):
        p = match_anchors(mapped, grid, CANON, 1, lv)
        hit = torch.zeros(len(grid.anchors), dtype=torch.bool)
        hit[p[p >= 0]] = True
        return hit

    box, area = paired(None), paired(area_levels(grid.anchors, M, 5, CANON))
    assert not box[level_slice(grid, 0)].any() and area[level_slice(grid, 0)].float().mean() > 0.15
    assert area.float().mean() > 1.5 * box.float().mean()  # all levels together: twice the coverage


def test_degenerate_and_outside_boxes_have_no_partner():
    grid, _ = student(128, 160)
    boxes = torch.tensor([
        [10.0, 10.0, 10.0, 30.0],   # zero width
        [10.0, 30.0, 30.0, 10.0],   # negative height
        [-80.0, -80.0, -40.0, -40.0],  # fully outside
        [150.0, 20.0, 170.0, 40.0],  # centre x = 160 = W: outside the half-open image
        [-20.0, 0.0, 10.0, 12.0],   # centre x < 0, box partly inside
        [-10.0, -5.0, 12.0, 7.0],   # partly outside, centre inside: has a partner
        [60.0, 60.0, 61.0, 61.0],   # 1 px box inside: level 0 partner
    ])
    partner = match_anchors(boxes, grid, CANON)
    assert partner[:5].tolist() == [-1] * 5
    assert grid.anchors[partner[5]].tolist() == [-11.0, -6.0, 11.0, 6.0]
    assert partner[6] >= 0 and partner[6] < grid.offsets[1]
    empty = match_anchors(torch.zeros(0, 4), grid, CANON)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert match_anchors(boxes.double(), grid, CANON).tolist() == partner.tolist()


def test_chunking_gives_the_same_result(monkeypatch):
    grid, _ = student(128, 160)
    mapped = map_unclipped(grid.anchors, rotate_matrix(7.0, (80.0, 64.0)) @ scale_matrix(1.3, 1.3))
    full = match_anchors(mapped, grid, CANON)
    monkeypatch.setattr(corr, "MAX_CANDIDATES_PER_CHUNK", 27 * 64)  # 64 boxes per chunk
    assert torch.equal(match_anchors(mapped, grid, CANON), full)


# ----------------------------------------------------------------------------- brute force


def random_boxes(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Centres over (and a little beyond) the image, sides 6..400 px, aspect 1/4..4."""
    c = torch.rand(n, 2, generator=gen) * torch.tensor([width * 1.1, height * 1.1]) - 0.05 * torch.tensor([width, height])
    side = torch.exp(torch.empty(n).uniform_(1.8, 6.0, generator=gen))
    aspect = torch.exp(torch.empty(n).uniform_(-1.386, 1.386, generator=gen)).sqrt()
    half = torch.stack([side / aspect, side * aspect], dim=-1) / 2
    return torch.cat([c - half, c + half], dim=-1)


def brute_force(boxes: torch.Tensor, grid: AnchorGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(best IoU, best index) over ALL anchors of each box's level (full IoU matrix)."""
    levels = fpn_level(boxes, grid.num_levels, CANON)
    best = torch.zeros(len(boxes))
    arg = torch.full((len(boxes),), -1)
    for level in range(grid.num_levels):
        sel = levels == level
        if sel.any():
            iou = box_iou(boxes[sel], grid.anchors[level_slice(grid, level)])
            best[sel], a = iou.max(dim=1)
            arg[sel] = a + grid.offsets[level]
    return best, arg


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_window_agrees_with_full_iou_matrix(radius):
    """The window never misses the level's best IoU, even with radius 0: per axis, the overlap of two
    intervals of fixed lengths only shrinks as their centres move apart, so for each cell anchor r the
    best anchor is the one whose centre is nearest on each axis, i.e. the (clamped) centre cell."""
    grid, _ = student(128, 160)
    boxes = random_boxes(4000, 128, 160, torch.Generator().manual_seed(radius))
    partner, iou = match_anchors_with_iou(boxes, grid, CANON, radius)
    best, arg = brute_force(boxes, grid)
    levels = fpn_level(boxes, grid.num_levels, CANON)
    index, valid = window_candidates(boxes, levels, grid, radius)
    has = partner >= 0
    assert torch.equal(has, valid.any(dim=1))  # every box with its centre on the grid finds a partner
    assert torch.all(levels[has] == torch.bucketize(partner[has], torch.tensor(grid.offsets[1:]), right=True))
    in_window = ((index == arg[:, None]) & valid).any(dim=1)
    assert torch.allclose(iou[in_window], best[in_window], atol=1e-6)  # same max (ties may pick another anchor)
    miss = (best[has] - iou[has] > 1e-6).float().mean().item()
    ties = (partner[has] != arg[has]).float().mean().item()
    print(f"radius {radius}: {int(has.sum())} boxes, {100 * (~in_window[has]).float().mean():.1f}% best outside window, "
          f"{100 * miss:.2f}% lower IoU, {100 * ties:.1f}% other anchor of equal IoU")
    assert miss == 0


def test_partner_does_not_depend_on_the_radius():
    """Nearest cells come first in the window, so IoU ties go to the centre cell, which holds the max."""
    grid, _ = student(128, 160)
    boxes = random_boxes(4000, 128, 160, torch.Generator().manual_seed(5))
    rotated = map_unclipped(grid.anchors, rotate_matrix(20.0, (80.0, 64.0)) @ scale_matrix(0.8, 0.8))
    for b in (boxes, rotated):
        p0 = match_anchors(b, grid, CANON, radius=0)
        assert torch.equal(match_anchors(b, grid, CANON, radius=1), p0)
        assert torch.equal(match_anchors(b, grid, CANON, radius=2), p0)


# ----------------------------------------------------------------------------- R-CNN


def test_map_proposals_is_one_to_one_projection():
    props = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.0, 5.0], [90.0, 10.0, 120.0, 40.0]])
    M = translate_matrix(-20.0, 0.0) @ hflip_matrix(128.0)
    rois = map_proposals(props, M, (100, 100))
    assert rois.shape == props.shape and rois.dtype == props.dtype
    assert torch.equal(rois, project_boxes(props, M, (100, 100)))
    assert rois.tolist() == [[58.0, 20.0, 98.0, 60.0], [100.0, 0.0, 100.0, 5.0], [0.0, 10.0, 18.0, 40.0]]
    assert map_proposals(torch.zeros(0, 4), M, (100, 100)).shape == (0, 4)


# ----------------------------------------------------------------------------- one-to-one transfer

from dtg.methods.dtg.correspondence import assign_one_to_one, match_anchors_one_to_one  # noqa: E402


def serial_reference(index, iou, priority):
    """The definition: teacher anchors in decreasing priority (ties: higher index first), each
    taking its free candidate of largest IoU (ties: the earlier slot)."""
    taken, out = set(), [-1] * len(priority)
    order = sorted(range(len(priority)), key=lambda i: (float(priority[i]), i), reverse=True)
    for i in order:
        cands = sorted((c for c in range(index.shape[1]) if iou[i, c] > 0), key=lambda c: (-float(iou[i, c]), c))
        for c in cands:
            if int(index[i, c]) not in taken:
                taken.add(int(index[i, c]))
                out[i] = int(index[i, c])
                break
    return out


def test_one_to_one_hand_made():
    # Three teacher anchors all prefer student anchor 7. Priority 0.9 takes it; 0.8 falls back to its
    # second choice 3; 0.5's second choice 3 is gone too, so it takes its third, 5.
    index = torch.tensor([[7, 3, 5], [7, 3, 5], [7, 3, 5]])
    iou = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.2], [0.7, 0.6, 0.3]])
    got = assign_one_to_one(index, iou, torch.tensor([0.5, 0.9, 0.8]), 10)
    assert got.tolist() == [5, 7, 3]


def test_one_to_one_loses_an_anchor_only_when_its_window_is_full():
    index = torch.tensor([[1, 2], [1, 2], [2, 1]])
    iou = torch.tensor([[0.9, 0.1], [0.8, 0.0], [0.5, 0.4]])
    got = assign_one_to_one(index, iou, torch.tensor([0.3, 0.9, 0.6]), 3)
    # 0.9 (row 1) takes 1; 0.6 (row 2) takes 2; 0.3 (row 0) finds 1 and 2 taken: none
    assert got.tolist() == [-1, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_one_to_one_equals_the_serial_definition_and_is_injective(seed):
    g = torch.Generator().manual_seed(seed)
    n, c, a = 60, 9, 40
    index = torch.randint(0, a, (n, c), generator=g)
    iou = torch.rand(n, c, generator=g) - 0.2  # some slots are no candidate
    priority = torch.rand(n, generator=g).round(decimals=1)  # ties in priority
    got = assign_one_to_one(index, iou, priority, a)
    assert got.tolist() == serial_reference(index, iou, priority)
    paired = got[got >= 0]
    assert paired.unique().numel() == paired.numel()


def test_one_to_one_on_a_downscaled_view_pairs_every_anchor_max_pairs_and_more():
    """A student view at 0.7x: several teacher anchors land on one student anchor. ``max`` pairs one
    teacher anchor per student anchor; one-to-one pairs as many student anchors at least, and more
    teacher anchors, each with its own student anchor; with no conflict (identity) the two agree."""
    teacher, _ = student(128, 160)
    small, _ = student(96, 112)
    mapped = map_unclipped(teacher.anchors, scale_matrix(0.7, 0.7))
    priority = torch.rand(len(mapped), generator=torch.Generator().manual_seed(0))
    many = corr.match_anchors(mapped, small, CANON)
    one = match_anchors_one_to_one(mapped, priority, small, CANON)
    paired = one[one >= 0]
    assert paired.unique().numel() == paired.numel()  # injective
    assert paired.numel() > many[many >= 0].unique().numel()  # more teacher anchors keep a partner
    ident = corr.match_anchors(teacher.anchors, teacher, CANON)
    assert torch.equal(match_anchors_one_to_one(teacher.anchors, priority, teacher, CANON), ident)
