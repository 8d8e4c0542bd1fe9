"""``dtg bench targets``: how good are the unlabeled targets a teacher gives, per method and stage?

    dtg bench targets --checkpoint runs/embedded/dtg/checkpoints/last.pth
    dtg bench targets --checkpoint CKPT --on labeled       # your own data: is the teacher ready?

For one checkpoint's teacher and the same weak/strong views of each image (drawn as training
draws them), both methods label the **same student samples** and are scored against the
hidden ground truth (:mod:`dtg.evaluation.targets`):

* R-CNN: the teacher's proposals mapped into the student view (DTG's RoIs). DTG labels them
  with its INC targets; sparse with Faster R-CNN's RoI matcher against the teacher's
  detections >= ``sparse.pseudo_score_thresh`` (uncertain ones as ignore regions).
* RPN: the student's anchors. DTG labels them with its RPN INC targets; sparse with the RPN
  matcher against the same pseudo boxes.

Also per FPN level the share of student anchors some teacher anchor is paired with, and the
weight one positive's classification term gets relative to a supervised positive (under
DTG's ``samples``, ``cluster`` and ``supervised`` normalisations, and under sparse's supervised losses),
``semi.alpha`` included. ``--on unlabeled`` (default) scores the run's unlabeled images with
their boxes from ``data.full_json`` (generated sets have them); ``--on labeled`` the labeled
images. Writes ``OUT/targets.md`` (also printed) and ``OUT/targets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is imported only when the command runs
    from dtg.evaluation.target_quality import TargetReport

STAGES = ("rcnn", "rpn")
METHODS = ("dtg", "sparse")


def score_checkpoint(checkpoint: str | Path, on: str = "unlabeled", max_images: int = 32, seed: int = 0,
                     overrides: Sequence[str] = ()) -> TargetReport:
    """Score both methods' targets for the checkpoint's teacher on up to ``max_images`` images.

    ``overrides`` (``KEY=VALUE``) change the checkpoint's config first (e.g. data paths or
    ``dtg.rcnn.tau``).
    """
    from dtg.config import ConfigError, apply_override, from_dict, to_dict
    from dtg.data.coco import load_labeled
    from dtg.data.dataset import LabelMap
    from dtg.engine.checkpoint import load_checkpoint
    from dtg.evaluation.target_quality import TargetReport, score_models, unlabeled_with_boxes
    from dtg.bench.explain import load_models

    ckpt = load_checkpoint(checkpoint)
    _, teacher, student, _ = load_models(ckpt, checkpoint)
    cfg = from_dict(ckpt["config"])
    for text in overrides:
        apply_override(cfg, text)
    if on == "labeled":
        src = load_labeled(cfg.data.train_json, cfg.data.train_images, log=lambda m: None)
        records, cats = src.records[:max_images], src.categories
    else:
        records = unlabeled_with_boxes(cfg, max_images)
        cats = load_labeled(cfg.data.full_json, cfg.data.unlabeled_images, log=lambda m: None,
                            check_files=False).categories
    labels = LabelMap(ckpt["categories"])
    if {c["id"] for c in cats} - set(labels.to_label):
        raise ConfigError(f"categories of the scored json differ from the checkpoint's {[c['id'] for c in labels.categories]}")
    report = TargetReport(meta={"checkpoint": str(checkpoint), "iteration": ckpt.get("iteration"), "on": on,
                                "seed": seed, "classes": labels.names(), "config": to_dict(cfg)})
    return score_models(teacher, student, records, labels, cfg, seed, report)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


ROWS = (("positives_per_image", "positives per image", 1), ("precision", "precision of positives", 2),
        ("wrong_class", "positives of the wrong class", 2), ("recall", "recall of GT-positive samples", 2),
        ("gt_pos_background", "GT-positive labelled background", 2), ("gt_pos_ignored", "GT-positive ignored", 2),
        ("target_iou", "regression-target IoU with GT", 2), ("gt_positive_per_image", "GT-positive samples per image", 1))


def markdown(summary: dict[str, Any]) -> str:
    """The report as markdown tables (quality per stage and method, pairing, positive weights)."""
    q, m = summary["quality"], summary["meta"]
    cols = [f"{s}/{k}" for s in STAGES for k in METHODS]
    lines = [f"Target quality of {m['checkpoint']} (iteration {m['iteration']}) on {summary['images']} "
             f"{m['on']} images, view seed {m['seed']}; GT positive = IoU >= 0.5 with a GT box of the class.", "",
             "| | " + " | ".join(c.replace("rcnn", "R-CNN").replace("rpn", "RPN") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for key, name, digits in ROWS:
        lines.append(f"| {name} | " + " | ".join(_fmt(q.get(c, {}).get(key), digits) for c in cols) + " |")
    lines += ["", "| FPN level | " + " | ".join(f"P{i + 2}" for i in range(len(summary["paired_per_level"]))) + " |",
              "|---|" + "---:|" * len(summary["paired_per_level"]),
              "| student anchors paired | " + " | ".join(_fmt(x) for x in summary["paired_per_level"]) + " |", "",
              "| weight of one positive / a supervised positive (alpha included) | R-CNN | RPN |", "|---|---:|---:|"]
    for rule in ("dtg-samples", "dtg-cluster", "dtg-supervised", "sparse"):
        w = summary["positive_weight"]
        lines.append(f"| {rule} | {_fmt(w.get('rcnn/' + rule), 3)} | {_fmt(w.get('rpn/' + rule), 3)} |")
    if summary.get("pseudo_boxes"):
        lines += ["", *pseudo_box_table(summary["pseudo_boxes"], m.get("classes"))]
    return "\n".join(lines) + "\n"


def pseudo_box_table(pb: dict[str, Any], classes: list[str] | None) -> list[str]:
    """The teacher's detections (sparse's pseudo boxes) per score threshold and class: precision / recall,
    then the lowest threshold per class whose precision reaches the target, as a ``--set`` line."""
    k = len(pb["precision"][0]) - 1
    names = list(classes or [f"class {c + 1}" for c in range(k)])[:k] + ["all"]
    lines = ["Teacher detections as pseudo boxes (student view; correct = IoU >= 0.5 with a ground-truth box of "
             "the class): precision / recall per score threshold, box-only precision (any class) in the last column.",
             "", "| score >= | " + " | ".join(names) + " | box-only |", "|---|" + "---:|" * (k + 2)]
    for i, t in enumerate(pb["thresholds"]):
        cells = [f"{_fmt(p)} / {_fmt(r)}" for p, r in zip(pb["precision"][i], pb["recall"][i])]
        lines.append(f"| {t:g} | " + " | ".join(cells) + f" | {_fmt(pb['box_precision'][i][-1])} |")
    sug = pb["suggested"]
    lines.append("| GT boxes | " + " | ".join(f"{n:.0f}" for n in pb["gt_boxes"]) + f" | {sum(pb['gt_boxes']):.0f} | |")
    lines += ["", f"Lowest threshold per class with precision >= {pb['target_precision']:g} (at least 5 detections): "
              + ", ".join(f"{n} {_fmt(t)}" for n, t in zip(names, sug))]
    if all(t is not None for t in sug):
        lines.append(f"`--set sparse.class_thresholds=[{', '.join(f'{t:g}' for t in sug)}]`")
    return lines


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``targets`` on an argparse subparsers object."""
    p = subparsers.add_parser("targets", help="score DTG's and sparse's unlabeled targets against the ground truth",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a teacher (any semi-supervised method)")
    p.add_argument("--on", choices=["unlabeled", "labeled"], default="unlabeled",
                   help="images to score: the unlabeled ones (boxes from data.full_json) or the labeled ones")
    p.add_argument("--max-images", type=int, default=32, help="images scored (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weak/strong views (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the checkpoint's config first (data paths, dtg.* thresholds); repeatable")
    p.add_argument("--target-precision", type=float, default=0.7,
                   help="precision the suggested per-class pseudo-label thresholds reach (default 0.7)")
    p.add_argument("--out", help="folder for targets.md / targets.json (default: beside the checkpoints)")
    p.set_defaults(func=cmd_targets)
    return p


def cmd_targets(args: argparse.Namespace) -> int:
    from dtg.config import ConfigError

    if args.max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, got {args.max_images}")
    if not 0.0 < args.target_precision <= 1.0:
        raise ConfigError(f"--target-precision must be in (0, 1], got {args.target_precision}")
    report = score_checkpoint(args.checkpoint, args.on, args.max_images, args.seed, args.overrides)
    summary = report.summary(args.target_precision)
    text = markdown(summary)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / "targets"
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.md").write_text(text)
    (out / "targets.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text, end="")
    print(f"written: {out / 'targets.md'}, {out / 'targets.json'}", file=sys.stderr)
    return 0

