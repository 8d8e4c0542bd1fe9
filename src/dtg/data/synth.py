"""Deterministic synthetic COCO-format detection dataset (the embedded default).

Each image is a textured or photographic background with 2-6 shapes from
:data:`CLASS_NAMES` (classes differ by shape only; colour is random), distractor
clutter that belongs to no class, random rotation, log-uniform sizes and occlusion.
Image ``index`` of split ``code`` is rendered from ``numpy.random.default_rng([seed,
code, index])`` alone, so files are byte-identical from run to run.

This module holds :data:`VERSION`, :class:`SynthPaths`, :func:`num_labeled`,
:func:`tune_split`, :func:`content_fingerprint`, :func:`generate` and the file writing; the drawing (and the box conventions) lives in
:mod:`dtg.data.synth_draw`, whose public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtg.fingerprint import tree_fingerprint

from dtg.data.synth_draw import (  # noqa: F401  (re-exported)
    CLASS_NAMES,
    MAX_HIDDEN,
    PHOTO_NAMES,
    PHOTO_PROB,
    SHAPES,
    Layer,
    Poly,
    annotate,
    background,
    render_image,
    shape_mask,
)

VERSION = "1"
MARKER = "synth_config.json"  # written last: generator version, config and content fingerprint



def _dataset(name: str, **synth: Any) -> list[str]:
    """``--set`` overrides that generate dataset ``name`` under data/NAME and point every data path at it."""
    root = f"data/{name}"
    keys = [f"synth.out_dir={root}"] + [f"synth.{k}={json.dumps(v)}" for k, v in synth.items()]
    return keys + [f"data.train_json={root}/annotations/train_labeled.json", f"data.train_images={root}/images/train",
                   f"data.unlabeled={root}/annotations/train_unlabeled.json",
                   f"data.unlabeled_images={root}/images/train", f"data.val_json={root}/annotations/val.json",
                   f"data.val_images={root}/images/val", f"data.full_json={root}/annotations/train_full.json"]


# Generated datasets by name (``dtg bench reproduce --dataset NAME``): overrides applied before
# any other. ``shapes2`` is made differently from the embedded set and never tuned on: the
# other five shapes, mostly photo and pattern backgrounds, clutter, rotation, smaller objects,
# another seed.
DATASETS: dict[str, list[str]] = {
    "embedded": [],
    "shapes2": _dataset("shapes2", first_class=5, num_classes=5, flat_prob=0.3, photo_prob=0.5, rotation=30.0,
                        object_size=[14, 56], image_size=[144, 176], distractors_per_image=[0, 2], seed=11),
}
TUNE_VAL_MAX = 200  # images held out of the unlabeled split for choosing defaults (at most a quarter of it)


# ----------------------------------------------------------------------------- dataset


@dataclass
class SynthPaths:
    """Where :func:`generate` wrote the dataset (image folders and COCO jsons)."""

    root: Path
    train_images: Path
    val_images: Path
    train_labeled: Path
    train_unlabeled: Path
    train_full: Path
    val: Path
    # The tuning split (docs/method.md, "Splits"): defaults are chosen on tune_val, a held-out
    # part of the train images, never on val. tune_unlabeled is train_unlabeled without it,
    # tune_full the labeled images plus tune_unlabeled with their boxes (the ceiling).
    tune_val: Path
    tune_unlabeled: Path
    tune_full: Path

    @classmethod
    def under(cls, root: Path) -> SynthPaths:
        ann = root / "annotations"
        return cls(root, root / "images" / "train", root / "images" / "val", ann / "train_labeled.json",
                   ann / "train_unlabeled.json", ann / "train_full.json", ann / "val.json",
                   ann / "tune_val.json", ann / "tune_unlabeled.json", ann / "tune_full.json")  # fmt: skip


def _fingerprint(cfg: Any) -> dict:
    """What determines the files: generator version and config (``out_dir`` excluded)."""
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
    return {"version": VERSION, "config": conf}


def content_fingerprint(root: Path) -> str:
    """16 hex digits of sha256 over every json and PNG under ``root`` (names and bytes), the marker excluded."""
    return tree_fingerprint(Path(root), (".json", ".png"), exclude=(MARKER,))


def read_marker(root: Path) -> dict | None:
    """The marker :func:`generate` wrote last under ``root`` (version, config, content), or None."""
    try:
        data = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tune_split(unlabeled_ids: list[int], seed: int) -> tuple[list[int], list[int]]:
    """(held-out ids, remaining ids) of the unlabeled train images, for choosing defaults.

    The held-out part is the first ``min(TUNE_VAL_MAX, n // 4)`` ids of
    ``default_rng([seed, 3]).permutation(sorted ids)``; both lists are sorted.
    """
    ids = sorted(unlabeled_ids)
    n = min(TUNE_VAL_MAX, len(ids) // 4)
    perm = np.random.default_rng([seed, 3]).permutation(len(ids))
    held = {ids[i] for i in perm[:n].tolist()}
    return sorted(held), [i for i in ids if i not in held]


def num_labeled(num_train: int, labeled_percent: float) -> int:
    """Size of the labeled split: ``labeled_percent`` % of ``num_train`` rounded half up, >= 1."""
    return min(num_train, max(1, int(np.floor(num_train * labeled_percent / 100.0 + 0.5))))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def _render_split(
    cfg: Any, code: int, first_id: int, count: int, folder: Path, progress: bool
) -> tuple[list[dict], list[dict]]:
    """Render ``count`` images of split ``code`` into ``folder``; return (COCO images, annotations)."""
    from tqdm import tqdm

    images, anns = [], []
    for index in tqdm(range(count), desc=f"synth {folder.name}", disable=not progress, leave=False):
        img, objects = render_image(np.random.default_rng([cfg.seed, code, index]), cfg)
        image_id = first_id + index
        name = f"{image_id:06d}.png"
        img.save(folder / name, format="PNG")
        images.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
        for obj in objects:
            anns.append({"image_id": image_id, "iscrowd": 0, **obj})
    return images, anns


def _is_complete(paths: SynthPaths, fingerprint: dict) -> bool:
    """Whether the marker names this version and config, and the files still hash to its content fingerprint."""
    marker = read_marker(paths.root)
    if marker is None or {k: marker.get(k) for k in fingerprint} != fingerprint or "content" not in marker:
        return False
    return content_fingerprint(paths.root) == marker["content"]


def _check(cfg: Any) -> None:
    """One-line errors for synth settings the generator cannot honour."""
    from dtg.config import ConfigError

    if not 1 <= cfg.num_classes <= len(CLASS_NAMES):
        raise ConfigError(f"config key 'synth.num_classes': {cfg.num_classes} is not in 1..{len(CLASS_NAMES)}")
    if not 0 <= cfg.first_class <= len(CLASS_NAMES) - cfg.num_classes:
        raise ConfigError(f"config key 'synth.first_class': {cfg.first_class} is not in "
                          f"0..{len(CLASS_NAMES) - cfg.num_classes} (with synth.num_classes {cfg.num_classes})")
    for key in ("flat_prob", "photo_prob", "low_contrast_prob"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"config key 'synth.{key}': {getattr(cfg, key)} is not a probability in [0, 1]")
    if not 0.0 <= cfg.rotation <= 180.0:
        raise ConfigError(f"config key 'synth.rotation': {cfg.rotation} is not in [0, 180] degrees")


def generate(cfg: Any, progress: bool = True) -> SynthPaths:
    """Write the dataset under ``cfg.out_dir`` (a :class:`dtg.config.SynthConfig`); return its paths.

    Skips the work when ``out_dir`` already holds the dataset of the same generator version
    and config whose files still hash to the content fingerprint recorded with them
    (:data:`MARKER`, written last); otherwise (re)generates it. Train image ids are
    1..num_train, val ids follow; the labeled split is a seeded choice of train ids, the
    tuning split a seeded choice of the unlabeled ones (:func:`tune_split`).
    """
    _check(cfg)
    root = Path(cfg.out_dir)
    paths = SynthPaths.under(root)
    marker, fingerprint = root / MARKER, _fingerprint(cfg)
    if _is_complete(paths, fingerprint):
        return paths
    marker.unlink(missing_ok=True)
    for d in (root / "images", root / "annotations"):
        shutil.rmtree(d, ignore_errors=True)
    for d in (paths.train_images, paths.val_images, paths.val.parent):
        d.mkdir(parents=True, exist_ok=True)

    train_imgs, train_anns = _render_split(cfg, 0, 1, cfg.num_train, paths.train_images, progress)
    val_imgs, val_anns = _render_split(cfg, 1, cfg.num_train + 1, cfg.num_val, paths.val_images, progress)
    for i, ann in enumerate(train_anns + val_anns, 1):
        ann["id"] = i
    names = CLASS_NAMES[cfg.first_class : cfg.first_class + cfg.num_classes]
    cats = [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(names, 1)]
    info = {"description": "dtg synthetic shapes", **fingerprint}

    def coco(images: list, anns: list) -> dict:
        ids = {im["id"] for im in images}
        return {"info": info, "images": images, "annotations": [a for a in anns if a["image_id"] in ids],
                "categories": cats}  # fmt: skip

    perm = np.random.default_rng([cfg.seed, 2]).permutation(cfg.num_train) + 1
    labeled = set(perm[: num_labeled(cfg.num_train, cfg.labeled_percent)].tolist())
    _write_json(paths.train_full, coco(train_imgs, train_anns))
    _write_json(paths.train_labeled, coco([im for im in train_imgs if im["id"] in labeled], train_anns))
    _write_json(paths.train_unlabeled, coco([im for im in train_imgs if im["id"] not in labeled], []))
    _write_json(paths.val, coco(val_imgs, val_anns))
    held, rest = tune_split([im["id"] for im in train_imgs if im["id"] not in labeled], cfg.seed)
    held_set, rest_set = set(held), set(rest)
    _write_json(paths.tune_val, coco([im for im in train_imgs if im["id"] in held_set], train_anns))
    _write_json(paths.tune_unlabeled, coco([im for im in train_imgs if im["id"] in rest_set], []))
    _write_json(paths.tune_full, coco([im for im in train_imgs if im["id"] not in held_set], train_anns))
    _write_json(marker, {**fingerprint, "content": content_fingerprint(root)})
    return paths
