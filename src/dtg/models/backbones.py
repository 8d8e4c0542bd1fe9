"""Backbones with FPN for torchvision's Faster R-CNN; pretrained weights from a local file or by name
(``imagenet``: torchvision's file, from torch's hub cache or a registry package, :mod:`dtg.models.weights`)."""

from __future__ import annotations

import math
import sys

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from dtg.config import ModelConfig
from dtg.models.weights import WeightsError, resolve_pretrained


class ModelError(ValueError):
    """The model cannot be built as configured (e.g. a bad weight file)."""


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """``bn`` -> BatchNorm2d, ``frozen_bn`` -> FrozenBatchNorm2d, ``gn`` -> GroupNorm(gcd(32, C) groups)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)  # 32 groups where C allows (MobileNet has C=144)
    raise ModelError(f"unknown norm '{kind}'")


def _conv_block(c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """3x3 conv (stride) + norm + ReLU, then 3x3 conv + norm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


class TinyBody(nn.Sequential):
    """A small conv-norm net for CPU training from scratch.

    Outputs of ``layer1..layer4`` have strides 4, 8, 16, 32 and widths
    ``w, 2w, 4w, 8w``, like a ResNet's C2..C5.
    """

    def __init__(self, width: int = 32, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        w = width
        super().__init__(
            OrderedDict(
                stem=nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), norm(w), nn.ReLU(inplace=True)),
                layer1=_conv_block(w, w, 2, norm),
                layer2=_conv_block(w, 2 * w, 2, norm),
                layer3=_conv_block(2 * w, 4 * w, 2, norm),
                layer4=_conv_block(4 * w, 8 * w, 2, norm),
            )
        )
        self.channels = [w, 2 * w, 4 * w, 8 * w]


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state-dict file (``.pth``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: pretrained weight file not found (model.pretrained: a local file, or imagenet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise ModelError(f"{path}: cannot read weight file ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: not a state dict")
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` strictly (ignoring ``num_batches_tracked``); name the file on mismatch."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not fit the backbone "
            f"(missing {len(missing)} keys e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )


def _freeze(body: nn.Module, trainable_prefixes: list[str]) -> None:
    for name, p in body.named_parameters():
        if not any(name.startswith(pre) for pre in trainable_prefixes):
            p.requires_grad_(False)


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """The configured backbone body + FPN (levels P2-P5 and a max-pooled P6).

    Pretrained weights (``cfg.pretrained``) are a local torchvision-format file of
    the plain classification network (e.g. ``resnet50-0676ba61.pth``,
    ``mobilenet_v2-b0353104.pth``), or ``imagenet`` for torchvision's file of this
    backbone (:func:`~dtg.models.weights.resolve_imagenet`); its classifier keys are ignored.
    """
    norm = norm_layer(cfg.norm)
    extra = LastLevelMaxPool()
    try:
        pretrained = resolve_pretrained(cfg.pretrained, cfg.backbone, log=lambda m: print(m, file=sys.stderr))
    except WeightsError as e:
        raise ModelError(str(e)) from None
    if cfg.backbone == "tiny":
        body = TinyBody(cfg.tiny_width, norm)
        if pretrained:
            _load_into(body, load_weight_file(pretrained), pretrained)
        layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        return BackboneWithFPN(body, layers, body.channels, cfg.fpn_channels, extra_blocks=extra)
    if cfg.backbone in ("resnet18", "resnet50"):
        net = (resnet18 if cfg.backbone == "resnet18" else resnet50)(weights=None, norm_layer=norm)
        if pretrained:
            state = {k: v for k, v in load_weight_file(pretrained).items() if not k.startswith("fc.")}
            net.fc = nn.Identity()
            _load_into(net, state, pretrained)
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
        _freeze(net, trainable + (["bn1"] if cfg.trainable_layers == 5 else []))
        c2 = net.inplanes // 8
        layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        return BackboneWithFPN(net, layers, [c2, 2 * c2, 4 * c2, 8 * c2], cfg.fpn_channels, extra_blocks=extra)
    if cfg.backbone == "mobilenet_v2":
        net = mobilenet_v2(weights=None, norm_layer=norm)
        if pretrained:
            state = {k: v for k, v in load_weight_file(pretrained).items() if not k.startswith("classifier.")}
            net.classifier = nn.Identity()
            _load_into(net, state, pretrained)
        feats = net.features
        stages = [0] + [i for i, b in enumerate(feats) if getattr(b, "_is_cn", False)] + [len(feats) - 1]
        # strides 4, 8, 16, 32: the first block of each strided stage, and the last block.
        picked = [stages[1], stages[2], stages[3], stages[5]]
        if not 0 <= cfg.trainable_layers <= len(stages):
            raise ModelError(f"model.trainable_layers must be in [0, {len(stages)}] for mobilenet_v2")
        first_trainable = stages[len(stages) - cfg.trainable_layers] if cfg.trainable_layers else len(feats)
        _freeze(feats, [str(i) for i in range(first_trainable, len(feats))])
        layers = {str(k): str(v) for v, k in enumerate(picked)}
        channels = [feats[k].out_channels for k in picked]
        return BackboneWithFPN(feats, layers, channels, cfg.fpn_channels, extra_blocks=extra)
    raise ModelError(f"unknown backbone '{cfg.backbone}'")


__all__ = ["ModelError", "TinyBody", "build_backbone", "load_weight_file", "norm_layer"]
