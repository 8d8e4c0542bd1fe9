"""COCO-format image sources, validated in full before training starts.

Labeled data is a COCO json plus an image folder; unlabeled data is a COCO json whose
annotations are absent/empty (any present are ignored) or a plain folder of images.
Every problem (malformed entries, duplicate ids, missing/corrupt files, sizes that do
not match the file, bad boxes) is collected as one line naming the json file and the
image/annotation id. Without ``skip_bad`` all lines are logged and one
:class:`DatasetError` is raised; with ``skip_bad`` the bad images/boxes are dropped,
each line is logged, and a summary line is logged. A json that cannot be parsed, or
lacks the ``images``/``categories`` lists, is always an error.

Boxes: COCO ``[x, y, w, h]`` in the json; :class:`ImageRecord` holds ``(n, 4)`` float32
``xyxy`` in original (EXIF-transposed, as displayed) pixels, clipped to the image.

Image decoding and the per-file checks live in :mod:`dtg.data.image_io`; :class:`DatasetError`,
:func:`load_image` and :func:`to_rgb` are re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Image file I/O lives in image_io; its public names are re-exported here.
from dtg.data.image_io import ALPHA_BACKGROUND, DatasetError, load_image, to_rgb  # noqa: F401
from dtg.data.image_io import check_image_files, ImageEntry, file_label, error_reason, show_value

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BOX_TOLERANCE = 1.0  # px a box may extend beyond the image border
_INT64 = 1 << 63
_MAX_SIDE = 1 << 31


@dataclass
class ImageRecord:
    """One image: ``boxes`` (n, 4) float32 xyxy in original pixels, ``category_ids`` (n,) int64 COCO ids."""

    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray


@dataclass
class CocoSource:
    """A validated source: records sorted by image id, categories ``[{"id", "name"}]`` sorted by id.

    ``num_skipped_boxes`` counts invalid annotations dropped under ``skip_bad`` (not the
    annotations of skipped images); ``num_crowd`` counts iscrowd=1 annotations, which are
    kept out of the targets.
    """

    json_path: Path | None
    image_dir: Path
    records: list[ImageRecord]
    categories: list[dict]
    num_skipped_images: int = 0
    num_skipped_boxes: int = 0
    num_crowd: int = 0


# ----------------------------------------------------------------------------- small helpers


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _as_side(v: Any) -> int | None:
    """A positive image side (int or integral float) as int, else None."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    return v if is_int(v) and 0 < v < _MAX_SIDE else None


# ----------------------------------------------------------------------------- json structure


def read_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError, bad path
        raise DatasetError(f"{path}: cannot read a json file ({error_reason(e)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (RecursionError, ValueError) as e:
        raise DatasetError(f"{path}: not valid JSON ({error_reason(e)})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO json (top level is a {type(data).__name__}, expected an object)")
    return data


def json_lists(data: dict, path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, list]:
    """The top-level lists; a missing required key or a non-list is a fatal, one-line error."""
    out, errors = {}, []
    for key in required + optional:
        value = data.get(key)
        if key not in data or (value is None and key in optional):
            if key in required:
                errors.append(f"missing key '{key}'")
            out[key] = []
        elif not isinstance(value, list):
            errors.append(f"'{key}' must be a list, got {type(value).__name__}")
        else:
            out[key] = value
    if errors:
        raise DatasetError(f"{path}: not a valid COCO json: {'; '.join(errors)}")
    return out


def _categories(entries: list, problems: list[str], prefix: str, strict: bool = True) -> list[dict]:
    """Valid ``{"id", "name"}`` categories sorted by id; problems recorded when ``strict``."""
    out: dict[int, dict] = {}
    for i, c in enumerate(entries):
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not is_int(cid):
            msg = f"category #{i}: id {show_value(cid)} is not an integer" if isinstance(c, dict) else f"category #{i}: entry {show_value(c)} is not an object"
        elif cid in out:
            msg = f"category {cid}: duplicate category id"
        elif not isinstance(c.get("name"), str):
            msg = f"category {cid}: name {show_value(c.get('name'))} is not a string"
        else:
            out[cid] = {"id": cid, "name": c["name"]}
            continue
        if strict:
            problems.append(prefix + msg)
    return [out[k] for k in sorted(out)]


def parse_images(entries: list, problems: list[str], prefix: str) -> tuple[dict[int, ImageEntry], set[int], int]:
    """Image entries by id (bad ones with ``ok=False``), all declared ids, and the number of entries."""
    imgs: dict[int, ImageEntry] = {}
    declared: set[int] = set()
    for i, e in enumerate(entries):
        iid = e.get("id") if isinstance(e, dict) else None
        if not isinstance(e, dict):
            problems.append(f"{prefix}image #{i}: entry {show_value(e)} is not an object")
            continue
        if not is_int(iid):
            problems.append(f"{prefix}image #{i}: id {show_value(iid)} is not an integer")
            continue
        fn = e.get("file_name")
        label = f"{prefix}image {iid} ({file_label(fn)})"
        if iid in declared:
            problems.append(f"{label}: duplicate image id (also used by {file_label(imgs[iid].file_name)})")
            imgs[iid].ok = False
            continue
        declared.add(iid)
        img = ImageEntry(iid, fn if isinstance(fn, str) else "", None, None)
        imgs[iid] = img
        if not isinstance(fn, str) or not fn.strip():
            problems.append(f"{label}: file_name {show_value(fn)} is not a non-empty string")
            img.ok = False
            continue
        for key in ("width", "height"):
            if key in e:
                side = _as_side(e[key])
                if side is None:
                    problems.append(f"{label}: {key} {show_value(e[key])} is not a positive integer")
                    img.ok = False
                setattr(img, key, side)
    return imgs, declared, len(entries)


# ----------------------------------------------------------------------------- annotations


def _box(bbox: Any, width: int | None, height: int | None) -> tuple[list[float] | None, str]:
    """COCO xywh -> clipped xyxy, or ``(None, reason)``."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None, f"bbox {show_value(bbox)} is not a list of 4 numbers"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:
        return None, f"box {show_value(bbox)} has non-finite values"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, f"box {show_value(bbox)} has non-finite values"
    if w <= 0 or h <= 0:
        which = "width and height" if w <= 0 and h <= 0 else "width" if w <= 0 else "height"
        return None, f"box {show_value(bbox)} has non-positive {which}"
    if width is None or height is None:
        return [x, y, x + w, y + h], ""
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return None, f"box {show_value(bbox)} lies outside the {width}x{height} image"
    x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if x2 <= x1 or y2 <= y1:
        return None, f"box {show_value(bbox)} has no area inside the {width}x{height} image"
    return [x1, y1, x2, y2], ""


def _annotations(
    entries: list, imgs: dict[int, ImageEntry], declared: set[int], cat_ids: set[int], problems: list[str], prefix: str
) -> tuple[dict[int, list[tuple[list[float], int]]], int, int, int]:
    """Valid (xyxy, category) per image id, plus counts: bad annotations, crowd, on dropped images."""
    out: dict[int, list[tuple[list[float], int]]] = {}
    bad = crowd = orphaned = 0
    for i, a in enumerate(entries):
        if not isinstance(a, dict):
            problems.append(f"{prefix}annotation #{i}: entry {show_value(a)} is not an object")
            bad += 1
            continue
        aid, iid = a.get("id"), a.get("image_id")
        label = f"{prefix}annotation {aid}" if is_int(aid) else f"{prefix}annotation #{i}"
        if not is_int(iid) or iid not in declared:
            problems.append(f"{label}: image_id {show_value(iid)} is not a declared image")
            bad += 1
            continue
        label = f"{label} (image {iid})"
        iscrowd, cid = a.get("iscrowd", 0), a.get("category_id")
        img = imgs[iid]
        if iscrowd not in (0, 1):
            reason = f"iscrowd {show_value(iscrowd)} is not 0 or 1"
        elif iscrowd == 1:
            crowd += 1
            continue
        elif not is_int(cid) or cid not in cat_ids:
            reason = f"category {show_value(cid)} is not declared"
        else:
            box, reason = _box(a.get("bbox"), img.width, img.height)
            if box is not None:
                if img.ok:
                    out.setdefault(iid, []).append((box, cid))
                else:
                    orphaned += 1
                continue
        problems.append(f"{label}: {reason}")
        bad += 1
    return out, bad, crowd, orphaned


# ----------------------------------------------------------------------------- assembling


def finish_load(problems: list[str], src: Path, skip_bad: bool, log: Callable[[str], None], n_imgs: int, n_boxes: int, extra: str = "") -> None:
    """Log every problem; raise one error unless ``skip_bad``, else log the summary."""
    if not problems:
        return
    for line in problems:
        log(line)
    if not skip_bad:
        n = len(problems)
        raise DatasetError(f"{src}: {n} problem{'s' if n != 1 else ''} found (first: {problems[0]}); rerun with --skip-bad to drop them")
    log(f"skipped {n_imgs} images and {n_boxes} boxes from {src}{extra}")


def _records(imgs: dict[int, ImageEntry], image_dir: Path, boxes: dict[int, list[tuple[list[float], int]]]) -> list[ImageRecord]:
    recs = []
    for iid in sorted(i for i, img in imgs.items() if img.ok):
        img, items = imgs[iid], boxes.get(iid, [])
        b = np.asarray([x for x, _ in items], dtype=np.float32).reshape(-1, 4)
        c = np.asarray([k for _, k in items], dtype=np.int64).reshape(-1)
        recs.append(ImageRecord(iid, image_dir / img.file_name, int(img.width or 0), int(img.height or 0), b, c))
    return recs


def _check_dir(image_dir: Path, src: Path, check_files: bool) -> None:
    if check_files and not image_dir.is_dir():
        raise DatasetError(f"{src}: image folder {image_dir} does not exist")


def load_labeled(
    json_path: str | Path,
    image_dir: str | Path,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
    check_files: bool = True,
) -> CocoSource:
    """Load and validate a labeled COCO json; see the module docstring for the rules."""
    src, image_dir = Path(json_path), Path(image_dir)
    parts = json_lists(read_json(src), src, ("images", "categories"), ("annotations",))
    _check_dir(image_dir, src, check_files)
    problems: list[str] = []
    prefix = f"{src}: "
    cats = _categories(parts["categories"], problems, prefix)
    imgs, declared, n_entries = parse_images(parts["images"], problems, prefix)
    check_image_files(imgs, image_dir, problems, prefix, check_files)
    boxes, bad, crowd, orphaned = _annotations(parts["annotations"], imgs, declared, {c["id"] for c in cats}, problems, prefix)
    records = _records(imgs, image_dir, boxes)
    n_skipped = n_entries - len(records)
    extra = f" (plus {orphaned} valid boxes on the skipped images)" if orphaned else ""
    finish_load(problems, src, skip_bad, log, n_skipped, bad, extra)
    if crowd:
        log(f"{src}: {crowd} crowd annotations (iscrowd=1) kept out of the training targets")
    if not cats:
        raise DatasetError(f"{src}: no usable categories")
    if not records:
        raise DatasetError(f"{src}: no usable images")
    return CocoSource(src, image_dir, records, cats, n_skipped, bad, crowd)


def _folder_entries(folder: Path) -> list[dict]:
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    return [{"id": i + 1, "file_name": name} for i, name in enumerate(files)]


def load_unlabeled(
    source: str | Path,
    image_dir: str | Path | None = None,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
    check_files: bool = True,
) -> CocoSource:
    """Load unlabeled images from a COCO json (``image_dir`` required) or a folder (ids 1..N by name).

    Annotations in a json are ignored (a note is logged); records have no boxes.
    Missing width/height are read from the file headers.
    """
    src = Path(source)
    if src.is_dir():
        json_path, image_dir, cats = None, src, []
        entries, check_files = _folder_entries(src), True
        if not entries:
            raise DatasetError(f"{src}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in this folder")
    else:
        if image_dir is None:
            raise DatasetError(f"{src}: an image folder is required with an unlabeled json")
        json_path, image_dir = src, Path(image_dir)
        data = read_json(src)
        parts = json_lists(data, src, ("images",), ("annotations", "categories"))
        _check_dir(image_dir, src, check_files)
        entries, cats = parts["images"], _categories(parts["categories"], [], "", strict=False)
        if parts["annotations"]:
            log(f"{src}: ignoring {len(parts['annotations'])} annotations (used as unlabeled data)")
    problems: list[str] = []
    prefix = f"{src}: "
    imgs, _, n_entries = parse_images(entries, problems, prefix)
    check_image_files(imgs, image_dir, problems, prefix, check_files)
    records = _records(imgs, image_dir, {})
    n_skipped = n_entries - len(records)
    finish_load(problems, src, skip_bad, log, n_skipped, 0)
    if not records:
        raise DatasetError(f"{src}: no usable images")
    return CocoSource(json_path, image_dir, records, cats, n_skipped, 0, 0)
