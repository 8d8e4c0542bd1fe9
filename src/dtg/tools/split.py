"""``dtg split coco``: the COCO partial-label protocol (docs/method.md, "Splits").

For each ``percent`` and ``fold`` (1..F) a labeled json holds ``floor(N * percent / 100)``
(at least 1) of the N images of the input json, with their annotations, and an unlabeled
json holds every other image (its ``annotations`` list empty). Files are named like the
SoftTeacher / mmdetection semi-supervised splits::

    {stem}.{fold}@{percent}.json             labeled
    {stem}.{fold}@{percent}-unlabeled.json   unlabeled

e.g. ``instances_train2017.1@10.json``. The sample is keyed by image id: image ``i`` is
ranked by ``sha256("dtg-coco-split/fold{fold}/{i}")`` and the lowest ranks are labeled, so
the split depends only on the fold (the fixed seed) and the set of image ids — not on the
order of the input, the Python version or the platform. Because the ranking is per fold,
the labeled sets of one fold are nested (1 % within 2 % within 5 % ...), as with the
``seed = fold`` permutation of the SoftTeacher script. The json is written with sorted keys,
images sorted by id and annotations by (image id, annotation id), so every run gives the
same bytes. ``dtg split voc`` lives in :mod:`dtg.tools.voc`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from dtg.config import ConfigError
from dtg.data.coco import DatasetError, is_int, json_lists, read_json, show_value
from dtg.tools.files import Staged, json_bytes

SALT = "dtg-coco-split"


def split_names(stem: str, fold: int, percent: float) -> tuple[str, str]:
    """File names of the labeled and unlabeled json of one split."""
    tag = f"{stem}.{fold}@{percent:g}"
    return f"{tag}.json", f"{tag}-unlabeled.json"


def num_labeled(num_images: int, percent: float) -> int:
    """``floor(N * percent / 100)``, at least 1 (exact: the percent is taken as written, e.g. 0.1)."""
    return max(1, int(num_images * Fraction(repr(float(percent))) / 100))


def rank_key(fold: int, image_id: int) -> bytes:
    """The sort key of an image in fold ``fold`` (lowest keys are labeled)."""
    return hashlib.sha256(f"{SALT}/fold{fold}/{image_id}".encode()).digest()


def fold_ranking(image_ids: list[int], fold: int) -> list[int]:
    """The image ids of fold ``fold`` in labeling order (the first ``num_labeled`` are labeled)."""
    return sorted(image_ids, key=lambda i: (rank_key(fold, i), i))


def labeled_ids(image_ids: list[int], percent: float, fold: int) -> list[int]:
    """The sorted labeled image ids of one split."""
    return sorted(fold_ranking(image_ids, fold)[: num_labeled(len(image_ids), percent)])


def _check_inputs(percents: list[float], folds: int) -> list[float]:
    if folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {folds}")
    bad = [p for p in percents if not 0 < p < 100]
    if bad:
        raise ConfigError(f"--percent must be in (0, 100), got {bad[0]:g}")
    return sorted({float(p) for p in percents})


def read_coco(path: Path) -> tuple[dict[str, Any], dict[int, dict], dict[int, list[dict]]]:
    """The top level of a COCO json, its images by id and its annotations by image id.

    Raises one :class:`DatasetError` naming the file and the first problem (entries that are
    not objects, ids that are not integers or repeat, annotations of undeclared images).
    """
    data = read_json(path)
    parts = json_lists(data, path, ("images",), ("annotations",))
    problems: list[str] = []
    images: dict[int, dict] = {}
    for i, e in enumerate(parts["images"]):
        iid = e.get("id") if isinstance(e, dict) else None
        if not isinstance(e, dict):
            problems.append(f"image #{i}: entry {show_value(e)} is not an object")
        elif not is_int(iid):
            problems.append(f"image #{i}: id {show_value(iid)} is not an integer")
        elif iid in images:
            problems.append(f"image {iid}: duplicate image id")
        else:
            images[iid] = e
    anns: dict[int, list[dict]] = {}
    for i, a in enumerate(parts["annotations"]):
        iid = a.get("image_id") if isinstance(a, dict) else None
        if not isinstance(a, dict):
            problems.append(f"annotation #{i}: entry {show_value(a)} is not an object")
        elif not is_int(iid) or iid not in images:
            problems.append(f"annotation #{i}: image_id {show_value(iid)} is not a declared image")
        else:
            anns.setdefault(iid, []).append(a)
    if problems:
        n = len(problems)
        raise DatasetError(f"{path}: {n} problem{'s' * (n != 1)} found (first: {problems[0]})")
    for lst in anns.values():  # stable: annotations without an integer id keep their input order
        lst.sort(key=lambda a: a["id"] if is_int(a.get("id")) else float("inf"))
    return data, images, anns


def subset(data: dict[str, Any], images: dict[int, dict], anns: dict[int, list[dict]], ids: list[int], with_annotations: bool) -> dict[str, Any]:
    """A copy of the top level with only the images ``ids`` (sorted) and, if asked, their annotations."""
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    out["images"] = [images[i] for i in ids]
    out["annotations"] = [a for i in ids for a in anns.get(i, [])] if with_annotations else []
    return out


def split_coco(ann: str | Path, percents: list[float], folds: int, out: str | Path, log: Any = print) -> list[tuple[Path, Path]]:
    """Write every (fold, percent) split of ``ann`` into ``out``; returns the (labeled, unlabeled) paths.

    Nothing is written unless the input is valid and every split has at least one labeled
    and one unlabeled image; files appear in ``out`` only once all of them are complete.
    """
    percents = _check_inputs(percents, folds)
    src = Path(ann)
    data, images, anns = read_coco(src)
    all_ids = sorted(images)
    if len(all_ids) < 2:
        raise DatasetError(f"{src}: {len(all_ids)} image(s); a split needs at least 2")
    # with N >= 2 and 0 < percent < 100, 1 <= floor(N * percent / 100) <= N - 1: both sides non-empty
    stem = src.name[:-5] if src.name.endswith(".json") else src.name
    written: list[tuple[Path, Path]] = []
    with Staged(out) as st:
        for fold in range(1, folds + 1):
            ranked = fold_ranking(all_ids, fold)
            for p in percents:
                lab = sorted(ranked[: num_labeled(len(all_ids), p)])
                lab_set = set(lab)
                unl = [i for i in all_ids if i not in lab_set]
                lab_name, unl_name = split_names(stem, fold, p)
                labeled = subset(data, images, anns, lab, True)
                st.path(lab_name).write_bytes(json_bytes(labeled))
                st.path(unl_name).write_bytes(json_bytes(subset(data, images, anns, unl, False)))
                log(f"fold {fold} @ {p:g} %: {len(lab)} labeled images ({len(labeled['annotations'])} annotations) "
                    f"-> {lab_name}; {len(unl)} unlabeled -> {unl_name}")
                written.append((st.out_dir / lab_name, st.out_dir / unl_name))
    return written


def cmd_split_coco(args: argparse.Namespace) -> int:
    written = split_coco(args.ann, args.percent, args.folds, args.out, log=lambda m: print(m, file=sys.stderr))
    print(f"{len(written)} splits (labeled + unlabeled json each) in {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dtg split`` with its ``coco`` and ``voc`` subcommands."""
    from dtg.tools import voc

    p = subparsers.add_parser("split", help="make semi-supervised splits: COCO partial labels, VOC07/12 as COCO json")
    sub = p.add_subparsers(dest="split_kind", required=True, metavar="KIND")
    c = sub.add_parser(
        "coco", help="labeled/unlabeled COCO json per percent and fold (docs/method.md, section Splits)",
        description="Labeled and unlabeled COCO json for each percent and fold, keyed by image id, "
        "byte-identical on every run: OUT/{stem}.{fold}@{percent}.json and OUT/{stem}.{fold}@{percent}-unlabeled.json.",
    )
    c.add_argument("--ann", required=True, help="COCO json of the full training set, e.g. instances_train2017.json")
    c.add_argument("--percent", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0], help="labeled percents (default: 1 2 5 10)")
    c.add_argument("--folds", type=int, default=5, help="folds 1..F per percent (default: 5)")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_split_coco)
    voc.add_parser(sub)
    return p
