import pytest
import torch
from torchvision.models.detection import FasterRCNN

from dtg.config import ModelConfig
from dtg.geometry import project_boxes, teacher_to_student
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer, TrainingError
from dtg.losses.pseudo_label import pseudo_targets
from dtg.models.detector import Detector, build_faster_rcnn
from dtg.models.ema import ema_momentum, ema_update, make_teacher

from conftest import tiny_config


def test_momentum_ramp():
    assert ema_momentum(0, 0.999) == 0.0  # first step: the teacher becomes the student
    assert ema_momentum(1, 0.999) == 0.5
    assert ema_momentum(9, 0.999) == pytest.approx(0.9)
    assert ema_momentum(100_000, 0.999) == 0.999


def test_ema_update_is_the_formula_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student = Detector.from_config(ModelConfig(tiny_width=8, fpn_channels=16, box_head_dim=32), 2)
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()
    loss = sum(student.supervised_losses([torch.rand(3, 64, 64)], [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])}]).values())
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    ema_update(teacher, student, 0.9)
    s_state = student.state_dict()
    changed = 0
    for k, t in teacher.state_dict().items():
        if t.dtype.is_floating_point:
            expected = 0.9 * before[k] + 0.1 * s_state[k]
            assert torch.allclose(t, expected, atol=1e-6), k
            changed += int(not torch.equal(t, before[k]))
    assert changed > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_pseudo_targets_threshold_and_projection():
    det = {
        "boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.95, 0.5, 0.91]),
        "labels": torch.tensor([2, 1, 3]),
    }
    flip = torch.tensor([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)  # mirror in a 100-wide view
    out = pseudo_targets(det, flip, (80, 100), 0.9)
    assert out["labels"].tolist() == [2, 3]
    assert torch.allclose(out["boxes"], torch.tensor([[70.0, 10.0, 90.0, 40.0], [95.0, 0.0, 100.0, 5.0]]))
    shift = torch.tensor([[1.0, 0, 99.5], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)  # pushes boxes out of view
    assert len(pseudo_targets(det, shift, (80, 100), 0.9)["boxes"]) == 0
    # per-class thresholds (index = label): class 1 at 0.4 keeps its 0.5 box, class 3 at 0.95 drops its 0.91 box
    per_class = torch.tensor([1.0, 0.4, 0.9, 0.95])
    assert pseudo_targets(det, flip, (80, 100), per_class)["labels"].tolist() == [2, 1]


def test_class_thresholds_need_one_value_per_category(tiny_dataset, tmp_path):
    with pytest.raises(TrainingError, match=r"'sparse.class_thresholds': 2 values for the 5 categories"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "x", "method=sparse", "sparse.class_thresholds=[0.5, 0.6]"),
                log=lambda m: None)


def test_unsup_reg_off_leaves_only_classification_losses(tiny_dataset, tmp_path):
    from dtg.methods.sparse import SparseMethod

    cfg = tiny_config(tiny_dataset, tmp_path / "x", "method=sparse", "sparse.pseudo_score_thresh=0.0",
                      "sparse.uncertain_score_thresh=0.0", "data.batch_unlabeled=2")
    t = Trainer(cfg, log=lambda m: None, progress=False)
    items = next(iter(t._loader(0)))["unsup"]
    torch.manual_seed(0)  # the samplers draw from the global generator
    on, _ = t.method.student_losses(t.model, items, t.method.teacher_targets(t.teacher, items))
    cfg.sparse.unsup_reg = False
    torch.manual_seed(0)
    off_method = SparseMethod(cfg, t.device)
    off, _ = off_method.student_losses(t.model, items, off_method.teacher_targets(t.teacher, items))
    assert set(on) == {"unsup_rpn_cls", "unsup_rpn_reg", "unsup_rcnn_cls", "unsup_rcnn_reg"}
    assert set(off) == {"unsup_rpn_cls", "unsup_rcnn_cls"}
    assert torch.equal(off["unsup_rpn_cls"], on["unsup_rpn_cls"])


def test_teacher_momentum_switches_after_burn_in_for_semi_methods_only():
    from dtg.config import SemiConfig
    from dtg.engine.solver import teacher_momentum

    semi = SemiConfig(ema_momentum=0.99, ema_momentum_unsup=0.999, burn_in=10)
    assert teacher_momentum(0, semi, True) == 0.0 and teacher_momentum(3, semi, True) == 0.75  # the ramp
    assert teacher_momentum(9, semi, True) == 0.9 and teacher_momentum(10, semi, True) == 0.999
    assert teacher_momentum(500, semi, False) == 0.99  # supervised keeps its momentum
    assert teacher_momentum(500, SemiConfig(ema_momentum=0.99, burn_in=10), True) == 0.99


def test_teacher_boxes_land_on_the_object_in_the_student_view(tiny_dataset):
    """Render a box, build both views of the image, map the teacher-view box with M."""
    import random

    from PIL import Image, ImageDraw

    from dtg.config import ViewConfig
    from dtg.data.augment import make_view

    img = Image.new("RGB", (160, 120), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([40, 30, 89, 69], fill=(255, 0, 0))  # covers [40, 90) x [30, 70)
    box = torch.tensor([[40.0, 30.0, 90.0, 70.0]])
    rng = random.Random(5)
    weak = make_view(img, rng, ViewConfig(short_edge=[96, 128], max_size=200))
    strong = make_view(img, rng, ViewConfig(short_edge=[96, 128], max_size=200, strong=True, cutout_patches=[0, 0]))
    in_teacher = project_boxes(box, weak.matrix, weak.size)
    in_student = project_boxes(in_teacher, teacher_to_student(weak.matrix, strong.matrix), strong.size)
    red = (strong.image[0] - strong.image[2]) > 0.3
    ys, xs = torch.where(red)
    seen = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert torch.allclose(in_student, seen, atol=3.0)


@pytest.mark.slow
def test_three_iteration_sparse_run_writes_both_models(tiny_dataset, tmp_path):
    cfg = tiny_config(
        tiny_dataset, tmp_path / "sparse", "method=sparse", "solver.max_iter=3", "data.batch_labeled=1",
        "data.batch_unlabeled=2", "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}",
        "sparse.pseudo_score_thresh=0.0", "semi.alpha_warmup=2",
    )
    t = Trainer(cfg, log=lambda m: None, progress=False)
    start = {k: v.clone() for k, v in t.teacher.net.state_dict().items()}
    summary = t.train()
    assert summary["reported"] == "teacher" and "student" in summary and "teacher" in summary
    ckpt = load_checkpoint(tmp_path / "sparse" / "checkpoints" / "last.pth")
    for name in ("teacher", "student"):
        plain = build_faster_rcnn(cfg.model, num_classes=len(ckpt["categories"]))
        assert isinstance(plain, FasterRCNN)
        plain.load_state_dict(ckpt[name])
    assert any(not torch.equal(v, start[k]) for k, v in ckpt["teacher"].items())
    assert any(not torch.equal(v, ckpt["student"][k]) for k, v in ckpt["teacher"].items() if v.is_floating_point())
    assert (tmp_path / "sparse" / "checkpoints" / "best.pth").exists()


def test_semi_method_without_unlabeled_batch_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(TrainingError, match="needs data.batch_unlabeled >= 1"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "x", "method=sparse", "data.batch_unlabeled=0"), log=lambda m: None)


def test_unlabeled_image_without_pseudo_boxes_still_gives_background_loss():
    torch.manual_seed(0)
    student = Detector.from_config(ModelConfig(tiny_width=8, fpn_channels=16, box_head_dim=32), 3)
    student.train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = student.supervised_losses([torch.rand(3, 64, 64)], empty, cls_loss="focal")
    assert losses["rpn_cls"] > 0 and losses["rcnn_cls"] > 0
    assert losses["rpn_reg"] == 0 and losses["rcnn_reg"] == 0
    (losses["rpn_cls"] + losses["rcnn_cls"]).backward()
    assert student.net.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_pseudo_targets_uncertain_band_becomes_ignore_boxes():
    det = {
        "boxes": torch.tensor([[10.0, 10, 30, 30], [40, 40, 60, 60], [0, 0, 5, 5]]),
        "scores": torch.tensor([0.95, 0.6, 0.2]),
        "labels": torch.tensor([1, 2, 3]),
    }
    out = pseudo_targets(det, torch.eye(3, dtype=torch.float64), (80, 100), 0.9, uncertain_thresh=0.5)
    assert out["labels"].tolist() == [1]
    assert torch.allclose(out["ignore"], torch.tensor([[40.0, 40, 60, 60]]))  # 0.5 <= 0.6 < 0.9 only
    assert "ignore" not in pseudo_targets(det, torch.eye(3, dtype=torch.float64), (80, 100), 0.9)


def test_background_to_ignore_only_touches_background_on_uncertain_boxes():
    from dtg.losses.pseudo_label import background_to_ignore

    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]])
    labels = torch.tensor([0, 2, 0, 0, -1])
    unsure = torch.tensor([[0.0, 0, 10, 10]])
    # IoU with the uncertain box: 1, 1, 81/119 = 0.68, 0, 1
    assert background_to_ignore(labels, boxes, unsure, 0.5).tolist() == [True, False, True, False, False]
    assert background_to_ignore(labels, boxes, unsure, 0.7).tolist() == [True, False, False, False, False]
    assert not background_to_ignore(labels, boxes, torch.zeros(0, 4), 0.5).any()


def test_strong_views_can_be_kept_out_of_the_batchnorm_statistics():
    from torch import nn

    from dtg.models.ema import bn_stats_frozen

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 8, 8) * 5 + 3
    bn = net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with bn_stats_frozen(net):
        y = net(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.momentum == 0.1
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)  # still normalised by the batch
    net(x)
    assert not torch.equal(bn.running_mean, before[0])  # outside, the statistics move again
