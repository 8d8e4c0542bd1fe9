"""torch Datasets over validated COCO sources: training items keyed by sampler keys, and test views.

A training batch is a dict keyed by branch, in mmdetection's habit:
``{"sup": [...], "unsup": [...]}``. A ``sup`` item holds one labeled view and its
targets; an ``unsup`` item holds the weak (teacher) and strong (student) views
of one unlabeled image with their 3x3 matrices, so that
``M = H_s @ inv(H_t)`` maps teacher boxes to student boxes.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import Dataset

from dtg.config import ViewConfig
from dtg.data.coco import CocoSource, ImageRecord, load_image
from dtg.data.sampler import LABELED, SampleKey
from dtg.data.transforms import make_view, project_boxes, test_view, valid_boxes


class LabelMap:
    """COCO category ids <-> contiguous labels 1..K (0 is background)."""

    def __init__(self, categories: list[dict]) -> None:
        self.categories = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in categories), key=lambda c: c["id"])
        self.to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.to_category = {i + 1: c["id"] for i, c in enumerate(self.categories)}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def names(self) -> list[str]:
        return [c["name"] for c in self.categories]


def record_targets(record: ImageRecord, labels: LabelMap) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (n, 4) float32 xyxy in original pixels and labels (n,) int64 in 1..K of one record."""
    boxes = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    cls = torch.as_tensor([labels.to_label[int(c)] for c in record.category_ids], dtype=torch.int64)
    return boxes, cls


class TrainData(Dataset):
    """Items for :class:`~dtg.data.sampler.MixedBatchSampler` keys; augmentation seeded by the key."""

    def __init__(
        self,
        labeled: CocoSource,
        unlabeled: CocoSource | None,
        labels: LabelMap,
        labeled_view: ViewConfig,
        weak_view: ViewConfig,
        strong_view: ViewConfig,
    ) -> None:
        self.labeled, self.unlabeled, self.labels = labeled, unlabeled, labels
        self.labeled_view, self.weak_view, self.strong_view = labeled_view, weak_view, strong_view

    def __len__(self) -> int:  # informative only; items are addressed by SampleKey
        return len(self.labeled.records) + (len(self.unlabeled.records) if self.unlabeled else 0)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        rng = random.Random(key.seed)
        if key.source == LABELED:
            return self._labeled_item(self.labeled.records[key.index], rng)
        assert self.unlabeled is not None
        return self._unlabeled_item(self.unlabeled.records[key.index], rng)

    def _labeled_item(self, rec: ImageRecord, rng: random.Random) -> dict[str, Any]:
        view = make_view(load_image(rec.path), rng, self.labeled_view)
        boxes, cls = record_targets(rec, self.labels)
        boxes = project_boxes(boxes, view.matrix, view.size)
        keep = valid_boxes(boxes)
        return {
            "branch": "sup",
            "image_id": rec.id,
            "image": view.image,
            "matrix": view.matrix,
            "boxes": boxes[keep],
            "labels": cls[keep],
        }

    def _unlabeled_item(self, rec: ImageRecord, rng: random.Random) -> dict[str, Any]:
        img = load_image(rec.path)
        weak = make_view(img, rng, self.weak_view)
        strong = make_view(img, rng, self.strong_view)
        return {
            "branch": "unsup",
            "image_id": rec.id,
            "weak": weak.image,
            "weak_matrix": weak.matrix,
            "strong": strong.image,
            "strong_matrix": strong.matrix,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group a batch's items by branch: ``{"sup": [...], "unsup": [...]}``."""
    out: dict[str, list[dict[str, Any]]] = {"sup": [], "unsup": []}
    for item in items:
        out[item["branch"]].append(item)
    return out


class EvalData(Dataset):
    """Deterministic test views of a source, with the matrix back to original pixels."""

    def __init__(self, source: CocoSource, short_edge: int, max_size: int) -> None:
        self.source, self.short_edge, self.max_size = source, short_edge, max_size

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.source.records[i]
        view = test_view(load_image(rec.path), self.short_edge, self.max_size)
        return {"image_id": rec.id, "image": view.image, "matrix": view.matrix, "orig_size": (rec.height, rec.width)}


def collate_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items
