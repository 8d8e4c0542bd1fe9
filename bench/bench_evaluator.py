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

from dtg.bench.cases import make_dets, make_gt
from dtg.evaluation.coco_eval import BACKENDS, STAT_NAMES, evaluate_bbox


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
