import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FasterRCNN

from dtg.config import ModelConfig
from dtg.losses.detection import rcnn_losses
from dtg.losses.focal import softmax_focal_loss
from dtg.losses.pseudo_label import background_to_ignore
from dtg.models.backbones import ModelError, build_backbone
from dtg.models.detector import Detector, build_faster_rcnn


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Detector.from_config(ModelConfig(), num_classes=3)


def targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 20.0, 120.0, 50.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # background-only image
    ]


def test_dense_outputs_cover_every_anchor_with_its_level(model):
    model.eval()
    imgs = [torch.rand(3, 128, 160), torch.rand(3, 100, 150)]
    with torch.no_grad():
        out = model.forward_dense(imgs)
    b, a = out.rpn.objectness.shape
    assert b == 2 and out.rpn.deltas.shape == (2, a, 4) and out.rpn.anchors.shape == (a, 4)
    # padded batch 128 x 160: level l has (128/2^(l+2)) * (160/2^(l+2)) cells x 3 ratios (P6 = P5 / 2)
    cells = [(32 * 40), (16 * 20), (8 * 10), (4 * 5), (2 * 3)]
    assert out.rpn.num_anchors_per_level == [3 * c for c in cells]
    assert torch.equal(out.rpn.levels.bincount(), torch.tensor([3 * c for c in cells]))
    # anchors of level l have the configured size (sqrt(area) == size)
    sizes = (out.rpn.anchors[:, 2:] - out.rpn.anchors[:, :2]).prod(1).sqrt()
    for lvl, s in enumerate(ModelConfig().anchor_sizes):
        assert torch.allclose(sizes[out.rpn.levels == lvl], torch.tensor(float(s)), rtol=0.02)
    # images keep their own size: no resize inside the model
    assert out.images.image_sizes == [(128, 160), (100, 150)]
    for p, (h, w) in zip(out.proposals, out.images.image_sizes):
        assert p.shape[1] == 4 and (p[:, 2] <= w).all() and (p[:, 3] <= h).all()


def test_roi_forward_scores_any_given_boxes(model):
    model.eval()
    with torch.no_grad():
        out = model.forward_dense([torch.rand(3, 96, 96)])
        boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 30.0, 90.0, 60.0], [5.0, 5.0, 6.0, 6.0]])]
        logits, deltas = model.roi_forward(out.features, boxes, out.images.image_sizes)
    assert logits.shape == (3, 4) and deltas.shape == (3, 16)


def test_supervised_losses_are_finite_and_reach_all_heads(model):
    model.train()
    model.zero_grad()
    losses = model.supervised_losses([torch.rand(3, 128, 128), torch.rand(3, 96, 128)], targets())
    assert set(losses) == {"rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ["net.rpn.head.cls_logits.weight", "net.roi_heads.box_predictor.cls_score.weight", "net.backbone.body.stem.0.weight"]:
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_predictions_are_in_input_pixels(model):
    model.eval()
    dets = model.predict([torch.rand(3, 80, 200)])
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    b = dets[0]["boxes"]
    if len(b):
        assert (b[:, 2] <= 200).all() and (b[:, 3] <= 80).all()
        assert dets[0]["labels"].min() >= 1 and dets[0]["labels"].max() <= 3


def test_state_dict_loads_into_plain_torchvision_faster_rcnn(model):
    plain = build_faster_rcnn(ModelConfig(), num_classes=3)
    assert isinstance(plain, FasterRCNN)
    plain.load_state_dict(model.net.state_dict())  # strict
    plain.eval()
    model.eval()
    img = torch.rand(3, 192, 192)
    with torch.no_grad():
        ours = model.predict([img])[0]
        theirs = plain([img])[0]  # torchvision's own forward (its resize: 192 -> test size 800 by default)
    assert set(theirs) == {"boxes", "scores", "labels"}
    assert ours["boxes"].shape[1] == 4


def test_focal_loss_hand_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    labels = torch.tensor([0, 2])
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = torch.softmax(logits, -1)[torch.arange(2), labels]
    expected = (1 - p) ** 2 * ce
    assert torch.allclose(softmax_focal_loss(logits, labels, 2.0, "none"), expected)
    assert torch.allclose(softmax_focal_loss(logits, labels, 0.0, "mean"), ce.mean())
    assert softmax_focal_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)) == 0
    assert math.isclose(float(softmax_focal_loss(logits, labels, 2.0, "mean")), float(expected.mean()), rel_tol=1e-6)


def test_rcnn_losses_ce_matches_torchvision_and_focal_differs():
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    torch.manual_seed(1)
    logits, deltas = torch.randn(6, 4), torch.randn(6, 16)
    labels, reg = torch.tensor([0, 1, 3, 0, 2, 0]), torch.randn(6, 4)
    ours = rcnn_losses(logits, deltas, labels, reg, "ce")
    ref = fastrcnn_loss(logits, deltas, [labels], [reg])
    assert torch.allclose(ours[0], ref[0]) and torch.allclose(ours[1], ref[1])
    focal = rcnn_losses(logits, deltas, labels, reg, "focal")
    assert focal[0] < ours[0] and torch.allclose(focal[1], ours[1])


def test_local_weight_files(tmp_path):
    path = tmp_path / "mobilenet_v2.pth"
    ref = torchvision.models.mobilenet_v2()
    torch.save(ref.state_dict(), path)  # torchvision's file format
    bb = build_backbone(ModelConfig(backbone="mobilenet_v2", pretrained=str(path)))
    got = dict(bb.body.named_parameters())["0.0.weight"]
    assert torch.equal(got, ref.features[0][0].weight)
    with pytest.raises(ModelError, match="missing.pth: pretrained weight file not found"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "missing.pth")))
    with pytest.raises(ModelError, match="mobilenet_v2.pth: weights do not fit the backbone"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(path)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pth: cannot read weight file"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(junk)))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18"])
def test_group_norm_builds_for_every_backbone(backbone):
    """GroupNorm uses gcd(32, C) groups, so MobileNetV2's C=144 layers build too, and features flow."""
    body = build_backbone(ModelConfig(backbone=backbone, norm="gn"))
    norms = [m for m in body.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert any(m.num_channels == 144 for m in norms) == (backbone == "mobilenet_v2")
    feats = body(torch.rand(1, 3, 64, 64))
    assert all(torch.isfinite(f).all() for f in feats.values())


def test_eval_mode_teacher_can_propose_with_the_training_top_n():
    """DTG's teacher is in eval mode but proposes with the training top-N (docs/method.md, "INC in the R-CNN stage")."""
    torch.manual_seed(0)
    cfg = ModelConfig(rpn_pre_nms_top_n_train=400, rpn_post_nms_top_n_train=60,
                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=7)
    det = Detector.from_config(cfg, num_classes=3).eval()
    images = [torch.rand(3, 128, 160)]
    with torch.no_grad():
        test_props = det.forward_dense(images).proposals[0]
        train_props = det.forward_dense(images, train_top_n=True).proposals[0]
    assert len(test_props) == 7 and 7 < len(train_props) <= 60
    assert not det.training and not det.net.rpn.training  # the mode is restored


def test_ignore_boxes_remove_background_samples_from_the_losses(model):
    """An uncertain box over a real object stops the RPN/R-CNN from calling it background."""
    images = [torch.rand(3, 128, 160)]
    plain = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    unsure = [{**plain[0], "ignore": torch.tensor([[80.0, 20.0, 150.0, 100.0]])}]
    nothing = [{**plain[0], "ignore": torch.zeros(0, 4)}]
    with torch.no_grad():
        out = model.forward_dense(images)
        runs = {}
        for name, tg in (("plain", plain), ("nothing", nothing), ("unsure", unsure)):
            torch.manual_seed(1)  # the same anchor / RoI sampling draws
            runs[name] = model.losses_from_dense(out, tg, ignore_rule=background_to_ignore)
    assert all(torch.equal(runs["plain"][k], runs["nothing"][k]) for k in runs["plain"])
    assert not torch.equal(runs["plain"]["rpn_cls"], runs["unsure"]["rpn_cls"])
    assert all(torch.isfinite(v) for v in runs["unsure"].values())


def test_ignore_boxes_need_a_rule_from_the_caller(model):
    """The detector knows no ignore band of its own: 'ignore' boxes without an ignore_rule are refused."""
    images = [torch.rand(3, 128, 160)]
    unsure = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
               "ignore": torch.tensor([[80.0, 20.0, 150.0, 100.0]])}]
    with torch.no_grad():
        out = model.forward_dense(images)
        with pytest.raises(ValueError, match="ignore_rule"):
            model.losses_from_dense(out, unsure)
        with pytest.raises(ValueError, match="ignore_rule"):
            model.rpn_losses(out, unsure)
