"""Time the COCO bbox evaluation backends on N images x D detections and check they agree.

    python bench/bench_evaluator.py              # N=5000, D=100
    python bench/bench_evaluator.py --images 500

Prints a markdown table: wall time of one ``evaluate_bbox`` call per backend (best of
``--repeat``), AP, and the largest difference from pycocotools over the 12 stats.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dtg.evaluation.coco_eval import BACKENDS, STAT_NAMES, evaluate_bbox


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--cats", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    gt = make_gt(args.images, args.cats, rng)
    dets = make_dets(gt, args.dets, args.cats, rng)
    results: dict[str, tuple[float, dict[str, float]]] = {}
    for backend in BACKENDS:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            stats = evaluate_bbox(gt, dets, backend=backend)
            best = min(best, time.perf_counter() - t0)
        results[backend] = (best, stats)
    ref_time, ref = results["pycocotools"]
    print(f"{args.images} images, {len(gt['annotations'])} GT boxes, {len(dets)} detections, {args.cats} categories\n")
    print("| backend | time (s) | speed-up | AP | max abs diff vs pycocotools (12 stats) |")
    print("|---|---:|---:|---:|---:|")
    for backend, (t, stats) in results.items():
        diff = max(abs(stats[n] - ref[n]) for n in STAT_NAMES)
        print(f"| {backend} | {t:.2f} | {ref_time / t:.1f}x | {100 * stats['AP']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
