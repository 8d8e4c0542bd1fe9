"""Training-step timings for ``dtg bench speed``: every registered method, the Mean Teacher lower bound, a profile.

Each method is timed through its own :class:`dtg.engine.step.TrainStep` (losses, backward,
clipping, SGD, EMA), built here on the trainer's student and teacher (:func:`build_steps`),
at an iteration past burn-in and warm-up so that alpha has its full value. Every method sees
the same batches.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dtg.config import Config
from dtg.data.dataset import TrainData, collate
from dtg.data.sampler import MixedBatchSampler
from dtg.geometry import teacher_to_student
from dtg.engine.step import TrainStep
from dtg.engine.trainer import Trainer
from dtg.methods import REGISTRY, build_method
from dtg.methods.base import Batch, Method, strong_images, weak_images
from dtg.methods.dtg.teacher import TeacherPass, teacher_pass
from dtg.methods.dtg.correspondence import map_proposals
from dtg.models.detector import Detector


class LowerBoundMethod(Method):
    """What any Mean Teacher step must do, and nothing of DTG's or sparse's own work.

    Labeled: the ordinary supervised losses (the step's own). Unlabeled: the teacher's forward on the weak views
    (backbone, dense RPN, proposals, R-CNN on its proposals; no gradient): DTG's own teacher pass
    (:func:`dtg.methods.dtg.teacher.teacher_pass`), as its targets; and the student's
    forward on the strong views (backbone, dense RPN, R-CNN on the teacher's proposals mapped
    into the student view, as DTG's RoIs are), with a zero-weight dummy loss over all student
    outputs so that the backward pass runs through them. No targets, clustering or matching.
    """

    name = "lower bound"
    uses_unlabeled = True
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device

    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> TeacherPass:
        """The teacher pass DTG makes, and nothing built from it."""
        return teacher_pass(teacher, weak_images(items, self.device))

    def student_losses(self, student: Detector, items: list[dict[str, Any]], targets: TeacherPass
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The student's pass, its R-CNN on the mapped teacher proposals, a zero-weight dummy loss."""
        s = student.forward_dense(strong_images(items, self.device))
        rois = [map_proposals(p, teacher_to_student(it["weak_matrix"], it["strong_matrix"]).to(self.device), size)
                for p, it, size in zip(targets.dense.proposals, items, s.images.image_sizes)]
        logits, deltas = student.roi_forward(s.features, rois, s.images.image_sizes)
        dummy = logits.sum() + deltas.sum() + s.rpn.objectness.sum() + s.rpn.deltas.sum()
        return {"unsup_dummy": dummy * 0.0}, {}


@dataclass
class StepTimes:
    """Wall times (s) of one method's measured steps, its step statistics and peak GPU memory."""

    times: list[float] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)
    peak_gpu_bytes: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def draw_batches(trainer: Trainer, n_labeled: int, n_unlabeled: int, count: int, seed: int = 0) -> list[Batch]:
    """``count`` collated batches of the trainer's data, made in this process (no DataLoader)."""
    d, src = trainer.cfg.data, trainer.data
    n_unl = len(src.unlabeled.records) if (src.unlabeled and n_unlabeled) else 0
    sampler = iter(MixedBatchSampler(len(src.labeled.records), n_unl, n_labeled, n_unlabeled if n_unl else 0, seed=seed))
    data = TrainData(src.labeled, src.unlabeled, src.labels, d.labeled_view, d.weak_view, d.strong_view)
    return [collate([data[k] for k in next(sampler)]) for _ in range(count)]


def full_alpha_iteration(cfg: Config) -> int:
    """First iteration where alpha(t) has reached ``semi.alpha``."""
    return cfg.semi.burn_in + max(cfg.semi.alpha_warmup, 0)


@torch.no_grad()
def calibrate(teacher: Detector, batch: Batch, cfg: Config, rpn_frac: float, rcnn_frac: float,
              pseudo_per_image: float, device: torch.device) -> dict[str, float]:
    """Thresholds giving the teacher's weak-view outputs on ``batch`` a set amount of candidates.

    Untrained or briefly trained weights put no score above the paper's thresholds, so no
    cluster (and no pseudo box) would exist and the methods' own work would not be measured.
    ``dtg.rpn.tau``: the ``1 - rpn_frac`` quantile of the anchors' objectness probability;
    ``dtg.rcnn.tau``: the ``1 - rcnn_frac`` quantile of the proposals' best foreground probability;
    ``sparse.pseudo_score_thresh``: the score of the ``pseudo_per_image``-th best detection (on average).
    Writes them into ``cfg`` (``dtg.rpn.tau``, ``dtg.rcnn.tau``, ``sparse.pseudo_score_thresh``).
    """
    items = batch["unsup"]
    t = teacher_pass(teacher, weak_images(items, device), train_top_n=None)  # the teacher module's own top-N
    obj = t.dense.rpn.objectness.sigmoid().flatten().float()
    fg = t.logits.float().softmax(-1)[:, 1:].amax(-1)
    dets = build_method(replace(cfg, method="sparse"), device).teacher_targets(teacher, items).detections
    scores = torch.cat([d["scores"] for d in dets]).sort(descending=True).values.cpu()
    k = int(round(pseudo_per_image * len(items)))
    # torch.quantile caps its input size; a strided subsample is plenty for a threshold.
    obj = obj[:: max(1, obj.numel() // 1_000_000)]
    out = {
        "dtg.rpn.tau": float(torch.quantile(obj, 1.0 - rpn_frac)),
        "dtg.rcnn.tau": float(torch.quantile(fg, 1.0 - rcnn_frac)) if fg.numel() else cfg.dtg.rcnn.tau,
        "sparse.pseudo_score_thresh": float(scores[min(k, len(scores)) - 1]) if k and len(scores) else 1.0,
    }
    cfg.dtg.rpn.tau, cfg.dtg.rcnn.tau, cfg.sparse.pseudo_score_thresh = out.values()
    return out


def build_steps(trainer: Trainer, cfg: Config) -> dict[str, TrainStep]:
    """A :class:`TrainStep` per registered method and the lower bound, on the trainer's models, reading ``cfg`` as it is now."""
    methods = {name: cls(cfg, trainer.device) for name, cls in REGISTRY.items()
               if not cls.needs_unlabeled_boxes}  # the oracle reads ground truth
    methods["lower bound"] = LowerBoundMethod(cfg, trainer.device)
    return {name: TrainStep(cfg, trainer.model, trainer.teacher, m, trainer.dist, trainer.device, lambda msg: None)
            for name, m in methods.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, steps: dict[str, TrainStep], batches: dict[str, list[Batch]], warmup: int,
               repeat: int, interleave: bool = True) -> dict[str, StepTimes]:
    """Median-ready wall times of each method's :class:`TrainStep` (``steps``, from :func:`build_steps`).

    ``batches[name]`` holds at least ``warmup + repeat`` batches. ``interleave`` (CPU default)
    runs the methods in turn, step by step, so a shared machine's load hits them alike; without
    it (GPU) each method runs alone and its peak GPU memory is recorded.
    """
    out = {name: StepTimes() for name in steps}
    start = full_alpha_iteration(trainer.cfg)

    def one(name: str, i: int, record: bool) -> None:
        _sync(trainer.device)
        t0 = time.perf_counter()
        scalars = steps[name](batches[name][i], start + i)
        _sync(trainer.device)
        if record:
            out[name].times.append(time.perf_counter() - t0)
            for k, v in scalars.items():
                if k.endswith("per_image"):
                    out[name].stats.setdefault(k, []).append(v)

    cuda = trainer.device.type == "cuda"
    if interleave:
        for i in range(warmup + repeat):
            for name in steps:
                one(name, i, i >= warmup)
    else:
        for name in steps:
            for i in range(warmup):
                one(name, i, False)
            if cuda:
                torch.cuda.reset_peak_memory_stats(trainer.device)
            for i in range(warmup, warmup + repeat):
                one(name, i, True)
            if cuda:
                out[name].peak_gpu_bytes = torch.cuda.max_memory_allocated(trainer.device)
    return out


def _ratio(a: float, b: float, target: float) -> str:
    r = a / b
    return f"{r:.3f} ({'meets' if r <= target else 'misses'} <= {target:.2f})"


def measure(trainer: Trainer, args: Any, interleave: bool) -> tuple[list[str], dict[str, Any]]:
    """The step-cost table of ``trainer``'s config (``args``: repeat, warmup, profile_steps, thresholds).

    Returns markdown lines and ``{"mixed": batches, "steps": ..., "dtg_median": s, "medians": {method: s}}``
    for later sections.
    """
    cfg, dev, out = trainer.cfg, trainer.device, []
    n_l, n_u = cfg.data.batch_labeled, cfg.data.batch_unlabeled
    count = args.warmup + max(args.repeat, args.profile_steps)
    mixed = draw_batches(trainer, n_l, n_u, count)
    sup = draw_batches(trainer, n_l + n_u, 0, count)
    if args.no_calibrate:
        out.append(f"Thresholds from the config: dtg.rpn.tau {cfg.dtg.rpn.tau}, dtg.rcnn.tau {cfg.dtg.rcnn.tau}, "
                   f"sparse.pseudo_score_thresh {cfg.sparse.pseudo_score_thresh}.\n")
    else:
        th = calibrate(trainer.teacher, mixed[0], cfg, args.rpn_frac, args.rcnn_frac, args.pseudo_per_image, dev)
        out.append(f"Thresholds calibrated on batch 0's weak views (top {100 * args.rpn_frac:g} % of anchors, "
                   f"top {100 * args.rcnn_frac:g} % of proposals, {args.pseudo_per_image:g} pseudo boxes / image): "
                   + ", ".join(f"{k} = {v:.4f}" for k, v in th.items()) + ".\n")
    steps = build_steps(trainer, cfg)
    batches = {name: (sup if name == "supervised" else mixed) for name in steps}
    res = time_steps(trainer, steps, batches, args.warmup, args.repeat, interleave)
    lb = res["lower bound"].median
    out.append(f"{args.repeat} measured steps per method after {args.warmup} warm-up steps"
               f"{', methods interleaved' if interleave else ', one method at a time'}; alpha at its full value; "
               f"images per step: supervised {n_l + n_u} labeled, others {n_l} + {n_u}.\n")
    gpu = dev.type == "cuda" and not interleave
    out.append("| method | median s | min s | / lower bound |" + (" peak GPU GiB |" if gpu else "")
               + " per image (mean) |\n|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---|")
    for name, r in res.items():
        stats = ", ".join(f"{k.replace('_per_image', '')} {sum(v) / len(v):.1f}" for k, v in r.stats.items()) or "-"
        mem = f" {(r.peak_gpu_bytes or 0) / 2**30:.2f} |" if gpu else ""
        out.append(f"| {name} | {r.median:.3f} | {min(r.times):.3f} | {r.median / lb:.2f} |{mem} {stats} |")
    best = {name: min(r.times) for name, r in res.items()}
    out.append(f"\ndtg / lower bound = {_ratio(res['dtg'].median, lb, 1.10)} by medians, "
               f"{_ratio(best['dtg'], best['lower bound'], 1.10)} by minima; "
               f"dtg / sparse = {_ratio(res['dtg'].median, res['sparse'].median, 1.05)} by medians, "
               f"{_ratio(best['dtg'], best['sparse'], 1.05)} by minima (on a loaded machine the minima are "
               "closer to the uncontended cost).\n")
    return out, {"mixed": mixed, "steps": steps, "dtg_median": res["dtg"].median,
                 "medians": {name: r.median for name, r in res.items()}}


def profile_steps(trainer: Trainer, steps: dict[str, TrainStep], name: str, batches: list[Batch], top: int = 25
                  ) -> str:
    """torch.profiler over method ``name``'s steps (top ops by self CPU time) and cProfile (top dtg functions, cumulative)."""
    from torch.profiler import ProfilerActivity, profile

    step = steps[name]
    start = full_alpha_iteration(trainer.cfg)  # the timed steps before these were the warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    prof_py = cProfile.Profile()
    with profile(activities=acts) as prof:
        prof_py.enable()
        for i, b in enumerate(batches):
            step(b, start + i)
        prof_py.disable()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    buf = io.StringIO()
    st = pstats.Stats(prof_py, stream=buf)
    st.sort_stats("cumulative").print_stats(r"dtg[/\\](engine|losses|models)", top)
    syncs = count_host_syncs(step, batches[-1], start + len(batches))
    base = count_host_syncs(steps["lower bound"], batches[-1], start + len(batches) + 1)
    base = base.split(":", 1)[1].split("(", 1)[0].strip()
    syncs += f"\n(the lower bound's step, for comparison: {base})\n"
    return f"### torch.profiler: top {top} ops by self CPU time over {len(batches)} steps\n\n```\n{ops}\n```\n\n" \
           f"### cProfile: dtg functions by cumulative time\n\n```\n{_trim_pstats(buf.getvalue())}\n```\n\n{syncs}"


def _trim_pstats(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:])


# Tensor -> host conversions: on CUDA each one waits for the device (a sync).
_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique")


def count_host_syncs(step: TrainStep, batch: Batch, iteration: int, top: int = 15) -> str:
    """Count, in one training ``step``, the calls that read a tensor's value on the host.

    ``.item() / .tolist() / bool() / int() / float()``, ``nonzero`` and ``unique`` (output size
    depends on the data) are wrapped for the step and attributed to the innermost frame in
    ``dtg`` (torchvision internals count at the dtg line that called them). On CPU they cost
    little; on CUDA each is a device-to-host synchronisation.
    """
    counts: Counter[str] = Counter()
    here = str(Path(__file__).parent)

    def where() -> str:
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if f"{os.sep}dtg{os.sep}" in name and not name.startswith(here):
                return f"{name.split(os.sep + 'dtg' + os.sep)[-1]}:{f.f_lineno} ({f.f_code.co_name})"
            f = f.f_back
        return "outside dtg"

    depth = [0]  # count the outermost call only (Tensor.unique calls torch.unique, nonzero may call item)

    def wrap(fn: Any) -> Any:
        def counted(*a: Any, **k: Any) -> Any:
            if depth[0] == 0:
                counts[where()] += 1
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return counted

    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}
    saved_fn = {"nonzero": torch.nonzero, "unique": torch.unique}
    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(fn))
        for name, fn in saved_fn.items():
            setattr(torch, name, wrap(fn))
        step(batch, iteration)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in saved_fn.items():
            setattr(torch, name, fn)
    lines = [f"### host reads of tensor values in one step: {sum(counts.values())} "
             "(.item/.tolist/bool/int/float, nonzero, unique; each a device sync on CUDA)\n",
             "| calls | where (innermost dtg frame) |", "|---:|---|"]
    lines += [f"| {n} | {w} |" for w, n in counts.most_common(top)]
    return "\n".join(lines) + "\n"
