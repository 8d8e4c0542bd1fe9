"""Run a detector over a COCO source (sharded over torchrun ranks) and turn its detections into COCO results."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dtg.data.coco import CocoSource
from dtg.data.dataset import LabelMap, EvalData, collate_list
from dtg.geometry import project_boxes
from dtg.dist import DistInfo, broadcast_from_main, gather_to_main
from dtg.evaluation.coco_eval import evaluate_bbox
from dtg.models.detector import Detector


def detections_to_coco(
    image_id: int, det: dict[str, torch.Tensor], to_original: torch.Tensor, orig_size: tuple[int, int], labels: LabelMap
) -> list[dict]:
    """One image's detections in view pixels -> COCO results in original pixels.

    Args:
        det: ``boxes`` (n, 4) xyxy in the view, ``scores`` (n,), ``labels`` (n,) in 1..K.
        to_original: (3, 3) matrix from the view back to the original image.
        orig_size: (H, W) of the original image.
    """
    boxes = project_boxes(det["boxes"].float().cpu(), to_original, orig_size)
    out = []
    for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": labels.to_category[int(c)],
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(s), 5),
            }
        )
    return out


def shard_batches(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Rank ``rank``'s share of the evaluation batches: batch ``b`` holds images ``[b*bs, (b+1)*bs)``.

    Whole batches (not single images) are dealt round-robin, so every image is
    predicted in the same batch, with the same padding, as in a one-process
    evaluation: sharded results are those of one process, in any world size.
    """
    batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def predict_batches(
    model: Detector,
    source: CocoSource,
    labels: LabelMap,
    short_edge: int,
    max_size: int,
    device: torch.device,
    batches: list[list[int]],
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
) -> list[tuple[int, list[dict]]]:
    """``(record index, COCO results)`` of every image in ``batches`` (model put in eval mode)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        EvalData(source, short_edge, max_size),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_list,
        generator=torch.Generator(),  # leave the global RNG untouched (exact resume of training)
    )
    out: list[tuple[int, list[dict]]] = []
    flat = [i for b in batches for i in b]
    for items in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        dets = model.predict([it["image"].to(device) for it in items])
        for it, det in zip(items, dets):
            back = torch.linalg.inv(it["matrix"])
            out.append((flat[len(out)], detections_to_coco(it["image_id"], det, back, it["orig_size"], labels)))
    model.train(was_training)
    return out


def predict_source(
    model: Detector,
    source: CocoSource,
    labels: LabelMap,
    short_edge: int,
    max_size: int,
    device: torch.device,
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
    dist: DistInfo = DistInfo(),
) -> list[dict]:
    """COCO results of ``model`` on every image of ``source``, in record order.

    Under torchrun (``dist.enabled``) each rank predicts its :func:`shard_batches`
    and the results are gathered on rank 0; other ranks get ``[]``.
    """
    batches = shard_batches(len(source.records), batch_size, dist.rank, dist.world_size)
    mine = predict_batches(model, source, labels, short_edge, max_size, device, batches, num_workers, progress, desc)
    shards = gather_to_main(dist, mine)
    if shards is None:
        return []
    return [r for _, results in sorted((p for s in shards for p in s), key=lambda p: p[0]) for r in results]


def evaluate_model(
    model: Detector,
    source: CocoSource,
    labels: LabelMap,
    short_edge: int,
    max_size: int,
    device: torch.device,
    dist: DistInfo = DistInfo(),
    **kwargs,
) -> tuple[dict[str, float], list[dict]]:
    """COCO bbox metrics (fractions, ``AP`` ... ``ARl``) and the results they came from.

    Under torchrun: sharded prediction, COCO evaluation on rank 0, metrics sent to
    every rank; the results list is complete on rank 0 and empty elsewhere.
    """
    assert source.json_path is not None, "evaluation needs a COCO json with annotations"
    results = predict_source(model, source, labels, short_edge, max_size, device, dist=dist, **kwargs)
    metrics = evaluate_bbox(source.json_path, results) if dist.is_main else None
    return broadcast_from_main(dist, metrics), results
