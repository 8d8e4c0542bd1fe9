"""``dtg split voc``: Pascal VOC xml -> COCO json with the 20 VOC classes.

The semi-supervised VOC protocol: VOC2007 trainval is labeled (``voc07_trainval.json``),
VOC2012 trainval is unlabeled (``voc12_trainval.json``; with ``--coco20`` the COCO images
showing at least one non-crowd object of the 20 VOC classes join it:
``voc12_trainval_coco20.json``), VOC2007 test is the val set (``voc07_test.json``).
Unlabeled jsons have an empty ``annotations`` list.

Conventions:

* Categories: the 20 VOC classes in their usual (alphabetical) order, ids 1..20.
* Boxes: VOC ``xmin ymin xmax ymax`` are 1-based, inclusive pixel indices, so the box
  covers ``[xmin - 1, xmax] x [ymin - 1, ymax]`` in continuous pixel coordinates; COCO
  ``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``, clipped to the image.
* ``difficult`` objects (``--difficult``): ``ignore`` (default) writes them with
  ``iscrowd: 1`` — dtg's loader keeps crowd boxes out of the training targets, and COCO
  evaluation neither rewards nor penalises detections on them (COCO matches crowd regions by
  intersection over the detection's area, a little more lenient than VOC's rule);
  ``keep`` writes them as ordinary boxes; ``drop`` leaves them out. Every annotation also
  carries ``"difficult": 0|1``.
* Image ids: a numeric VOC name becomes an integer with the underscore dropped
  (``000005`` -> 5, ``2008_000008`` -> 2008000008); other names get ids after the largest
  one, in name order. COCO images keep their ids; a clash is an error.
* ``file_name`` is relative to one image root shared by all three jsons: the common folder of
  the VOC (and COCO) image folders, also recorded as ``info.image_root``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

from dtg.data.coco import BOX_TOLERANCE, DatasetError, finish_load, parse_images, json_lists, read_json
from dtg.data.image_io import BadImage, probe_image, show_value
from dtg.tools.files import Staged, json_bytes

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_TO_VOC = {
    **{c: c for c in VOC_CLASSES},
    "airplane": "aeroplane", "dining table": "diningtable", "motorcycle": "motorbike",
    "potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor",
}  # fmt: skip
DIFFICULT_MODES = ("ignore", "keep", "drop")


def categories() -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]


def voc_dir(path: str | Path, year: int) -> Path:
    """``path`` itself or ``path/VOC{year}``, whichever holds ``Annotations/``."""
    p = Path(path)
    for cand in (p, p / f"VOC{year}"):
        if (cand / "Annotations").is_dir():
            return cand
    raise DatasetError(f"{p}: not a VOC{year} folder (no Annotations/ in it or in VOC{year}/)")


def image_set(root: Path, name: str) -> list[str]:
    """The image names of ``ImageSets/Main/{name}.txt``."""
    path = root / "ImageSets" / "Main" / f"{name}.txt"
    try:
        lines = path.read_text().split("\n")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image set not found") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__})") from None
    names = [ln.split()[0] for ln in lines if ln.strip()]
    if not names:
        raise DatasetError(f"{path}: empty image set")
    return names


def numeric_id(name: str) -> int | None:
    """``000005`` -> 5, ``2008_000008`` -> 2008000008, anything else -> None."""
    return int(name.replace("_", "")) if re.fullmatch(r"\d+(_\d+)?", name) else None


def _number(obj: ET.Element, tag: str) -> float:
    text = obj.findtext(tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadImage(f"{tag} {show_value(text)} is not a number") from None


def _voc_box(obj: ET.Element, w: int, h: int) -> list[float]:
    """COCO ``[x, y, w, h]`` of an ``<object>``; raises ``BadImage``."""
    bb = obj.find("bndbox")
    if bb is None:
        raise BadImage("no <bndbox>")
    x1, y1, x2, y2 = (_number(bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
    x1, y1 = x1 - 1.0, y1 - 1.0  # 1-based inclusive -> continuous
    if x2 <= x1 or y2 <= y1:
        raise BadImage(f"empty box (xmin {x1 + 1:g}, ymin {y1 + 1:g}, xmax {x2:g}, ymax {y2:g})")
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
        raise BadImage(f"box (xmin {x1 + 1:g}, ymin {y1 + 1:g}, xmax {x2:g}, ymax {y2:g}) lies outside the {w}x{h} image")
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    return [x1, y1, x2 - x1, y2 - y1]


def _size(root: ET.Element, image: Path) -> tuple[int, int]:
    """``<size>`` of the xml, or the image file's displayed size when it is absent or zero."""
    try:
        w, h = int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0)
    except ValueError:
        w = h = 0
    if w > 0 and h > 0:
        return w, h
    w, h, _ = probe_image(image)
    return w, h


def read_voc_set(
    root: Path, names: list[str], image_root: Path, difficult: str, problems: list[str]
) -> tuple[list[dict], list[list[dict]], int]:
    """Image entries and per-image annotation lists (ids still unset) of one VOC image set.

    Problems (unreadable xml, missing image, unknown class, bad box) are appended as lines
    naming the xml file; an image with an xml/image problem is left out, a bad object only drops
    that object. Returns ``(images, annotations per image, number of dropped objects)``.
    """
    images, anns, bad_objects = [], [], 0
    for name in names:
        xml = root / "Annotations" / f"{name}.xml"
        try:
            tree = ET.parse(xml).getroot()
            image = root / "JPEGImages" / f"{name}.jpg"
            if not image.is_file() and tree.findtext("filename"):
                image = root / "JPEGImages" / str(tree.findtext("filename")).strip()
            if not image.is_file():
                raise BadImage(f"image file {image} not found")
            w, h = _size(tree, image)
        except FileNotFoundError:
            problems.append(f"{xml}: annotation file not found")
            continue
        except (ET.ParseError, OSError) as e:
            problems.append(f"{xml}: cannot parse xml ({type(e).__name__}: {e})")
            continue
        except BadImage as e:
            problems.append(f"{xml}: {e}")
            continue
        objs = []
        for k, obj in enumerate(tree.findall("object")):
            try:
                cls = (obj.findtext("name") or "").strip()
                if cls not in VOC_CLASSES:
                    raise BadImage(f"class {show_value(cls)} is not one of the 20 VOC classes")
                diff = (obj.findtext("difficult") or "0").strip() not in ("0", "")
                box = _voc_box(obj, w, h)
            except BadImage as e:
                problems.append(f"{xml}: object #{k}: {e}")
                bad_objects += 1
                continue
            if diff and difficult == "drop":
                continue
            crowd = int(diff and difficult == "ignore")
            objs.append({"category_id": VOC_CLASSES.index(cls) + 1, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": crowd, "difficult": int(diff)})
        rel = Path(os.path.relpath(image, image_root)).as_posix()
        images.append({"name": name, "file_name": rel, "width": w, "height": h})
        anns.append(objs)
    return images, anns, bad_objects


def assign_ids(images: list[dict]) -> None:
    """Set ``id`` from each VOC name (see the module docstring)."""
    ids = [numeric_id(e["name"]) for e in images]
    nxt = max([i for i in ids if i is not None], default=0) + 1
    for e, i in sorted(zip(images, ids), key=lambda t: t[0]["name"]):
        if i is None:
            i, nxt = nxt, nxt + 1
        e["id"] = i


def to_coco(images: list[dict], anns: list[list[dict]], image_root: Path, desc: str, labeled: bool) -> dict[str, Any]:
    """A COCO json (images by id, annotation ids 1.. in that order; none when not ``labeled``)."""
    order = sorted(range(len(images)), key=lambda k: images[k]["id"])
    out_imgs, out_anns = [], []
    for k in order:
        e = images[k]
        out_imgs.append({"id": e["id"], "file_name": e["file_name"], "width": e["width"], "height": e["height"]})
        if labeled:
            for a in anns[k]:
                out_anns.append({"id": len(out_anns) + 1, "image_id": e["id"], **a})
    info = {"description": desc, "image_root": str(image_root), "made_by": "dtg split voc"}
    return {"info": info, "images": out_imgs, "annotations": out_anns, "categories": categories()}


def coco20_images(ann: Path, images_dir: Path, image_root: Path, problems: list[str]) -> list[dict]:
    """Images of a COCO json with at least one non-crowd annotation of a VOC class (ids kept)."""
    data = read_json(ann)
    parts = json_lists(data, ann, ("images", "categories"), ("annotations",))
    names = {c.get("id"): c.get("name") for c in parts["categories"] if isinstance(c, dict)}
    voc_cats = {cid for cid, n in names.items() if n in COCO_TO_VOC}
    if not voc_cats:
        raise DatasetError(f"{ann}: none of its categories is one of the 20 VOC classes (COCO names, e.g. 'airplane', 'tv')")
    keep = {a.get("image_id") for a in parts["annotations"]
            if isinstance(a, dict) and a.get("category_id") in voc_cats and not a.get("iscrowd", 0)}
    imgs, _, _ = parse_images(parts["images"], problems, f"{ann}: ")
    out = []
    for iid in sorted(i for i in imgs if i in keep and imgs[i].ok):
        img = imgs[iid]
        path = images_dir / img.file_name
        if img.width is None or img.height is None:
            problems.append(f"{ann}: image {iid} ({img.file_name}): width/height missing")
        elif not path.is_file():
            problems.append(f"{ann}: image {iid} ({img.file_name}): file not found in {images_dir}")
        else:
            out.append({"id": iid, "name": img.file_name, "file_name": Path(os.path.relpath(path, image_root)).as_posix(),
                        "width": img.width, "height": img.height})
    return out


def _coco20_dir(ann: Path, given: str | None) -> Path:
    """``--coco20-images`` or, for ``.../annotations/instances_train2017.json``, ``.../train2017``."""
    d = Path(given) if given else ann.parent.parent / ann.stem.split("_")[-1]
    if not d.is_dir():
        raise DatasetError(f"{ann}: image folder {d} not found (give it with --coco20-images)")
    return d


def split_voc(
    voc07: str | Path, voc12: str | Path, out: str | Path, coco20: str | Path | None = None,
    coco20_dir: str | None = None, difficult: str = "ignore", skip_bad: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Convert and write the three jsons; returns ``{"labeled", "unlabeled", "val"}`` -> path."""
    if difficult not in DIFFICULT_MODES:
        raise DatasetError(f"--difficult must be one of {DIFFICULT_MODES}, got {difficult!r}")
    v07, v12 = voc_dir(voc07, 2007), voc_dir(voc12, 2012)
    sets = {"labeled": (v07, image_set(v07, "trainval")), "unlabeled": (v12, image_set(v12, "trainval")),
            "val": (v07, image_set(v07, "test"))}
    c20 = Path(coco20) if coco20 else None
    c20_dir = _coco20_dir(c20, coco20_dir) if c20 else None
    roots = [v07.resolve().parent, v12.resolve().parent] + ([c20_dir.resolve()] if c20_dir else [])
    image_root = Path(os.path.commonpath(roots))
    names = {"labeled": "voc07_trainval.json", "unlabeled": "voc12_trainval_coco20.json" if c20 else "voc12_trainval.json",
             "val": "voc07_test.json"}
    jsons, summary = {}, []
    for key, (root, ids) in sets.items():
        problems: list[str] = []
        images, anns, bad = read_voc_set(root.resolve(), ids, image_root, difficult, problems)
        assign_ids(images)
        skipped = len(ids) - len(images)
        if key == "unlabeled" and c20 is not None:
            before = len(problems)
            extra = coco20_images(c20, c20_dir, image_root, problems)  # type: ignore[arg-type]
            skipped += len(problems) - before  # one line per dropped COCO image
            clash = {e["id"] for e in images} & {e["id"] for e in extra}
            if clash:
                raise DatasetError(f"{c20}: image id {min(clash)} is also the id of a VOC2012 image")
            images, anns = images + extra, anns + [[] for _ in extra]
        src = root / "ImageSets" / "Main" / f"{'test' if key == 'val' else 'trainval'}.txt"
        finish_load(problems, src, skip_bad, log, skipped, bad)
        if not images:
            raise DatasetError(f"{src}: no usable images")
        desc = {"labeled": "VOC2007 trainval (labeled)", "val": "VOC2007 test",
                "unlabeled": "VOC2012 trainval" + (" + COCO images of the 20 VOC classes" if c20 else "") + " (unlabeled)"}[key]
        jsons[key] = to_coco(images, anns, image_root, desc, labeled=key != "unlabeled")
        n_anns = sum(len(a) for a in anns) if key != "unlabeled" else 0
        n_diff = sum(a["difficult"] for a in jsons[key]["annotations"])
        summary.append(f"{key}: {len(images)} images, {n_anns} boxes ({n_diff} difficult, --difficult {difficult}) -> {names[key]}")
    with Staged(out) as st:
        for key, data in jsons.items():
            st.path(names[key]).write_bytes(json_bytes(data))
    for line in summary:
        log(line)
    log(f"image folder of all three jsons (data.train_images / unlabeled_images / val_images): {image_root}")
    return {k: Path(out) / names[k] for k in jsons}


def cmd_split_voc(args: argparse.Namespace) -> int:
    paths = split_voc(args.voc07, args.voc12, args.out, args.coco20, args.coco20_images, args.difficult,
                      args.skip_bad, log=lambda m: print(m, file=sys.stderr))
    print(f"labeled {paths['labeled']}, unlabeled {paths['unlabeled']}, val {paths['val']}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``voc`` under ``dtg split``."""
    p = subparsers.add_parser(
        "voc", help="VOC2007 trainval (labeled), VOC2012 trainval [+ COCO-20] (unlabeled), VOC2007 test (val) as COCO json",
        description="Pascal VOC xml -> COCO json with the 20 VOC classes (1-based VOC pixels -> COCO xywh).",
    )
    p.add_argument("--voc07", required=True, help="VOCdevkit/VOC2007 (Annotations/, ImageSets/Main/{trainval,test}.txt, JPEGImages/)")
    p.add_argument("--voc12", required=True, help="VOCdevkit/VOC2012 (ImageSets/Main/trainval.txt)")
    p.add_argument("--coco20", metavar="ANN.json", help="COCO json whose images with VOC-class objects join the unlabeled set")
    p.add_argument("--coco20-images", metavar="DIR", help="image folder of --coco20 (default: ../train2017 beside annotations/)")
    p.add_argument("--difficult", choices=DIFFICULT_MODES, default="ignore",
                   help="difficult objects: ignore = iscrowd 1 (default), keep = ordinary boxes, drop = left out")
    p.add_argument("--skip-bad", action="store_true", help="drop unreadable xml / bad objects (each reported) instead of stopping")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_split_voc)
    return p
