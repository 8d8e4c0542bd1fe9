from pathlib import Path

import pytest
import torch
import yaml

from dtg.config import Config, ConfigError, load_config, save_config, from_dict, to_dict
from dtg.models.detector import Detector

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("solver: {lr: 0.5, steps: [10, 20]}\nmodel: {backbone: resnet18}\n")
    cfg = load_config(f, ["solver.lr=0.25", "data.weak_view.short_edge=[100, 120]", "model.pretrained=null"])
    assert cfg.solver.lr == 0.25 and cfg.solver.steps == [10, 20]
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained is None
    assert cfg.data.weak_view.short_edge == [100, 120]
    assert cfg.solver.max_iter == Config().solver.max_iter  # untouched default


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.nonexistent=1", "unknown config key 'model.nonexistent'"),
        ("solver.max_iter=1.5", "'solver.max_iter': expected an integer"),
        ("solver.lr=fast", "'solver.lr': expected a number"),
        ("model.backbone=vgg16", "'model.backbone': 'vgg16' is not one of"),
        ("data.skip_bad=3", "'data.skip_bad': expected true/false"),
        ("solver.steps=[1, x]", "'solver.steps[1]': expected an integer"),
        ("solver=3", "'solver': expected a mapping"),
        ("novalue", "must look like key.path=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_error_in_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.widht'"):
        load_config(f)
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(f)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["solver.lr=0.3", "model.backbone=mobilenet_v2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """Files in torchvision's ImageNet formats (random values), by backbone name: exercise the local-weights path."""
    import torchvision

    folder = tmp_path_factory.mktemp("w")

    def make(backbone: str) -> Path:
        path = folder / f"{backbone}.pth"
        if not path.exists():
            torch.save(getattr(torchvision.models, backbone)().state_dict(), path)
        return path

    return make


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path, fake_weights):
    cfg = load_config(path)
    overrides = [f"model.pretrained={fake_weights(cfg.model.backbone)}"] if cfg.model.pretrained else []
    cfg = load_config(path, overrides)
    model = Detector.from_config(cfg.model, cfg.model.num_classes or 8, cfg.data.test_size, cfg.data.test_max_size)
    assert model.num_classes == (cfg.model.num_classes or 8)
    model.eval()
    with torch.no_grad():
        out = model.forward_dense([torch.rand(3, 64, 96)])
    assert out.rpn.objectness.shape[1] == out.rpn.anchors.shape[0]


def test_paper_configs_hold_the_paper_settings():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "coco_10pct.yaml")
    assert (cfg.solver.max_iter, cfg.solver.lr, cfg.solver.steps) == (180000, 0.01, [120000, 160000])
    assert (cfg.data.batch_labeled, cfg.data.batch_unlabeled) == (1, 4)
    assert cfg.model.backbone == "resnet50" and cfg.solver.momentum == 0.9 and cfg.solver.weight_decay == 1e-4
