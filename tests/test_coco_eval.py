"""COCO bbox evaluation: backends agree, sanity values, table and results writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtg.evaluation.coco_eval import STAT_NAMES, evaluate_bbox, format_table, write_results


def random_gt(num_images: int = 30, num_cats: int = 3, seed: int = 0) -> dict:
    """GT with boxes spread over small (<32^2), medium and large (>96^2) areas; some crowd boxes."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        w, h = int(rng.integers(300, 500)), int(rng.integers(300, 500))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(1, 8))):
            side = float(rng.choice([rng.uniform(6, 30), rng.uniform(35, 90), rng.uniform(100, 250)]))
            bw, bh = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, num_cats + 1)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(rng.random() < 0.03)})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, num_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def noisy_detections(gt: dict, seed: int = 1, per_image_fp: int = 10) -> list[dict]:
    """Jittered copies of most GT boxes (some with a wrong class) plus random false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.9 else int(rng.integers(1, len(gt["categories"]) + 1))
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                     "score": float(rng.uniform(0.3, 1.0))})
    for img in gt["images"]:
        for _ in range(per_image_fp):
            w, h = rng.uniform(5, 150, 2)
            dets.append({"image_id": img["id"], "category_id": int(rng.integers(1, len(gt["categories"]) + 1)),
                         "bbox": [rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h), w, h], "score": float(rng.uniform(0, 0.6))})
    return dets


@pytest.mark.parametrize("seed", [0, 1])
def test_backends_agree(seed: int) -> None:
    gt = random_gt(seed=seed)
    dets = noisy_detections(gt, seed=seed + 10)
    fast = evaluate_bbox(gt, dets, backend="faster_coco_eval")
    ref = evaluate_bbox(gt, dets, backend="pycocotools")
    assert tuple(fast) == STAT_NAMES
    for name in STAT_NAMES:
        assert abs(fast[name] - ref[name]) <= 1e-6, (name, fast[name], ref[name])
    assert 0.2 < fast["AP50"] < 1.0 and all(fast[n] >= 0 for n in ("APs", "APm", "APl"))  # all size ranges populated


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_perfect_detections(backend: str, tmp_path: Path) -> None:
    gt = random_gt(num_images=10, seed=3)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    dets.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0})  # not in GT: ignored
    stats = evaluate_bbox(path, dets, backend=backend)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_empty_results_give_zeros() -> None:
    gt = random_gt(num_images=3)
    assert evaluate_bbox(gt, []) == {name: 0.0 for name in STAT_NAMES}
    assert evaluate_bbox(gt, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]) == {n: 0.0 for n in STAT_NAMES}


def test_does_not_mutate_inputs_and_is_quiet(capsys: pytest.CaptureFixture) -> None:
    gt = random_gt(num_images=5)
    del gt["annotations"][0]["area"]
    dets = noisy_detections(gt)
    before = json.dumps([gt, dets], sort_keys=True)
    evaluate_bbox(gt, dets, backend="pycocotools")
    evaluate_bbox(gt, dets)
    assert json.dumps([gt, dets], sort_keys=True) == before
    assert capsys.readouterr().out == ""


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        evaluate_bbox(random_gt(num_images=2), [], backend="nope")


def test_format_table() -> None:
    rows = {"supervised (teacher)": {"AP": 0.12345, "AP50": 0.5, "APl": -1.0}, "dtg (student)": {"AP": 0.2, "AP50": 1.0, "APl": 0.0}}
    table = format_table(rows, stats=("AP", "AP50", "APl"))
    lines = table.splitlines()
    assert lines[0] == "| model | AP | AP50 | APl |" and lines[1].startswith("|---|")
    assert lines[2] == "| supervised (teacher) | 12.3 | 50.0 | - |"
    assert lines[3] == "| dtg (student) | 20.0 | 100.0 | 0.0 |"


def test_write_results_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    results = [{"image_id": np.int64(3), "category_id": 1, "bbox": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32), "score": np.float32(0.5)}]
    write_results(path, results)
    assert json.loads(path.read_text()) == [{"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    with pytest.raises(TypeError):
        write_results(path, [{"bad": object()}])
    assert json.loads(path.read_text())[0]["image_id"] == 3 and len(list(path.parent.iterdir())) == 1
