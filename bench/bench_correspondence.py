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
import time

import torch
from torchvision.ops import box_iou

from dtg.bench.cases import CANON, build_grid, map_unclipped, random_similarity
from dtg.methods.dtg.correspondence import AnchorGrid, fpn_level, match_anchors_with_iou



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
