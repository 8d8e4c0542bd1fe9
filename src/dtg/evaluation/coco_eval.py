"""COCO bbox metrics through faster-coco-eval (default) or pycocotools.

Both backends give the same 12 numbers (checked to 1e-6 in the tests); faster-coco-eval
runs its matching and accumulation in C++ and is about 4x faster (``bench/bench_evaluator.py``).
Boxes are COCO ``[x, y, w, h]`` in original image pixels throughout.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster_coco_eval", "pycocotools")


def _load_gt(gt: str | Path | dict) -> dict:
    """A private copy of the GT dict with ``area`` (w*h) and ``iscrowd`` (0) filled in where absent."""
    data = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else gt
    anns = []
    for a in data.get("annotations") or []:
        a = dict(a)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        anns.append(a)
    out = {k: v for k, v in data.items() if k not in ("annotations", "images", "categories")}
    out.update(images=[dict(i) for i in data.get("images", [])], categories=[dict(c) for c in data.get("categories", [])], annotations=anns)
    return out


def _clean_results(results: list[dict], image_ids: set[int]) -> list[dict]:
    """Plain-python copies of the results whose image is in the GT."""
    out = []
    for r in results:
        iid = int(r["image_id"])
        if iid in image_ids:
            bbox = [float(v) for v in np.asarray(r["bbox"], dtype=np.float64).reshape(4)]
            out.append({"image_id": iid, "category_id": int(r["category_id"]), "bbox": bbox, "score": float(r["score"])})
    return out


def _no_print(*args: Any, **kwargs: Any) -> None:
    pass


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Swallow stdout prints and faster-coco-eval's log records when ``quiet``."""
    if not quiet:
        yield
        return
    logger = logging.getLogger("faster_coco_eval")
    old = logger.disabled
    logger.disabled = True
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.disabled = old


def _run(gt: dict, dets: list[dict], backend: str, quiet: bool) -> np.ndarray:
    """The 12 summary stats of one evaluation."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_no_print if quiet else print)
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
    else:
        raise ValueError(f"unknown COCO evaluation backend {backend!r} (choose from {', '.join(BACKENDS)})")
    ev.params.imgIds = sorted(int(i["id"]) for i in gt["images"])
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)[: len(STAT_NAMES)]


def evaluate_bbox(
    gt: str | Path | dict, results: list[dict], backend: str = "faster_coco_eval", quiet: bool = True
) -> dict[str, float]:
    """COCO bbox AP/AR of ``results`` against ``gt`` (json path or dict).

    ``results``: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``; entries
    whose image is not in the GT are ignored. Returns the 12 stats of :data:`STAT_NAMES`
    as fractions in [0, 1] (-1 where undefined, e.g. no GT of that size); all zeros when
    there are no results.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r} (choose from {', '.join(BACKENDS)})")
    data = _load_gt(gt)
    dets = _clean_results(results, {int(i["id"]) for i in data["images"]})
    if not dets:
        return {name: 0.0 for name in STAT_NAMES}
    with _silenced(quiet):
        stats = _run(data, dets, backend, quiet)
    return {name: float(v) for name, v in zip(STAT_NAMES, stats)}


def _cell(value: Any) -> str:
    if value is None or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        return "-"
    return f"{100.0 * value:.1f}"


def format_table(rows: dict[str, dict[str, float]], stats: Sequence[str] = ("AP", "AP50", "AP75", "APs", "APm", "APl")) -> str:
    """A markdown table: one row per entry of ``rows``, values x100 with 1 decimal, -1 (undefined) as "-"."""
    lines = ["| model | " + " | ".join(stats) + " |", "|---|" + "---:|" * len(stats)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(s)) for s in stats) + " |")
    return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_results(path: str | Path, results: list[dict]) -> None:
    """Write COCO results json atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
