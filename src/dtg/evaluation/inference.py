"""Run a detector over a COCO source and turn its detections into COCO results."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dtg.data.coco import CocoSource
from dtg.data.dataset import LabelMap, EvalData, collate_list
from dtg.data.transforms import project_boxes
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


@torch.no_grad()
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
) -> list[dict]:
    """COCO results of ``model`` on every image of ``source`` (model put in eval mode)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        EvalData(source, short_edge, max_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_list,
        generator=torch.Generator(),  # leave the global RNG untouched (exact resume of training)
    )
    results: list[dict] = []
    for items in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        dets = model.predict([it["image"].to(device) for it in items])
        for it, det in zip(items, dets):
            back = torch.linalg.inv(it["matrix"])
            results.extend(detections_to_coco(it["image_id"], det, back, it["orig_size"], labels))
    model.train(was_training)
    return results


def evaluate_model(
    model: Detector,
    source: CocoSource,
    labels: LabelMap,
    short_edge: int,
    max_size: int,
    device: torch.device,
    **kwargs,
) -> tuple[dict[str, float], list[dict]]:
    """COCO bbox metrics (fractions, ``AP`` ... ``ARl``) and the results they came from."""
    results = predict_source(model, source, labels, short_edge, max_size, device, **kwargs)
    assert source.json_path is not None, "evaluation needs a COCO json with annotations"
    return evaluate_bbox(source.json_path, results), results
