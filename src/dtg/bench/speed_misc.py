"""Kernel, data-path, evaluator and memory measurements for ``dtg bench speed``.

The clustering, anchor-matching and evaluator cases are those of :mod:`dtg.bench.cases`, which
the repository's ``bench/*.py`` scripts time too.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torchvision.ops import batched_nms

from dtg.config import save_config
from dtg.data.coco import load_image
from dtg.data.augment import make_view
from dtg.bench import cases
from dtg.methods import Batch
from dtg.engine.trainer import Trainer
from dtg.methods.dtg.clusters import nms_clusters
from dtg.methods.dtg.correspondence import anchor_grid, map_anchors, match_anchors, match_anchors_with_iou
from dtg.methods.dtg.image_targets import rcnn_image_targets, rpn_image_targets
from dtg.methods import build_method
from dtg.methods.dtg.method import DTGMethod

def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time in ms of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def clustering_table(sizes: list[int], repeat: int) -> str:
    """nms_clusters vs batched_nms alone at each N, both box sets of bench_clustering.py (interleaved)."""
    g = torch.Generator().manual_seed(0)
    lines = ["| boxes | N | IoU | kept | batched_nms ms | nms_clusters ms | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, make, thr in [("uniform, 80 cls", cases.uniform_boxes, 0.5), ("dense, 5 lvl", cases.dense_boxes, 0.7)]:
        for n in sizes:
            boxes, scores, labels = make(n, g)
            keep, _ = nms_clusters(boxes, scores, labels, thr)
            t_nms, t_cl = cases.interleaved_times([lambda: batched_nms(boxes, scores, labels, thr),
                                                lambda: nms_clusters(boxes, scores, labels, thr)], repeat)
            a, b = statistics.median(t_nms), statistics.median(t_cl)
            lines.append(f"| {name} | {n} | {thr} | {keep.numel()} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x |")
    return "\n".join(lines) + "\n"


def matching_table(counts: list[int], repeat: int) -> str:
    """match_anchors on an 800 x 1344 student grid for N teacher anchors (bench_correspondence.py's setup)."""
    gen = torch.Generator().manual_seed(0)
    grid = cases.build_grid(800, 1344)
    lines = [f"student grid: {len(grid.anchors):,} anchors\n", "| N | with partner | match_anchors ms | us / anchor |",
             "|---:|---:|---:|---:|"]
    for n in counts:
        teacher = grid.anchors[torch.randperm(len(grid.anchors), generator=gen)[:n]]
        mapped = cases.map_unclipped(teacher, cases.random_similarity(800, 1344, gen))
        partner, _ = match_anchors_with_iou(mapped, grid, cases.CANON, 1)
        ms = median_ms(lambda: match_anchors_with_iou(mapped, grid, cases.CANON, 1), repeat)
        lines.append(f"| {n:,} | {int((partner >= 0).sum()):,} | {ms:.1f} | {1e3 * ms / n:.2f} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def inc_table(trainer: Trainer, batch: Batch, repeat: int) -> str:
    """Per-image cost of DTG's target building on a real batch, with the functions training calls
    (on the teacher pass and student layout of the DTG method's own :meth:`~DTGMethod.teacher_targets`)."""
    cfg, dev, teacher = trainer.cfg, trainer.device, trainer.teacher
    items = batch["unsup"]
    method = build_method(replace(cfg, method="dtg", dtg=replace(
        cfg.dtg, rcnn=replace(cfg.dtg.rcnn, enabled=True), rpn=replace(cfg.dtg.rpn, enabled=True, targets="dtg"))), dev)
    assert isinstance(method, DTGMethod)
    tt = method.teacher_targets(teacher, items)
    assert tt.rpn is not None
    t, mats, sizes, lay = tt.teacher.dense, tt.mats, tt.student_sizes, tt.rpn.layout
    rcnn_stage, rpn_stage, canonical = method.d.rcnn, method.d.rpn, method.canonical
    counts = [len(p) for p in t.proposals]
    logits, deltas = tt.teacher.logits.split(counts), tt.teacher.deltas.split(counts)

    def rcnn(i: int) -> object:
        return rcnn_image_targets(logits[i], deltas[i], t.proposals[i], mats[i], sizes[i],
                                  t.images.image_sizes[i], teacher.rcnn_box_coder, rcnn_stage)

    def grid() -> object:
        return anchor_grid(lay.anchors, lay.num_anchors_per_level, lay.feature_sizes, lay.padded_size)

    g = grid()

    def rpn(i: int) -> object:
        return rpn_image_targets(t.rpn.objectness[i], t.rpn.deltas[i], t.rpn.anchors, t.rpn.levels, g, mats[i],
                                 sizes[i], t.images.image_sizes[i], teacher.rpn_box_coder, canonical, rpn_stage)

    n = len(items)
    each = lambda f: median_ms(lambda: [f(i) for i in range(n)], repeat) / n  # noqa: E731
    rows = [
        ("R-CNN: rcnn_image_targets (mapping + INC)", each(rcnn), f"{statistics.fmean(counts):.0f} proposals"),
        ("RPN: anchor_grid (once per batch; per image here)", median_ms(grid, repeat) / n, f"{len(lay.anchors):,} anchors"),
        ("RPN: map_anchors + match_anchors", each(lambda i: match_anchors(map_anchors(t.rpn.anchors, mats[i]), g,
                                                                         canonical, rpn_stage.anchor_radius)),
         f"{len(t.rpn.anchors):,} teacher anchors"),
        ("RPN: rpn_image_targets (matching + INC)", each(rpn), f"dtg.rpn.tau {rpn_stage.tau:.3f}"),
    ]
    lines = ["| part | ms / image | size |", "|---|---:|---|"] + [f"| {a} | {b:.2f} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def augmentation_table(trainer: Trainer, count: int) -> str:
    """Per-image cost of decoding an image and building its weak and strong views (this process)."""
    recs = (trainer.data.unlabeled or trainer.data.labeled).records[:count]
    d = trainer.cfg.data
    imgs = [load_image(r.path) for r in recs]
    rng = random.Random(0)
    load = median_ms(lambda: [load_image(r.path) for r in recs], 2) / len(recs)
    weak = median_ms(lambda: [make_view(im, rng, d.weak_view) for im in imgs], 2) / len(recs)
    strong = median_ms(lambda: [make_view(im, rng, d.strong_view) for im in imgs], 2) / len(recs)
    return ("| part | ms / image |\n|---|---:|\n"
            f"| load_image (decode, RGB) | {load:.2f} |\n| weak view (resize, flip) | {weak:.2f} |\n"
            f"| strong view (resize, flip, photometric, geometric, cutout) | {strong:.2f} |\n")


def loader_rate(trainer: Trainer, batches: int) -> tuple[float, int]:
    """Source images per second the training DataLoader delivers (first batch excluded), and workers."""
    d = trainer.cfg.data
    per_batch = d.batch_labeled + (d.batch_unlabeled if trainer.method.uses_unlabeled else 0)
    it = iter(trainer._loader(start_batch=0))
    next(it)  # worker start-up
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * per_batch / (time.perf_counter() - t0)
    del it
    return rate, d.num_workers


def evaluator_table(images: int, repeat: int) -> str:
    """evaluate_bbox per backend on bench_evaluator.py's synthetic GT and detections."""
    import numpy as np

    from dtg.evaluation.coco_eval import BACKENDS, evaluate_bbox

    rng = np.random.default_rng(0)
    gt = cases.make_gt(images, 20, rng)
    dets = cases.make_dets(gt, 100, 20, rng)
    lines = [f"{images} images x 100 detections, 20 categories\n", "| backend | s | images/s | AP |", "|---|---:|---:|---:|"]
    for backend in BACKENDS:
        stats: dict = {}

        def call() -> None:
            stats.update(evaluate_bbox(gt, dets, backend=backend))

        s = median_ms(call, repeat) / 1e3
        lines.append(f"| {backend} | {s:.2f} | {images / s:.0f} | {100 * stats['AP']:.2f} |")
    return "\n".join(lines) + "\n"


# The child reports its own peak: VmHWM of /proc/self/status where there is one, because
# getrusage's ru_maxrss survives exec on Linux (a child forked from a 1 GiB benchmark
# process would report at least 1 GiB); ru_maxrss elsewhere.
_MEM_CHILD = """
import json, resource, sys, time, torch
from dtg.config import load_config
from dtg.engine.checkpoint import load_checkpoint
from dtg.engine.trainer import Trainer
config, checkpoint, *overrides = sys.argv[1:]
t0 = time.perf_counter()
trainer = Trainer(load_config(config, overrides), log=lambda m: None, progress=False)
if checkpoint:  # the benchmark's weights, as a fresh start (not a resume)
    ckpt = load_checkpoint(checkpoint)
    trainer.model.net.load_state_dict(ckpt["student"])
    trainer.teacher.net.load_state_dict(ckpt.get("teacher", ckpt["student"]))
trainer.train()
try:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"seconds": time.perf_counter() - t0, "self_kib": hwm,
       "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
       "cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
print("MEMORY " + json.dumps(out))
"""


def memory_row(trainer: Trainer, method: str, steps: int, threads: int, checkpoint: str | None) -> str:
    """Peak RSS of a training run of ``steps`` iterations of ``method`` at full alpha (no eval), in a subprocess.

    The run starts from ``checkpoint``'s weights (else random ones) with ``trainer.cfg``'s thresholds.
    """
    with tempfile.TemporaryDirectory(prefix="dtg_speed_mem_") as tmp:
        path = Path(tmp) / "run.yaml"
        save_config(trainer.cfg, path)
        sets = [f"output_dir={Path(tmp) / 'out'}", f"method={method}", f"solver.max_iter={steps}", "semi.burn_in=0",
                "semi.alpha_warmup=0", "data.val_json=", f"threads={threads}", f"checkpoint_period={steps + 1}"]
        r = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(path), checkpoint or "", *sets],
                           capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY ")), None)
    if line is None:
        return f"| {method} | {steps} | failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]} | | | |"
    m = json.loads(line[7:])
    gpu = "-" if m["cuda_bytes"] is None else f"{m['cuda_bytes'] / 2**30:.2f}"
    return (f"| {method} | {steps} | {m['self_kib'] / 2**10:.0f} | {m['children_kib'] / 2**10:.0f} | {gpu} | "
            f"{m['seconds']:.0f} |")
