"""``dtg explain``: data of the R-CNN clusters / INC labels / ranks, and the rendered PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models.detection._utils import BoxCoder

from dtg.bench.explain import explain_checkpoint, explain_rcnn, render
from dtg.cli import main
from dtg.engine.trainer import Trainer
from dtg.config import RcnnStageConfig

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    """A method=dtg checkpoint after one iteration (student and teacher)."""
    cfg = tiny_config(
        tiny_dataset, tmp_path_factory.mktemp("explain") / "run", "method=dtg", "solver.max_iter=1",
        "data.batch_labeled=1", "data.batch_unlabeled=1",
        "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}", "data.val_json=",
    )
    Trainer(cfg, log=lambda m: None, progress=False).train()
    path = Path(cfg.output_dir) / "checkpoints" / "last.pth"
    assert path.is_file()
    return path


def _train_image(paths) -> Path:
    data = json.loads(Path(paths.train_unlabeled).read_text())
    return Path(paths.train_images) / data["images"][0]["file_name"]


def _check_clusters(ex) -> None:
    members = [i for c in ex.clusters for i in c.members]
    assert sorted(members) == sorted(ex.candidates)  # the member sets partition the candidates
    assert len(set(members)) == len(members)
    for c in ex.clusters:
        ranked = [j for j, g in enumerate(c.ignored) if not g]
        assert sorted(c.teacher_rank[j] for j in ranked) == list(range(len(ranked)))
        assert sorted(c.student_rank[j] for j in ranked) == list(range(len(ranked)))
        assert c.kept in c.members and c.teacher_scores == sorted(c.teacher_scores, reverse=True)
        assert all(int(ex.targets.classes[i]) in (c.label, -1) for i in c.members)
    assert all(float(ex.teacher_scores[i]) < ex.tau for i in ex.background)


def test_cli_writes_a_two_panel_png_and_the_data_is_consistent(tiny_checkpoint, tiny_dataset, tmp_path, capsys):
    image = _train_image(tiny_dataset)
    out = tmp_path / "look.png"
    code = main(["explain", "--checkpoint", str(tiny_checkpoint), "--image", str(image), "--out", str(out),
                 "--tau-rcnn", "0.05"])
    assert code == 0, capsys.readouterr().err
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height
    ex, weak, strong, names = explain_checkpoint(tiny_checkpoint, image, seed=0, tau=0.05)
    assert ex.clusters and ex.candidates  # 1 iteration: near-uniform class probabilities > 0.05
    _check_clusters(ex)
    assert render(ex, weak, strong, names, max_clusters=2).mode == "RGB"


def test_missing_image_is_one_line(tiny_checkpoint, tmp_path, capsys):
    code = main(["explain", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "nope.jpg")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jpg" in err[0] and "not found" in err[0]


def test_missing_checkpoint_and_checkpoint_without_teacher(tiny_checkpoint, tiny_dataset, tmp_path, capsys):
    image = str(_train_image(tiny_dataset))
    assert main(["explain", "--checkpoint", str(tmp_path / "absent.pth"), "--image", image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent.pth: checkpoint not found" in err[0]
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    del ckpt["teacher"]
    torch.save(ckpt, tmp_path / "student_only.pth")
    assert main(["explain", "--checkpoint", str(tmp_path / "student_only.pth"), "--image", image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student_only.pth: has no teacher" in err[0]


def test_explain_rcnn_on_hand_made_outputs():
    """Two overlapping class-1 boxes form one cluster, a far class-2 box another, one proposal is background."""
    props = torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52], [70, 70, 90, 90], [0, 0, 20, 20]])
    logits = torch.tensor([[0.0, 5, 0], [0, 4, 0], [0, 0, 3], [5, 0, 0]])
    deltas = torch.zeros(4, 12)
    flip = torch.tensor([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)  # hflip of a 100 px view
    s_logits = torch.tensor([[0.0, 1, 0], [0, 3, 0], [0, 0, 1], [0, 0, 0]])  # student prefers member 1
    ex = explain_rcnn(logits, deltas, props, flip, (100, 100), (100, 100), BoxCoder((10.0, 10.0, 5.0, 5.0)),
                      s_logits, RcnnStageConfig(tau=0.5, uncertain=1.0))  # no ignore band
    _check_clusters(ex)
    assert [c.members for c in ex.clusters] == [[0, 1], [2]]
    assert [c.label for c in ex.clusters] == [1, 2] and ex.clusters[0].kept == 0
    assert ex.clusters[0].teacher_rank == [0, 1] and ex.clusters[0].student_rank == [1, 0]
    assert ex.clusters[0].kendall == -1.0 and ex.clusters[1].kendall is None
    assert ex.background == [3] and ex.ignored == []
    assert torch.allclose(ex.rois[0], torch.tensor([50.0, 10, 90, 50]))
