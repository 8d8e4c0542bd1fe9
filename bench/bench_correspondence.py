"""Time the windowed anchor matching against a full IoU matrix over the level's anchors.

    python bench/bench_correspondence.py                    # N = 10k, 50k, 100k
    python bench/bench_correspondence.py --n 10000 --repeat 3

Teacher anchors: a random subset of the torchvision anchors of a padded 800 x 1344 batch
(an 800 x 1333 image; sizes 16..256, ratios 0.5/1/2), mapped by a random similarity
(scale, rotation about the centre, translation) into a student view with the same grid.
Runs on one thread (other jobs share the machine). Prints a markdown table: best-of-``--repeat``
time of :func:`match_anchors` and one run of the reference (``box_iou`` against all anchors of
each box's level, chunked), the speed-up, and how often the two disagree on the best IoU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from dtg.data.transforms import map_points, rotate_matrix, scale_matrix, translate_matrix
from dtg.losses.correspondence import AnchorGrid, anchor_grid, fpn_level, match_anchors_with_iou

SIZES = ((16,), (32,), (64,), (128,), (256,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
CANON = 16.0


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


def full_matrix_reference(boxes: torch.Tensor, grid: AnchorGrid, max_pairs: int) -> torch.Tensor:
    """(N,) best IoU of each box over ALL anchors of its level (0 where the level's grid misses its centre)."""
    levels = fpn_level(boxes, grid.num_levels, CANON)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    best = torch.zeros(len(boxes))
    for level, ((h, w), (sy, sx), start) in enumerate(zip(grid.sizes, grid.strides, grid.offsets)):
        anchors = grid.anchors[start : start + h * w * grid.base_anchors[level].shape[0]]
        inside = (centre[:, 0] >= 0) & (centre[:, 0] < w * sx) & (centre[:, 1] >= 0) & (centre[:, 1] < h * sy)
        rows = torch.nonzero((levels == level) & inside).squeeze(1)
        step = max(1, max_pairs // len(anchors))
        for i in range(0, len(rows), step):
            r = rows[i : i + step]
            best[r] = box_iou(boxes[r], anchors).amax(dim=1)
    return best


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000, 100_000], help="teacher anchors")
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="repeats of match_anchors (reference runs once)")
    ap.add_argument("--max-pairs", type=int, default=1 << 22, help="IoU matrix entries per reference chunk")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    height, width = 800, 1344
    grid = build_grid(height, width)
    print(f"student grid: {len(grid.anchors)} anchors, sizes {grid.sizes}, strides {grid.strides}; "
          f"radius {args.radius}, 1 thread\n")
    print("| N | with partner | match_anchors (s) | full IoU reference (s) | speed-up | lower IoU than reference |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        teacher = grid.anchors[torch.randperm(len(grid.anchors), generator=gen)[:n]]
        mapped = map_unclipped(teacher, random_similarity(height, width, gen))
        t_win, (partner, iou) = timed(lambda: match_anchors_with_iou(mapped, grid, CANON, args.radius), args.repeat)
        t_ref, best = timed(lambda: full_matrix_reference(mapped, grid, args.max_pairs), 1)
        has = partner >= 0
        worse = (best[has] - iou[has] > 1e-6).sum().item()
        print(f"| {n:,} | {int(has.sum()):,} | {t_win:.3f} | {t_ref:.1f} | {t_ref / t_win:.0f}x | {worse} |", flush=True)


if __name__ == "__main__":
    main()
