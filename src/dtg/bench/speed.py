"""``dtg bench speed``: where a training step's time goes, as markdown tables (a benchmark run by hand).

    dtg bench speed                                   # every section, embedded default, 5 measured steps
    dtg bench speed --sections step data --repeat 3   # just the step cost and the data path
    dtg bench speed --profile                         # + torch.profiler / cProfile of a few dtg steps

Sections:
  step     median wall time of Trainer.step for supervised (as many labeled images as the Mean
           Teacher batch has images), sparse, dtg, and the Mean Teacher lower bound (teacher forward
           on the weak views + student forward/backward on every student image; no targets), on
           the same batches, interleaved, after --warmup steps; ratios dtg / lower bound and
           dtg / sparse against their targets (<= 1.10, <= 1.05).
  kernels  nms_clusters vs batched_nms, windowed anchor matching, DTG target building per image,
           image decoding and weak / strong augmentation per image.
  data     images/s the training DataLoader delivers (configured workers) vs images/s a dtg step uses.
  eval     the COCO evaluator backends (bench_evaluator.py's synthetic set).
  memory   peak RSS of training --mem-steps iterations (Trainer.train in a subprocess, same weights and
           thresholds; peak GPU memory with CUDA).
  gpu      with CUDA only: R50-FPN, 1 + 4 images of 1333 x 800, fp32 and AMP, step time and peak
           memory of the three methods and the lower bound.
  cpu-kernels  the step section under cpu_kernels fast and portable, each in fresh processes,
           interleaved over --rounds rounds: what portable kernels cost per step (not in the default
           set of sections: name it).

Weights are random (or --checkpoint's); the teacher's thresholds are then calibrated on the first
batch (--rpn-frac, --rcnn-frac, --pseudo-per-image) so that clusters and pseudo boxes exist, and
the values used are printed. Timings on a shared machine are contended: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECTIONS = ("step", "kernels", "data", "eval", "memory", "gpu", "cpu-kernels")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``speed`` on an argparse subparsers object."""
    p = subparsers.add_parser("speed", help="timings: step cost, kernels, data path, evaluator, memory, GPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML over the built-in defaults (default: the embedded config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=[s for s in SECTIONS if s != "cpu-kernels"])
    p.add_argument("--repeat", type=int, default=5, help="measured steps / calls per case (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method first (default 2)")
    p.add_argument("--out", default="runs/speed/speed.md", help="markdown file to write (default runs/speed/speed.md)")
    p.add_argument("--profile", action="store_true", help="profile --profile-steps dtg steps (torch.profiler, cProfile)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps profiled (default 3, at least 1)")
    p.add_argument("--checkpoint", help="start student and teacher from this checkpoint instead of random weights")
    p.add_argument("--rpn-frac", type=float, default=0.01, help="share of teacher anchors >= dtg.rpn.tau (default 0.01)")
    p.add_argument("--rcnn-frac", type=float, default=0.1, help="share of teacher proposals >= dtg.rcnn.tau (default 0.1)")
    p.add_argument("--pseudo-per-image", type=float, default=4.0, help="sparse pseudo boxes per image (default 4)")
    p.add_argument("--no-calibrate", action="store_true", help="keep the config's thresholds")
    p.add_argument("--nms-sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--anchors", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    p.add_argument("--aug-images", type=int, default=16)
    p.add_argument("--loader-batches", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--mem-steps", type=int, default=20)
    p.add_argument("--mem-methods", nargs="+", default=["dtg"], choices=["supervised", "sparse", "dtg"])
    p.add_argument("--gpu-pretrained", help="local ResNet-50 weights for the gpu section (else random init, GroupNorm)")
    p.add_argument("--rounds", type=int, default=3, help="cpu-kernels: interleaved rounds per mode (default 3)")
    p.add_argument("--medians-json", help=argparse.SUPPRESS)  # cpu-kernels' subprocesses: the step medians as JSON
    p.set_defaults(func=cmd_speed)
    return p


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def step_section(trainer: Any, args: argparse.Namespace, out: list[str]) -> dict[str, Any]:
    """Calibrate, time the four steps (interleaved on CPU), append the table; returns what later sections reuse."""
    from dtg.bench import speed_step as ss

    lines, shared = ss.measure(trainer, args, interleave=trainer.device.type != "cuda")
    out.extend(lines)
    return shared


def gpu_section(args: argparse.Namespace, out: list[str]) -> None:
    """R50-FPN at 1333 x 800, 1 + 4 images, fp32 and AMP (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        out.append("skipped: CUDA is not available on this machine (torch.cuda.is_available() is False).\n")
        return
    from dtg.bench import speed_gpu

    out.append(speed_gpu.gpu_tables(args))


def cmd_speed(args: argparse.Namespace) -> int:
    """Run the chosen sections; print and write the markdown."""
    import torch

    from dtg.config import load_config
    from dtg.engine.trainer import Trainer

    t_start = time.perf_counter()
    args.profile_steps = max(1, args.profile_steps)
    cfg = load_config(args.config, list(args.overrides))
    cfg.method = "dtg"  # loads the unlabeled data; every method is then timed on it
    out: list[str] = ["# dtg bench speed\n"]
    out.append(f"torch {torch.__version__}, Python {platform.python_version()}, {_cores()} cores, "
               f"torch threads {cfg.threads or torch.get_num_threads()}, device {cfg.device}; load average "
               f"(1/5/15 min) at start {_load()}. **Shared machine: when the load average exceeds the core count, "
               f"other jobs compete for the CPU and every timing below is contended (inflated and noisy).**\n")
    sections = set(args.sections)
    need_step = bool(sections & {"step", "kernels", "data"}) or args.profile
    with tempfile.TemporaryDirectory(prefix="dtg_speed_") as tmp:
        cfg.output_dir = tmp
        trainer = None
        if need_step or "memory" in sections:
            if not Path(cfg.data.train_json).is_file():
                from dtg.data.synth import generate

                generate(cfg.synth, progress=False)
            trainer = Trainer(cfg, log=lambda m: None, progress=False)
            if args.checkpoint:
                from dtg.engine.checkpoint import load_checkpoint

                ckpt = load_checkpoint(args.checkpoint)
                trainer.model.net.load_state_dict(ckpt["student"])
                trainer.teacher.net.load_state_dict(ckpt.get("teacher", ckpt["student"]))
            out.append(f"Weights: {args.checkpoint or 'random initialisation'}; config: "
                       f"{args.config or 'embedded default'} {' '.join(args.overrides)}\n")
        from dtg.bench import speed_misc as sm
        from dtg.bench import speed_step as ss

        shared: dict[str, Any] = {}
        if need_step:
            out.append("## (a) step cost\n")
            shared = step_section(trainer, args, out)
            if args.medians_json:
                Path(args.medians_json).write_text(json.dumps(shared["medians"]))
        if args.profile:
            out.append(f"## profile of {args.profile_steps} dtg steps\n")
            out.append(ss.profile_steps(trainer, shared["steps"], "dtg", shared["mixed"][: args.profile_steps]))
        if "kernels" in sections:
            out.append("## (b) kernels\n\n### nms_clusters vs batched_nms (median ms)\n")
            out.append(sm.clustering_table(args.nms_sizes, args.repeat))
            out.append("### anchor matching (median ms)\n")
            out.append(sm.matching_table(args.anchors, args.repeat))
            out.append("### DTG target building per image (this config, batch 0)\n")
            out.append(sm.inc_table(trainer, shared["mixed"][0], args.repeat))
            out.append(f"### image decoding and augmentation per image ({args.aug_images} images)\n")
            out.append(sm.augmentation_table(trainer, args.aug_images))
        if "data" in sections:
            rate, workers = sm.loader_rate(trainer, args.loader_batches)
            d = cfg.data
            used = (d.batch_labeled + d.batch_unlabeled) / shared["dtg_median"]
            out.append("## (c) data path\n")
            out.append(f"| DataLoader ({workers} workers) delivers | a dtg step uses | delivered / used |\n"
                       f"|---:|---:|---:|\n| {rate:.1f} images/s | {used:.1f} images/s | {rate / used:.2f} |\n")
            out.append("(source images: each unlabeled one is decoded once and gives a weak and a strong view; "
                       "delivery measured with no step running, after the first batch.)\n")
        if "eval" in sections:
            out.append("## (d) evaluator\n")
            out.append(sm.evaluator_table(args.eval_images, 1))  # one timed call after a warm-up call
        if "memory" in sections:
            threads = cfg.threads or min(2, _cores())
            out.append(f"## (e) memory: training {args.mem_steps} steps at full alpha from the weights above, no eval, "
                       f"{threads} threads, "
                       f"dtg.rpn.tau {cfg.dtg.rpn.tau:.4g}, dtg.rcnn.tau {cfg.dtg.rcnn.tau:.4g}, "
                       f"sparse.pseudo_score_thresh {cfg.sparse.pseudo_score_thresh:.4g}\n")
            out.append("| method | steps | peak RSS trainer MiB | largest DataLoader worker MiB | peak GPU GiB | s |\n"
                       "|---|---:|---:|---:|---:|---:|")
            out.extend(sm.memory_row(trainer, m, args.mem_steps, threads, args.checkpoint) for m in args.mem_methods)
            out.append("\n(trainer: VmHWM of its process; workers: getrusage ru_maxrss of the largest, which counts "
                       "pages it shares with the trainer since the fork.)\n")
            out.append(f"\nthis benchmark process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f}"
                       " MiB (all sections so far)\n")
        if "cpu-kernels" in sections:
            from dtg.bench.speed_kernels import kernels_section

            passed = [*(["--config", args.config] if args.config else []), *[a for o in args.overrides for a in ("--set", o)],
                      "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
            out.append("## (g) cpu_kernels: portable against fast, per step\n")
            out.append(kernels_section(passed, args.rounds, lambda m: print(f"[speed] {m}", file=sys.stderr, flush=True)))
        if "gpu" in sections:
            out.append("## (f) GPU: R50-FPN, 1333 x 800, 1 + 4 images\n")
            gpu_section(args, out)
    out.append(f"\nload average at end {_load()}; {time.perf_counter() - t_start:.0f} s in all.\n")
    text = "\n".join(out)
    print(text)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written: {path}", file=sys.stderr)
    return 0

