"""Shared fixtures: a tiny generated dataset and a matching tiny training config."""

from __future__ import annotations

import pytest
import torch

from dtg.config import Config, SynthConfig, load_config
from dtg.data.synth import generate

torch.set_num_threads(1)  # tiny convolutions: 1 thread is faster than 2 on a loaded 2-core machine


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """12 train (4 labeled) + 4 val images of 96-128 px."""
    cfg = SynthConfig(
        out_dir=str(tmp_path_factory.mktemp("embedded")),
        num_train=12,
        num_val=4,
        labeled_percent=34.0,
        image_size=[96, 128],
        object_size=[10, 48],
        seed=0,
    )
    return generate(cfg, progress=False)


def tiny_config(paths, out_dir, *overrides: str) -> Config:
    """A config that trains a few iterations on ``tiny_dataset`` in seconds."""
    view = "{short_edge: [96, 112], max_size: 128, flip_prob: 0.5}"
    return load_config(
        None,
        [
            f"output_dir={out_dir}",
            f"data.train_json={paths.train_labeled}",
            f"data.train_images={paths.train_images}",
            f"data.unlabeled={paths.train_unlabeled}",
            f"data.unlabeled_images={paths.train_images}",
            f"data.val_json={paths.val}",
            f"data.val_images={paths.val_images}",
            "data.num_workers=0",
            "data.batch_labeled=2",
            f"data.labeled_view={view}",
            f"data.weak_view={view}",
            "data.test_size=96",
            "data.test_max_size=128",
            "model.backbone=tiny",  # the fast path: trained from scratch, no weight file needed
            "model.pretrained=null",
            "model.norm=bn",
            "model.trainable_layers=5",
            "model.tiny_width=8",
            "model.fpn_channels=16",
            "model.box_head_dim=32",
            "model.roi_batch_size_per_image=32",
            "model.rpn_batch_size_per_image=64",
            "solver.max_iter=4",
            "solver.warmup_iters=2",
            "solver.steps=[3]",
            "checkpoint_period=2",
            "log_period=1",
            "deterministic=true",
            *_steps_for(overrides),
            *overrides,
        ],
    )


def _steps_for(overrides) -> list[str]:
    """``solver.steps`` must lie below ``solver.max_iter``: drop the tiny step [3] for shorter runs."""
    given = [o for o in overrides if o.startswith("solver.max_iter=")]
    if given and int(given[-1].split("=", 1)[1]) <= 3 and not any(o.startswith("solver.steps=") for o in overrides):
        return ["solver.steps=[]"]
    return []


def intercept_step(step, around) -> None:
    """Route every call of the training ``step`` (a :class:`dtg.engine.step.TrainStep`) through ``around``.

    ``around(call, batch, iteration)`` must return ``call()``'s scalars; it may look at the
    batch and the trainer before and after. Only this instance changes (its class becomes a
    subclass), so the trainer's other uses of the step (checkpoint state, skip counts) are untouched.
    """
    base = type(step)

    class Intercepted(base):  # type: ignore[misc, valid-type]
        def __call__(self, batch, iteration):  # type: ignore[no-untyped-def]
            return around(lambda: base.__call__(self, batch, iteration), batch, iteration)

    step.__class__ = Intercepted


def poison_losses(monkeypatch, fn) -> None:
    """Make ``StudentLoss.forward`` return ``fn(losses, iteration)`` instead of its losses."""
    from dtg.engine.step import StudentLoss

    real = StudentLoss.forward

    def forward(self, teacher, batch, iteration):  # type: ignore[no-untyped-def]
        losses, stats = real(self, teacher, batch, iteration)
        return fn(losses, iteration), stats

    monkeypatch.setattr(StudentLoss, "forward", forward)
