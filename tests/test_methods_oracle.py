"""``method=oracle``: sparse fed the unlabeled images' ground truth, and the data it needs."""

import json

import pytest
import torch

from dtg.cli import main
from dtg.config import save_config
from dtg.data.coco import DatasetError, load_unlabeled
from dtg.data.dataset import record_targets, with_boxes_from
from dtg.engine.trainer import Trainer
from dtg.geometry import project_targets
from dtg.methods.oracle import ground_truth_targets

from conftest import tiny_config

FLIP_100 = torch.tensor([[-1.0, 0.0, 100.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_ground_truth_goes_through_the_strong_views_matrix_and_is_clipped():
    item = {"strong": torch.zeros(3, 50, 100), "strong_matrix": FLIP_100,
            "gt_boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [-40.0, 5.0, -10.0, 20.0], [90.0, 0.0, 130.0, 60.0]]),
            "gt_labels": torch.tensor([2, 1, 3])}
    (t,) = ground_truth_targets([item], torch.device("cpu"))
    # x -> 100 - x: [10, 30] -> [70, 90]; the second box lands at x in [110, 140], outside: dropped;
    # the third, x in [-30, 10] and y in [0, 60], is clipped to the 100 x 50 image.
    assert torch.allclose(t["boxes"], torch.tensor([[70.0, 10.0, 90.0, 30.0], [0.0, 0.0, 10.0, 50.0]]))
    assert t["labels"].tolist() == [2, 3] and t["labels"].dtype == torch.int64


def test_unlabeled_records_take_their_boxes_from_the_full_json(tiny_dataset):
    unlabeled = load_unlabeled(tiny_dataset.train_unlabeled, tiny_dataset.train_images, log=lambda m: None)
    cats = json.loads(tiny_dataset.train_full.read_text())["categories"]
    got = with_boxes_from(unlabeled, str(tiny_dataset.train_full), cats, lambda m: None)
    full = json.loads(tiny_dataset.train_full.read_text())
    per_image = {}
    for a in full["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert [r.id for r in got.records] == [r.id for r in unlabeled.records]
    assert [len(r.boxes) for r in got.records] == [per_image.get(r.id, 0) for r in unlabeled.records]
    assert all(len(r.boxes) == 0 for r in unlabeled.records)  # the source itself is left unchanged


def test_missing_or_boxless_ground_truth_is_refused_in_one_line(tiny_dataset, tmp_path):
    unlabeled = load_unlabeled(tiny_dataset.train_unlabeled, tiny_dataset.train_images, log=lambda m: None)
    full = json.loads(tiny_dataset.train_full.read_text())
    cats = full["categories"]
    with pytest.raises(DatasetError, match="config key 'data.full_json' is empty"):
        with_boxes_from(unlabeled, "", cats, lambda m: None)
    first = unlabeled.records[0].id
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**full, "images": [i for i in full["images"] if i["id"] != first],
                                   "annotations": [a for a in full["annotations"] if a["image_id"] != first]}))
    with pytest.raises(DatasetError, match=rf"partial.json: holds no entry for 1 of the {len(unlabeled.records)} "
                                           rf"unlabeled images .* \(e.g. image {first},"):
        with_boxes_from(unlabeled, str(partial), cats, lambda m: None)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**full, "annotations": []}))
    with pytest.raises(DatasetError, match="empty.json: holds no box on any unlabeled image"):
        with_boxes_from(unlabeled, str(empty), cats, lambda m: None)
    with pytest.raises(DatasetError, match="categories .* differ from the labeled json's"):
        with_boxes_from(unlabeled, str(tiny_dataset.train_full), cats[:-1], lambda m: None)


def test_oracle_pseudo_labels_are_the_ground_truth_and_it_trains(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "oracle", "method=oracle", f"data.full_json={tiny_dataset.train_full}",
                      "solver.max_iter=3", "data.batch_labeled=1", "data.batch_unlabeled=2", "semi.burn_in=1",
                      "semi.alpha_warmup=1")
    t = Trainer(cfg, log=lambda m: None, progress=False)
    batch = next(iter(t._loader(start_batch=0)))
    items = batch["unsup"]
    labels = t.method.teacher_targets(t.teacher, items).images
    for it, lab in zip(items, labels):
        rec = next(r for r in t.data.unlabeled.records if r.id == it["image_id"])
        boxes, cls = record_targets(rec, t.labels)
        want, want_cls = project_targets(boxes, cls, it["strong_matrix"], tuple(it["strong"].shape[-2:]))
        assert torch.equal(lab["boxes"], want) and torch.equal(lab["labels"], want_cls)
    assert sum(len(lab["boxes"]) for lab in labels) > 0
    summary = t.train()
    assert summary["method"] == "oracle" and "teacher" in summary


def test_cli_refuses_the_oracle_without_ground_truth(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "out", "method=oracle", "data.full_json="), config)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dtg: error: config key 'data.full_json' is empty: the oracle needs")
