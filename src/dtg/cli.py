"""Command line: ``dtg synth | train | eval | explain | demo | split | predict | export`` (also ``python -m dtg``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING, Sequence

from dtg.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from dtg.run_exec import Run

def _add_config_args(p: argparse.ArgumentParser, default: str = "") -> None:
    p.add_argument("--config", help="YAML file overriding the built-in defaults (which are configs/embedded.yaml)"
                   + (f"; default: {default}" if default else ""))
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set solver.max_iter=200 --set solver.steps=[150,180] (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config(args: argparse.Namespace, *extra: str) -> Config:
    path = args.config
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    overrides = list(args.overrides) + list(extra)
    if getattr(args, "skip_bad", False):
        overrides.append("data.skip_bad=true")
    cfg = load_config(path, overrides)
    from dtg.methods import check_method

    check_method(cfg.method)
    return cfg


def _add_skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip-bad", action="store_true",
        help="drop invalid images/boxes (each reported, with counts) instead of stopping",
    )


def _err(msg: str) -> None:
    print(f"dtg: error: {msg}", file=sys.stderr)


def _bars(args: argparse.Namespace) -> bool:
    """Redrawn progress bars: only on a terminal (a pipe or a log file gets no ``\\r`` lines) and without --no-progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def cmd_synth(args: argparse.Namespace) -> int:
    from dtg.data.synth import generate, read_marker

    cfg = _config(args)
    if args.out:
        cfg.synth.out_dir = args.out
    paths = generate(cfg.synth, progress=_bars(args))
    content = (read_marker(paths.root) or {}).get("content", "?")
    print(f"embedded dataset in {paths.root}: labeled {paths.train_labeled}, unlabeled {paths.train_unlabeled}, "
          f"val {paths.val}; tuning split {paths.tune_val} (held out of the unlabeled images), "
          f"{paths.tune_unlabeled}, {paths.tune_full}")
    print(f"content fingerprint {content} (sha256 over its json and image files; also in {paths.root / 'synth_config.json'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Claim the output folder (:mod:`dtg.engine.run_folder`: one process, one config), then train."""
    from dtg.engine.run_folder import claim, exit_with_parent

    cfg = _config(args)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.init_iteration is not None and not args.init_from:
        raise ConfigError("--init-iteration needs --init-from")
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at must be >= 1, got {args.stop_at}")
    if args.init_from and not Path(args.init_from).is_file():
        from dtg.engine.checkpoint import CheckpointError

        raise CheckpointError(f"{args.init_from}: checkpoint not found (--init-from)")
    if args.resume and (args.overwrite or args.force):
        raise ConfigError(f"--{'overwrite' if args.overwrite else 'force'} starts the run over and --resume "
                          f"continues it: pass one of them")
    exit_with_parent()  # started by a sweep: it does not outlive it
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    held = claim(cfg, args.resume, args.overwrite, args.force, log)  # one process, one config per folder
    try:
        summary = held.summary if held.finished else _train(args, cfg, log)  # finished: its metrics.json
        if summary is not None:
            from dtg.evaluation.coco_eval import format_table

            rows = {f"{cfg.method} ({name})": summary[name] for name in ("teacher", "student") if name in summary}
            if rows:
                print(format_table(rows))
            print(f"outputs in {cfg.output_dir} (metrics.json, checkpoints/, tb/)")
        return 0
    finally:
        held.release()


def _train(args: argparse.Namespace, cfg: Config, log: Any) -> dict | None:
    """Train from where the arguments say; the summary (None: stopped early, or not rank 0)."""
    from dtg.engine.trainer import Trainer

    trainer = Trainer(cfg, log=log, progress=not args.no_progress)
    trainer.start(args.resume, args.init_from, args.init_iteration)
    summary = trainer.train(stop_at=args.stop_at)
    if trainer.is_main and summary is None:
        print(f"stopped at iteration {trainer.iteration} of {cfg.solver.max_iter}; continue with --resume "
              f"(checkpoint {Path(cfg.output_dir) / 'checkpoints' / 'last.pth'})")
    return summary if trainer.is_main else None  # under torchrun, rank 0 reports


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from dtg.data.coco import load_labeled
    from dtg.data.dataset import LabelMap
    from dtg.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from dtg.engine.runtime import resolve_device
    from dtg.evaluation.coco_eval import format_table, write_results
    from dtg.evaluation.inference import evaluate_model

    ckpt = load_checkpoint(args.checkpoint)
    which = args.model or ("teacher" if "teacher" in ckpt else "student")
    cfg, model = model_from_checkpoint(ckpt, which, args.checkpoint)
    val_json = args.val_json or cfg.data.val_json
    val_images = args.val_images or cfg.data.val_images
    source = load_labeled(val_json, val_images, skip_bad=args.skip_bad, log=lambda m: print(m, file=sys.stderr))
    labels = LabelMap(ckpt["categories"])
    device = resolve_device(args.device)
    model.to(device)
    with torch.inference_mode():
        metrics, results = evaluate_model(
            model, source, labels, cfg.data.test_size, cfg.data.test_max_size, device, progress=_bars(args)
        )
    out = Path(args.out or Path(args.checkpoint).parent.parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / f"results_{which}.json", results)
    (out / f"metrics_{which}.json").write_text(json.dumps(metrics, indent=2))
    print(format_table({f"{cfg.method} ({which})": metrics}))
    print(f"results and metrics in {out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """A look inside: the teacher's R-CNN clusters and the student's INC labels and ranks on one image."""
    from dtg.engine.runtime import resolve_device
    from dtg.bench.explain import explain_checkpoint, render

    if args.max_clusters < 0:
        raise ConfigError(f"--max-clusters must be >= 0, got {args.max_clusters}")
    ex, weak, strong, names = explain_checkpoint(
        args.checkpoint, args.image, args.seed, args.tau_rcnn, resolve_device(args.device)
    )
    out = Path(args.out or Path(args.checkpoint).parent.parent / "explain" / f"{Path(args.image).stem}_seed{args.seed}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    render(ex, weak, strong, names, max_clusters=args.max_clusters).save(out, format="PNG")
    members = sum(len(c.members) for c in ex.clusters)
    print(f"{out}: {len(ex.clusters)} clusters, {members} members, {len(ex.background)} background RoIs (tau_rcnn {ex.tau:g})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: generate the dataset, train the methods from one shared burn-in, print the table.

    A preset of ``dtg bench reproduce``'s planner (:func:`dtg.bench.reproduce.plan`): one row per
    method (``method=METHOD`` on the config), one seed (the config's), the runs in
    ``OUTPUT_DIR/runs/<key>`` and ``OUTPUT_DIR/<method>`` a link to its method's run. When a
    semi-supervised method has a burn-in (``0 < semi.burn_in < solver.max_iter``), the supervised
    run trains it once, alone, with every core (phase 1, ``--stop-at``); then the supervised run
    continues and each semi-supervised method starts from its checkpoint at the end of the burn-in
    (``--init-from``), side by side (phase 2, ``--jobs`` at a time, default all, each with
    ``max(1, cores // jobs)`` threads; :func:`dtg.run_exec.execute_phased`). A run whose
    ``metrics.json`` exists is not trained again; one with a checkpoint is resumed.
    """
    import os

    from dtg.bench.reproduce import plan
    from dtg.bench.rows import method_row
    from dtg.data.synth import generate, read_marker
    from dtg.engine.run_folder import check_same_run
    from dtg.models.weights import resolve_pretrained
    from dtg.run_exec import execute_phased
    from dtg.run_identity import git_state

    if args.config is None:
        args.config = str(DEMO_PRESET)
    cfg = _config(args)
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    paths = generate(cfg.synth, progress=_bars(args))
    log = lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True)  # noqa: E731
    resolve_pretrained(cfg.model.pretrained, cfg.model.backbone, log)  # fetched once, before the subprocesses
    phases["data and weights"] = time.perf_counter() - t_start
    methods = list(dict.fromkeys(args.methods))
    overrides = [*args.overrides, *(["data.skip_bad=true"] if args.skip_bad else [])]
    root = Path(cfg.output_dir)
    runs = plan([method_row(m) for m in methods], [cfg.seed], args.config, overrides, root, 0, log)
    by_method = {m: next(r for r in runs.values() if (m, cfg.seed) in r.uses) for m in methods}
    for run in runs.values():
        check_same_run(run.out, run.cfg, "use another output folder (--set output_dir=DIR) or remove it")
    _demo_links(root, {**by_method, **{r.cfg.method: r for r in runs.values() if not r.uses}}, log)
    commit, dirty = git_state(Path(__file__).resolve().parent)
    log(f"dataset {paths.root}, content fingerprint {(read_marker(paths.root) or {}).get('content', '?')}; "
        f"code {commit}{' (dirty)' if dirty else ''}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(args.jobs or len(by_method), len(by_method)))
    status, seconds = execute_phased(runs, jobs, cfg.threads or max(1, cores // jobs), cfg.threads or cores, log)
    phases.update(seconds)
    code = _demo_report(by_method, status, cfg, time.perf_counter() - t_start)
    print("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()), file=sys.stderr)
    _demo_plot(by_method, runs, cfg)
    return code


def _demo_links(root: Path, runs: dict[str, Run], log: Callable[[str], None]) -> None:
    """``ROOT/<method>``: a link to the folder of the method's run, ``ROOT/runs/<key>``.

    A folder an earlier demo trained there (before the runs moved to ``runs/<key>``) moves to the
    key of its run when it holds this config's run and nothing is there yet, so that it is reused;
    any other file or folder stays as it is (logged, without a link).
    """
    import os

    from dtg.engine.run_folder import RunLock, held_run, other_config

    for method, run in runs.items():
        link, target = root / method, Path(os.path.relpath(run.out, root))
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            held = held_run(link) if link.is_dir() else None
            lock = RunLock(link) if held is not None and held.holds else None
            if (lock is None or run.out.exists() or other_config(link, run.cfg, held) is not None
                    or not lock.try_acquire()):
                log(f"{link}: left as it is (not this config's run, or in use); {method}'s run is {run.out}")
                continue
            try:
                run.out.parent.mkdir(parents=True, exist_ok=True)
                link.rename(run.out)
            finally:
                lock.release()
            log(f"moved {link} (this config's {method} run, from an earlier demo) to {run.out}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)
        except OSError as e:
            log(f"{link}: no link to {run.out} ({e.strerror})")


def _demo_plot(runs: dict[str, Run], planned: dict[str, Run], cfg: Any) -> None:
    """``OUTPUT_DIR/demo.png``: teacher AP against iteration for each method (a branched method's curve
    starts with the curve of the run it branches from, up to the burn-in it starts from)."""
    from dtg.bench.report import plot_curves, read_curve

    curves = {}
    for method, run in runs.items():
        parent = planned.get(run.parent) if run.parent is not None else None
        start = [p for p in read_curve(parent.out) if p[0] <= (run.branch_at or 0)] if parent is not None else []
        own = read_curve(run.out)
        curves[method] = [start + own] if own else []
    path = Path(cfg.output_dir) / "demo.png"
    plot_curves(curves, path, f"dtg demo: teacher AP (%) on {cfg.data.val_json}, seed {cfg.seed}")
    print(f"written: {path}", file=sys.stderr)


DEMO_PRESET = Path(__file__).resolve().parent / "presets" / "demo.yaml"  # dtg demo's config (packaged)


def _demo_report(runs: dict[str, Run], status: dict[str, str], cfg: Any, seconds: float) -> int:
    """The demo's closing table: teacher AP per method (``runs``: its run) with the gain over supervised, and
    how to get the seeds; ``status`` is by run key (:func:`dtg.run_exec.execute`)."""
    from dtg.evaluation.coco_eval import format_table

    status = {m: status.get(run.key, "") for m, run in runs.items()}
    rows, failed, ap = {}, [m for m in runs if status[m].startswith("failed")], {}
    for method, run in runs.items():
        if method in failed or not run.metrics_path.is_file():
            continue
        summary = json.loads(run.metrics_path.read_text())
        reported = summary.get("reported", "teacher")
        rows[f"{method} ({reported})"] = summary[reported]
        ap[method] = 100.0 * summary[reported]["AP"]
        print(f"{method}: {summary['iterations']} iterations, in {run.out}", file=sys.stderr)
    if rows:
        table = format_table(rows).splitlines()
        base = ap.get("supervised")
        table[0] += " gain over supervised |"
        table[1] += "---:|"
        for i, method in enumerate(m for m in runs if m in ap):
            table[2 + i] += f" {ap[method] - base:+.1f} |" if base is not None and method != "supervised" else " - |"
        print("\n".join(table))
        print(f"Teacher AP (%) on {cfg.data.val_json}, one seed ({cfg.seed}), {seconds / 60:.1f} min. A single seed "
              f"moves by a few AP: the README's numbers are means over 5 seeds with paired 95 % intervals, from "
              f"`dtg bench reproduce` (docs/results.md).")
    for method in failed:
        _err(f"{method}: {status[method]}")
    return 1 if failed else 0


def _usages(p: argparse.ArgumentParser) -> list[str]:
    """The usage of ``p``, or of each of its own subcommands (``dtg split coco``, ``dtg split voc``)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return [u for a in subs for sp in a.choices.values() for u in _usages(sp)] if subs else [p.format_usage()]


def build_parser() -> argparse.ArgumentParser:
    from dtg.methods import MAIN_METHODS, method_names

    parser = argparse.ArgumentParser(prog="dtg", description="Semi-supervised object detection with Dense Teacher Guidance")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate the embedded default dataset (COCO json + images)")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: synth.out_dir of the config)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a detector (method from the config)")
    _add_config_args(p)
    _add_skip_bad(p)
    p.add_argument("--output-dir", help="where checkpoints, logs and metrics go (default: output_dir of the config)")
    p.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
        help="continue from a checkpoint (default: OUTPUT_DIR/checkpoints/last.pth)",
    )
    p.add_argument("--init-from", metavar="CKPT",
                   help="start from the weights of a checkpoint (a supervised run's: student and EMA teacher) or "
                        "of a FasterRCNN state dict (both models), with a fresh optimizer; ignored when --resume "
                        "finds a checkpoint")
    p.add_argument("--init-iteration", type=int, metavar="N",
                   help="with --init-from: iteration the schedule continues at (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace the run OUTPUT_DIR holds, of any config")
    p.add_argument("--force", action="store_true", help="train this config's run in OUTPUT_DIR again (finished or not)")
    p.add_argument("--stop-at", type=int, metavar="N",
                   help="stop after iteration N with checkpoints/last.pth written (no evaluation); --resume "
                        "continues the run later")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO bbox metrics of a checkpoint on a COCO val set")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by dtg train")
    p.add_argument("--model", choices=["teacher", "student"], help="which model (default: teacher if present)")
    p.add_argument("--val-json", help="COCO json with annotations (default: the training config's data.val_json)")
    p.add_argument("--val-images", help="image folder of the val json (default: data.val_images)")
    p.add_argument("--out", help="folder for results and metrics json (default: beside the checkpoints)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_skip_bad(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="draw the teacher's R-CNN clusters and the student's INC labels on one image")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of a semi-supervised run (with a teacher)")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--out", help="PNG to write (default: beside the checkpoints, explain/IMAGE_seedS.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weak/strong view augmentation (default: 0)")
    p.add_argument("--max-clusters", type=int, default=8, help="clusters drawn, highest kept score first (default: 8)")
    p.add_argument("--tau-rcnn", type=float, help="candidate threshold (default: dtg.rcnn.tau of the checkpoint)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="the main job: synth + train + eval in the pretrained regime, print a table")
    _add_config_args(p, default=f"the demo preset, {DEMO_PRESET.relative_to(Path(__file__).resolve().parent.parent)}")
    _add_skip_bad(p)
    p.add_argument(
        "--methods", nargs="+", default=list(MAIN_METHODS), choices=method_names(),
        help="methods to run side by side on the same schedule and seed (default: all three)",
    )
    p.add_argument("--jobs", type=int, default=0, help="methods trained at once (default: all of them)")
    p.set_defaults(func=cmd_demo)

    from dtg.tools import export, predict, split

    for tool in (split, predict, export):  # dtg split coco|voc, dtg predict, dtg export
        tool.add_parser(sub)

    from dtg.bench import add_parser as add_bench_parser  # argparse only; the commands import the rest

    add_bench_parser(sub)

    # `dtg --help` shows every subcommand with its options.
    usages = [u.replace("usage: ", "  ").rstrip() for sp in sub.choices.values() for u in _usages(sp)]
    parser.epilog = "commands and their options (COMMAND --help for details):\n" + "\n".join(usages)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dtg.data.coco import DatasetError
    from dtg.engine.checkpoint import CheckpointError
    from dtg.engine.runtime import TrainingError
    from dtg.models.backbones import ModelError

    from dtg.engine.run_folder import RunFolderError

    user_errors = (ConfigError, DatasetError, ModelError, CheckpointError, TrainingError, RunFolderError, OSError)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted; the last complete checkpoint is intact")
        return 130
    except user_errors as e:
        # Errors of ours carry one line naming the file and the problem.
        _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
