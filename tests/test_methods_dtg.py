import copy
import math

import pytest
import torch

from dtg.config import apply_override
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer
from dtg.methods.dtg.targets import IncTargets
from dtg.methods.dtg.image_targets import concat_targets, ignore_samples
from dtg.methods.base import weak_images
from dtg.methods.dtg.method import DTGMethod
from dtg.methods.dtg.teacher import teacher_pass
from dtg.methods.dtg.correspondence import map_anchors

from conftest import tiny_config


def targets(labels, cluster, num_clusters):
    n = len(labels)
    return IncTargets(
        labels=torch.tensor(labels), reg_targets=torch.zeros(n, 4), reg_mask=torch.tensor(labels) > 0,
        cluster=torch.tensor(cluster), teacher_scores=torch.rand(n), num_clusters=num_clusters,
    )


def test_concat_targets_keeps_clusters_of_different_images_apart():
    a = targets([2, 2, 0], [0, 0, -1], 1)
    b = targets([1, 0, 3, 3], [0, -1, 1, 1], 2)
    c = concat_targets([a, b])
    assert c.cluster.tolist() == [0, 0, -1, 1, -1, 2, 2]
    assert c.num_clusters == 3 and c.labels.tolist() == [2, 2, 0, 1, 0, 3, 3]
    empty = targets([0, 0], [-1, -1], 0)
    assert concat_targets([empty, a]).cluster.tolist() == [-1, -1, 0, 0, -1]


def test_ignore_samples_removes_them_from_every_loss():
    t = ignore_samples(targets([2, 2, 0], [0, 0, -1], 1), torch.tensor([False, True, True]))
    assert t.labels.tolist() == [2, -1, -1] and t.classes.tolist() == [2, -1, -1]
    assert t.reg_mask.tolist() == [True, False, False] and t.cluster.tolist() == [0, -1, -1]
    assert t.num_clusters == 1
    gone = ignore_samples(targets([2, 3, 0], [0, 1, -1], 2), torch.tensor([False, True, False]))
    assert gone.num_clusters == 1  # cluster 1 lost its only member (it left the student view)


def test_map_anchors_is_unclipped_projection():
    flip = torch.tensor([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    boxes = torch.tensor([[-10.0, 5.0, 20.0, 25.0]])
    assert torch.allclose(map_anchors(boxes, flip), torch.tensor([[80.0, 5.0, 110.0, 25.0]]))


# DTG dense in both stages, as the paper has it (the default's RPN stage is the sparse hybrid), every
# background RoI scored (the default draws 96 per image): the base every switch below is varied on
DENSE = ["dtg.rpn.targets=dtg", "dtg.rcnn.background=0"]
ABLATIONS = {
    "default": [],
    "rpn_only": ["dtg.rcnn.enabled=false"],
    "rcnn_inc_cls_only": ["dtg.rpn.enabled=false", "dtg.rcnn.inc_reg=false", "dtg.rpn.inc_reg=false", "dtg.rcnn.rank_matching=false", "dtg.rpn.rank_matching=false"],
    "rcnn_cls_reg": ["dtg.rpn.enabled=false", "dtg.rcnn.rank_matching=false", "dtg.rpn.rank_matching=false"],
    "reg_target_own": ["dtg.rcnn.reg_target=own", "dtg.rpn.reg_target=own"],
    "normalize_samples": ["dtg.normalize=samples"],
    "normalize_supervised": ["dtg.normalize=supervised"],
    "anchor_level_area": ["dtg.rpn.anchor_level=area", "dtg.rpn.anchor_ties=up"],
    "rpn_bce_supervised": ["dtg.rpn.cls_loss=bce", "dtg.normalize=supervised"],
    "rcnn_only_components": ["dtg.rcnn.inc_reg=false", "dtg.rcnn.rank_matching=false"],
    "rcnn_subsample_logit_rm": ["dtg.rcnn.subsample=true", "dtg.rm_input=logit"],
    "sparse_rpn_hybrid": ["dtg.rpn.targets=sparse", "sparse.pseudo_score_thresh=0.05", "sparse.uncertain_score_thresh=0.01"],
    "defaults": ["dtg.rpn.targets=sparse", "dtg.normalize=supervised", "dtg.rcnn.uncertain=1.0", "dtg.rm_weight=0.6",
                 "sparse.pseudo_score_thresh=0.05", "sparse.uncertain_score_thresh=0.01"],
    "nms_then_threshold": ["dtg.rpn.candidates=nms_then_threshold"],
    "rm_logit_T5_beta1": ["dtg.rm_input=logit", "dtg.T=5.0", "dtg.rm_weight=1.0"],
    "uncertain_band": ["dtg.rpn.uncertain=0.1", "dtg.rcnn.uncertain=0.01"],
    "paper_scales": ["dtg.rm_scale=inc", "dtg.rpn.transfer=one_to_one", "dtg.normalize=cluster"],
    "rcnn_members_pruned": ["dtg.rcnn.member_iou=0.3", "dtg.rcnn.member_topk=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_three_iteration_dtg_run_for_each_ablation(tiny_dataset, tmp_path, name):
    cfg = tiny_config(
        tiny_dataset, tmp_path / name, "method=dtg", "solver.max_iter=3", "data.batch_labeled=1",
        "data.batch_unlabeled=2", "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}",
        "semi.alpha_warmup=1", "dtg.rpn.tau=0.3", "dtg.rcnn.tau=0.05", "data.val_json=", *DENSE, *ABLATIONS[name],
    )
    t = Trainer(cfg, log=lambda m: None, progress=False)
    before = {k: v.clone() for k, v in t.model.net.state_dict().items()}
    items = next(iter(t._loader(0)))["unsup"]
    losses, stats = t.method.student_losses(t.model, items, t.method.teacher_targets(t.teacher, items))
    stages = [s for s, on in (("rpn", cfg.dtg.rpn.enabled), ("rcnn", cfg.dtg.rcnn.enabled)) if on]
    for s in stages:
        assert {f"unsup_{s}_cls", f"unsup_{s}_reg"} <= set(losses)
        if s == "rpn" and cfg.dtg.rpn.targets == "sparse":  # the hybrid: sparse's RPN loss, no RPN clusters
            assert "unsup_rpn_rm" not in losses and stats["pseudo_boxes_per_image"] > 0
            continue
        assert (f"unsup_{s}_rm" in losses) == getattr(cfg.dtg, s).rank_matching
        if not getattr(cfg.dtg, s).inc_reg:
            assert losses[f"unsup_{s}_reg"].item() == 0.0
        assert stats[f"{s}_clusters_per_image"] > 0 and stats[f"{s}_members_per_image"] >= stats[f"{s}_clusters_per_image"]
    assert all(torch.isfinite(v) for v in losses.values())
    t.train()
    ckpt = load_checkpoint(tmp_path / name / "checkpoints" / "last.pth")
    assert ckpt["iteration"] == 3 and "teacher" in ckpt
    assert any(not torch.equal(v, before[k]) for k, v in ckpt["student"].items())


def test_per_stage_switches_override_the_shared_ones():
    """A config stored before the per-stage sections (shared switches with per-stage overrides, as
    an older checkpoint holds it) reads as each stage's own switches, the override winning."""
    from dtg.config import from_dict

    cfg = from_dict({"method": "dtg", "dtg": {"rcnn_inc_reg": False, "rpn_rank_matching": False, "inc_cls": False,
                                              "rpn_inc_cls": True, "rcnn_reg_target": "own", "rpn_reg_target": None}})
    rcnn, rpn = cfg.dtg.rcnn, cfg.dtg.rpn
    assert not rcnn.inc_reg and rpn.inc_reg
    assert rcnn.rank_matching and not rpn.rank_matching
    assert not rcnn.inc_cls and rpn.inc_cls
    assert (rcnn.inc_cls, rcnn.inc_reg, rpn.inc_cls, rpn.inc_reg) == (False, False, True, True)
    assert (rcnn.reg_target, rpn.reg_target) == ("own", "kept")


# ----------------------------------------------------------------------------- each switch's effect
#
# One fixed batch, one fixed teacher and student; every switch is compared with the default on it:
# the losses it should change differ, the ones it should not are bit-identical, the targets change
# where they should. The comparisons are exact because both passes are deterministic (asserted).


def _geometry_items(items):
    """Two hand-made unlabeled items whose teacher-to-student matrices exercise the anchor switches.

    Item 0: a horizontal flip of a 100 px wide weak view, so that mapped anchor centres fall half-way
    between the cells of the stride-8 level (100 = 12.5 * 8): ``dtg.rpn.anchor_ties`` decides them.
    Item 1: a 40 degree rotation about the centre (the strong image is the weak one: only the matrix
    and the sizes reach the targets), whose min/max boxes are over sqrt(2) times the equal-area boxes
    for 2:1 anchors: ``dtg.rpn.anchor_level`` moves them a level.
    """
    eye = torch.eye(3, dtype=torch.float64)
    weak0 = items[0]["weak"][:, :, :100]
    flip = torch.tensor([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    weak1 = items[1]["weak"]
    h, w = weak1.shape[-2:]
    c, s = math.cos(math.radians(40)), math.sin(math.radians(40))
    cx, cy = w / 2, h / 2
    rot = torch.tensor([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]], dtype=torch.float64)
    return [
        {"weak": weak0, "strong": weak0.flip(-1).contiguous(), "weak_matrix": eye, "strong_matrix": flip},
        {"weak": weak1, "strong": weak1.clone(), "weak_matrix": eye, "strong_matrix": rot},
    ]


def _spread_teacher(teacher, items, device):
    """The untrained teacher scores every anchor ~0.5 and every RoI ~1 / (K + 1): give its RPN
    objectness and R-CNN foreground logits a spread (random weights of a fixed generator, scaled to
    logit std 2; background logit 0), so that thresholds split members, ignored and background."""
    teacher = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    rpn, rcnn = teacher.net.rpn.head.cls_logits, teacher.net.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        for mod in (rpn, rcnn):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
            mod.bias.zero_()
        rcnn.weight[0] = 0.0
        tp = teacher_pass(teacher, weak_images(items, device))
        rpn.weight.mul_(2.0 / tp.dense.rpn.objectness.std())
        rcnn.weight.mul_(2.0 / tp.logits[:, 1:].std())
        tp = teacher_pass(teacher, weak_images(items, device))
    return teacher, tp


class Switches:
    """``run(*overrides)``: (targets, losses, stats) of ``DTGMethod`` on the fixed batch."""

    def __init__(self, cfg, student, teacher, items, device):
        self.cfg, self.student, self.teacher, self.items, self.device = cfg, student, teacher, items, device

    def config(self, *overrides):
        cfg = copy.deepcopy(self.cfg)
        for o in overrides:
            apply_override(cfg, o)
        return cfg

    def run(self, *overrides):
        method = DTGMethod(self.config(*overrides), self.device)
        torch.manual_seed(0)  # rcnn_subsample's background draw and the hybrid's RPN sampler
        targets = method.teacher_targets(self.teacher, self.items)
        torch.manual_seed(1)
        losses, stats = method.student_losses(self.student, self.items, targets)
        return targets, {k: v.detach() for k, v in losses.items()}, stats


@pytest.fixture(scope="module")
def switches(tiny_dataset, tmp_path_factory):
    cfg = tiny_config(tiny_dataset, tmp_path_factory.mktemp("switches"), "method=dtg", "data.batch_unlabeled=2",
                      "data.val_json=", "dtg.rm_weight=3.0", "dtg.normalize=samples", *DENSE)
    t = Trainer(cfg, log=lambda m: None, progress=False)
    items = _geometry_items(next(iter(t._loader(0)))["unsup"])
    teacher, tp = _spread_teacher(t.teacher, items, t.device)
    # thresholds at fixed quantiles of this teacher's own scores: members, an ignore band and background
    obj = tp.dense.rpn.objectness.sigmoid().flatten()
    fg = tp.logits.softmax(-1)[:, 1:].max(-1).values
    q = lambda x, p: float(torch.quantile(x.double(), p))  # noqa: E731
    base = [f"dtg.rpn.tau={q(obj, 0.7):.6f}", f"dtg.rpn.uncertain={q(obj, 0.4):.6f}",
            f"dtg.rcnn.tau={q(fg, 0.8):.6f}", f"dtg.rcnn.uncertain={q(fg, 0.4):.6f}"]
    for o in base:
        apply_override(cfg, o)
    return Switches(cfg, t.model, teacher, items, t.device)


@pytest.fixture(scope="module")
def default(switches):
    return switches.run()


RCNN_KEYS = ("unsup_rcnn_cls", "unsup_rcnn_reg", "unsup_rcnn_rm")
RPN_KEYS = ("unsup_rpn_cls", "unsup_rpn_reg", "unsup_rpn_rm")


def same(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in keys)


def differ(a, b, keys):
    return all(not torch.equal(a[k], b[k]) for k in keys)


def same_targets(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("labels", "classes", "reg_targets", "reg_mask", "cluster", "teacher_scores")) \
        and a.num_clusters == b.num_clusters


def test_the_fixed_batch_is_deterministic_and_exercises_every_kind_of_sample(switches, default):
    targets, losses, stats = default
    again = switches.run()
    assert list(losses) == [*RCNN_KEYS, *RPN_KEYS]
    assert same(losses, again[1], losses) and stats == again[2]
    assert same_targets(targets.rcnn.targets, again[0].rcnn.targets)
    assert same_targets(targets.rpn.targets, again[0].rpn.targets)
    for tg in (targets.rcnn.targets, targets.rpn.targets):  # members in clusters of >1, background, ignored
        assert (tg.labels > 0).any() and (tg.labels == 0).any() and (tg.labels < 0).any()
        assert tg.num_clusters < int((tg.cluster >= 0).sum())
        assert tg.reg_mask.any()
    assert all(v.item() > 0 for v in losses.values())


def test_stage_switches_remove_their_stage_and_leave_the_other_bit_identical(switches, default):
    tg, base, _ = default
    t, losses, stats = switches.run("dtg.rcnn.enabled=false")
    assert t.rcnn is None and list(losses) == list(RPN_KEYS) and "rcnn_clusters_per_image" not in stats
    assert same(losses, base, RPN_KEYS) and same_targets(t.rpn.targets, tg.rpn.targets)
    t, losses, stats = switches.run("dtg.rpn.enabled=false")
    assert t.rpn is None and t.rpn_boxes is None and list(losses) == list(RCNN_KEYS)
    assert "rpn_clusters_per_image" not in stats
    assert same(losses, base, RCNN_KEYS) and same_targets(t.rcnn.targets, tg.rcnn.targets)


@pytest.mark.parametrize("stages", [("rcnn", "rpn"), ("rcnn",), ("rpn",)])
def test_inc_cls_off_ignores_every_sample_for_classification_only(switches, default, stages):
    tg, base, _ = default
    over = ["dtg.rcnn.inc_cls=false", "dtg.rpn.inc_cls=false"] if len(stages) == 2 else [f"dtg.{stages[0]}.inc_cls=false"]
    t, losses, _ = switches.run(*over)
    for s in ("rcnn", "rpn"):
        got, want = getattr(t, s).targets, getattr(tg, s).targets
        assert torch.equal(got.classes, want.classes) and torch.equal(got.cluster, want.cluster)
        assert torch.equal(got.reg_targets, want.reg_targets) and torch.equal(got.reg_mask, want.reg_mask)
        if s in stages:
            assert (got.labels == -1).all() and losses[f"unsup_{s}_cls"].item() == 0.0
            assert same(losses, base, [f"unsup_{s}_reg", f"unsup_{s}_rm"])  # classes, not labels, pick deltas
        else:
            assert torch.equal(got.labels, want.labels)
            assert same(losses, base, [f"unsup_{s}_cls", f"unsup_{s}_reg", f"unsup_{s}_rm"])


@pytest.mark.parametrize("stages", [("rcnn", "rpn"), ("rcnn",), ("rpn",)])
def test_inc_reg_off_drops_every_regression_target_only(switches, default, stages):
    tg, base, _ = default
    over = ["dtg.rcnn.inc_reg=false", "dtg.rpn.inc_reg=false"] if len(stages) == 2 else [f"dtg.{stages[0]}.inc_reg=false"]
    t, losses, _ = switches.run(*over)
    for s in ("rcnn", "rpn"):
        got, want = getattr(t, s).targets, getattr(tg, s).targets
        assert torch.equal(got.labels, want.labels) and torch.equal(got.cluster, want.cluster)
        if s in stages:
            assert not got.reg_mask.any() and losses[f"unsup_{s}_reg"].item() == 0.0
            assert same(losses, base, [f"unsup_{s}_cls", f"unsup_{s}_rm"])
        else:
            assert same_targets(got, want)
            assert same(losses, base, [f"unsup_{s}_cls", f"unsup_{s}_reg", f"unsup_{s}_rm"])


@pytest.mark.parametrize("stages", [("rcnn", "rpn"), ("rcnn",), ("rpn",)])
def test_rank_matching_off_removes_its_loss_only(switches, default, stages):
    tg, base, _ = default
    over = ["dtg.rcnn.rank_matching=false", "dtg.rpn.rank_matching=false"] if len(stages) == 2 else [f"dtg.{stages[0]}.rank_matching=false"]
    t, losses, _ = switches.run(*over)
    assert set(losses) == set(base) - {f"unsup_{s}_rm" for s in stages}
    assert same(losses, base, losses)
    assert same_targets(t.rcnn.targets, tg.rcnn.targets) and same_targets(t.rpn.targets, tg.rpn.targets)


@pytest.mark.parametrize("overrides, stages", [
    ((), ["RcnnStage", "RpnStage"]),
    (("dtg.rpn.targets=sparse",), ["RcnnStage", "SparseRpnStage"]),
    (("dtg.rcnn.enabled=false", "dtg.rpn.rank_matching=false"), ["RpnStage"]),
    (("dtg.rpn.enabled=false", "dtg.rcnn.rank_matching=false"), ["RcnnStage"]),
])
def test_the_weight_dict_names_every_logged_term_with_its_weight(switches, overrides, stages):
    """One stage object per enabled stage; the weight dict's keys are the logged loss names, in order,
    and each logged term is its weight times the stage's raw term (Rank Matching: ``dtg.rm_weight``)."""
    from dtg.methods.dtg.method import weight_dict

    cfg = switches.config(*overrides)
    method = DTGMethod(cfg, switches.device)
    assert [type(s).__name__ for s in method.stages] == stages
    _, losses, _ = switches.run(*overrides)
    assert list(method.weight_dict) == list(losses) == list(method.loss_weights())
    assert method.weight_dict == {k: 3.0 if k.endswith("_rm") else 1.0 for k in losses}  # the fixture's rm_weight
    assert weight_dict(method.stages, cfg.dtg) == method.weight_dict
    torch.manual_seed(0)
    targets = method.teacher_targets(switches.teacher, switches.items)
    torch.manual_seed(1)
    s = switches.student.forward_dense([it["strong"] for it in switches.items])
    for stage in method.stages:
        raw, _ = stage.losses(switches.student, s, getattr(targets, stage.slot))
        assert tuple(raw) == stage.terms
        for term, value in raw.items():
            key = f"unsup_{stage.name}_{term}"
            assert torch.equal(losses[key], method.weight_dict[key] * value.detach())


def test_training_logs_the_weight_dict_once(tiny_dataset, tmp_path):
    lines: list[str] = []
    Trainer(tiny_config(tiny_dataset, tmp_path / "dtg", "method=dtg", "dtg.rm_weight=0.6", "data.val_json="),
            log=lines.append, progress=False)
    said = [ln for ln in lines if ln.startswith("unlabeled loss terms and their weights")]
    assert len(said) == 1 and said[0].endswith(
        "unsup_rcnn_cls 1, unsup_rcnn_reg 1, unsup_rcnn_rm 0.6, unsup_rpn_cls 1, unsup_rpn_reg 1")
    lines.clear()
    Trainer(tiny_config(tiny_dataset, tmp_path / "sparse", "method=sparse", "data.val_json="),
            log=lines.append, progress=False)
    assert not any(ln.startswith("unlabeled loss terms") for ln in lines)  # sparse weighs no term


def test_rm_weight_scales_rank_matching_only(switches, default):
    _, base, _ = default
    one, two, zero = (switches.run(f"dtg.rm_weight={b}")[1] for b in (1.0, 2.0, 0.0))
    for s in ("rcnn", "rpn"):
        rm = f"unsup_{s}_rm"
        assert one[rm].item() > 0
        assert torch.equal(two[rm], 2.0 * one[rm]) and torch.equal(base[rm], 3.0 * one[rm])  # the default rm_weight 3
        assert zero[rm].item() == 0.0
    for other in (one, two, zero):
        assert same(other, base, ["unsup_rcnn_cls", "unsup_rcnn_reg", "unsup_rpn_cls", "unsup_rpn_reg"])


@pytest.mark.parametrize("override", ["dtg.T=5.0", "dtg.rm_input=logit", "dtg.rm_scale=inc"])
def test_rank_matching_inputs_change_rank_matching_only(switches, default, override):
    _, base, _ = default
    _, losses, _ = switches.run(override)
    assert differ(losses, base, ["unsup_rcnn_rm", "unsup_rpn_rm"])
    assert same(losses, base, ["unsup_rcnn_cls", "unsup_rcnn_reg", "unsup_rpn_cls", "unsup_rpn_reg"])


@pytest.mark.parametrize("normalize", ["samples", "supervised", "cluster"])
def test_rm_scale_inc_gets_each_stage_s_members_and_inc_denominators(switches, default, monkeypatch, normalize):
    """The method hands :func:`inc_rank_matching_loss` each stage's member clusters, its labelled-sample
    count and the supervised denominator; its RM is what that function gives on those inputs."""
    import dtg.methods.dtg.stages as method_module
    from dtg.methods.dtg.losses import inc_rank_matching_loss

    tg, _, _ = default
    calls = []

    def spy(p_s, p_t, cluster, *args, **kwargs):
        out = inc_rank_matching_loss(p_s, p_t, cluster, *args, **kwargs)
        calls.append((cluster.clone(), args, kwargs, out.detach()))
        return out

    monkeypatch.setattr(method_module, "inc_rank_matching_loss", spy)
    _, losses, _ = switches.run("dtg.rm_scale=inc", f"dtg.normalize={normalize}")
    m, b = switches.cfg.model, len(switches.items)
    assert len(calls) == 2  # R-CNN, then RPN
    for (cluster, args, kwargs, out), s, den in zip(calls, ("rcnn", "rpn"), (b * m.roi_batch_size_per_image,
                                                                          b * m.rpn_batch_size_per_image)):
        t = getattr(tg, s).targets
        assert torch.equal(cluster, t.cluster[t.cluster >= 0])
        assert args == (normalize, 1.0, "inc", den) and kwargs == {"labelled": int((t.classes >= 0).sum())}
        assert torch.equal(losses[f"unsup_{s}_rm"], 3.0 * out)


def test_normalize_supervised_divides_by_the_supervised_denominators(switches, default):
    """``samples`` divides a stage's summed losses by its labelled samples, ``supervised`` by
    B x the supervised sampler's batch: their ratio is labelled / (B x batch) for cls and reg."""
    tg, base, _ = default
    t, losses, _ = switches.run("dtg.normalize=supervised")
    m, b = switches.cfg.model, len(switches.items)
    for s, den in (("rcnn", b * m.roi_batch_size_per_image), ("rpn", b * m.rpn_batch_size_per_image)):
        tgt = getattr(tg, s).targets
        used, labelled = int((tgt.labels >= 0).sum()), int((tgt.classes >= 0).sum())
        assert losses[f"unsup_{s}_cls"].item() == pytest.approx(base[f"unsup_{s}_cls"].item() * used / den, rel=1e-5)
        assert losses[f"unsup_{s}_reg"].item() == pytest.approx(base[f"unsup_{s}_reg"].item() * labelled / den,
                                                                 rel=1e-5)
        assert used != den  # the ratio is not 1: a switch that were ignored would fail the checks above
        assert torch.equal(losses[f"unsup_{s}_rm"], base[f"unsup_{s}_rm"])
    assert same_targets(t.rcnn.targets, tg.rcnn.targets) and same_targets(t.rpn.targets, tg.rpn.targets)


def test_normalize_cluster_averages_within_clusters(switches, default):
    """The RPN objectness loss from the student's per-anchor focal losses: ``samples`` is their mean
    over labelled anchors; ``cluster`` the mean over clusters of the members' mean, plus the
    background mean (docs/method.md, "Normalisation")."""
    from torchvision.ops import sigmoid_focal_loss

    from dtg.methods.dtg.losses import cluster_mean

    tg, base, _ = default
    _, losses, _ = switches.run("dtg.normalize=cluster")
    assert differ(losses, base, ["unsup_rcnn_cls", "unsup_rcnn_reg", "unsup_rpn_cls", "unsup_rpn_reg"])
    assert same(losses, base, ["unsup_rcnn_rm", "unsup_rpn_rm"])
    tgt = tg.rpn.targets
    with torch.no_grad():
        obj = switches.student.forward_dense([it["strong"] for it in switches.items]).rpn.objectness.reshape(-1)
    used = tgt.labels >= 0
    per = sigmoid_focal_loss(obj[used], tgt.labels[used].float(), alpha=-1, gamma=2.0, reduction="none")
    pos = tgt.labels[used] > 0
    assert base["unsup_rpn_cls"].item() == pytest.approx(per.mean().item(), rel=1e-5)
    want = cluster_mean(per[pos], tgt.cluster[used][pos]) + per[~pos].mean()
    assert losses["unsup_rpn_cls"].item() == pytest.approx(want.item(), rel=1e-5)
    assert want.item() != pytest.approx(per.mean().item(), rel=1e-3)


def test_rpn_cls_loss_bce_changes_the_rpn_objectness_loss_only_and_upward(switches, default):
    _, base, _ = default
    _, losses, _ = switches.run("dtg.rpn.cls_loss=bce")
    # focal = (1 - p_t)^2 * BCE <= BCE per sample, strictly where p_t > 0
    assert losses["unsup_rpn_cls"].item() > base["unsup_rpn_cls"].item()
    assert same(losses, base, ["unsup_rpn_reg", "unsup_rpn_rm", *RCNN_KEYS])


@pytest.mark.parametrize("stage", [None, "rcnn", "rpn"])
def test_reg_target_own_changes_regression_targets_not_classes(switches, default, stage):
    tg, base, _ = default
    t, losses, _ = switches.run(*(["dtg.rcnn.reg_target=own", "dtg.rpn.reg_target=own"] if stage is None
                                  else [f"dtg.{stage}.reg_target=own"]))
    for s in ("rcnn", "rpn"):
        got, want = getattr(t, s).targets, getattr(tg, s).targets
        assert torch.equal(got.labels, want.labels) and torch.equal(got.classes, want.classes)
        assert torch.equal(got.cluster, want.cluster) and torch.equal(got.teacher_scores, want.teacher_scores)
        if stage in (None, s):
            assert not torch.equal(got.reg_targets, want.reg_targets)
            assert not torch.equal(losses[f"unsup_{s}_reg"], base[f"unsup_{s}_reg"])
            assert same(losses, base, [f"unsup_{s}_cls", f"unsup_{s}_rm"])
        else:
            assert same_targets(got, want) and same(losses, base, [f"unsup_{s}_{k}" for k in ("cls", "reg", "rm")])


@pytest.mark.parametrize("override, item", [("dtg.rpn.anchor_ties=up", 0), ("dtg.rpn.anchor_level=area", 1),
                                            ("dtg.rpn.candidates=nms_then_threshold", None)])
def test_rpn_target_switches_change_the_rpn_targets_only(switches, default, override, item):
    """The anchor switches change the flipped item's (ties) or the rotated item's (levels) RPN
    targets and leave the other item's bit-identical; no switch here touches the R-CNN stage."""
    tg, base, _ = default
    t, losses, _ = switches.run(override)
    assert same_targets(t.rcnn.targets, tg.rcnn.targets) and same(losses, base, RCNN_KEYS)
    changed = [not same_targets(a, b) for a, b in zip(t.rpn.images, tg.rpn.images)]
    assert changed == ([True, True] if item is None else [i == item for i in range(2)])
    assert differ(losses, base, ["unsup_rpn_cls", "unsup_rpn_reg"]) or differ(losses, base, ["unsup_rpn_rm"])


@pytest.mark.parametrize("override", ["dtg.rcnn.member_iou=0.9", "dtg.rcnn.member_topk=true"])
def test_member_pruning_turns_rcnn_members_into_background_only(switches, default, override):
    """``dtg.rcnn.member_iou`` / ``member_topk``: some R-CNN members become background, none is added,
    the clusters left are renumbered; the RPN stage is bit-identical."""
    tg, base, _ = default
    t, losses, _ = switches.run(override)
    assert same_targets(t.rpn.targets, tg.rpn.targets) and same(losses, base, RPN_KEYS)
    got, want = t.rcnn.targets, tg.rcnn.targets
    was, now = want.cluster >= 0, got.cluster >= 0
    assert bool((now <= was).all()) and int(now.sum()) < int(was.sum())
    assert bool((got.labels[was & ~now] == 0).all())
    assert torch.equal(got.labels[now], want.labels[now]) and got.num_clusters == int(got.cluster[now].unique().numel())
    assert differ(losses, base, ["unsup_rcnn_cls"])


def test_one_to_one_transfer_labels_more_student_anchors_and_leaves_the_rcnn_alone(switches, default):
    """``dtg.rpn.transfer=one_to_one``: a teacher anchor that loses its student anchor to a higher
    objectness takes a free neighbour instead of being lost, so at least as many student anchors
    carry a label (and some more); the R-CNN stage is bit-identical."""
    tg, base, _ = default
    t, losses, _ = switches.run("dtg.rpn.transfer=one_to_one")
    assert same_targets(t.rcnn.targets, tg.rcnn.targets) and same(losses, base, RCNN_KEYS)
    got, want = t.rpn.targets, tg.rpn.targets
    assert int((got.labels >= 0).sum()) > int((want.labels >= 0).sum())
    assert int((got.labels == 1).sum()) >= int((want.labels == 1).sum())
    assert differ(losses, base, ["unsup_rpn_cls"])


@pytest.mark.parametrize("stage", ["rcnn", "rpn"])
def test_uncertain_band_turns_background_into_ignored(switches, default, stage):
    """``dtg.<stage>.uncertain`` up to ``dtg.<stage>.tau``: no band, the band's samples become background;
    the members are the same, the other stage is bit-identical."""
    tg, base, _ = default
    tau = getattr(switches.cfg.dtg, stage).tau
    t, losses, _ = switches.run(f"dtg.{stage}.uncertain={tau}")
    got, want = getattr(t, stage).targets, getattr(tg, stage).targets
    assert torch.equal(got.cluster, want.cluster) and torch.equal(got.labels[want.labels > 0], want.labels[want.labels > 0])
    assert int((got.labels == 0).sum()) > int((want.labels == 0).sum())
    assert int((got.labels < 0).sum()) < int((want.labels < 0).sum())
    assert torch.equal(got.labels == 0, (want.labels == 0) | ((want.labels < 0) & (got.labels == 0)))
    assert not torch.equal(losses[f"unsup_{stage}_cls"], base[f"unsup_{stage}_cls"])
    other = "rpn" if stage == "rcnn" else "rcnn"
    assert same_targets(getattr(t, other).targets, getattr(tg, other).targets)
    assert same(losses, base, [f"unsup_{other}_{k}" for k in ("cls", "reg", "rm")])


def test_rcnn_subsample_scores_every_member_and_a_background_sample(switches, default):
    tg, base, _ = default
    t, losses, stats = switches.run("dtg.rcnn.subsample=true")
    budget = switches.cfg.model.roi_batch_size_per_image
    for full, rois, kept in zip(tg.rcnn.images, t.rcnn.rois, t.rcnn.images):
        members = int((full.targets.cluster >= 0).sum())
        background = int(((full.targets.classes == 0) & (full.targets.cluster < 0)).sum())
        assert len(rois) == members + min(background, max(budget - members, 0)) < len(full.rois)
    sub, all_ = t.rcnn.targets, tg.rcnn.targets
    assert (sub.labels >= 0).all()  # ignored RoIs are not scored
    assert int((sub.cluster >= 0).sum()) == int((all_.cluster >= 0).sum()) and sub.num_clusters == all_.num_clusters
    assert sorted(sub.teacher_scores[sub.cluster >= 0].tolist()) == sorted(all_.teacher_scores[all_.cluster >= 0].tolist())
    assert stats["rcnn_clusters_per_image"] == default[2]["rcnn_clusters_per_image"]
    assert differ(losses, base, ["unsup_rcnn_cls"]) and same(losses, base, RPN_KEYS)


def test_rcnn_background_scores_every_member_and_a_weighted_background_draw(switches, default):
    tg, base, _ = default
    backgrounds = [int(((im.targets.classes == 0) & (im.targets.cluster < 0)).sum()) for im in tg.rcnn.images]
    num = min(backgrounds) // 3
    t, losses, stats = switches.run(f"dtg.rcnn.background={num}")
    for full, rois, b in zip(tg.rcnn.images, t.rcnn.rois, backgrounds):
        members = int((full.targets.cluster >= 0).sum())
        assert len(rois) == members + num < len(full.rois)
    sub, all_ = t.rcnn.targets, tg.rcnn.targets
    assert (sub.labels >= 0).all() and sub.weight is not None  # ignored RoIs are not scored
    assert (sub.weight[sub.cluster >= 0] == 1).all()
    assert float(sub.weight[sub.cluster < 0].sum()) == pytest.approx(sum(backgrounds))  # stands for all of it
    assert int((sub.cluster >= 0).sum()) == int((all_.cluster >= 0).sum()) and sub.num_clusters == all_.num_clusters
    assert stats["rcnn_clusters_per_image"] == default[2]["rcnn_clusters_per_image"]
    assert differ(losses, base, ["unsup_rcnn_cls"]) and same(losses, base, RPN_KEYS)
    # members' terms are untouched: the regression and Rank Matching losses are the full run's (under
    # "samples", divided by the weighted count of labelled RoIs, the full run's count)
    for key in ("unsup_rcnn_reg", "unsup_rcnn_rm"):
        assert torch.allclose(losses[key], base[key], atol=1e-6), key
    # a draw of at least every background RoI: the full run's classification loss (ignored RoIs dropped)
    _, every, _ = switches.run(f"dtg.rcnn.background={max(backgrounds)}")
    assert torch.allclose(every["unsup_rcnn_cls"], base["unsup_rcnn_cls"], atol=1e-6)


def test_rcnn_append_kept_adds_each_cluster_s_kept_box_as_a_roi(switches, default):
    tg, base, _ = default
    t, losses, stats = switches.run("dtg.rcnn.append_kept=true")
    for full, rois in zip(tg.rcnn.images, t.rcnn.rois):
        ft = full.targets
        with_target = ft.cluster[(ft.cluster >= 0) & ft.reg_mask].unique().numel()
        assert len(rois) == len(full.rois) + with_target and torch.equal(rois[:len(full.rois)], full.rois)
    app, all_ = t.rcnn.targets, tg.rcnn.targets
    assert int((app.cluster >= 0).sum()) == int((all_.cluster >= 0).sum()) + sum(
        im.targets.cluster[(im.targets.cluster >= 0) & im.targets.reg_mask].unique().numel() for im in tg.rcnn.images)
    assert app.num_clusters == all_.num_clusters and stats["rcnn_clusters_per_image"] == default[2]["rcnn_clusters_per_image"]
    assert len(t.rcnn.teacher_logits) == len(app.labels)  # one teacher row per RoI (rm_input=logit)
    assert differ(losses, base, RCNN_KEYS) and same(losses, base, RPN_KEYS)


def test_rpn_subsample_labels_the_supervised_sampler_s_budget_per_image(switches, default):
    tg, base, _ = default
    t, losses, stats = switches.run("dtg.rpn.subsample=true")
    budget = switches.cfg.model.rpn_batch_size_per_image
    for full, cut in zip(tg.rpn.images, t.rpn.images):
        members = int((full.cluster >= 0).sum())
        usable = int((full.labels >= 0).sum())
        assert int((cut.labels >= 0).sum()) == min(usable, max(budget, members)) < usable
        assert torch.equal(cut.cluster, full.cluster) and torch.equal(cut.labels[full.cluster >= 0], full.labels[full.cluster >= 0])
    assert stats["rpn_clusters_per_image"] == default[2]["rpn_clusters_per_image"]
    assert differ(losses, base, ["unsup_rpn_cls"]) and same_targets(t.rcnn.targets, tg.rcnn.targets)
    assert same(losses, base, RCNN_KEYS)


def test_rcnn_background_and_subsample_together_are_refused(switches):
    from dtg.config import ConfigError, check_relations

    cfg = switches.config("dtg.rcnn.background=64", "dtg.rcnn.subsample=true")
    with pytest.raises(ConfigError, match=r"^config key 'dtg.rcnn.subsample': true needs dtg.rcnn.background=0 \(it is 64;"):
        check_relations(cfg)


def test_rcnn_proposals_keeps_the_teacher_s_highest_objectness_proposals_only(switches, default):
    tg, base, _ = default
    counts = [len(p) for p in tg.teacher.dense.proposals]
    keep = min(counts) // 2
    t, losses, _ = switches.run(f"dtg.rcnn.proposals={keep}")
    for i, (full, cut) in enumerate(zip(tg.rcnn.images, t.rcnn.images)):
        assert len(cut.rois) == keep < counts[i]
        assert torch.equal(cut.rois, full.rois[:keep])  # the same proposals, mapped the same way
        scores = t.teacher.dense.proposal_scores[i]
        assert torch.equal(scores, tg.teacher.dense.proposal_scores[i][:keep])
        assert float(scores.min()) >= float(tg.teacher.dense.proposal_scores[i][keep:].max())  # the best ones
    # the teacher's R-CNN ran on the kept proposals only: its outputs are the full pass's first rows
    first = torch.cat([lg[:keep] for lg in tg.teacher.logits.split(counts)])
    assert t.teacher.logits.shape == first.shape and torch.allclose(t.teacher.logits, first, atol=1e-5)
    assert differ(losses, base, ["unsup_rcnn_cls"])
    assert same_targets(t.rpn.targets, tg.rpn.targets) and same(losses, base, RPN_KEYS)  # the RPN stage untouched
    assert same_targets(switches.run(f"dtg.rcnn.proposals={max(counts)}")[0].rcnn.targets, tg.rcnn.targets)


def test_rcnn_subsample_that_keeps_no_roi_gives_zero_rcnn_losses(switches, default):
    """No RoI above ``dtg.rcnn.tau`` and every RoI in the ignore band: nothing is scored, and the
    R-CNN losses are 0 (with a graph), not an error; the RPN is untouched."""
    _, base, _ = default
    t, losses, _ = switches.run("dtg.rcnn.subsample=true", "dtg.rcnn.tau=1.0", "dtg.rcnn.uncertain=0.0")
    assert all(len(r) == 0 for r in t.rcnn.rois)
    assert all(float(losses[k]) == 0.0 for k in ("unsup_rcnn_cls", "unsup_rcnn_reg"))
    assert same(losses, base, RPN_KEYS)


def test_rpn_targets_sparse_is_sparse_pseudo_boxes_in_the_rpn_stage(switches, default):
    from dtg.losses.pseudo_label import background_to_ignore
    from dtg.methods.sparse import pseudo_box_targets

    tg, base, _ = default
    over = ("dtg.rpn.targets=sparse", "sparse.pseudo_score_thresh=0.2", "sparse.uncertain_score_thresh=0.1")
    t, losses, stats = switches.run(*over)
    assert t.rpn is None and t.rpn_boxes is not None
    assert list(losses) == [*RCNN_KEYS, "unsup_rpn_cls", "unsup_rpn_reg"]
    assert same(losses, base, RCNN_KEYS) and differ(losses, base, ["unsup_rpn_cls", "unsup_rpn_reg"])
    want = pseudo_box_targets(switches.teacher, switches.items, switches.config(*over).sparse, switches.device)
    for got, w in zip(t.rpn_boxes.images, want.images):
        assert set(got) == set(w) and all(torch.equal(got[k], w[k]) for k in w)
    # the hybrid reuses the teacher's DTG pass (training top-N proposals) and still gets predict's detections
    test_props, _ = switches.teacher.propose(t.teacher.dense.rpn, t.teacher.dense.images.image_sizes)
    assert [len(p) for p in test_props] != [len(p) for p in t.teacher.dense.proposals]  # made again, not reused
    for got, w in zip(t.rpn_boxes.detections, want.detections):
        assert all(torch.equal(got[k], w[k]) for k in ("boxes", "scores", "labels"))
    assert stats["pseudo_boxes_per_image"] == want.boxes_per_image() > 0
    s = switches.student.forward_dense([it["strong"] for it in switches.items])
    torch.manual_seed(1)
    rpn_cls = switches.student.rpn_losses(s, want.images, ignore_rule=background_to_ignore)[0]
    assert torch.equal(losses["unsup_rpn_cls"], rpn_cls.detach())
