"""``dtg bench reproduce``: the paper's main comparison and DTG ablations, over seeds, with a table and a PNG.

    dtg bench reproduce                                  # supervised, sparse, dtg, full-labels x seeds 0-4
    dtg bench reproduce --dataset shapes2                # the same rows on the second generated dataset
    dtg bench reproduce --rows all --jobs 2              # + the ablation rows of tables 2(a), 2(b), 3, 5
    dtg bench reproduce --rows dtg reg-own --seeds 0 1 --set solver.max_iter=300 --set solver.steps=[210,270]
    dtg bench reproduce --split tune --rows supervised full-labels  # choose on train images, not val

Every row is a name plus ``--set`` overrides of the config (built-in embedded default, or
``--config``); ``--set`` given here applies to every row first, the row's own overrides last.
A run lives in ``OUT/runs/<hash>``, the hash of its resolved config without the keys that
cannot change its result (output_dir, threads, log and checkpoint periods): rows with the same
config share runs, a run whose ``metrics.json`` exists is not trained again, and one with
``checkpoints/last.pth`` but no metrics is resumed (``dtg train --resume auto``). Runs are
subprocesses (``python -m dtg train``), ``--jobs`` at a time, each with ``threads = cores // jobs``.
Row ``full-labels`` is the fully-labeled ceiling: supervised on ``data.full_json`` (every train
image with its boxes), same schedule; the report gives the share of the supervised-to-ceiling
gap each method recovers (and, for the rows of another schedule, the share between
``supervised-2000`` and ``full-labels-2000``: :data:`dtg.bench.rows.SHARE_FRAMES`). Gaps are paired by seed, with 95 % Student-t intervals.
``--dataset NAME`` prefixes the overrides of a generated dataset (:data:`dtg.data.synth.DATASETS`);
``--split tune`` evaluates on its tuning split (``tune_val``, carved from the train images) instead
of ``val``: choose defaults there, report on ``val``.
Writes ``OUT/results.md`` (also printed), ``OUT/results.json`` and ``OUT/results.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dtg.bench.report import (
    STATS, RowResult, convergence_table, gap_share, gap_table, markdown_table, plot, read_curve,
)
from dtg.config import Config, load_config, to_dict
from dtg.data.synth import DATASETS
from dtg.run_exec import Run, branch_from, ensure_generated, execute, trained_twin
from dtg.run_identity import branch_key, dataset_fingerprint, run_key, start_key, supervised_part
from dtg.bench.rows import CEILINGS, MAIN_ROWS, NOTES, ROW_BY_NAME, SHARE_FRAMES, Row, select_rows
from dtg.run_migration import migrate

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


def use_tune_split(cfg: Config) -> None:
    """Point ``cfg.data`` at the tuning split of its generated dataset (docs/method.md, "Splits").

    Evaluation on ``tune_val`` (train images held out of the unlabeled split), unlabeled data
    ``tune_unlabeled``, the ceiling on ``tune_full``; the labeled json is unchanged. Refused
    (:class:`ConfigError`) when ``data.train_json`` is not the labeled json of ``synth.out_dir``.
    """
    from dtg.config import ConfigError
    from dtg.data.synth import SynthPaths

    paths = SynthPaths.under(Path(cfg.synth.out_dir))
    if Path(cfg.data.train_json).resolve() != paths.train_labeled.resolve():
        raise ConfigError(f"config key 'data.train_json': {cfg.data.train_json} is not the labeled json of the "
                          f"generated dataset in synth.out_dir ({cfg.synth.out_dir}); --split tune needs that dataset")
    cfg.data.val_json, cfg.data.val_images = str(paths.tune_val), str(paths.train_images)
    cfg.data.unlabeled, cfg.data.unlabeled_images = str(paths.tune_unlabeled), str(paths.train_images)
    cfg.data.full_json = str(paths.tune_full)


def resolve(config: str | None, overrides: Sequence[str], row: Row, seed: int, curve_points: int,
            split: str = "val") -> Config:
    """The config of one (row, seed): file, then ``overrides``, then the row, then the seed.

    With ``curve_points > 0`` and no ``eval_period`` given anywhere, ``eval_period`` becomes
    ``max_iter // curve_points`` so that the run logs a teacher AP curve. ``split="tune"``
    evaluates on the tuning split instead of ``val`` (:func:`use_tune_split`).
    """
    cfg = load_config(config, [*overrides, *row.set_args(), f"seed={seed}"])
    if split == "tune":
        use_tune_split(cfg)
    if row.name in CEILINGS:
        from dtg.config import ConfigError

        if not cfg.data.full_json:
            raise ConfigError(f"config key 'data.full_json' is empty: row {row.name} needs a json of every "
                              "train image with its boxes")
        cfg.data.train_json = cfg.data.full_json
    if curve_points > 0 and cfg.eval_period == 0 and not any(o.startswith("eval_period=") for o in overrides):
        cfg.eval_period = max(1, cfg.solver.max_iter // curve_points)
    return cfg


def plan(rows: Sequence[Row], seeds: Sequence[int], config: str | None, overrides: Sequence[str], out: Path,
         curve_points: int, log: Callable[[str], None] = lambda m: None, split: str = "val",
         shared_burn_in: bool = True) -> dict[str, Run]:
    """Runs by identity (config hash + dataset fingerprint), each listing the (row, seed) pairs it serves.

    Generated datasets are made (or remade when stale) first, so that their fingerprints are current.
    With ``shared_burn_in`` a semi-supervised run whose config differs from the supervised row's
    only in keys a supervised run does not read (:data:`dtg.run_identity.SUPERVISED_IGNORES`), or a
    supervised run that differs from it only after ``semi.burn_in`` (e.g. another schedule, row
    ``supervised-2000``), does not train its own ``semi.burn_in`` iterations: it starts from the supervised run's checkpoint at
    that iteration (``dtg train --init-from``, fresh optimizer, same schedule), and its identity
    says so (:func:`dtg.run_identity.branch_key`): it names the weights it starts from
    (:func:`dtg.run_identity.start_key`), not the supervised run's length after them. Run folders of ``out`` still named by the run keys
    before issue 27 are renamed first (:func:`dtg.run_migration.migrate`, once).
    """
    from dtg.methods import REGISTRY

    cfgs = {(row.name, seed): resolve(config, overrides, row, seed, curve_points, split)
            for row in rows for seed in seeds}
    sup_cfgs = {seed: resolve(config, overrides, ROW_BY_NAME["supervised"], seed, curve_points, split)
                for seed in seeds} if shared_burn_in else {}
    ensure_generated([*cfgs.values(), *sup_cfgs.values()], log)
    migrate(out / "runs", log)  # folders cached under the run keys before issue 27 (once; dtg.run_migration)
    prints: dict[str, str] = {}
    runs: dict[str, Run] = {}

    def print_of(cfg: Config) -> str:
        data_key = json.dumps(to_dict(cfg.data), sort_keys=True)
        if data_key not in prints:
            prints[data_key] = dataset_fingerprint(cfg.data)
        return prints[data_key]

    def key_of(cfg: Config) -> str:
        return run_key(cfg, print_of(cfg))

    def add(cfg: Config, key: str) -> Run:
        cfg.output_dir = str(out / "runs" / key)
        return runs.setdefault(key, Run(key, cfg, Path(cfg.output_dir)))

    for (name, seed), cfg in cfgs.items():
        sup = sup_cfgs.get(seed)
        branch = (sup is not None and name not in CEILINGS
                  and (REGISTRY[cfg.method].uses_unlabeled or key_of(cfg) != key_of(sup))
                  and 0 < cfg.semi.burn_in < cfg.solver.max_iter
                  and supervised_part(cfg, cfg.semi.burn_in) == supervised_part(sup, cfg.semi.burn_in))
        if not branch:
            add(cfg, key_of(cfg)).uses.append((name, seed))
            continue
        parent = add(sup, key_of(sup))
        start = start_key(sup, print_of(sup), cfg.semi.burn_in)
        child = add(cfg, branch_key(key_of(cfg), start, cfg.semi.burn_in))
        branch_from(child, parent, cfg.semi.burn_in)
        child.uses.append((name, seed))
    for run in runs.values():  # a supervised run trained for another split: evaluate its weights only
        run.twin = trained_twin(run, out / "runs")
    return runs


def trim_burn_ins(runs: dict[str, Run]) -> dict[str, Run]:
    """The planned runs worth training: every run that serves a row, and a run that serves none (a
    supervised burn-in that branches start from, when no supervised row was asked for) only while an
    unfinished branch still lacks its checkpoint; such a burn-in then trains only up to the latest of
    those checkpoints (``stop_at``; a later plan resumes it), or, when it has a ``twin``, only evaluates.
    Without this a burn-in whose branches are all cached would train its whole schedule for nothing.
    Reads which files exist; changes nothing but the kept burn-ins' ``stop_at``."""
    kept: dict[str, Run] = {}
    for key, run in runs.items():
        if not run.uses:
            points = [c.branch_at for c in runs.values() if c.parent == key and c.branch_at is not None
                      and not c.metrics_path.is_file() and c.needs is not None and not c.needs.is_file()]
            if not points:
                continue
            if run.twin is None and not run.metrics_path.is_file():  # a finished one stays: its branch says what is missing
                run.stop_at = max(points)
        kept[key] = run
    return kept


def check_provenance(runs: dict[str, Run]) -> str:
    """The dataset fingerprint the finished runs share ("-" when none finished).

    The ceiling's runs read another labeled json (every train image with its boxes), so they
    are compared among themselves; every run, ceiling included, must share the val set.
    Returns the fingerprint of the non-ceiling runs (the ceiling's when there are no others).

    Raises:
        ConfigError: (one line) finished runs were made on different data.
    """
    from dtg.config import ConfigError

    seen: dict[str, dict[str, str]] = {"main": {}, "ceiling": {}, "val": {}}
    for run in runs.values():
        if not run.metrics_path.is_file():
            continue
        prov = json.loads(run.metrics_path.read_text()).get("provenance", {})
        group = "ceiling" if all(row in CEILINGS for row, _ in run.uses) else "main"
        seen[group].setdefault(prov.get("dataset_fingerprint", "unrecorded"), str(run.out))
        seen["val"].setdefault(prov.get("val_fingerprint", "unrecorded"), str(run.out))
    for group, prints in seen.items():
        if len(prints) > 1:
            what = "val sets" if group == "val" else "datasets"
            raise ConfigError(f"runs of different {what} in one table (fingerprints {', '.join(prints)}; e.g. "
                              f"{', '.join(prints.values())}); remove the stale runs or use another --out")
    return next(iter(seen["main"] or seen["ceiling"]), "-")


def collect(rows: Sequence[Row], runs: dict[str, Run]) -> tuple[list[RowResult], dict[str, list]]:
    """Per-row teacher metrics (percent) by seed, and the teacher AP curves of the main rows."""
    results = {r.name: RowResult(r.name, " ".join(r.set_args()), r.paper, r.source) for r in rows}
    curves: dict[str, list] = {name: [] for name in MAIN_ROWS if name in results}
    for run in runs.values():
        metrics = json.loads(run.metrics_path.read_text()) if run.metrics_path.is_file() else None
        for name, seed in run.uses:
            if metrics is None:
                results[name].failed.append(seed)
                continue
            model = metrics.get("teacher") or metrics[metrics["reported"]]
            results[name].per_seed[seed] = {s: 100.0 * float(model[s]) for s in STATS}
            if name in curves:
                curves[name].append(read_curve(run.out))
    return [results[r.name] for r in rows], curves


def report(rows: Sequence[Row], runs: dict[str, Run], out: Path, header: str) -> str:
    """Write results.md / .json / .png under ``out``; return the markdown."""
    results, curves = collect(rows, runs)
    by_name = {r.name: r for r in results}
    variants = [(r.name, r.overrides["method"]) for r in rows
                if r.name not in MAIN_ROWS and r.name not in CEILINGS and r.overrides.get("method") in by_name
                and r.name != r.overrides["method"]]
    gaps = gap_table(by_name, [("sparse", "supervised"), ("dtg", "supervised"), ("dtg", "sparse"),
                               ("oracle", "supervised"), ("dtg-u1000", "sparse-u1000"), *variants])
    if gaps.count("\n") < 2:
        gaps = "(none: they need the dtg row and the supervised or sparse row)"
    share = "\n\n".join(table for base, ceiling, methods in SHARE_FRAMES
                         if (table := gap_share(by_name, base, ceiling, methods)))
    parts = [f"# DTG-SSOD reproduction: teacher AP (%)\n\n{header}", markdown_table(results),
             "Gaps (ours paired by seed, 95 % Student-t interval of the mean AP difference):\n\n" + gaps]
    if share:
        parts.append("Label efficiency (paired by seed; the paper: DTG recovers 64 % of COCO 10 %'s gap, "
                     "Soft Teacher 51 %):\n\n" + share)
    converged = convergence_table(curves)
    if converged:
        parts.append("Convergence (teacher AP curves of the main rows; a run that moved < 1 AP over the last "
                     "quarter of its schedule has converged):\n\n" + converged)
    text = "\n\n".join([*parts, NOTES]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    raw = {r.name: {"overrides": r.overrides, "paper": r.paper, "per_seed": r.per_seed, "failed": r.failed}
           for r in results}
    raw["_runs"] = {k: {"dir": str(v.out), "uses": v.uses} for k, v in runs.items()}  # type: ignore[assignment]
    raw["_curves"] = curves  # type: ignore[assignment]  # main rows: per seed [(iteration, teacher AP %)]
    (out / "results.json").write_text(json.dumps(raw, indent=2))
    plot(results, curves, out / "results.png", "DTG-SSOD reproduction (teacher AP, %)")
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``reproduce`` on an argparse subparsers object."""
    p = subparsers.add_parser("reproduce", help="the paper's comparison and ablations over seeds: table + PNG",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML over the built-in defaults (default: the embedded config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every row before the row's own (repeatable)")
    p.add_argument("--rows", nargs="+", default=["main"],
                   help=f"main (default: {' '.join(MAIN_ROWS)}) | all | names: {' '.join(ROW_BY_NAME)}")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                   help=f"default: {' '.join(map(str, DEFAULT_SEEDS))}")
    p.add_argument("--dataset", default="embedded", choices=list(DATASETS),
                   help="generated dataset the rows run on (default: embedded); its overrides come first")
    p.add_argument("--split", default="val", choices=["val", "tune"],
                   help="evaluate on val (the held-out check) or on the tuning split carved from the train images, "
                        "where defaults are chosen (default: val)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--curve-points", type=int, default=5,
                   help="evaluations per run for the AP curves when eval_period is 0 (default 5; 0: final only)")
    p.add_argument("--own-burn-in", action="store_true",
                   help="semi-supervised runs train their own burn-in instead of starting from the supervised "
                        "run's checkpoint at semi.burn_in (the default shares it)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, hashes, cache state) and stop")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table of the finished runs (a sweep still running, or stopped)")
    p.set_defaults(func=cmd_reproduce)
    return p


def add_migrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``migrate`` (the run folders of an ``--out`` to today's run keys) on bench's subparsers."""
    p = subparsers.add_parser("migrate", help="rename the cached runs of a reproduce --out to today's run keys",
                              description="Rename the run folders OUT/runs/<key> cached under the run keys before "
                                          "issue 27 (hashed over the flat config layout), and branches keyed by their "
                                          "parent run before issue 25, to today's keys, and point "
                                          "their records at the new names. Idempotent, safe to interrupt; dtg bench "
                                          "reproduce does it by itself once. Run it from the folder the runs' data "
                                          "paths are relative to.")
    p.add_argument("out", nargs="?", default="runs/reproduce", help="the reproduce output folder (default runs/reproduce)")
    p.set_defaults(func=cmd_migrate)
    return p


def cmd_migrate(args: argparse.Namespace) -> int:
    """Scan ``OUT/runs`` and rename what is named by an old key."""
    runs = Path(args.out) / "runs"
    if not runs.is_dir():
        from dtg.config import ConfigError

        raise ConfigError(f"{runs}: no such folder (give the --out of dtg bench reproduce)")
    moved = migrate(runs, lambda m: print(f"[migrate] {m}", file=sys.stderr, flush=True), force=True)
    for old, new in moved.items():
        print(f"{old} -> {new}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Plan, run, report. Exit status 1 when a run failed."""
    if args.config is not None and not Path(args.config).is_file():
        from dtg.config import ConfigError

        raise ConfigError(f"{args.config}: config file not found")
    try:
        rows = select_rows(args.rows)
    except ValueError as e:
        from dtg.config import ConfigError

        raise ConfigError(str(e)) from None
    jobs = max(1, args.jobs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads if args.threads > 0 else max(1, cores // jobs)
    out = Path(args.out)
    log = lambda m: print(f"[reproduce] {m}", file=sys.stderr, flush=True)  # noqa: E731
    overrides = [*DATASETS[args.dataset], *args.overrides]
    runs = trim_burn_ins(plan(rows, args.seeds, args.config, overrides, out, args.curve_points, log, args.split,
                              shared_burn_in=not args.own_burn_in))
    if args.dry_run:
        for run in runs.values():
            state = "cached" if run.metrics_path.is_file() else "to train"
            src = f" (from {run.parent} at {run.cfg.semi.burn_in})" if run.parent else ""
            src += f" (evaluates the weights of {run.twin.name})" if run.twin else ""
            what = ', '.join(f'{r}/seed {s}' for r, s in run.uses) or f'burn-in to {run.stop_at or run.cfg.solver.max_iter}'
            print(f"{run.key}  {state:8s}  {what}{src}")
        return 0
    if args.report_only:
        status = {k: ("cached" if r.metrics_path.is_file() else "not trained") for k, r in runs.items()}
        log(f"report only: {sum(v == 'cached' for v in status.values())} of {len(runs)} runs finished")
    else:
        status = execute(runs, jobs, threads, log)
    fingerprint = check_provenance(runs)
    any_cfg = next(iter(runs.values())).cfg
    header = (f"Config: {args.config or 'built-in embedded default (configs/embedded.yaml)'}"
              f"{'; dataset ' + args.dataset if args.dataset != 'embedded' else ''}"
              f"{' + ' + ' '.join(args.overrides) if args.overrides else ''}; dataset fingerprint {fingerprint}; {any_cfg.solver.max_iter} iterations; "
              f"seeds {' '.join(map(str, args.seeds))}; val set {any_cfg.data.val_json}. Runs in {out / 'runs'}.")
    print(report(rows, runs, out, header), end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}", file=sys.stderr)
    failed = [k for k, s in status.items() if s.startswith("failed")]
    return 1 if failed else 0

