"""View geometry: 3x3 matrices, point and box mapping. The ground floor: imports nothing of dtg.

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` (row, column) covers
``[j, j+1) x [i, i+1)`` and an image of size ``(H, W)`` spans ``[0, W] x [0, H]``.
Boxes are ``(N, 4)`` float tensors in ``xyxy`` format in these coordinates.

Every geometric augmentation (:mod:`dtg.data.augment`) records a 3x3 ``torch.float64``
matrix mapping its INPUT coordinates (homogeneous column vectors ``(x, y, 1)``) to its
OUTPUT coordinates; a view composes them into ``H = M_k @ ... @ M_1`` (original image ->
view). A teacher box maps to the student view by ``M = H_s @ inv(H_t)``
(:func:`teacher_to_student`); see docs/method.md, "Views and matrices".
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- boxes


def map_points(points: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Map ``(..., 2)`` xy points by the 3x3 homogeneous ``M``; returns float64 ``(..., 2)``."""
    pts = points.to(torch.float64)
    M = M.to(device=pts.device, dtype=torch.float64)
    hom = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1) @ M.T
    return hom[..., :2] / hom[..., 2:]


def project_boxes(boxes: torch.Tensor, M: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Map boxes through ``M`` and clip them to the output image.

    Args:
        boxes: (N, 4) xyxy, float32 or float64; N may be 0.
        M: (3, 3) matrix mapping input coordinates to output coordinates.
        out_size: (height, width) of the output image.

    Returns:
        (N, 4) xyxy in ``boxes.dtype``: the min/max of the 4 mapped corners, clipped to
        ``[0, width] x [0, height]``. Degenerate boxes are kept (see :func:`valid_boxes`).
    """
    b = boxes.reshape(-1, 4).to(torch.float64)
    x1, y1, x2, y2 = b.unbind(-1)
    corners = torch.stack(
        [torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
         torch.stack([x2, y2], -1), torch.stack([x1, y2], -1)], dim=1
    )  # (N, 4, 2)
    mapped = map_points(corners, M)
    lo, hi = mapped.amin(dim=1), mapped.amax(dim=1)  # (N, 2) each
    h, w = out_size
    out = torch.cat([lo, hi], dim=-1)
    out[:, 0::2] = out[:, 0::2].clamp(0.0, float(w))
    out[:, 1::2] = out[:, 1::2].clamp(0.0, float(h))
    return out.to(boxes.dtype)


def valid_boxes(boxes: torch.Tensor, min_size: float = 1.0) -> torch.Tensor:
    """(N,) bool mask of xyxy boxes whose width and height are both ``>= min_size``."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def project_targets(
    boxes: torch.Tensor, labels: torch.Tensor, M: torch.Tensor, out_size: tuple[int, int],
    min_size: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ground-truth (N, 4) xyxy boxes and drop those under ``min_size`` with their (N,) labels."""
    projected = project_boxes(boxes, M, out_size)
    keep = valid_boxes(projected, min_size)
    return projected[keep], labels[keep]



# ----------------------------------------------------------------------------- matrices


def _matrix(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _about(M: torch.Tensor, center: tuple[float, float]) -> torch.Tensor:
    """``M`` applied about ``center`` instead of the origin."""
    cx, cy = center
    return translate_matrix(cx, cy) @ M @ translate_matrix(-cx, -cy)


def scale_matrix(sx: float, sy: float) -> torch.Tensor:
    """(3, 3) float64: ``x -> x * sx, y -> y * sy``."""
    return _matrix([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def hflip_matrix(width: float) -> torch.Tensor:
    """(3, 3) float64: ``x -> width - x`` (a horizontal flip of an image ``width`` wide)."""
    return _matrix([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def translate_matrix(tx: float, ty: float) -> torch.Tensor:
    """(3, 3) float64: ``x -> x + tx, y -> y + ty``."""
    return _matrix([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def rotate_matrix(angle_deg: float, center: tuple[float, float]) -> torch.Tensor:
    """(3, 3) float64 rotation by ``angle_deg`` about ``center`` = (cx, cy).

    Positive angles rotate COUNTER-CLOCKWISE as seen on screen (y points down), like
    ``PIL.Image.rotate``: a point right of the centre moves up,
    ``x' = cx + cos(a) dx + sin(a) dy``, ``y' = cy - sin(a) dx + cos(a) dy``.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return _about(_matrix([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]), center)


def shear_matrix(shear_x_deg: float, shear_y_deg: float, center: tuple[float, float]) -> torch.Tensor:
    """(3, 3) float64 shear about ``center``: ``x' = x + tan(sx)(y - cy)``, ``y' = y + tan(sy)(x - cx)``."""
    tx, ty = math.tan(math.radians(shear_x_deg)), math.tan(math.radians(shear_y_deg))
    return _about(_matrix([[1.0, tx, 0.0], [ty, 1.0, 0.0], [0.0, 0.0, 1.0]]), center)


def teacher_to_student(h_teacher: torch.Tensor, h_student: torch.Tensor) -> torch.Tensor:
    """(3, 3) float64 ``H_s @ inv(H_t)``: teacher-view coordinates -> student-view coordinates."""
    return h_student.to(torch.float64) @ torch.linalg.inv(h_teacher.to(torch.float64))
