"""``dtg predict``: run a checkpoint's detector on image files, write COCO results and PNGs.

Outputs in ``--out`` (all staged, moved into place only when every image is done):

* ``results.json`` — COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
  in original (EXIF-transposed, as displayed) pixels, scores ``>= --score-thresh``;
* ``images.json`` — COCO-style ``images`` (``id``, ``file_name`` as given, ``width``, ``height``,
  ``png``), ``categories``, ``info`` (checkpoint, model, threshold) and ``skipped`` (bad files),
  so that ``COCO("images.json").loadRes("results.json")`` works;
* one PNG per image (``{stem}.png``; ``{stem}_{id}.png`` where stems repeat) with boxes, class
  names and scores.

Image ids are the positions 1..N of the files in the order given (folders: their images sorted
by name), skipped files included, so an id does not depend on which files are bad. The detector
runs exactly as in ``dtg eval`` (:func:`dtg.evaluation.inference.predict_source` on the test view).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dtg.config import Config, ConfigError
from dtg.data.coco import IMAGE_EXTENSIONS, DatasetError
from dtg.tools.files import Staged, json_bytes

if TYPE_CHECKING:  # torch and the model code load inside the functions: `dtg --help` stays fast
    import torch
    from PIL import Image

    from dtg.data.dataset import LabelMap
    from dtg.models.detector import Detector


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Files as given and the images of folders (sorted by name), without repeats."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not files:
                raise DatasetError(f"{p}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in this folder")
        else:
            files = [p]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def render_detections(img: Image.Image, dets: list[dict], names: dict[int, str]) -> Image.Image:
    """``img`` with each COCO result drawn: a box in its class colour and a ``name score`` tag."""
    from PIL import ImageDraw, ImageFont

    from dtg.bench.explain import PALETTE, draw_box, draw_tag

    canvas = img.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short = min(canvas.size)
    width = max(2, round(short / 250))
    font = ImageFont.load_default(size=max(11, round(short / 45)))
    order = sorted(names)
    ranked = sorted(dets, key=lambda r: -r["score"])
    color = {cid: PALETTE[k % len(PALETTE)] for k, cid in enumerate(order)}
    for r in reversed(ranked):  # the highest score drawn last, on top
        x, y, w, h = r["bbox"]
        draw_box(draw, [x, y, x + w, y + h], 1.0, 1.0, color[r["category_id"]], width)
    taken: list[tuple[float, float, float, float]] = []
    for r in ranked:
        x, y = r["bbox"][:2]
        text = f"{names[r['category_id']]} {r['score']:.2f}"
        x = max(0.0, min(x, canvas.width - draw.textlength(text, font=font) - 4))  # keep the tag inside the image
        draw_tag(draw, (x, y), text, color[r["category_id"]], font, taken)
    return canvas


def _png_names(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [f"{s}.png" if stems.count(s) == 1 else f"{s}_{k + 1}.png" for k, s in enumerate(stems)]


def predict_images(
    model: Detector, labels: LabelMap, paths: list[Path], short_edge: int, max_size: int, device: torch.device,
    score_thresh: float, skip_bad: bool, log: Callable[[str], None] = print,
) -> tuple[list[dict], list[dict], list[dict], list[Image.Image]]:
    """Detections of ``model`` on each image file.

    Returns ``(images, results, skipped, renders)``: COCO image entries (id = position 1..N in
    ``paths``; bad files left out under ``skip_bad``), COCO results with ``score >= score_thresh``,
    ``{"id", "file_name", "reason"}`` of skipped files, and one rendered PIL image per image entry.
    A bad file without ``skip_bad`` raises :class:`DatasetError` naming it before any detector run.
    """
    import numpy as np

    from dtg.data.coco import CocoSource, ImageRecord, load_image
    from dtg.data.image_io import BadImage, probe_image
    from dtg.evaluation.inference import predict_source

    bad = {}
    for p in paths:  # cheap integrity pass first: fail before any work
        try:
            probe_image(p)
        except BadImage as e:
            bad[p] = f"{p}: {e}"
    if bad and not skip_bad:
        first, n = next(iter(bad.values())), len(bad)
        more = f" (and {n - 1} more bad file{'s' * (n > 2)})" if n > 1 else ""
        raise DatasetError(f"{first}{more}; rerun with --skip-bad to skip bad images")
    names = {c["id"]: c["name"] for c in labels.categories}
    images, results, skipped, renders = [], [], [], []
    for k, (p, png) in enumerate(zip(paths, _png_names(paths))):
        try:
            if p in bad:
                raise DatasetError(bad[p])
            img = load_image(p)
            rec = ImageRecord(k + 1, p, img.width, img.height, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
            source = CocoSource(None, p.parent, [rec], labels.categories)
            dets = predict_source(model, source, labels, short_edge, max_size, device, batch_size=1, progress=False)
        except DatasetError as e:
            if not skip_bad:
                raise
            log(str(e))
            skipped.append({"id": k + 1, "file_name": str(p), "reason": str(e)})
            continue
        dets = [r for r in dets if r["score"] >= score_thresh]
        images.append({"id": k + 1, "file_name": str(p), "width": img.width, "height": img.height, "png": png})
        results.extend(dets)
        renders.append(render_detections(img, dets, names))
    if skipped:
        log(f"skipped {len(skipped)} bad image{'s' * (len(skipped) != 1)}")
    return images, results, skipped, renders


def load_model(checkpoint: str | Path, which: str | None) -> tuple[dict[str, Any], str, Config, Detector]:
    """``(checkpoint dict, model name, config, model)``; ``which`` defaults to the teacher if present.

    The backbone's ``model.pretrained`` file is not needed (the checkpoint holds every weight),
    so a checkpoint also loads on a machine without it.
    """
    from dtg.engine.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    which = which or ("teacher" if "teacher" in ckpt else "student")
    if isinstance(ckpt.get("config"), dict) and isinstance(ckpt["config"].get("model"), dict):
        ckpt = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "pretrained": None}}}
    cfg, model = model_from_checkpoint(ckpt, which, checkpoint)
    return ckpt, which, cfg, model.eval()


def cmd_predict(args: argparse.Namespace) -> int:
    from dtg.data.dataset import LabelMap
    from dtg.engine.trainer import resolve_device

    if not 0.0 <= args.score_thresh <= 1.0:
        raise ConfigError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    paths = collect_images(args.images)
    inputs = {p.resolve() for p in paths}
    for p, png in zip(paths, _png_names(paths)):
        if (Path(args.out) / png).resolve() in inputs:
            raise ConfigError(f"--out {args.out}: {png} would overwrite an input image; choose another folder")
    ckpt, which, cfg, model = load_model(args.checkpoint, args.model)
    labels = LabelMap(ckpt["categories"])
    device = resolve_device(args.device)
    model.to(device).eval()
    images, results, skipped, renders = predict_images(
        model, labels, paths, cfg.data.test_size, cfg.data.test_max_size, device, args.score_thresh, args.skip_bad,
        log=lambda m: print(m, file=sys.stderr),
    )
    if not images:
        raise DatasetError(f"{args.images[0]}: no usable images (all {len(skipped)} skipped)")
    info = {"checkpoint": str(args.checkpoint), "model": which, "iteration": ckpt.get("iteration"),
            "score_thresh": args.score_thresh, "made_by": "dtg predict"}
    meta = {"info": info, "images": images, "categories": labels.categories, "skipped": skipped}
    with Staged(args.out) as st:
        st.path("results.json").write_bytes(json_bytes(results))
        st.path("images.json").write_bytes(json_bytes(meta))
        for entry, im in zip(images, renders):
            im.save(st.path(entry["png"]), format="PNG")
    note = f"; skipped {len(skipped)} bad images" if skipped else ""
    print(f"{len(images)} images, {len(results)} detections with score >= {args.score_thresh:g} ({which}): "
          f"{args.out}/results.json, images.json and {len(images)} PNGs{note}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dtg predict``."""
    p = subparsers.add_parser("predict", help="detect objects in image files: COCO results json + one PNG per image")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dtg train")
    p.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (results.json, images.json, PNGs)")
    p.add_argument("--model", choices=["teacher", "student"], help="which model (default: teacher if present)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="keep and draw detections scoring at least this (default: 0.3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (each reported, with a count) instead of stopping")
    p.set_defaults(func=cmd_predict)
    return p
