"""GPU section of ``dtg bench speed``: R50-FPN at 1333 x 800, 1 + 4 images, fp32 and AMP.

A small synthetic dataset of large images (canvas sides 800..1333, views resized to a short
edge of 800 with the long edge capped at 1333) is generated in a temporary folder; a real
:class:`Trainer` is built on it with the paper's R50-FPN sizes (anchors 32..512, 2000 / 1000
RPN proposals, 512 RoIs per image), and :func:`dtg.bench.speed_step.measure` times the three
methods and the lower bound one at a time, with their peak GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from dtg.bench import speed_step as ss
from dtg.config import Config, ModelConfig, SynthConfig, ViewConfig


def paper_model(pretrained: str | None, backbone: str = "resnet50") -> ModelConfig:
    """R50-FPN as the paper trains it (frozen BN with ImageNet weights; GroupNorm when random)."""
    return ModelConfig(
        backbone=backbone, pretrained=pretrained, norm="frozen_bn" if pretrained else "gn", trainable_layers=3,
        fpn_channels=256, anchor_sizes=[32, 64, 128, 256, 512], rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
        roi_batch_size_per_image=512, box_head_dim=1024,
    )


def large_config(root: Path, model: ModelConfig, device: str, amp: bool, short: int, max_size: int,
                 n_l: int, n_u: int, num_train: int) -> Config:
    """A config over a generated dataset of ``num_train`` large images under ``root``."""
    from dtg.data.synth import generate

    cfg = Config()
    cfg.synth = SynthConfig(out_dir=str(root / "data"), num_train=num_train, num_val=1, labeled_percent=50.0,
                            image_size=[short, max_size], object_size=[max(8, short // 25), short // 2], seed=0)
    paths = generate(cfg.synth, progress=False)
    d = cfg.data
    d.train_json, d.train_images = str(paths.train_labeled), str(paths.train_images)
    d.unlabeled, d.unlabeled_images = str(paths.train_unlabeled), str(paths.train_images)
    d.val_json, d.num_workers, d.batch_labeled, d.batch_unlabeled = "", 0, n_l, n_u
    d.labeled_view = ViewConfig(short_edge=[short, short], max_size=max_size)
    d.weak_view = ViewConfig(short_edge=[short, short], max_size=max_size)
    d.strong_view = ViewConfig(short_edge=[short, short], max_size=max_size, strong=True)
    cfg.model, cfg.device, cfg.method = model, device, "dtg"
    cfg.solver.amp, cfg.solver.lr = amp, 0.01
    cfg.semi.burn_in, cfg.semi.alpha_warmup = 0, 0
    cfg.output_dir = str(root / f"out_{'amp' if amp else 'fp32'}")
    return cfg


def gpu_tables(args: argparse.Namespace, device: str = "cuda", short: int = 800, max_size: int = 1333,
               backbone: str = "resnet50", n_l: int = 1, n_u: int = 4, precisions: tuple[bool, ...] = (False, True),
               num_train: int = 16) -> str:
    """Markdown: step time and peak memory of each method, per precision (``args`` as for :func:`ss.measure`)."""
    from dtg.engine.trainer import Trainer

    out = [f"Weights {args.gpu_pretrained or 'random (GroupNorm instead of frozen BN)'}; synthetic images, "
           f"short edge {short}, long edge <= {max_size}; {n_l} labeled + {n_u} unlabeled per step.\n"]
    with tempfile.TemporaryDirectory(prefix="dtg_speed_gpu_") as tmp:
        for amp in precisions:
            cfg = large_config(Path(tmp), paper_model(args.gpu_pretrained, backbone), device, amp, short, max_size,
                               n_l, n_u, num_train)
            trainer = Trainer(cfg, log=lambda m: None, progress=False)
            out.append(f"### {'AMP (fp16 autocast)' if amp else 'fp32'}\n")
            lines, _ = ss.measure(trainer, args, interleave=False)
            out.extend(lines)
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return "\n".join(out) + "\n"
