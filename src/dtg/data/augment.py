"""Weak / strong augmentation views that record their geometry (docs/method.md, "Views and matrices").

Coordinate conventions and the matrices themselves live in :mod:`dtg.geometry`. Every
geometric op here returns the 3x3 ``torch.float64`` matrix of its warp (input -> output
coordinates); a view composes them into ``H`` (original image -> view). The pixel warps use
PIL with the same pixel-centre convention, so the recorded matrix is exactly the warp that
was applied. Photometric ops and cutout do not move pixels and record nothing. All
randomness comes from the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, ImageStat

from dtg.config import ViewConfig
from dtg.geometry import hflip_matrix, rotate_matrix, scale_matrix, shear_matrix, translate_matrix

FILL = (124, 116, 104)  # constant colour of the area a geometric warp uncovers
ENHANCE_RANGE = (0.4, 1.6)  # factor range of brightness / contrast / sharpness / color

# ----------------------------------------------------------------------------- geometric ops


def resize(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, torch.Tensor]:
    """Bilinear resize to ``size`` = (height, width); the matrix scales by new/old per axis."""
    h, w = size
    out = img.resize((w, h), Image.Resampling.BILINEAR)
    return out, scale_matrix(w / img.width, h / img.height)


def hflip(img: Image.Image) -> tuple[Image.Image, torch.Tensor]:
    """Mirror left-right; matrix ``x -> W - x``."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hflip_matrix(img.width)


def warp_affine(img: Image.Image, M: torch.Tensor, fill: tuple[int, int, int] = FILL) -> Image.Image:
    """Warp ``img`` by the affine 3x3 ``M`` (input -> output coordinates) on a same-size canvas.

    PIL samples the input at ``inv(M) @ (x + 0.5, y + 0.5, 1)`` for each output pixel
    centre, so the warp is exactly ``M`` in continuous coordinates. Content moved out is
    lost; uncovered area gets ``fill``.
    """
    M = M.to(torch.float64)
    if not torch.allclose(M[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)):
        raise ValueError(f"warp_affine needs an affine matrix, got last row {M[2].tolist()}")
    inv = torch.linalg.inv(M)
    data = tuple(inv[:2].reshape(-1).tolist())
    return img.transform(
        img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def resized_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """(height, width) with the short edge at ``short_edge``, the long edge capped at ``max_size``."""
    scale = short_edge / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def random_resize(
    img: Image.Image, rng: random.Random, short_edge: tuple[int, int], max_size: int
) -> tuple[Image.Image, torch.Tensor]:
    """Resize with the short edge drawn uniformly from the integers in ``short_edge`` = [min, max]."""
    target = rng.randint(int(short_edge[0]), int(short_edge[1]))
    return resize(img, resized_size(img.height, img.width, target, max_size))


def random_geometric(img: Image.Image, rng: random.Random, cfg: ViewConfig) -> tuple[Image.Image, torch.Tensor]:
    """One of translate / rotate / shear (uniformly) with a random magnitude; returns (image, M)."""
    w, h = img.size
    center = (w / 2.0, h / 2.0)
    kind = rng.choice(("translate", "rotate", "shear"))
    if kind == "translate":
        M = translate_matrix(rng.uniform(-cfg.translate, cfg.translate) * w,
                             rng.uniform(-cfg.translate, cfg.translate) * h)
    elif kind == "rotate":
        M = rotate_matrix(rng.uniform(-cfg.rotate, cfg.rotate), center)
    else:
        angle = rng.uniform(-cfg.shear, cfg.shear)
        M = shear_matrix(angle, 0.0, center) if rng.random() < 0.5 else shear_matrix(0.0, angle, center)
    return warp_affine(img, M), M


# ----------------------------------------------------------------------------- photometric ops


def _enhance(cls: type) -> Callable[[Image.Image, random.Random], Image.Image]:
    return lambda img, rng: cls(img).enhance(rng.uniform(*ENHANCE_RANGE))


PHOTOMETRIC_OPS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "solarize": lambda img, rng: ImageOps.solarize(img, threshold=rng.randint(128, 255)),
    "brightness": _enhance(ImageEnhance.Brightness),
    "contrast": _enhance(ImageEnhance.Contrast),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "color": _enhance(ImageEnhance.Color),
    "equalize": lambda img, rng: ImageOps.equalize(img),
    "posterize": lambda img, rng: ImageOps.posterize(img, rng.randint(4, 8)),
    "autocontrast": lambda img, rng: ImageOps.autocontrast(img),
}


def random_photometric(img: Image.Image, rng: random.Random) -> Image.Image:
    """One op of :data:`PHOTOMETRIC_OPS`, chosen uniformly, with a random magnitude."""
    return PHOTOMETRIC_OPS[rng.choice(tuple(PHOTOMETRIC_OPS))](img, rng)


def cutout(
    img: Image.Image, rng: random.Random, patches: tuple[int, int], frac: tuple[float, float]
) -> Image.Image:
    """Fill ``n`` rectangles (``n`` uniform in ``patches``; each side a fraction in ``frac`` of
    the image side) with a random gray or the image's mean colour. Pixels do not move."""
    n = rng.randint(int(patches[0]), int(patches[1]))
    if n <= 0:
        return img
    out = img.copy()
    w, h = img.size
    mean = tuple(int(round(v)) for v in ImageStat.Stat(img).mean)
    for _ in range(n):
        pw = min(w, max(1, round(rng.uniform(*frac) * w)))
        ph = min(h, max(1, round(rng.uniform(*frac) * h)))
        x0, y0 = rng.randint(0, w - pw), rng.randint(0, h - ph)
        gray = rng.randint(0, 255)
        color = (gray,) * len(mean) if rng.random() < 0.5 else mean
        out.paste(color, (x0, y0, x0 + pw, y0 + ph))
    return out


# ----------------------------------------------------------------------------- views


@dataclass
class View:
    """An augmented image and the matrix that produced it."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    matrix: torch.Tensor  # (3, 3) float64, original image -> this view

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the view."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1].

    Converted in numpy: torch's multi-threaded elementwise kernels are ~100x slower than this
    when the cores are busy (e.g. next to the training process).
    """
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(np.divide(chw, np.float32(255.0), out=chw))


def _strong_ops(
    img: Image.Image, rng: random.Random, cfg: ViewConfig
) -> tuple[Image.Image, torch.Tensor]:
    """Photometric and geometric op in random order, then cutout; returns (image, geometric M)."""
    if rng.random() < 0.5:
        img = random_photometric(img, rng)
        img, M = random_geometric(img, rng, cfg)
    else:
        img, M = random_geometric(img, rng, cfg)
        img = random_photometric(img, rng)
    img = cutout(img, rng, tuple(cfg.cutout_patches), tuple(cfg.cutout_frac))
    return img, M


def make_view(img: Image.Image, rng: random.Random, cfg: ViewConfig) -> View:
    """Weak view (random resize + flip), plus the strong ops when ``cfg.strong``."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    img, H = random_resize(img, rng, tuple(cfg.short_edge), cfg.max_size)
    if rng.random() < cfg.flip_prob:
        img, F = hflip(img)
        H = F @ H
    if cfg.strong:
        img, G = _strong_ops(img, rng, cfg)
        H = G @ H
    return View(to_tensor(img), H)


def test_view(img: Image.Image, short_edge: int, max_size: int) -> View:
    """Deterministic evaluation view: resize only."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    img, H = resize(img, resized_size(img.height, img.width, short_edge, max_size))
    return View(to_tensor(img), H)


test_view.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported
