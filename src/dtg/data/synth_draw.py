"""Drawing for the synthetic dataset: one image and its annotations from one random generator.

Holds the shape classes (:data:`CLASS_NAMES`, their polygons in :data:`SHAPES`,
:func:`shape_mask`), distractor clutter, photographic and procedural backgrounds,
colour picking, painting, object placement and annotation, and :func:`render_image`,
which composes them. Each image is a textured or photographic background with 2-6
shapes (classes differ by shape only; colour is random), distractor clutter that
belongs to no class, random rotation, log-uniform sizes and occlusion.

Boxes are COCO ``[x, y, w, h]`` floats in pixels (``x, y`` is the top-left corner of
the top-left covered pixel): the tight box of the object's drawn pixels before
occlusion, clipped to the image. Objects more than 60 % hidden are not annotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "hexagon", "arrow", "heart", "crescent",
)  # fmt: skip
MAX_HIDDEN = 0.6  # drop an object when more than this fraction of it is hidden
PHOTO_PROB = 0.5  # defaults of SynthConfig.photo_prob / low_contrast_prob
LOW_CONTRAST_PROB = 0.35
# Bundled scikit-image photos (no network). Coins, retina, colorwheel, clock: left out, round.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text",
)  # fmt: skip
_PHOTOS: dict[str, Image.Image] = {}

Poly = np.ndarray  # (N, 2) float vertices, x then y


# ----------------------------------------------------------------------------- shapes


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0) -> Poly:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)


def _regular(n: int, phase: float = -np.pi / 2) -> Poly:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> Poly:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _crescent(d: float = 0.45, rho: float = 0.8, n: int = 32) -> Poly:
    """Unit disc minus the disc of radius ``rho`` centred at ``(d, 0)``, as one polygon."""
    x = (1 - rho**2 + d**2) / (2 * d)
    y = np.sqrt(1 - x**2)
    a, b = np.arctan2(y, x), np.arctan2(y, x - d)
    outer = np.linspace(a, 2 * np.pi - a, n)
    inner = np.linspace(2 * np.pi - b, b, n)
    arc_in = np.stack([d + rho * np.cos(inner), rho * np.sin(inner)], 1)
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1), arc_in])


def _heart(n: int = 48) -> Poly:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1) / 16.0


_W = 0.34  # cross arm half-width
_ARROW = [[-1.0, -0.2], [0.1, -0.2], [0.1, -0.6], [1, 0], [0.1, 0.6], [0.1, 0.2], [-1, 0.2]]
SHAPES: dict[str, tuple[Poly, list[Poly]]] = {  # name -> (outer polygon, holes), about [-1, 1]^2
    "circle": (_circle(), []),
    "square": (np.array([[-1.0, -1], [1, -1], [1, 1], [-1, 1]]), []),
    "triangle": (_regular(3), []),
    "star": (_star(), []),
    "cross": (np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1],
                        [-_W, 1], [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]]), []),  # fmt: skip
    "ring": (_circle(), [_circle(r=0.55)]),
    "hexagon": (_regular(6, 0.0), []),
    "arrow": (np.array(_ARROW), []),
    "heart": (_heart(), []),
    "crescent": (_crescent(), []),
}
assert tuple(SHAPES) == CLASS_NAMES


@dataclass
class Layer:
    """A painted element: boolean ``mask`` (h, w) whose top-left pixel sits at canvas ``(x, y)``."""

    mask: np.ndarray
    x: int
    y: int
    category_id: int = 0  # 0: distractor


def shape_mask(
    name: str, size: float, angle: float, aspect: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Rasterise shape ``name`` rotated by ``angle`` (radians) so its box side is ~``size`` px.

    Returns a boolean (h, w) mask with a 1 px margin; ``aspect`` stretches x before rotation,
    ``offset`` (each in [0, 1)) shifts the shape by a sub-pixel amount.
    """
    outer, holes = SHAPES[name]
    c, s = np.cos(angle), np.sin(angle)

    def tf(p: Poly) -> Poly:  # stretch x, then rotate row vectors
        return (p * [aspect, 1.0]) @ np.array([[c, s], [-s, c]])

    o = tf(outer)
    lo, hi = o.min(0), o.max(0)
    scale = size / float((hi - lo).max())
    shift = 1.0 + np.asarray(offset) - lo * scale
    w, h = (np.ceil((hi - lo) * scale) + 3).astype(int)
    img = Image.new("L", (int(w), int(h)), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon([tuple(p) for p in o * scale + shift], fill=255)
    for hole in holes:
        draw.polygon([tuple(p) for p in tf(hole) * scale + shift], fill=0)
    return np.asarray(img) > 0


# ----------------------------------------------------------------------------- distractors


def _distractor(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A clutter mask (h, w): line, scribble, elongated ellipse, irregular blob or text strokes."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    kind = rng.integers(5)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if kind == 0:  # straight line
        length, a = rng.uniform(20, 150), rng.uniform(0, np.pi)
        dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(1, 5)))
    elif kind == 1:  # scribble: a random walk
        steps = rng.normal(0, 8, size=(int(rng.integers(4, 14)), 2)).cumsum(0) + [cx, cy]
        draw.line([tuple(p) for p in steps], fill=255, width=int(rng.integers(1, 4)), joint="curve")
    elif kind in (2, 3):  # elongated ellipse (aspect >= 2.5) or irregular blob, never round
        n = 40
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = np.ones(n)
        if kind == 3:  # smoothed (circularly) random radii
            r = 1 + 0.5 * np.convolve(np.tile(rng.normal(size=n), 3), np.ones(5) / 5, "same")[n : 2 * n]
        size, ar, a = rng.uniform(5, 40), rng.uniform(2.5, 5.0), rng.uniform(0, np.pi)
        px, py = r * np.cos(t) * size, r * np.sin(t) * size / ar
        pts = np.stack([px * np.cos(a) - py * np.sin(a) + cx, px * np.sin(a) + py * np.cos(a) + cy], 1)
        draw.polygon([tuple(p) for p in pts], fill=255)
    else:  # text-like strokes: a row of glyphs of 2-3 short segments each
        gh = rng.uniform(5, 14)
        width = 1 if gh < 10 else 2
        for i in range(int(rng.integers(3, 9))):
            gx = cx + i * gh * 0.8
            for _ in range(int(rng.integers(2, 4))):
                p = rng.uniform(0, 1, size=(2, 2)) * [gh * 0.6, gh] + [gx, cy]
                draw.line([tuple(p[0]), tuple(p[1])], fill=255, width=width)
    return np.asarray(img) > 0


# ----------------------------------------------------------------------------- backgrounds


def _photo(name: str) -> Image.Image:
    """A bundled scikit-image photograph as RGB, cached per process."""
    if name not in _PHOTOS:
        import skimage.data

        a = np.asarray(getattr(skimage.data, name)())
        a = np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3]
        _PHOTOS[name] = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))
    return _PHOTOS[name]


def _photo_crop(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    img = _photo(PHOTO_NAMES[rng.integers(len(PHOTO_NAMES))])
    zoom = float(np.exp(rng.uniform(np.log(0.6), np.log(2.0))))
    cw, ch = min(img.width, max(8, int(w / zoom))), min(img.height, max(8, int(h / zoom)))
    x0, y0 = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
    crop = img.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    out = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.3:  # tint
        out = out * rng.uniform(0.6, 1.2, size=3)
    return out


def _procedural(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient, blurred noise, stripes, checkerboard or flat; float (h, w, 3) in [0, 255]."""
    c1, c2 = rng.uniform(0, 255, size=(2, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a)
    kind = rng.integers(5)
    if kind == 0:  # linear gradient
        t = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
    elif kind == 1:  # blurred value noise
        g = int(rng.integers(3, 14))
        low = Image.fromarray(rng.integers(0, 256, size=(g, g, 3), dtype=np.uint8))
        return np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.float32)
    elif kind == 2:  # stripes
        t = 0.5 + 0.5 * np.sin(u * 2 * np.pi / rng.uniform(6, 40))
    elif kind == 3:  # rotated checkerboard, low contrast
        cell = rng.uniform(6, 32)
        v = -xx * np.sin(a) + yy * np.cos(a)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2) * rng.uniform(0.1, 0.4)
    else:  # flat
        t = np.zeros_like(u)
    return c1 + (c2 - c1) * t[..., None]


def background(rng: np.random.Generator, w: int, h: int, photo_prob: float = PHOTO_PROB,
               flat_prob: float = 0.0) -> np.ndarray:
    """A float32 (h, w, 3) background in [0, 255] with random contrast and pixel noise.

    ``flat_prob`` is the chance of one flat random colour (no noise); otherwise ``photo_prob``
    is the chance of a photograph crop instead of a procedural pattern.
    """
    if flat_prob > 0 and rng.random() < flat_prob:  # no draw at all when 0: older datasets unchanged
        return np.broadcast_to(rng.uniform(0, 255, size=3).astype(np.float32), (h, w, 3)).copy()
    bg = _photo_crop(rng, w, h) if rng.random() < photo_prob else _procedural(rng, w, h)
    mean = bg.mean((0, 1))
    bg = mean + (bg - mean) * rng.uniform(0.35, 1.1) + rng.uniform(-30, 30)
    if rng.random() < 0.4:
        bg = bg + rng.normal(0, rng.uniform(2, 8), size=(h, w, 1)).astype(np.float32)
    return np.clip(bg, 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- composing


def _clip(layer: Layer, w: int, h: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(canvas slices, mask slices) of the part of ``layer`` inside a w x h canvas."""
    mh, mw = layer.mask.shape
    x0, y0 = max(0, layer.x), max(0, layer.y)
    x1, y1 = min(w, layer.x + mw), min(h, layer.y + mh)
    x1, y1 = max(x0, x1), max(y0, y1)
    local = (slice(y0 - layer.y, y1 - layer.y), slice(x0 - layer.x, x1 - layer.x))
    return (slice(y0, y1), slice(x0, x1)), local


def _pick_colour(under: np.ndarray, rng: np.random.Generator, low_contrast_prob: float = LOW_CONTRAST_PROB) -> np.ndarray:
    """An RGB colour whose largest channel difference from ``under`` is >= 30 (often much more).

    With probability ``low_contrast_prob`` the difference is only 30..60.
    """
    if rng.random() < low_contrast_prob:  # low contrast: a random direction, 30..60 away
        d = rng.normal(size=3)
        d *= rng.uniform(30, 60) / np.abs(d).max()
        k = int(np.argmax(np.abs(d)))
        return np.clip(under + d if 0 <= under[k] + d[k] <= 255 else under - d, 0, 255)
    contrast = rng.uniform(30, 110)
    for _ in range(8):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - under).max() >= contrast:
            return colour
    k = int(np.argmax(np.maximum(under, 255 - under)))  # the channel with most room
    colour = under.copy()
    colour[k] = under[k] + contrast if under[k] + contrast <= 255 else under[k] - contrast
    return colour


def _paint(canvas: np.ndarray, layer: Layer, rng: np.random.Generator, low_contrast_prob: float) -> None:
    """Fill ``layer`` in place on the float (h, w, 3) ``canvas`` with a colour contrasting what lies below."""
    h, w = canvas.shape[:2]
    cs, ms = _clip(layer, w, h)
    m = layer.mask[ms]
    if not m.any():
        return
    fill = np.broadcast_to(_pick_colour(canvas[cs][m].mean(0), rng, low_contrast_prob), m.shape + (3,)).astype(np.float32)
    if rng.random() < 0.5:  # mild shading, amplitude <= 10 so a flat background still differs by >= 20
        fill = fill + rng.uniform(-10, 10) * np.linspace(-1, 1, m.shape[1], dtype=np.float32)[None, :, None]
    region = canvas[cs]
    region[m] = np.clip(fill[m], 0, 255)


def _place_object(rng: np.random.Generator, cfg: Any, w: int, h: int) -> Layer:
    lo, hi = cfg.object_size
    hi = min(float(hi), 0.9 * min(w, h))
    size = float(np.exp(rng.uniform(np.log(lo), np.log(max(lo, hi)))))
    cat = int(rng.integers(int(getattr(cfg, "num_classes", len(CLASS_NAMES)))))
    angle, aspect, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15), rng.uniform(0, 1, 2)
    max_rot = float(getattr(cfg, "rotation", 180.0))
    if max_rot < 180.0:  # the same draw, mapped linearly onto [-max_rot, max_rot] degrees
        angle = (angle / np.pi - 1.0) * np.deg2rad(max_rot)
    first = int(getattr(cfg, "first_class", 0))
    mask = shape_mask(CLASS_NAMES[first + cat], size, angle, aspect, (float(offset[0]), float(offset[1])))
    mh, mw = mask.shape
    x = int(rng.integers(-int(0.2 * mw), max(-int(0.2 * mw), w - int(0.8 * mw)) + 1))
    y = int(rng.integers(-int(0.2 * mh), max(-int(0.2 * mh), h - int(0.8 * mh)) + 1))
    return Layer(mask, x, y, cat + 1)


def annotate(layers: list[Layer], w: int, h: int) -> list[dict]:
    """Objects hidden at most ``MAX_HIDDEN`` (by later layers or the border), in drawing order."""
    covered = np.zeros((h, w), bool)
    objects = []
    for layer in reversed(layers):
        cs, ms = _clip(layer, w, h)
        m = layer.mask[ms]
        visible = int((m & ~covered[cs]).sum())
        covered[cs] |= m
        full = int(layer.mask.sum())
        if layer.category_id == 0 or full == 0 or visible < (1 - MAX_HIDDEN) * full:
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0 = cs[1].start + cols[0], cs[0].start + rows[0]
        box = [float(x0), float(y0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
        objects.append({"bbox": box, "category_id": layer.category_id, "area": float(visible)})
    return objects[::-1]


def render_image(
    rng: np.random.Generator, cfg: Any, background_colour: tuple[int, int, int] | None = None
) -> tuple[Image.Image, list[dict]]:
    """Render one RGB canvas (w, h each in ``cfg.image_size``) and its annotated objects.

    Objects are dicts with ``bbox`` [x, y, w, h] floats (COCO, pixels), ``category_id`` in
    1..len(CLASS_NAMES) and ``area`` (visible pixels). ``background_colour`` replaces the
    random background by a flat colour (for tests); everything else is unchanged.
    """
    w, h = (int(rng.integers(cfg.image_size[0], cfg.image_size[1] + 1)) for _ in range(2))
    if background_colour is None:
        canvas = background(rng, w, h, getattr(cfg, "photo_prob", PHOTO_PROB), getattr(cfg, "flat_prob", 0.0))
    else:
        canvas = np.broadcast_to(np.asarray(background_colour, np.float32), (h, w, 3)).copy()
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    n_dis = int(rng.integers(cfg.distractors_per_image[0], cfg.distractors_per_image[1] + 1))
    objects = [_place_object(rng, cfg, w, h) for _ in range(n_obj)]
    clutter = [Layer(_distractor(rng, w, h), 0, 0) for _ in range(n_dis)]
    on_top = rng.random(n_dis) < 0.3
    below = [c for c, top in zip(clutter, on_top) if not top]
    layers = below + objects + [c for c, top in zip(clutter, on_top) if top]
    low = getattr(cfg, "low_contrast_prob", LOW_CONTRAST_PROB)
    for layer in layers:
        _paint(canvas, layer, rng, low)
    return Image.fromarray(np.round(canvas).astype(np.uint8), "RGB"), annotate(layers, w, h)
