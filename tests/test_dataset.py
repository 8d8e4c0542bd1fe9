import torch

from dtg.config import ViewConfig
from dtg.data.coco import load_labeled, load_unlabeled
from dtg.data.dataset import LabelMap, EvalData, TrainData, collate
from dtg.data.sampler import LABELED, UNLABELED, MixedBatchSampler, SampleKey
from dtg.geometry import project_boxes


def make(paths):
    lab = load_labeled(paths.train_labeled, paths.train_images, log=lambda m: None)
    unl = load_unlabeled(paths.train_unlabeled, paths.train_images, log=lambda m: None)
    labels = LabelMap(lab.categories)
    view = ViewConfig(short_edge=[64, 80], max_size=100)
    data = TrainData(lab, unl, labels, view, view, ViewConfig(short_edge=[64, 80], max_size=100, strong=True))
    return lab, unl, labels, data


def test_label_map_is_contiguous_and_invertible(tiny_dataset):
    lab, _, labels, _ = make(tiny_dataset)
    assert sorted(labels.to_label.values()) == list(range(1, labels.num_classes + 1))
    for cid, lbl in labels.to_label.items():
        assert labels.to_category[lbl] == cid


def test_labeled_item_boxes_follow_the_view(tiny_dataset):
    lab, _, labels, data = make(tiny_dataset)
    item = data[SampleKey(LABELED, 0, seed=7)]
    rec = lab.records[0]
    h, w = item["image"].shape[1:]
    assert 64 <= min(h, w) <= 80 and max(h, w) <= 100
    expected = project_boxes(torch.as_tensor(rec.boxes), item["matrix"], (h, w))
    assert torch.allclose(item["boxes"], expected[: len(item["boxes"])], atol=1e-4)
    assert item["labels"].min() >= 1 and item["labels"].max() <= labels.num_classes
    # same key -> same augmentation; another seed -> another view
    again = data[SampleKey(LABELED, 0, seed=7)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["matrix"], again["matrix"])


def test_unlabeled_item_carries_both_views_of_one_image(tiny_dataset):
    _, unl, _, data = make(tiny_dataset)
    item = data[SampleKey(UNLABELED, 2, seed=3)]
    assert item["image_id"] == unl.records[2].id and "boxes" not in item
    for k in ("weak", "strong"):
        assert item[k].dtype == torch.float32 and item[k].shape[0] == 3 and item[f"{k}_matrix"].shape == (3, 3)
    assert not torch.equal(item["weak_matrix"], item["strong_matrix"]) or not torch.equal(item["weak"], item["strong"])


def test_collate_groups_a_sampler_batch_by_branch(tiny_dataset):
    _, _, _, data = make(tiny_dataset)
    keys = next(iter(MixedBatchSampler(len(data.labeled.records), len(data.unlabeled.records), 1, 4, seed=0)))
    batch = collate([data[k] for k in keys])
    assert len(batch["sup"]) == 1 and len(batch["unsup"]) == 4


def test_test_view_matrix_maps_back_to_original_pixels(tiny_dataset):
    lab = load_labeled(tiny_dataset.val, tiny_dataset.val_images, log=lambda m: None)
    item = EvalData(lab, 64, 100)[0]
    rec = lab.records[0]
    boxes = torch.as_tensor(rec.boxes)
    there = project_boxes(boxes, item["matrix"], tuple(item["image"].shape[1:]))
    back = project_boxes(there, torch.linalg.inv(item["matrix"]), (rec.height, rec.width))
    assert torch.allclose(back, boxes, atol=1e-3)
