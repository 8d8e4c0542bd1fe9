import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dtg.cli import build_parser, main
from dtg.config import Config, load_config, to_dict
from dtg.evaluation.coco_eval import STAT_NAMES, evaluate_bbox

ROOT = Path(__file__).parent.parent


def test_top_level_help_lists_every_subcommand_with_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ["synth", "train", "eval", "demo"]:
        assert f"dtg {cmd} [-h]" in out
    assert "--checkpoint CHECKPOINT" in out and "--resume" in out


@pytest.mark.parametrize("cmd", ["synth", "train", "eval", "demo"])
def test_each_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: dtg {cmd}" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "dtg", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout


def test_embedded_yaml_is_the_builtin_default():
    assert to_dict(load_config(ROOT / "configs" / "embedded.yaml")) == to_dict(Config())


def test_bad_override_is_one_clear_line(capsys):
    assert main(["train", "--set", "solver.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown config key 'solver.lrr'" in err[0]


def test_missing_config_file_names_it(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


def test_missing_dataset_is_reported_before_training(capsys, tmp_path):
    code = main(["train", "--no-progress", "--set", f"data.train_json={tmp_path}/absent.json", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.json" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tiny_dataset, tmp_path, capsys):
    from conftest import tiny_config

    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    d = to_dict(tiny_config(tiny_dataset, tmp_path / "run", "solver.max_iter=2"))
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| supervised (teacher) |" in out and "| supervised (student) |" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.pth"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert "\r" not in capsys.readouterr().err  # no redrawn bar when stderr is not a terminal
    metrics = json.loads((tmp_path / "ev" / "metrics_teacher.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert json.loads((tmp_path / "ev" / "results_teacher.json").read_text()) is not None
    assert set(metrics) == set(STAT_NAMES) and all(v == -1 or 0 <= v <= 1 for v in metrics.values())
    results = json.loads((tmp_path / "ev" / "results_teacher.json").read_text())
    assert isinstance(results, list) and len(results) > 0
    val = json.loads(Path(tiny_dataset.val).read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in val["images"]}
    categories = {c["id"] for c in val["categories"]}
    for r in results:  # COCO results of the val images, in their original pixels
        assert set(r) == {"image_id", "category_id", "bbox", "score"}
        assert r["image_id"] in sizes and r["category_id"] in categories
        (x, y, w, h), (width, height) = r["bbox"], sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
        assert d["model"]["box_score_thresh"] <= r["score"] <= 1
    per_image = Counter(r["image_id"] for r in results)
    assert max(per_image.values()) <= d["model"]["detections_per_img"]
    # the metrics are those of the results file; the training run's final evaluation wrote the same file
    assert evaluate_bbox(tiny_dataset.val, results) == metrics
    assert json.loads((tmp_path / "run" / "results_teacher.json").read_text()) == results
    # the same numbers as the training run's final evaluation of the teacher (the default model)
    train_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher"]
    assert metrics["AP"] == pytest.approx(train_metrics["AP"], abs=1e-9)


def test_demo_trains_methods_side_by_side_and_reuses_its_runs(tiny_dataset, tmp_path, capsys):
    """The main job on the tiny dataset: one table with both methods, the runs of reproduce's planner
    (OUTPUT_DIR/runs/<key>, OUTPUT_DIR/<method> a link to its run); a rerun trains nothing, a run
    folder of the layout before moves to its key, bad input stops with one line."""
    from conftest import tiny_config
    import yaml

    d = to_dict(tiny_config(tiny_dataset, tmp_path / "demo", "solver.max_iter=2", "semi.burn_in=1"))
    d["synth"] = {**json.loads((tiny_dataset.root / "synth_config.json").read_text())["config"],
                  "out_dir": str(tiny_dataset.root)}  # the existing tiny set: generate() skips
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    argv = ["demo", "--config", str(cfg_path), "--methods", "supervised", "sparse", "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "| supervised (teacher) |" in out and "| sparse (teacher) |" in out
    for m in ("supervised", "sparse"):
        assert json.loads((tmp_path / "demo" / m / "metrics.json").read_text())["method"] == m
    # one shared burn-in: the supervised run alone to iteration 1, then sparse starts from its checkpoint
    assert "phase 1: the supervised burn-in, 1 iterations" in err and "phase 2: supervised, sparse" in err
    sparse_log = (tmp_path / "demo" / "sparse" / "train.log").read_text()
    assert "--init-from" in sparse_log and "iter_0000001.pth" in sparse_log
    assert "--stop-at 1" in (tmp_path / "demo" / "supervised" / "train.log").read_text()
    header, _, sup_row, sparse_row = [ln for ln in out.splitlines() if ln.startswith("|")]
    ap = {m: 100 * json.loads((tmp_path / "demo" / m / "metrics.json").read_text())["teacher"]["AP"]
          for m in ("supervised", "sparse")}
    assert header.endswith("| gain over supervised |") and sup_row.endswith("| - |")
    assert sparse_row.endswith(f"| {ap['sparse'] - ap['supervised']:+.1f} |")
    assert "one seed (0)" in out and "dtg bench reproduce" in out
    assert "Time: data and weights" in err and "burn-in" in err and "methods" in err
    png = tmp_path / "demo" / "demo.png"
    assert f"written: {png}" in err and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the planner's layout: each method's folder is a link to its keyed run folder, named on stderr
    from dtg.bench.reproduce import plan
    from dtg.bench.rows import method_row

    runs = plan([method_row(m) for m in ("supervised", "sparse")], [0], str(cfg_path), [], tmp_path / "demo", 0)
    for m in ("supervised", "sparse"):
        run = next(r for r in runs.values() if (m, 0) in r.uses)
        link = tmp_path / "demo" / m
        assert link.is_symlink() and link.resolve() == run.out.resolve() and run.out.parent == tmp_path / "demo" / "runs"
        assert f"{m}: 2 iterations, in {run.out}" in err
    # a second demo reuses the runs: nothing trained, the same table
    logs = {m: (tmp_path / "demo" / m / "train.log").read_text() for m in ("supervised", "sparse")}
    assert main(argv) == 0
    out2, err2 = capsys.readouterr()
    assert "2 runs: 2 cached, 0 to train" in err2 and "phase 1" not in err2
    assert [ln for ln in out2.splitlines() if ln.startswith("|")] == [header, _, sup_row, sparse_row]
    assert logs == {m: (tmp_path / "demo" / m / "train.log").read_text() for m in ("supervised", "sparse")}
    # a demo folder of the per-method layout before: its run moves to its key and is reused
    import shutil

    old = tmp_path / "old"
    old.mkdir()
    for m in ("supervised", "sparse"):
        shutil.copytree((tmp_path / "demo" / m).resolve(), old / m)
    assert main(argv + ["--set", f"output_dir={old}"]) == 0
    out3, err3 = capsys.readouterr()
    assert "2 runs: 2 cached, 0 to train" in err3 and err3.count("(this config's") == 2
    assert all((old / m).is_symlink() and (old / m / "metrics.json").is_file() for m in ("supervised", "sparse"))
    # bad input: one line
    assert main(argv + ["--set", "solver.lr=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "solver.lr" in err[0]


def test_demo_preset_is_the_pretrained_regime_with_portable_kernels():
    """``dtg demo`` without --config reads the packaged preset: ImageNet MobileNetV2 with frozen BN,
    1 % labeled, a burn-in branched inside the schedule, the kernels that agree across x86 vendors."""
    from dtg.cli import DEMO_PRESET

    cfg = load_config(DEMO_PRESET)
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.norm) == ("mobilenet_v2", "imagenet", "frozen_bn")
    assert cfg.cpu_kernels == "portable" and cfg.synth.labeled_percent == 1.0
    assert 0 < cfg.semi.burn_in < cfg.solver.max_iter and all(s > cfg.semi.burn_in for s in cfg.solver.steps)
    assert Path(cfg.data.train_json).parent.parent == Path(cfg.synth.out_dir)


def test_synth_writes_no_redrawn_bar_into_a_log(tmp_path, capsys):
    argv = ["synth", "--out", str(tmp_path / "s"), "--set", "synth.num_train=6", "--set", "synth.num_val=2",
            "--set", "synth.labeled_percent=50", "--set", "synth.image_size=[64, 64]", "--set", "synth.object_size=[10, 20]"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "content fingerprint" in out and "\r" not in err and "\r" not in out
