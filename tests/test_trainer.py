import json
import os

import pytest
import torch
import yaml
from torchvision.models.detection import FasterRCNN

from dtg.config import save_config
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer, TrainingError
from dtg.models.detector import build_faster_rcnn
from dtg.run_identity import dataset_fingerprint, val_fingerprint

from conftest import tiny_config

pytestmark = pytest.mark.slow


def run(cfg, resume=None):
    t = Trainer(cfg, log=lambda m: None, progress=False)
    if resume:
        t.resume(resume)
    return t, t.train()


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_dataset, tmp_path):
    _, full = run(tiny_config(tiny_dataset, tmp_path / "full"))
    # Stop after 2 iterations (its own final eval + checkpoint), then resume to 4.
    run(tiny_config(tiny_dataset, tmp_path / "split", "solver.max_iter=2"))
    half = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pth")
    assert half["iteration"] == 2 and half["sampler"]["batches_drawn"] == 2
    run(tiny_config(tiny_dataset, tmp_path / "split"), resume=tmp_path / "split" / "checkpoints" / "last.pth")

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pth")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pth")
    assert a["iteration"] == b["iteration"] == 4
    for name in ("student", "teacher"):
        for k, v in a[name].items():
            assert torch.equal(v, b[name][k]), (name, k)
    # ... and the optimizer momentum buffers too.
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the weights did change during training
    t0 = Trainer(tiny_config(tiny_dataset, tmp_path / "fresh"), log=lambda m: None, progress=False)
    assert any(not torch.equal(v, a["student"][k]) for k, v in t0.model.net.state_dict().items())


def test_run_writes_resolved_config_metrics_and_loadable_checkpoint(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "r", "solver.max_iter=2")
    _, summary = run(cfg)
    out = tmp_path / "r"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["solver"]["max_iter"] == 2 and saved["model"]["tiny_width"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reported"] == "teacher" and 0.0 <= metrics["teacher"]["AP"] <= 1.0 and "student" in metrics
    assert set(summary["student"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    prov = metrics["provenance"]  # what the run ran on
    assert prov["dataset_fingerprint"] == dataset_fingerprint(cfg.data) and len(prov["dataset_fingerprint"]) == 16
    assert prov["val_fingerprint"] == val_fingerprint(cfg.data) != prov["dataset_fingerprint"]
    assert prov["threads"] == torch.get_num_threads() and prov["cpu"] and prov["cpu_capability"]
    assert set(prov["versions"]) >= {"torch", "torchvision", "numpy", "Pillow"} and prov["config_hash"]
    assert len(prov["commit"]) == 40 or prov["commit"] == "unknown"
    assert prov["cpu_kernels"]["onednn"] is True  # cpu_kernels=fast: the libraries' defaults
    for name in ("teacher", "student"):
        assert isinstance(json.loads((out / f"results_{name}.json").read_text()), list)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pth")
    assert {"student", "teacher", "optimizer", "scheduler", "iteration", "sampler", "rng", "config"} <= set(ckpt)
    plain = build_faster_rcnn(cfg.model, num_classes=len(ckpt["categories"]))
    assert isinstance(plain, FasterRCNN)
    plain.load_state_dict(ckpt["student"])
    assert list((out / "tb").iterdir()), "TensorBoard event file written"
    assert not list((out / "checkpoints").glob("*.tmp")), "no temporary checkpoint left behind"


def test_unwritable_output_dir_fails_before_training(tiny_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="output directory is not writable"):
        Trainer(tiny_config(tiny_dataset, blocker / "sub"), log=lambda m: None, progress=False)


def test_num_classes_mismatch_names_the_json(tiny_dataset, tmp_path):
    with pytest.raises(TrainingError, match=r"train_labeled.json: declares \d+ categories but model.num_classes is 3"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "x", "model.num_classes=3"), log=lambda m: None, progress=False)


@pytest.mark.slow
def test_portable_cpu_kernels_are_recorded_and_change_nothing_but_the_rounding(tiny_dataset, tmp_path):
    """cpu_kernels=portable in a fresh process (MKL reads MKL_CBWR once): oneDNN off, MKL in its
    compatible mode, both recorded; the same run twice gives the same weights."""
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "unused", "solver.max_iter=2", "cpu_kernels=portable"), config)
    hashes = []
    for name in ("a", "b"):
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        subprocess.run([sys.executable, "-m", "dtg", "train", "--config", str(config), "--output-dir", str(tmp_path / name),
                        "--no-progress"], check=True, capture_output=True, env=env)
        prov = json.loads((tmp_path / name / "metrics.json").read_text())["provenance"]
        assert prov["cpu_kernels"] == {"MKL_CBWR": "COMPATIBLE", "onednn": False}
        ckpt = load_checkpoint(tmp_path / name / "checkpoints" / "last.pth")
        hashes.append([v.clone() for v in ckpt["student"].values()])
    assert all(torch.equal(a, b) for a, b in zip(*hashes))
