"""Inputs the benchmarks time: box sets for NMS, an anchor grid and view maps, a synthetic COCO set.

Shared by ``dtg bench speed`` and the repository's ``bench/*.py`` scripts, so that both time the
same cases (and ``dtg bench speed`` needs nothing outside the installed package).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from dtg.geometry import map_points, rotate_matrix, scale_matrix, translate_matrix
from dtg.methods.dtg.correspondence import AnchorGrid, anchor_grid

WIDTH, HEIGHT = 1333.0, 800.0  # the NMS cases' image
SIZES = ((16,), (32,), (64,), (128,), (256,))  # anchor sizes / ratios of the matching cases (the embedded model's)
RATIOS = ((0.5, 1.0, 2.0),) * 5
CANON = 16.0


# ----------------------------------------------------------------------------- NMS boxes


def uniform_boxes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes of side 16..512 px anywhere in the image, 80 classes, distinct scores."""
    side = torch.exp(torch.empty(n, 2).uniform_(2.77, 6.24, generator=g))  # 16..512
    xy = torch.rand(n, 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
    boxes = torch.cat([xy, xy + side], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 80, (n,), generator=g)


def dense_boxes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes jittered (10% of the side) around ``n // 40`` objects, 5 labels (levels)."""
    objects, _, _ = uniform_boxes(max(n // 40, 1), g)
    pick = torch.randint(0, objects.shape[0], (n,), generator=g)
    base = objects[pick]
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    boxes = base + torch.randn(n, 4, generator=g) * 0.1 * wh
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)


def interleaved_times(fns: list[Callable[[], object]], repeat: int) -> list[list[float]]:
    """Wall times in seconds of ``repeat`` rounds, each calling every ``fn`` once in turn.

    Interleaving (after one warm-up round) exposes both functions to the same background
    load, which matters on a machine shared with training jobs.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- anchors and views


def build_grid(height: int, width: int) -> AnchorGrid:
    """torchvision anchors of a padded (height, width) batch with FPN P2-P6 map shapes."""
    maps = [torch.zeros(1, 1, height // s, width // s) for s in (4, 8, 16, 32)]
    maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2, padding=0))
    anchors = AnchorGenerator(SIZES, RATIOS)(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), maps)[0]
    per_level = [m.shape[-2] * m.shape[-1] * len(RATIOS[0]) for m in maps]
    return anchor_grid(anchors, per_level, [tuple(m.shape[-2:]) for m in maps], (height, width))


def random_similarity(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(3, 3) float64: scale 0.8..1.25, rotation -15..15 deg about the centre, shift up to 10%."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    scale = math.exp(math.log(0.8) + u[0] * (math.log(1.25) - math.log(0.8)))
    centre = (width / 2, height / 2)
    S = translate_matrix(*centre) @ scale_matrix(scale, scale) @ translate_matrix(-centre[0], -centre[1])
    shift = translate_matrix((u[2] - 0.5) * 0.2 * width, (u[3] - 0.5) * 0.2 * height)
    return shift @ rotate_matrix(-15 + 30 * u[1], centre) @ S


def map_unclipped(boxes: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy -> (N, 4) float32 min/max of the 4 mapped corners (no clipping)."""
    x1, y1, x2, y2 = boxes.to(torch.float64).unbind(-1)
    p = map_points(torch.stack([x1, y1, x2, y1, x2, y2, x1, y2], dim=-1).reshape(-1, 4, 2), M)
    return torch.cat([p.amin(1), p.amax(1)], dim=-1).float()


# ----------------------------------------------------------------------------- a synthetic COCO set


def make_gt(num_images: int, num_cats: int, rng: np.random.Generator) -> dict:
    """1-15 boxes per image over small/medium/large sizes in 640x480 images."""
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480})
        n = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(300), n))
        wh = side[:, None] * rng.uniform(0.6, 1.4, (n, 2))
        wh = np.minimum(wh, [639, 479])
        xy = rng.uniform(0, 1, (n, 2)) * ([640, 480] - wh)
        for k in range(n):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, num_cats + 1)),
                         "bbox": [*map(float, xy[k]), *map(float, wh[k])], "area": float(wh[k].prod()), "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_cats + 1)]}


def make_dets(gt: dict, per_image: int, num_cats: int, rng: np.random.Generator) -> list[dict]:
    """``per_image`` detections per image: jittered GT boxes (higher scores), then random boxes."""
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    dets = []
    for img in gt["images"]:
        boxes, cats = [], []
        for a in by_image.get(img["id"], [])[:per_image]:
            x, y, w, h = a["bbox"]
            boxes.append(np.array([x, y, w, h]) + rng.normal(0, 0.1, 4) * [w, h, w, h])
            cats.append(a["category_id"])
        n_rand = per_image - len(boxes)
        wh = rng.uniform(5, 200, (n_rand, 2))
        xy = rng.uniform(0, 1, (n_rand, 2)) * ([640, 480] - wh)
        boxes += list(np.concatenate([xy, wh], 1))
        cats += list(rng.integers(1, num_cats + 1, n_rand))
        n_gt = per_image - n_rand  # true positives tend to score higher
        scores = np.concatenate([rng.uniform(0.3, 1.0, n_gt), rng.uniform(0.0, 0.7, n_rand)])
        for b, c, s in zip(boxes, cats, scores):
            b = [float(b[0]), float(b[1]), max(1.0, float(b[2])), max(1.0, float(b[3]))]
            dets.append({"image_id": img["id"], "category_id": int(c), "bbox": b, "score": float(s)})
    return dets
