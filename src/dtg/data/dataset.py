"""torch Datasets over validated COCO sources: training items keyed by sampler keys, and test views.

A training batch is a dict keyed by branch, in mmdetection's habit:
``{"sup": [...], "unsup": [...]}``. A ``sup`` item holds one labeled view and its
targets; an ``unsup`` item holds the weak (teacher) and strong (student) views
of one unlabeled image with their 3x3 matrices, so that
``M = H_s @ inv(H_t)`` maps teacher boxes to student boxes.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from dtg.config import DataConfig, ViewConfig
from dtg.data.coco import CocoSource, DatasetError, ImageRecord, load_image, load_labeled, load_unlabeled
from dtg.data.sampler import LABELED, MixedBatchSampler, SampleKey
from dtg.geometry import project_boxes, valid_boxes
from dtg.data.augment import make_view, test_view


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
        unlabeled_boxes: bool = False,
    ) -> None:
        self.labeled, self.unlabeled, self.labels = labeled, unlabeled, labels
        self.labeled_view, self.weak_view, self.strong_view = labeled_view, weak_view, strong_view
        self.unlabeled_boxes = unlabeled_boxes  # unsup items carry their ground truth (method=oracle)

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
        item = {
            "branch": "unsup",
            "image_id": rec.id,
            "weak": weak.image,
            "weak_matrix": weak.matrix,
            "strong": strong.image,
            "strong_matrix": strong.matrix,
        }
        if self.unlabeled_boxes:  # original pixels; the oracle maps them into the strong view
            item["gt_boxes"], item["gt_labels"] = record_targets(rec, self.labels)
        return item


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


# ----------------------------------------------------------------------------- what a run reads


@dataclass
class Sources:
    """The validated COCO sources of a run and its label map (``unlabeled`` / ``val`` may be absent)."""

    labeled: CocoSource
    unlabeled: CocoSource | None
    val: CocoSource | None
    labels: LabelMap
    unlabeled_boxes: bool = False  # the unlabeled records carry their ground truth (method=oracle)

    def summary(self) -> str:
        n = lambda s: len(s.records) if s is not None else 0  # noqa: E731
        return (f"data: {n(self.labeled)} labeled, {n(self.unlabeled)} unlabeled, {n(self.val)} val images; "
                f"{self.labels.num_classes} classes")


def load_sources(d: DataConfig, with_unlabeled: bool, log: Callable[[str], None],
                 unlabeled_boxes: bool = False) -> Sources:
    """Validate and load the labeled, unlabeled (when ``with_unlabeled``) and val sources of ``d``.

    With ``unlabeled_boxes`` the unlabeled records carry their ground truth from ``d.full_json``
    (:func:`with_boxes_from`).
    """
    kw = {"skip_bad": d.skip_bad, "log": log}
    labeled = load_labeled(d.train_json, d.train_images, **kw)
    unlabeled = load_unlabeled(d.unlabeled, d.unlabeled_images, **kw) if with_unlabeled else None
    if unlabeled is not None and unlabeled_boxes:
        unlabeled = with_boxes_from(unlabeled, d.full_json, labeled.categories, log)
    val = load_labeled(d.val_json, d.val_images, **kw) if d.val_json else None
    return Sources(labeled, unlabeled, val, LabelMap(labeled.categories), unlabeled is not None and unlabeled_boxes)


def with_boxes_from(unlabeled: CocoSource, full_json: str, categories: list[dict],
                    log: Callable[[str], None]) -> CocoSource:
    """``unlabeled`` with every record's boxes taken from ``full_json`` (same image id and file).

    Raises:
        DatasetError: (one line) ``full_json`` is not given, its categories differ from the labeled
            json's, it lacks some of the unlabeled images, or it holds no box on any of them.
    """
    if not full_json:
        raise DatasetError("config key 'data.full_json' is empty: the oracle needs the unlabeled images' boxes "
                           "(a COCO json of every train image with its annotations)")
    full = load_labeled(full_json, unlabeled.image_dir, log=log)
    if [c["id"] for c in full.categories] != [c["id"] for c in categories]:
        raise DatasetError(f"{full_json}: categories {[c['id'] for c in full.categories]} differ from the labeled "
                           f"json's {[c['id'] for c in categories]}")
    by_key = {(r.id, r.path): r for r in full.records}
    missing = [r for r in unlabeled.records if (r.id, r.path) not in by_key]
    if missing:
        src = unlabeled.json_path or unlabeled.image_dir
        raise DatasetError(f"{full_json}: holds no entry for {len(missing)} of the {len(unlabeled.records)} unlabeled "
                           f"images of {src} (e.g. image {missing[0].id}, {missing[0].path.name}); the oracle needs "
                           f"the boxes of every unlabeled image")
    records = [by_key[(r.id, r.path)] for r in unlabeled.records]
    if not any(len(r.boxes) for r in records):
        raise DatasetError(f"{full_json}: holds no box on any unlabeled image; the oracle needs their boxes")
    return dataclasses.replace(unlabeled, records=records)


def train_loader(src: Sources, d: DataConfig, n_unlabeled: int, seed: int, rank: int, world_size: int,
                 start_batch: int) -> DataLoader:
    """The infinite training loader: ``d.batch_labeled`` + ``n_unlabeled`` items per batch from batch ``start_batch``."""
    sampler = MixedBatchSampler(
        len(src.labeled.records), len(src.unlabeled.records) if src.unlabeled else 0,
        d.batch_labeled, n_unlabeled, seed=seed, rank=rank, world_size=world_size, start_batch=start_batch,
    )
    data = TrainData(src.labeled, src.unlabeled, src.labels, d.labeled_view, d.weak_view, d.strong_view,
                     src.unlabeled_boxes)
    workers = d.num_workers
    return DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: creating the loader must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
