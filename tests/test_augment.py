"""Augmentation views: matrices must move boxes exactly where the pixels went."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dtg.config import ViewConfig
from dtg import geometry as G
from dtg.data import augment as A

BOX_COLOR = (180, 0, 0)  # stays "R - B > 40" under every photometric op, unlike the fill colour
TOL = 1.5  # px: thresholded bilinear pixels vs. continuous geometry


def canvas(size: tuple[int, int], box: list[float], color=(255, 255, 255)) -> Image.Image:
    """Black (H, W) RGB image with the integer xyxy ``box`` filled with ``color``."""
    img = Image.new("RGB", (size[1], size[0]))
    img.paste(color, tuple(int(v) for v in box))
    return img


def mask_bbox(mask: np.ndarray) -> torch.Tensor:
    """xyxy continuous bounding box of a (H, W) bool mask."""
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, "object vanished"
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)


def white_bbox(img: Image.Image) -> torch.Tensor:
    return mask_bbox(np.asarray(img.convert("L")) > 127)


def to_array(x: Image.Image | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.asarray(x)


def red_bbox(x: Image.Image | torch.Tensor) -> torch.Tensor:
    arr = to_array(x).astype(np.int32)
    return mask_bbox(arr[..., 0] - arr[..., 2] > 40)


def projected(box: list[float], M: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return G.project_boxes(torch.tensor([box], dtype=torch.float64), M, size)[0]


def assert_close_box(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"pixels at {got.tolist()}, matrix says {want.tolist()} (err {err:.2f})"


def assert_view_box(got: torch.Tensor, want: torch.Tensor) -> None:
    """Composite views: resize + warp ramps, which non-linear photometric ops (equalize maps any
    partially covered pixel to full intensity) can grow symmetrically by up to ~2 px per side;
    the box centre is unaffected by that and must match tightly (0.48 px worst of 600 seeds)."""
    assert_close_box(got, want, tol=2.5)
    centre_err = ((got[:2] + got[2:]) / 2 - (want[:2] + want[2:]) / 2).abs().max().item()
    assert centre_err <= 0.75, f"centre off by {centre_err:.2f}: pixels {got.tolist()}, matrix {want.tolist()}"


# ----------------------------------------------------------------------------- project_boxes


def test_flip_twice_is_identity():
    boxes = torch.tensor([[3.0, 4.0, 50.5, 60.0], [0.0, 0.0, 120.0, 80.0]])
    F = G.hflip_matrix(120)
    once = G.project_boxes(boxes, F, (80, 120))
    assert torch.allclose(once[0], torch.tensor([69.5, 4.0, 117.0, 60.0]))
    assert torch.allclose(G.project_boxes(once, F, (80, 120)), boxes)
    assert torch.equal(F @ F, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_boxes_empty(dtype):
    out = G.project_boxes(torch.zeros(0, 4, dtype=dtype), G.scale_matrix(2, 2), (10, 10))
    assert out.shape == (0, 4) and out.dtype == dtype
    assert G.valid_boxes(out).shape == (0,)


def test_project_boxes_dtypes():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float32)
    out = G.project_boxes(boxes, G.scale_matrix(2, 3).float(), (100, 100))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[2.0, 6.0, 6.0, 12.0]]))


def test_clipping_and_removal():
    boxes = torch.tensor([[-10.0, 5.0, 30.0, 200.0], [50.0, 50.0, 60.0, 60.0], [95.0, 10.0, 99.5, 20.0]])
    labels = torch.tensor([1, 2, 3])
    M = G.translate_matrix(5.0, 0.0)
    out = G.project_boxes(boxes, M, (100, 100))  # (height, width)
    assert torch.equal(out, torch.tensor([[0.0, 5.0, 35.0, 100.0], [55.0, 50.0, 65.0, 60.0], [100.0, 10.0, 100.0, 20.0]]))
    assert G.valid_boxes(out).tolist() == [True, True, False]
    kept, kept_labels = G.project_targets(boxes, labels, M, (100, 100))
    assert torch.equal(kept, out[:2]) and kept_labels.tolist() == [1, 2]
    assert G.valid_boxes(torch.tensor([[0.0, 0.0, 0.9, 5.0]])).tolist() == [False]


def test_composition_order_matches_sequential_projection():
    boxes = torch.tensor([[10.0, 20.0, 40.0, 30.0]], dtype=torch.float64)
    big = (10_000, 10_000)
    A, B = G.rotate_matrix(20, (50, 50)), G.scale_matrix(2.0, 0.5)
    B_after_A = G.project_boxes(G.project_boxes(boxes, A, big), B, big)
    # an axis-aligned op after the rotation commutes with taking the bbox
    assert torch.allclose(G.project_boxes(boxes, B @ A, big), B_after_A)
    assert not torch.allclose(G.project_boxes(boxes, A @ B, big), B_after_A)
    S, F = G.translate_matrix(30.0, 0.0), G.hflip_matrix(100)
    assert torch.allclose(G.project_boxes(boxes, F @ S, big), G.project_boxes(G.project_boxes(boxes, S, big), F, big))
    assert not torch.allclose(F @ S, S @ F)


def test_rotation_convention_counter_clockwise():
    M = G.rotate_matrix(90, (0.0, 0.0))
    # a point right of the centre moves up on screen (y decreases)
    assert torch.allclose(G.map_points(torch.tensor([[1.0, 0.0]]), M), torch.tensor([[0.0, -1.0]], dtype=torch.float64), atol=1e-12)
    img = canvas((100, 160), [100, 45, 140, 55])  # a bar right of the centre
    rotated = A.warp_affine(img, G.rotate_matrix(90, (80, 50)))
    assert white_bbox(rotated)[3] <= 50  # now above the centre
    assert_close_box(white_bbox(rotated), white_bbox(img.rotate(90)))  # same sense as PIL


# ----------------------------------------------------------------------------- pixels vs matrices

SIZES = [(120, 200), (210, 130)]  # (H, W), non-square both ways


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("angle", [-90.0, -37.0, -8.0, 0.0, 12.0, 30.0, 45.0, 71.0])
def test_rotate_moves_pixels(size, angle):
    box = [50, 40, 90, 75]
    img = canvas(size, box)
    M = G.rotate_matrix(angle, (size[1] / 2, size[0] / 2))
    assert_close_box(white_bbox(A.warp_affine(img, M)), projected(box, M, size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shear", [(-30.0, 0.0), (25.0, 0.0), (0.0, -20.0), (0.0, 30.0), (10.0, -15.0)])
def test_shear_moves_pixels(size, shear):
    box = [45, 40, 85, 80]
    img = canvas(size, box)
    M = G.shear_matrix(*shear, center=(size[1] / 2, size[0] / 2))
    assert_close_box(white_bbox(A.warp_affine(img, M)), projected(box, M, size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shift", [(-13.0, 7.5), (20.25, -11.0), (-60.0, 0.0)])
def test_translate_moves_pixels_and_clips(size, shift):
    box = [30, 40, 90, 90]
    img = canvas(size, box)
    M = G.translate_matrix(*shift)
    assert_close_box(white_bbox(A.warp_affine(img, M)), projected(box, M, size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("new_size", [(77, 131), (160, 90), (300, 410)])
def test_resize_moves_pixels(size, new_size):
    box = [31, 22, 97, 81]
    out, M = A.resize(canvas(size, box), new_size)
    assert (out.height, out.width) == new_size
    assert_close_box(white_bbox(out), projected(box, M, new_size))


@pytest.mark.parametrize("size", SIZES)
def test_hflip_moves_pixels(size):
    box = [7, 22, 61, 81]
    out, M = A.hflip(canvas(size, box))
    assert torch.equal(white_bbox(out), projected(box, M, size))  # exact: flips whole pixels


@pytest.mark.parametrize(
    "op",
    [("rotate", 90.0), ("rotate", -90.0), ("rotate", 180.0), ("translate", (7.0, -12.0)),
     ("resize", (240, 400)), ("resize", (360, 600))],
)
def test_grid_preserving_ops_are_exact(op):
    """Ops mapping pixel edges onto pixel edges must reproduce the box to the pixel, which
    catches half-pixel convention errors (align-corners, ``W - 1 - x``) a tolerance would hide."""
    size, box = (120, 200), [50, 40, 91, 75]
    img = canvas(size, box)
    kind, arg = op
    if kind == "resize":
        out, M = A.resize(img, arg)
    else:
        M = G.rotate_matrix(arg, (100, 60)) if kind == "rotate" else G.translate_matrix(*arg)
        out = A.warp_affine(img, M)
    assert torch.equal(white_bbox(out), projected(box, M, (out.height, out.width)).round())
    assert torch.allclose(white_bbox(out), projected(box, M, (out.height, out.width)), atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_random_geometric_and_resize_move_pixels(seed):
    rng = random.Random(seed)
    size, box = (150, 230), [80, 50, 150, 100]
    cfg = ViewConfig(strong=True)
    img, R = A.random_resize(canvas(size, box), rng, (100, 180), 260)
    assert min(img.size) in range(100, 181) or max(img.size) == 260
    out, G = A.random_geometric(img, rng, cfg)
    assert out.size == img.size
    out_size = (out.height, out.width)
    assert_close_box(white_bbox(out), projected(box, G @ R, out_size), tol=2.0)


def test_random_geometric_respects_config():
    cfg = ViewConfig(strong=True, translate=0.1, rotate=30.0, shear=20.0)
    img = Image.new("RGB", (200, 120))
    centre = torch.tensor([[100.0, 60.0]])
    kinds = set()
    for seed in range(60):
        _, M = A.random_geometric(img, random.Random(seed), cfg)
        L, t = M[:2, :2], M[:2, 2]
        if torch.allclose(L, torch.eye(2, dtype=torch.float64)):
            kinds.add("translate")
            assert abs(t[0]) <= 20.0 + 1e-9 and abs(t[1]) <= 12.0 + 1e-9
            continue
        assert torch.allclose(G.map_points(centre, M), centre.double(), atol=1e-9)  # about the centre
        if torch.allclose(L @ L.T, torch.eye(2, dtype=torch.float64), atol=1e-9):
            kinds.add("rotate")
            assert abs(math.degrees(math.atan2(L[0, 1].item(), L[0, 0].item()))) <= 30.0 + 1e-9
        else:
            kinds.add("shear")
            assert L.diagonal().eq(1).all() and (L[0, 1] == 0 or L[1, 0] == 0)
            assert max(abs(L[0, 1].item()), abs(L[1, 0].item())) <= math.tan(math.radians(20.0)) + 1e-9
    assert kinds == {"translate", "rotate", "shear"}


# ----------------------------------------------------------------------------- views

NO_CUTOUT = ViewConfig(strong=True, cutout_patches=[0, 0])


@pytest.mark.parametrize("seed", range(24))
def test_strong_view_matrix_moves_the_box(seed):
    size, box = (180, 260), [90, 60, 170, 120]
    view = A.make_view(canvas(size, box, BOX_COLOR), random.Random(seed), NO_CUTOUT)
    assert view.image.dtype == torch.float32 and view.image.shape[0] == 3
    assert 0.0 <= view.image.min() and view.image.max() <= 1.0
    assert view.matrix.dtype == torch.float64 and view.matrix.shape == (3, 3)
    assert_view_box(red_bbox(view.image), projected(box, view.matrix, view.size))


@pytest.mark.parametrize("name", sorted(A.PHOTOMETRIC_OPS))
def test_photometric_ops_do_not_move_pixels(name):
    box = [20, 30, 70, 50]
    img = canvas((90, 110), box, BOX_COLOR)
    img.paste(A.FILL, (80, 0, 110, 90))  # a warp's fill must not look like the box
    for seed in range(8):
        out = A.PHOTOMETRIC_OPS[name](img, random.Random(seed))
        assert out.size == img.size and out.mode == "RGB"
        assert torch.equal(red_bbox(out), torch.tensor(box, dtype=torch.float64))


def test_cutout_and_photometric_leave_matrix_unchanged():
    img = canvas((180, 260), [90, 60, 170, 120], BOX_COLOR)
    for seed in range(10):
        with_cutout = A.make_view(img, random.Random(seed), ViewConfig(strong=True, cutout_patches=[2, 5]))
        without = A.make_view(img, random.Random(seed), NO_CUTOUT)
        assert torch.equal(with_cutout.matrix, without.matrix)
        assert not torch.equal(with_cutout.image, without.image)
    rng = random.Random(0)
    plain = Image.new("RGB", (64, 48), (10, 200, 30))
    assert A.cutout(plain, rng, (0, 0), (0.1, 0.2)) is plain
    out = np.asarray(A.cutout(plain, rng, (3, 3), (0.1, 0.2)))
    changed = (out != np.asarray(plain)).any(-1).mean()
    assert out.shape == (48, 64, 3) and 0 < changed <= 3 * 0.2 * 0.2 + 1e-9


def test_weak_view_is_resize_and_flip():
    cfg = ViewConfig(short_edge=[100, 140], max_size=180, flip_prob=0.5)
    img = canvas((120, 200), [10, 20, 60, 70])
    flips = 0
    for seed in range(20):
        v = A.make_view(img, random.Random(seed), cfg)
        h, w = v.size
        assert 100 <= min(h, w) <= 140 and max(h, w) <= 180
        M = v.matrix
        assert M[0, 1] == 0 and M[1, 0] == 0 and M[1, 1] > 0
        flips += int(M[0, 0] < 0)
        assert_close_box(white_bbox(Image.fromarray(to_array(v.image))), projected([10, 20, 60, 70], M, v.size))
    assert 0 < flips < 20


@pytest.mark.parametrize("seeds", [(0, 1), (5, 17), (3, 40), (8, 9), (11, 2), (23, 24)])
def test_teacher_to_student_lands_on_student_pixels(seeds):
    size, box = (180, 260), [90, 60, 170, 120]
    img = canvas(size, box, BOX_COLOR)
    teacher = A.make_view(img, random.Random(seeds[0]), ViewConfig())
    student = A.make_view(img, random.Random(seeds[1]), NO_CUTOUT)
    M = G.teacher_to_student(teacher.matrix, student.matrix)
    assert torch.allclose(M @ teacher.matrix, student.matrix, atol=1e-9)
    seen_by_teacher = red_bbox(teacher.image)
    moved = G.project_boxes(seen_by_teacher[None], M, student.size)[0]
    assert_view_box(red_bbox(student.image), moved)


def test_determinism():
    arr = np.random.default_rng(0).integers(0, 256, (150, 210, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    cfg = ViewConfig(strong=True)
    a, b = (A.make_view(img, random.Random(7), cfg) for _ in range(2))
    assert torch.equal(a.image, b.image) and torch.equal(a.matrix, b.matrix)
    c = A.make_view(img, random.Random(8), cfg)
    assert a.size != c.size or not torch.equal(a.image, c.image)
    assert not torch.equal(a.matrix, c.matrix)


def test_test_view_is_deterministic_resize():
    img = canvas((120, 200), [10, 20, 60, 70])
    v = A.test_view(img, 192, 320)
    assert v.size == (192, 320)
    assert torch.allclose(v.matrix, G.scale_matrix(320 / 200, 192 / 120))
    assert torch.equal(v.image, A.test_view(img, 192, 320).image)
    assert A.test_view(img, 192, 250).size == (150, 250)  # long edge capped


def test_warp_affine_rejects_perspective():
    M = torch.eye(3, dtype=torch.float64)
    M[2, 0] = 0.01
    with pytest.raises(ValueError):
        A.warp_affine(Image.new("RGB", (8, 8)), M)


# ----------------------------------------------------------------------------- properties

coord = st.floats(-200, 600, allow_nan=False)


@st.composite
def affine_and_boxes(draw):
    h, w = draw(st.integers(8, 400)), draw(st.integers(8, 400))
    center = (w / 2, h / 2)
    M = G.scale_matrix(draw(st.floats(0.2, 4.0)), draw(st.floats(0.2, 4.0)))
    if draw(st.booleans()):
        M = G.hflip_matrix(w) @ M
    M = G.rotate_matrix(draw(st.floats(-180, 180)), center) @ M
    M = G.shear_matrix(draw(st.floats(-40, 40)), draw(st.floats(-40, 40)), center) @ M
    M = G.translate_matrix(draw(coord), draw(coord)) @ M
    n = draw(st.integers(0, 6))
    pts = torch.tensor(draw(st.lists(st.tuples(coord, coord, coord, coord), min_size=n, max_size=n)) or [[0.0] * 4])[:n]
    boxes = torch.cat([torch.minimum(pts[:, :2], pts[:, 2:]), torch.maximum(pts[:, :2], pts[:, 2:])], dim=1)
    return boxes.reshape(-1, 4).double(), M, (h, w)


@settings(max_examples=200, deadline=None)
@given(affine_and_boxes())
def test_projection_properties(case):
    boxes, M, (h, w) = case
    out = G.project_boxes(boxes, M, (h, w))
    assert out.shape == boxes.shape and out.dtype == boxes.dtype
    assert (out[:, 0] >= 0).all() and (out[:, 2] <= w).all() and (out[:, 1] >= 0).all() and (out[:, 3] <= h).all()
    assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    mapped = G.map_points(corners, M)
    assert torch.allclose(G.map_points(mapped, torch.linalg.inv(M)), corners, atol=1e-6)
    # every mapped corner that lands on the canvas lies inside its projected box
    inside = (mapped[..., 0] >= 0) & (mapped[..., 0] <= w) & (mapped[..., 1] >= 0) & (mapped[..., 1] <= h)
    lo, hi = out[:, None, :2] - 1e-6, out[:, None, 2:] + 1e-6
    assert ((mapped >= lo) & (mapped <= hi)).all(-1)[inside].all()
    assert math.isfinite(out.sum().item())
