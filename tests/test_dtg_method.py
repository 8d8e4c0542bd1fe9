import pytest
import torch

from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer
from dtg.losses.inc import IncTargets
from dtg.losses.inc_image import concat_targets, ignore_samples
from dtg.methods.dtg import inc_options, stage_switch
from dtg.losses.correspondence import map_anchors

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


ABLATIONS = {
    "default": [],
    "rpn_only": ["dtg.rcnn=false"],
    "rcnn_inc_cls_only": ["dtg.rpn=false", "dtg.inc_reg=false", "dtg.rank_matching=false"],
    "rcnn_cls_reg": ["dtg.rpn=false", "dtg.rank_matching=false"],
    "reg_target_own": ["dtg.reg_target=own"],
    "normalize_samples": ["dtg.normalize=samples"],
    "normalize_supervised": ["dtg.normalize=supervised"],
    "anchor_level_area": ["dtg.anchor_level=area", "dtg.anchor_ties=up"],
    "rpn_bce_supervised": ["dtg.rpn_cls_loss=bce", "dtg.normalize=supervised"],
    "rcnn_only_components": ["dtg.rcnn_inc_reg=false", "dtg.rcnn_rank_matching=false"],
    "rcnn_subsample_logit_rm": ["dtg.rcnn_subsample=true", "dtg.rm_input=logit"],
    "sparse_rpn_hybrid": ["dtg.rpn_targets=sparse", "semi.pseudo_score_thresh=0.05", "semi.uncertain_score_thresh=0.01"],
    "nms_then_threshold": ["dtg.rpn_candidates=nms_then_threshold"],
    "rm_logit_T5_beta1": ["dtg.rm_input=logit", "dtg.T=5.0", "dtg.beta=1.0"],
    "uncertain_band": ["dtg.uncertain_rpn=0.1", "dtg.uncertain_rcnn=0.01"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_three_iteration_dtg_run_for_each_ablation(tiny_dataset, tmp_path, name):
    cfg = tiny_config(
        tiny_dataset, tmp_path / name, "method=dtg", "solver.max_iter=3", "data.batch_labeled=1",
        "data.batch_unlabeled=2", "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}",
        "semi.alpha_warmup=1", "dtg.tau_rpn=0.3", "dtg.tau_rcnn=0.05", "data.val_json=", *ABLATIONS[name],
    )
    t = Trainer(cfg, log=lambda m: None, progress=False)
    before = {k: v.clone() for k, v in t.model.net.state_dict().items()}
    batch = next(iter(t._loader(0)))
    losses, stats = t.method.unlabeled_losses(t.model, t.teacher, batch["unsup"], 0)
    stages = [s for s, on in (("rpn", cfg.dtg.rpn), ("rcnn", cfg.dtg.rcnn)) if on]
    for s in stages:
        assert {f"unsup_{s}_cls", f"unsup_{s}_reg"} <= set(losses)
        if s == "rpn" and cfg.dtg.rpn_targets == "sparse":  # the hybrid: sparse's RPN loss, no RPN clusters
            assert "unsup_rpn_rm" not in losses and stats["pseudo_boxes_per_image"] > 0
            continue
        assert (f"unsup_{s}_rm" in losses) == stage_switch(cfg.dtg, s, "rank_matching")
        if not stage_switch(cfg.dtg, s, "inc_reg"):
            assert losses[f"unsup_{s}_reg"].item() == 0.0
        assert stats[f"{s}_clusters_per_image"] > 0 and stats[f"{s}_members_per_image"] >= stats[f"{s}_clusters_per_image"]
    assert all(torch.isfinite(v) for v in losses.values())
    t.train()
    ckpt = load_checkpoint(tmp_path / name / "checkpoints" / "last.pth")
    assert ckpt["iteration"] == 3 and "teacher" in ckpt
    assert any(not torch.equal(v, before[k]) for k, v in ckpt["student"].items())


def test_per_stage_switches_override_the_shared_ones():
    from dtg.config import load_config

    cfg = load_config(None, ["method=dtg", "dtg.rcnn_inc_reg=false", "dtg.rpn_rank_matching=false",
                             "dtg.inc_cls=false", "dtg.rpn_inc_cls=true", "dtg.rcnn_reg_target=own"])
    d = cfg.dtg
    assert not stage_switch(d, "rcnn", "inc_reg") and stage_switch(d, "rpn", "inc_reg")
    assert stage_switch(d, "rcnn", "rank_matching") and not stage_switch(d, "rpn", "rank_matching")
    assert not stage_switch(d, "rcnn", "inc_cls") and stage_switch(d, "rpn", "inc_cls")
    rcnn, rpn = inc_options(cfg, "rcnn"), inc_options(cfg, "rpn")
    assert (rcnn.cls_labels, rcnn.reg_labels, rpn.cls_labels, rpn.reg_labels) == (False, False, True, True)
    assert (rcnn.reg_target, rpn.reg_target) == ("own", "kept")
    assert inc_options(cfg).cls_labels is False  # without a stage: the shared switches
