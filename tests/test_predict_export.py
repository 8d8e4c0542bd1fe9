"""dtg predict and dtg export on a checkpoint of a 1-iteration tiny run (and untrained ResNet / MobileNet ones)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtg.cli import main
from dtg.config import to_dict
from dtg.data.coco import load_image, load_labeled
from dtg.data.dataset import LabelMap
from dtg.data.augment import test_view
from dtg.engine.checkpoint import model_from_checkpoint
from dtg.engine.trainer import Trainer
from dtg.evaluation.inference import predict_source
from dtg.models.detector import Detector
from dtg.tools.export import LOADER

from conftest import tiny_config


@pytest.fixture(scope="module")
def ckpt(tiny_dataset, tmp_path_factory) -> Path:
    """Teacher + student after one supervised iteration; every RoI scored (box_score_thresh 0)."""
    cfg = tiny_config(tiny_dataset, tmp_path_factory.mktemp("pe") / "run", "solver.max_iter=1", "data.val_json=",
                      "model.box_score_thresh=0.0")
    Trainer(cfg, log=lambda m: None, progress=False).train()
    return Path(cfg.output_dir) / "checkpoints" / "last.pth"


def _val_files(paths) -> list[Path]:
    return sorted(Path(paths.val_images).iterdir())


# ----------------------------------------------------------------------------- predict


def test_predict_writes_results_images_json_and_one_png_per_image(ckpt, tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    val = _val_files(tiny_dataset)
    for f in val[1:3]:
        shutil.copy(f, folder / f.name)
    bad = folder / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not picked up")
    files = [folder / val[1].name, folder / val[2].name, val[0]]  # the folder (sorted by name), then a file
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(ckpt), "--images", str(folder), str(val[0]), "--out", str(out),
            "--score-thresh", "0.08", "--device", "cpu"]
    # a bad file without --skip-bad: one line naming it, nothing written
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jpg: cannot be decoded" in err[0] and "--skip-bad" in err[0], err
    assert not out.exists() or not list(out.iterdir())

    assert main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "skipped 1 bad image" in captured.err and "Traceback" not in captured.err
    meta = json.loads((out / "images.json").read_text())
    results = json.loads((out / "results.json").read_text())
    order = sorted([val[1].name, val[2].name, bad.name])  # ids: positions in the input, skipped files included
    assert [im["file_name"] for im in meta["images"]] == [str(f) for f in files]
    assert [im["id"] for im in meta["images"]] == [order.index(val[1].name) + 1, order.index(val[2].name) + 1, 4]
    assert meta["skipped"] == [{"id": order.index(bad.name) + 1, "file_name": str(bad), "reason": meta["skipped"][0]["reason"]}]
    assert "broken.jpg: cannot be decoded" in meta["skipped"][0]["reason"] and meta["info"]["model"] == "teacher"
    assert results and all(r["score"] >= 0.08 for r in results)
    assert {r["image_id"] for r in results} <= {im["id"] for im in meta["images"]}
    names = {c["id"] for c in meta["categories"]}
    assert all(r["category_id"] in names for r in results)
    # one PNG per image, at the image's size, with the boxes drawn on it
    for im in meta["images"]:
        png = Image.open(out / im["png"])
        assert png.format == "PNG" and png.size == (im["width"], im["height"])
        if any(r["image_id"] == im["id"] for r in results):
            assert not np.array_equal(np.asarray(png.convert("RGB")), np.asarray(load_image(im["file_name"])))
    assert sorted(p.name for p in out.iterdir()) == sorted([im["png"] for im in meta["images"]] + ["images.json", "results.json"])

    # the same detections as dtg eval's code path on the val json (ids differ: map by file)
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg, model = model_from_checkpoint(ck, "teacher", ckpt)
    source = load_labeled(tiny_dataset.val, tiny_dataset.val_images, log=lambda m: None)
    source.records = [r for r in source.records if r.path.name in {f.name for f in files}]
    ref = predict_source(model, source, LabelMap(ck["categories"]), cfg.data.test_size, cfg.data.test_max_size,
                         torch.device("cpu"), batch_size=1, progress=False)  # one image per batch, as predict runs
    id_of = {r.path.name: r.id for r in source.records}
    to_val = {im["id"]: id_of[Path(im["file_name"]).name] for im in meta["images"]}
    assert sorted((to_val[r["image_id"]], r["category_id"], r["bbox"], r["score"]) for r in results) == sorted(
        (r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in ref if r["score"] >= 0.08)


def test_predict_missing_file_student_model_and_bad_threshold(ckpt, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert "nope.png: file not found" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path), "--out", str(out)]) == 2
    assert f"{tmp_path}: no images" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path), "--out", str(out), "--score-thresh", "2"]) == 2
    assert "--score-thresh must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- export

CHILD = """
import sys
sys.modules["dtg"] = None  # `import dtg` fails in this process
{loader}

for weights, image, out in {jobs!r}:
    model, names = load_dtg_export(weights, weights[:-3] + ".json")
    with torch.no_grad():
        det = model([torch.load(image, weights_only=True)])[0]
    torch.save(dict(det, names=names), out)
assert not [m for m, v in sys.modules.items() if v is not None and (m == "dtg" or m.startswith("dtg."))]
"""


def _fake_checkpoint(tiny_dataset, tmp_path, name: str, *overrides: str) -> Path:
    """A checkpoint of an untrained model of another backbone (student only)."""
    cfg = tiny_config(tiny_dataset, tmp_path / name, "model.box_score_thresh=0.0", *overrides)
    cats = json.loads(Path(tiny_dataset.val).read_text())["categories"]
    torch.manual_seed(0)
    net = Detector.from_config(cfg.model, len(cats), cfg.data.test_size, cfg.data.test_max_size).net
    path = tmp_path / f"{name}.pth"
    torch.save({"config": to_dict(cfg), "categories": cats, "student": net.state_dict(), "iteration": 0}, path)
    return path


def test_export_loads_in_plain_torchvision_without_dtg_and_gives_the_same_detections(ckpt, tiny_dataset, tmp_path, capsys):
    ckpts = {"tiny": ckpt}  # one forward check (other backbones: the structural test below)
    # an image already at the test size: torchvision's own resize is then the identity
    img = test_view(load_image(_val_files(tiny_dataset)[1]), 96, 128).image
    assert min(img.shape[1:]) == 96
    torch.save(img, tmp_path / "img.pt")
    jobs, expected = [], {}
    for kind, path in ckpts.items():
        weights = tmp_path / kind / "model.pt"
        assert main(["export", "--checkpoint", str(path), "--out", str(weights)]) == 0
        assert f"{kind} backbone" in capsys.readouterr().out
        meta = json.loads(weights.with_suffix(".json").read_text())
        ck = torch.load(path, map_location="cpu", weights_only=False)
        which = "teacher" if "teacher" in ck else "student"
        assert meta["source"]["model"] == which and meta["backbone"]["type"] == kind
        assert meta["backbone"]["plain_torchvision"] is (kind != "tiny")
        assert meta["class_names"] == [c["name"] for c in sorted(ck["categories"], key=lambda c: c["id"])]
        assert meta["num_classes"] == len(ck["categories"]) and meta["faster_rcnn_kwargs"]["min_size"] == 96
        _, model = model_from_checkpoint(ck, which, path)
        expected[kind] = model.eval().predict([img])[0]
        jobs.append((str(weights), str(tmp_path / "img.pt"), str(tmp_path / f"{kind}.out")))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(loader=LOADER, jobs=jobs))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for kind, (_, _, out) in zip(ckpts, jobs):
        got, want = torch.load(out, weights_only=False), expected[kind]
        assert len(want["boxes"]) > 0, kind
        assert torch.equal(got["labels"], want["labels"]), kind
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-4, rtol=0, msg=kind)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=0, msg=kind)


@pytest.mark.parametrize("backbone, norm", [("mobilenet_v2", "frozen_bn"), ("resnet18", "gn")])
def test_torchvision_backbone_export_rebuilds_the_same_network_with_the_loader(tiny_dataset, tmp_path, backbone, norm):
    """No forward pass (slow first calls on CPU): the loader's network takes the weights strictly
    and has the same modules, parameters and settings as dtg's."""
    path = _fake_checkpoint(tiny_dataset, tmp_path, "mb", f"model.backbone={backbone}", f"model.norm={norm}",
                            "model.rpn_post_nms_top_n_test=77", "model.anchor_sizes=[8,16,32,64,128]")
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "mb.pt")]) == 0
    meta = json.loads((tmp_path / "mb.json").read_text())
    assert meta["backbone"]["plain_torchvision"] is True and meta["backbone"]["norm"] == norm
    namespace: dict = {"__name__": "loader"}
    exec(compile(LOADER, "loader", "exec"), namespace)  # the snippet imports torch/torchvision only (checked above)
    model, names = namespace["load_dtg_export"](str(tmp_path / "mb.pt"), str(tmp_path / "mb.json"))
    ref = model_from_checkpoint(torch.load(path, weights_only=False), "student", path)[1].net
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in ref.modules()]
    assert model.rpn._post_nms_top_n == ref.rpn._post_nms_top_n and model.rpn._post_nms_top_n["testing"] == 77
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.roi_heads.score_thresh == 0.0 and names == meta["class_names"]


def test_export_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.json")]) == 2
    assert "must not end in .json" in capsys.readouterr().err
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    del ck["teacher"]
    torch.save(ck, tmp_path / "student_only.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "student_only.pth"), "--model", "teacher", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student_only.pth: has no 'teacher' entry" in err[0]
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.json").exists()



def test_readme_shows_the_tested_export_loader():
    """The README's loader snippet is exactly the one the export test runs without dtg."""
    from pathlib import Path

    from dtg.tools.export import LOADER

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert LOADER.rstrip("\n") in readme
