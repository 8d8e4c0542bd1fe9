"""``dtg train --init-from``: start the semi-supervised phase from a supervised model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtg.cli import main
from dtg.config import save_config
from dtg.engine.checkpoint import CheckpointError, load_checkpoint
from dtg.engine.solver import lr_factor
from dtg.engine.trainer import Trainer

from conftest import intercept_step, tiny_config

SEMI = ("method=dtg", "data.batch_unlabeled=2", "semi.burn_in=2", "semi.alpha_warmup=1",
        "data.strong_view={short_edge: [96, 112], max_size: 128, strong: true}", "data.val_json=",
        "dtg.rpn.tau=0.3", "dtg.rcnn.tau=0.05")


@pytest.fixture(scope="module")
def supervised_ckpt(tiny_dataset, tmp_path_factory) -> Path:
    """A supervised run stopped at the end of the burn-in (iteration 2)."""
    cfg = tiny_config(tiny_dataset, tmp_path_factory.mktemp("sup") / "run", "solver.max_iter=2", "data.val_json=")
    Trainer(cfg, log=lambda m: None, progress=False).train()
    return Path(cfg.output_dir) / "checkpoints" / "last.pth"


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_iteration_and_learning_rate_come_from_the_checkpoint(tiny_dataset, supervised_ckpt, tmp_path):
    ckpt = load_checkpoint(supervised_ckpt)
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "semi", *SEMI), log=lambda m: None, progress=False)
    t.init_from(supervised_ckpt)
    assert t.iteration == 2 and _equal(t.model.net.state_dict(), ckpt["student"])
    assert _equal(t.teacher.net.state_dict(), ckpt["teacher"])
    assert not _equal(ckpt["student"], ckpt["teacher"])  # the EMA teacher is its own model
    lr = t.step.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(t.cfg.solver.lr * lr_factor(2, t.cfg.solver))
    assert not t.step.optimizer.state  # a fresh optimizer
    t.train()  # the unlabeled branch runs from the first step: no burn-in repeated
    assert load_checkpoint(tmp_path / "semi" / "checkpoints" / "last.pth")["iteration"] == 4


def test_a_plain_state_dict_goes_into_both_models(tiny_dataset, supervised_ckpt, tmp_path):
    plain = tmp_path / "model.pt"
    torch.save(load_checkpoint(supervised_ckpt)["student"], plain)
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "p", *SEMI), log=lambda m: None, progress=False)
    t.init_from(plain, iteration=0)
    assert t.iteration == 0 and _equal(t.model.net.state_dict(), t.teacher.net.state_dict())


def test_mismatches_are_refused_in_one_line(tiny_dataset, supervised_ckpt, tmp_path, capsys):
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "w", *SEMI, "model.tiny_width=16"), log=lambda m: None,
                progress=False)
    with pytest.raises(CheckpointError, match="student weights do not fit this run's model") as e:
        t.init_from(supervised_ckpt)
    assert str(supervised_ckpt) in str(e.value) and "\n" not in str(e.value)
    ckpt = load_checkpoint(supervised_ckpt)
    ckpt["categories"] = [dict(c, name=f"other{i}") for i, c in enumerate(ckpt["categories"])]
    other = tmp_path / "other.pth"
    torch.save(ckpt, other)
    t = Trainer(tiny_config(tiny_dataset, tmp_path / "c", *SEMI), log=lambda m: None, progress=False)
    with pytest.raises(CheckpointError, match="categories .* differ"):
        t.init_from(other)
    cfg = tmp_path / "c.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "cli", *SEMI), cfg)
    for argv, needle in ((["--init-from", str(tmp_path / "none.pth")], "none.pth: checkpoint not found"),
                         (["--init-iteration", "3"], "--init-iteration needs --init-from"),
                         (["--init-from", str(supervised_ckpt), "--init-iteration", "9"], "--init-iteration 9")):
        assert main(["train", "--config", str(cfg), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_an_interrupted_init_from_run_resumes_bit_exactly(tiny_dataset, supervised_ckpt, tmp_path):
    whole = tiny_config(tiny_dataset, tmp_path / "whole", *SEMI)
    t = Trainer(whole, log=lambda m: None, progress=False)
    t.init_from(supervised_ckpt)
    t.train()

    cfg = tiny_config(tiny_dataset, tmp_path / "cut", *SEMI, "checkpoint_period=1")
    t = Trainer(cfg, log=lambda m: None, progress=False)
    t.init_from(supervised_ckpt)

    def stop_at_3(call, batch, iteration):
        if iteration == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of iteration 3
        return call()

    intercept_step(t.step, stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)  # --init-from again, as a rerun of the same command line would: --resume wins
    assert main(["train", "--config", str(path), "--no-progress", "--resume", "--init-from", str(supervised_ckpt)]) == 0
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pth")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pth")
    assert a["iteration"] == b["iteration"] == 4
    for name in ("student", "teacher"):
        assert _equal(a[name], b[name]), name


def test_stop_at_leaves_a_checkpoint_and_no_metrics_then_resume_finishes(tiny_dataset, tmp_path, capsys):
    import yaml

    from dtg.cli import main
    from dtg.config import to_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_dataset, tmp_path / "run", "solver.max_iter=3",
                                                         "checkpoint_at=[1]"))))
    assert main(["train", "--config", str(config), "--stop-at", "2", "--no-progress"]) == 0
    assert "stopped at iteration 2 of 3; continue with --resume" in capsys.readouterr().out
    out = tmp_path / "run"
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "iter_0000001.pth").is_file()
    assert load_checkpoint(out / "checkpoints" / "last.pth")["iteration"] == 2
    assert main(["train", "--config", str(config), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 3
    assert main(["train", "--config", str(config), "--stop-at", "0"]) == 2
    assert "--stop-at must be >= 1" in capsys.readouterr().err
