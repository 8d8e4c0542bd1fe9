'''``dtg export``: a checkpoint's detector as a plain torchvision ``FasterRCNN`` state dict.

Writes ``--out`` (e.g. ``model.pt``: ``torch.save`` of ``FasterRCNN.state_dict()``, loadable
with ``weights_only=True``) and beside it ``model.json`` (same stem): every constructor
argument needed to rebuild the network — backbone type, norm layer, FPN return layers and
channels, anchors, RoI pooling, box head width, ``num_classes`` (foreground; the predictor
has ``num_classes + 1`` outputs, 0 = background), the ``FasterRCNN`` keyword arguments
(resize, normalisation, RPN and box parameters, read off the built model), class names and
the COCO category id of each label.

ResNet-18/50 and MobileNet-V2 backbones are plain torchvision modules. The ``tiny`` backbone
is dtg's own small conv net, so rebuilding it needs a 12-line module definition (plain torch,
no dtg): ``model.json`` says so (``backbone.plain_torchvision``), and :data:`LOADER` — the
README snippet, run by the tests in a process where ``import dtg`` fails — contains it.
'''

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtg.config import ConfigError
from dtg.tools.files import Staged, json_bytes

if TYPE_CHECKING:  # torch loads inside the functions: `dtg --help` stays fast
    from torch import nn

FORMAT = "dtg-export/1"

LOADER = '''\
import json
import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def norm_layer(kind):
    if kind == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    return {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}[kind]


def tiny_body(width, norm):
    """dtg's 'tiny' backbone body (not in torchvision): stride-2 conv stages of width w..8w."""
    def stage(c_in, c_out, convs):
        layers = []
        for i in range(convs):
            layers += [nn.Conv2d(c_out if i else c_in, c_out, 3, 1 if i else 2, 1, bias=False),
                       norm(c_out), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)
    w = width
    return nn.Sequential(OrderedDict(stem=stage(3, w, 1), layer1=stage(w, w, 2), layer2=stage(w, 2 * w, 2),
                                     layer3=stage(2 * w, 4 * w, 2), layer4=stage(4 * w, 8 * w, 2)))


def load_dtg_export(weights="model.pt", meta="model.json"):
    """(torchvision FasterRCNN in eval mode, class names of labels 1..K) of a `dtg export`."""
    with open(meta) as f:
        m = json.load(f)
    b, a, r = m["backbone"], m["anchors"], m["roi_pool"]
    norm = norm_layer(b["norm"])
    if b["type"] == "tiny":
        body = tiny_body(b["tiny_width"], norm)
    elif b["type"] == "mobilenet_v2":
        body = mobilenet_v2(weights=None, norm_layer=norm).features
    else:  # resnet18 / resnet50
        body = {"resnet18": resnet18, "resnet50": resnet50}[b["type"]](weights=None, norm_layer=norm)
    backbone = BackboneWithFPN(body, b["return_layers"], b["in_channels_list"], b["out_channels"],
                               extra_blocks=LastLevelMaxPool())
    model = FasterRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=AnchorGenerator(tuple(map(tuple, a["sizes"])), tuple(map(tuple, a["aspect_ratios"]))),
        rpn_head=RPNHead(b["out_channels"], len(a["aspect_ratios"][0])),
        box_roi_pool=MultiScaleRoIAlign(r["featmap_names"], r["output_size"], r["sampling_ratio"]),
        box_head=TwoMLPHead(b["out_channels"] * r["output_size"] ** 2, m["box_head_dim"]),
        box_predictor=FastRCNNPredictor(m["box_head_dim"], m["num_classes"] + 1),
        **m["faster_rcnn_kwargs"],
    )
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), m["class_names"]
'''


def describe(net: "nn.Module", model_cfg: Any, categories: list[dict]) -> dict[str, Any]:
    """The ``model.json`` of a built dtg ``FasterRCNN`` (read off the modules, not the config)."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from dtg.engine.checkpoint import CheckpointError

    backbone, rpn, heads, tf = net.backbone, net.rpn, net.roi_heads, net.transform
    if not isinstance(backbone.fpn.extra_blocks, LastLevelMaxPool):
        raise CheckpointError(f"cannot export: FPN extra block {type(backbone.fpn.extra_blocks).__name__} is not LastLevelMaxPool")
    pool = heads.box_roi_pool
    size = pool.output_size[0] if isinstance(pool.output_size, (list, tuple)) else pool.output_size
    cats = sorted(categories, key=lambda c: int(c["id"]))
    kind = model_cfg.backbone
    plain = kind != "tiny"
    bb: dict[str, Any] = {
        "type": kind,
        "norm": model_cfg.norm,  # bn | frozen_bn | gn (GroupNorm(gcd(32, C), C))
        "return_layers": {str(k): str(v) for k, v in backbone.body.return_layers.items()},
        "in_channels_list": [int(blk[0].in_channels) for blk in backbone.fpn.inner_blocks],
        "out_channels": int(backbone.out_channels),
        "extra_blocks": "LastLevelMaxPool",
        "plain_torchvision": plain,
        "note": "torchvision body: " + {"mobilenet_v2": "mobilenet_v2(norm_layer=...).features"}.get(kind, f"{kind}(norm_layer=...)")
        if plain else "dtg's own small conv body: rebuild it with tiny_body() of the loader snippet (plain torch, no dtg)",
    }
    if kind == "tiny":
        bb["tiny_width"] = int(model_cfg.tiny_width)
    min_size = list(tf.min_size)
    kwargs = {
        "min_size": min_size[0] if len(min_size) == 1 else min_size,
        "max_size": tf.max_size, "image_mean": list(tf.image_mean), "image_std": list(tf.image_std),
        "rpn_pre_nms_top_n_train": rpn._pre_nms_top_n["training"], "rpn_pre_nms_top_n_test": rpn._pre_nms_top_n["testing"],
        "rpn_post_nms_top_n_train": rpn._post_nms_top_n["training"], "rpn_post_nms_top_n_test": rpn._post_nms_top_n["testing"],
        "rpn_nms_thresh": rpn.nms_thresh, "rpn_score_thresh": rpn.score_thresh,
        "rpn_fg_iou_thresh": rpn.proposal_matcher.high_threshold, "rpn_bg_iou_thresh": rpn.proposal_matcher.low_threshold,
        "rpn_batch_size_per_image": rpn.fg_bg_sampler.batch_size_per_image, "rpn_positive_fraction": rpn.fg_bg_sampler.positive_fraction,
        "box_score_thresh": heads.score_thresh, "box_nms_thresh": heads.nms_thresh, "box_detections_per_img": heads.detections_per_img,
        "box_fg_iou_thresh": heads.proposal_matcher.high_threshold, "box_bg_iou_thresh": heads.proposal_matcher.low_threshold,
        "box_batch_size_per_image": heads.fg_bg_sampler.batch_size_per_image, "box_positive_fraction": heads.fg_bg_sampler.positive_fraction,
        "bbox_reg_weights": list(heads.box_coder.weights),
    }
    return {
        "format": FORMAT,
        "class": "torchvision.models.detection.FasterRCNN",
        "num_classes": int(heads.box_predictor.cls_score.out_features) - 1,
        "class_names": [str(c["name"]) for c in cats],
        "category_ids": [int(c["id"]) for c in cats],
        "backbone": bb,
        "anchors": {"sizes": [list(s) for s in rpn.anchor_generator.sizes],
                    "aspect_ratios": [list(r) for r in rpn.anchor_generator.aspect_ratios]},
        "roi_pool": {"featmap_names": list(pool.featmap_names), "output_size": int(size), "sampling_ratio": int(pool.sampling_ratio)},
        "box_head_dim": int(heads.box_head.fc7.out_features),
        "faster_rcnn_kwargs": kwargs,
        "input": "float RGB (3, H, W) in [0, 1]; FasterRCNN resizes (short edge min_size, long edge <= max_size) "
                 "and normalises itself; dtg resizes with PIL bilinear instead, so boxes agree exactly only for "
                 "images already at that size",
    }


def export(checkpoint: str | Path, out: str | Path, which: str | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """Write the state dict and its ``.json``; returns ``(weights path, json path, json dict)``."""
    import torch

    from dtg.tools.predict import load_model

    out = Path(out)
    if out.suffix == ".json":
        raise ConfigError(f"--out {out}: the weights file must not end in .json (the json goes beside it)")
    ckpt, which, cfg, model = load_model(checkpoint, which)
    meta = describe(model.net, cfg.model, ckpt["categories"])
    meta["source"] = {"checkpoint": Path(checkpoint).name, "model": which, "iteration": ckpt.get("iteration"),
                      "method": cfg.method}
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    meta_path = out.with_suffix(".json")
    with Staged(out.parent) as st:
        torch.save(state, st.path(out.name))
        st.path(meta_path.name).write_bytes(json_bytes(meta, indent=2))
    return out, meta_path, meta


def cmd_export(args: argparse.Namespace) -> int:
    weights, meta_path, meta = export(args.checkpoint, args.out, args.model)
    kind = meta["backbone"]["type"]
    note = "" if meta["backbone"]["plain_torchvision"] else " (the tiny backbone needs the small body definition of the loader snippet)"
    print(f"{meta['source']['model']} of {args.checkpoint} -> {weights} + {meta_path}: torchvision FasterRCNN, "
          f"{kind} backbone, {meta['num_classes']} classes{note}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dtg export``."""
    p = subparsers.add_parser("export", help="a checkpoint's detector as a plain torchvision FasterRCNN state dict + model.json")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dtg train")
    p.add_argument("--out", required=True, help="weights file to write, e.g. model.pt (its .json goes beside it)")
    p.add_argument("--model", choices=["teacher", "student"], help="which model (default: teacher if present)")
    p.set_defaults(func=cmd_export)
    return p
