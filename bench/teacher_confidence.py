"""How sure is a checkpoint's teacher? Detections per image above score thresholds and their precision.

    python bench/teacher_confidence.py runs/embedded/supervised/checkpoints/last.pth [--images 100]

Runs the teacher (or ``--model student``) on the first N val images of the checkpoint's
config at the test size and prints, for each score threshold, the detections per image
and the share of them that hit an unmatched ground-truth box of the same class with
IoU >= 0.5 (greedy by score, as COCO does). This is what the pseudo-label threshold of
``sparse`` and the candidate thresholds of ``dtg`` see.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchvision.ops import box_iou

from dtg.data.coco import load_labeled
from dtg.data.dataset import LabelMap, record_targets
from dtg.data.image_io import load_image
from dtg.data.augment import test_view
from dtg.engine.checkpoint import load_checkpoint, model_from_checkpoint

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--model", default="teacher", choices=["teacher", "student"])
    p.add_argument("--images", type=int, default=100, help="first N val images (default 100)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg, model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.model, args.checkpoint)
    model.eval()
    source = load_labeled(cfg.data.val_json, cfg.data.val_images)
    labels_of = LabelMap(source.categories)
    records = source.records[: args.images]
    hits = {t: 0 for t in THRESHOLDS}
    dets = {t: 0 for t in THRESHOLDS}
    objects = 0
    for rec in records:
        img = load_image(rec.path)
        view = test_view(img, cfg.data.test_size, cfg.data.test_max_size)
        with torch.no_grad():
            det = model.predict([view.image])[0]
        scale = img.width / view.image.shape[-1]
        gt, gl = record_targets(rec, labels_of)  # (n, 4) xyxy original pixels, (n,) labels 1..K
        objects += len(gt)
        for t in THRESHOLDS:
            keep = det["scores"] >= t
            boxes, labels = det["boxes"][keep] * scale, det["labels"][keep]
            dets[t] += len(boxes)
            used = torch.zeros(len(gt), dtype=torch.bool)
            iou = box_iou(boxes, gt) if len(gt) and len(boxes) else torch.zeros(len(boxes), len(gt))
            for i in range(len(boxes)):  # greedy by score (predict sorts by score within classes)
                ok = (iou[i] >= 0.5) & (gl == labels[i]) & ~used
                if ok.any():
                    used[int(torch.nonzero(ok)[0])] = True
                    hits[t] += 1
    n = max(len(records), 1)
    print(f"{args.model} of {args.checkpoint}: {len(records)} val images, {objects / n:.2f} objects per image")
    print("| score >= | detections / image | precision (IoU 0.5, same class) |")
    print("|---:|---:|---:|")
    for t in THRESHOLDS:
        print(f"| {t:g} | {dets[t] / n:.2f} | {hits[t] / max(dets[t], 1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
