"""Time ``nms_clusters`` against ``torchvision.ops.batched_nms`` alone on random boxes.

    python bench/bench_clustering.py                  # N = 1000, 5000, 20000; 5 repeats
    python bench/bench_clustering.py --repeat 3 --sizes 1000 5000

Two box sets per N, both in a 1333 x 800 image with xyxy boxes and distinct scores:
  * ``uniform``: boxes of side 16..512 (log-uniform) anywhere, 80 classes, IoU 0.5
    (R-CNN-like: few boxes are suppressed);
  * ``dense``: ~40 jittered copies (10% of the side) of each of N / 40 objects, spread over
    5 labels (FPN levels), IoU 0.7 (RPN-like: about half the candidates are suppressed).
Every case first checks that ``keep`` equals batched_nms's. Prints a markdown table: median
wall time of each call (the two interleaved), the ratio of the medians and of the best times,
kept boxes (K) and suppressed candidates (S), the padded candidate x kept pairs the cluster
assignment evaluated, and an estimate of the bytes its largest chunk needed (its extra
memory peak). Runs single-threaded (``torch.set_num_threads(1)``) by default so it does not
disturb other jobs on the machine; ``--threads`` changes that.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torchvision.ops import batched_nms

from dtg.methods.dtg import clusters
from dtg.bench.cases import dense_boxes, interleaved_times, uniform_boxes
from dtg.methods.dtg.clusters import nms_clusters

# Live at the peak of one chunk, per candidate x kept pair: int64 gather index, 4 gathered
# coordinates + area (float32), ~3 float32 temporaries of the IoU, a bool mask (estimate).
BYTES_PER_PAIR = 8 + 20 + 12 + 1


def padded_pairs(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, thr: float) -> tuple[int, int]:
    """(total padded pairs, largest chunk's pairs) that ``nms_clusters`` evaluates."""
    keep = batched_nms(boxes, scores, labels, thr)
    sup = torch.ones(len(boxes), dtype=torch.bool)
    sup[keep] = False
    sup_idx = sup.nonzero().squeeze(1)
    if sup_idx.numel() == 0:
        return 0, 0
    _, lo, hi = clusters._windows(boxes, labels, keep, sup_idx, thr)
    lengths = sorted((hi - lo).tolist())
    chunks = [(sl.stop - sl.start) * w for sl, w in clusters._chunks(lengths, None)]
    return sum(chunks), max(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)

    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), {args.repeat} interleaved runs\n")
    print("| boxes | N | IoU | K | S | batched_nms ms | nms_clusters ms | ratio (median) | ratio (min) "
          "| pairs | max chunk MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, make, thr in [("uniform, 80 cls", uniform_boxes, 0.5), ("dense, 5 lvl", dense_boxes, 0.7)]:
        for n in args.sizes:
            boxes, scores, labels = make(n, g)
            keep, cluster = nms_clusters(boxes, scores, labels, thr)
            assert torch.equal(keep, batched_nms(boxes, scores, labels, thr))
            t_nms, t_cl = interleaved_times([lambda: batched_nms(boxes, scores, labels, thr),
                                             lambda: nms_clusters(boxes, scores, labels, thr)], args.repeat)
            med_nms, med_cl = statistics.median(t_nms), statistics.median(t_cl)
            pairs, biggest = padded_pairs(boxes, scores, labels, thr)
            print(f"| {name} | {n} | {thr} | {keep.numel()} | {n - keep.numel()} | {med_nms * 1e3:.2f} | "
                  f"{med_cl * 1e3:.2f} | {med_cl / med_nms:.2f}x | {min(t_cl) / min(t_nms):.2f}x | {pairs} | "
                  f"{biggest * BYTES_PER_PAIR / 2**20:.1f} |")


if __name__ == "__main__":
    main()
