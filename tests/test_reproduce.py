"""``dtg bench reproduce``: row selection, run hashing and caching, the table and its statistics."""

import json
import math
import subprocess

import pytest

from dtg.bench import reproduce as rp
from dtg.bench import rows as rw
from dtg.bench.report import (
    RowResult, convergence_table, fmt_interval, fmt_mean_std, gap_share, last_quarter_moves, gap_table, markdown_table, mean_curve, mean_std, paired_gap,
    t_interval,
)
from dtg.cli import main
from dtg.config import save_config
from dtg.run_exec import Run, _readiness, run_one, trained_twin
from dtg.run_identity import NEUTRAL, config_hash, hashed_dict, start_key, supervised_part, training_key

from conftest import tiny_config


def test_mean_and_sample_std_on_hand_made_numbers():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = mean_std([10.0, 14.0])
    assert mean == 12.0 and std == pytest.approx(math.sqrt(8.0))  # (2^2 + 2^2) / (2 - 1)
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)
    assert fmt_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert fmt_mean_std([5.0]) == "5.00" and fmt_mean_std([]) == "-"
    with pytest.raises(ValueError):
        mean_std([])


def test_gaps_are_paired_by_seed_and_table_has_paper_columns():
    def row(name, paper, aps):
        r = RowResult(name, f"method={name}", paper, "T")
        r.per_seed = {s: {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2} for s, ap in aps.items()}
        return r

    dtg = row("dtg", (36.3, 56.4, 38.8), {0: 5.0, 1: 7.0, 2: 9.0})
    sup = row("supervised", (26.8, 44.9, 28.4), {0: 4.0, 1: 4.0})  # seed 2 missing: not paired
    gap = paired_gap(dtg, sup)
    assert gap["AP"] == [1.0, 3.0] and gap["AP50"] == [2.0, 6.0]
    table = gap_table({"dtg": dtg, "supervised": sup}, [("dtg", "supervised"), ("dtg", "sparse")])
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one gap (no sparse row)
    # 95 % paired t interval, 1 degree of freedom: 2 +- 12.706 * 1.414 / sqrt(2)
    assert lines[2] == ("| dtg - supervised | 2 | 2.00 ± 1.41 | [-10.71, +14.71] | 4.00 ± 2.83 | 1.00 ± 0.71 "
                        "| +9.5 | +11.5 | +10.4 |")

    none = row("dtg-rcnn-only", None, {0: 1.0})
    none.failed = [1]
    table = markdown_table([dtg, none]).splitlines()
    assert table[0].startswith("| row | overrides | seeds | AP | AP50 | AP75 | paper AP |")
    assert table[2] == "| dtg | method=dtg | 3 | 7.00 ± 2.00 | 14.00 ± 4.00 | 3.50 ± 1.00 | 36.3 | 56.4 | 38.8 | T |"
    assert table[3].startswith("| dtg-rcnn-only | method=dtg-rcnn-only | 1 (1 without a result) | 1.00 | 2.00 | 0.50 | - | - | - |")
    assert mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0), (2, 5.0), (3, 9.0)]]) == [(1, 2.0), (2, 4.0)]


def test_t_interval_on_hand_made_numbers():
    mean, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # std sqrt(2.5), t(4) = 2.776
    assert mean == 3.0 and hi - mean == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5)) and mean - lo == hi - mean
    assert math.isnan(t_interval([4.0])[1]) and fmt_interval([4.0]) == "-"
    assert fmt_interval([1.0, 1.0, 1.0]) == "[+1.00, +1.00]"
    assert t_interval([0.0] * 40 + [4.0] * 40)[2] - 2.0 == pytest.approx(1.96 * mean_std([0.0] * 40 + [4.0] * 40)[1] / math.sqrt(80))


def test_last_quarter_moves_from_the_last_point_at_or_before_three_quarters():
    assert last_quarter_moves([(500, 50.0), (1000, 58.0), (1500, 61.0), (2000, 62.5)]) == pytest.approx(1.5)
    # a branched run's curve starts late: 1500 is still at 3/4 of 2000
    assert last_quarter_moves([(1500, 70.0), (2000, 69.0)]) == pytest.approx(-1.0)
    # the point just after 3/4 does not count as the start of the last quarter
    assert last_quarter_moves([(1000, 40.0), (1600, 60.0), (2000, 61.0)]) == pytest.approx(21.0)
    assert last_quarter_moves([(2000, 62.0)]) is None and last_quarter_moves([]) is None


def test_convergence_table_means_curves_and_their_last_quarter_per_row():
    curves = {"supervised": [[(1000, 58.0), (1500, 61.0), (2000, 62.0)], [(1000, 60.0), (1500, 62.0), (2000, 62.0)]],
              "sparse": [[]]}
    table = convergence_table(curves).splitlines()
    assert len(table) == 3  # header, rule, one row: sparse has no curve
    assert table[2] == "| supervised | 2 | 1000: 59.0, 1500: 61.5, 2000: 62.0 | 0.50 ± 0.71 |"
    assert convergence_table({"dtg": [[]]}) == ""
    assert convergence_table({"sparse": [[(2000, 74.0)], [(2000, 72.0)]]}) == ""  # final evaluations only


def test_read_curve_keeps_an_evaluation_that_a_resumed_run_purged(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dtg.bench.report import read_curve

    first = SummaryWriter(str(tmp_path / "tb"))
    for step, ap in ((500, 0.5), (1000, 0.6), (1500, 0.7)):
        first.add_scalar("teacher/AP", ap, step)
    first.close()
    # a run resumed at 1500 by the old trainer purged from 1500 on, its own last evaluation included
    resumed = SummaryWriter(str(tmp_path / "tb"), purge_step=1500)
    resumed.add_scalar("teacher/AP", 0.8, 2000)
    resumed.close()
    curve = read_curve(tmp_path)
    assert [it for it, _ in curve] == [500, 1000, 1500, 2000]
    assert [ap for _, ap in curve] == pytest.approx([50.0, 60.0, 70.0, 80.0])


def test_a_resumed_run_keeps_the_evaluation_of_its_checkpoint_iteration(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dtg.engine.trainer import Trainer

    cfg = tiny_config(tiny_dataset, tmp_path / "run", "eval_period=2", "checkpoint_period=2")
    Trainer(cfg, log=lambda m: None, progress=False).train(stop_at=2)  # evaluates at 2, then saves last.pth
    resumed = Trainer(cfg, log=lambda m: None, progress=False)
    resumed.resume(tmp_path / "run" / "checkpoints" / "last.pth")
    resumed.train()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})  # TensorBoard's own purging
    acc.Reload()
    assert [ev.step for ev in acc.Scalars("teacher/AP")] == [2, 4]


def test_gap_share_is_paired_over_seeds_all_three_rows_finished():
    def row(name, aps):
        r = RowResult(name, "", None, "T")
        r.per_seed = {s: {"AP": ap, "AP50": ap, "AP75": ap} for s, ap in aps.items()}
        return r

    rows = {"supervised": row("supervised", {0: 10.0, 1: 12.0, 2: 11.0}),
            "full-labels": row("full-labels", {0: 30.0, 1: 32.0}),
            "sparse": row("sparse", {0: 15.0, 1: 19.0, 2: 40.0}),  # seed 2 has no ceiling: left out
            "dtg": row("dtg", {0: 20.0})}
    lines = gap_share(rows, "supervised", "full-labels", ["sparse", "dtg"]).splitlines()
    assert lines[2].startswith("| headroom: full-labels - supervised | 2 | 20.00 ± 0.00 |") and lines[2].endswith("100 % |")
    assert lines[3].startswith("| sparse | 2 | 6.00 ± 1.41 |") and lines[3].endswith("| 30 % |")  # 6 / 20
    assert lines[4] == "| dtg | 1 | 10.00 | - | 50 % |"
    assert gap_share({"supervised": rows["supervised"]}, "supervised", "full-labels", ["dtg"]) == ""


def test_full_labels_row_trains_on_full_json_and_dataset_presets_move_every_path(tmp_path):
    from dtg.config import ConfigError
    from dtg.data.synth import DATASETS

    ceiling = rw.ROW_BY_NAME["full-labels"]
    cfg = rp.resolve(None, [], ceiling, 3, 0)
    assert cfg.method == "supervised" and cfg.seed == 3
    assert cfg.data.train_json == cfg.data.full_json == "data/embedded/annotations/train_full.json"
    with pytest.raises(ConfigError, match="data.full_json"):
        rp.resolve(None, ["data.full_json="], ceiling, 0, 0)
    other = rp.resolve(None, DATASETS["shapes2"], rw.ROW_BY_NAME["dtg"], 0, 0)
    paths = [other.data.train_json, other.data.train_images, other.data.unlabeled, other.data.unlabeled_images,
             other.data.val_json, other.data.val_images, other.data.full_json, other.synth.out_dir]
    assert all(p.startswith("data/shapes2") for p in paths) and other.synth.first_class == 5
    runs = rp.plan([rw.ROW_BY_NAME["supervised"], ceiling], [0], None, ["solver.max_iter=10", "solver.steps=[7]"], tmp_path, 0)
    assert len(runs) == 2  # the ceiling is its own run, on the same dataset fingerprint


def test_runs_of_different_datasets_are_not_mixed_in_one_table(tmp_path):
    from dtg.config import ConfigError

    runs = rp.plan(rw.select_rows(["supervised", "dtg", "full-labels"]), [0], None, [], tmp_path, 0)
    a, b, ceiling = runs.values()
    assert ceiling.uses == [("full-labels", 0)]

    def write(run, fp, val="vvvvvvvvvvvvvvvv"):
        run.out.mkdir(parents=True, exist_ok=True)
        run.metrics_path.write_text(json.dumps({"provenance": {"dataset_fingerprint": fp, "val_fingerprint": val}}))

    write(a, "1111111111111111"), write(b, "1111111111111111")
    write(ceiling, "3333333333333333")  # reads train_full.json as its labeled json: compared on its own
    assert rp.check_provenance(runs) == "1111111111111111"
    write(b, "2222222222222222")
    with pytest.raises(ConfigError, match="runs of different datasets in one table"):
        rp.check_provenance(runs)
    write(b, "1111111111111111")
    write(ceiling, "3333333333333333", val="wwwwwwwwwwwwwwww")  # evaluated on another val set
    with pytest.raises(ConfigError, match="runs of different val sets in one table"):
        rp.check_provenance(runs)


def test_row_selection():
    assert [r.name for r in rw.select_rows(["main"])] == ["supervised", "sparse", "dtg", "oracle", "full-labels"]
    assert len(rw.select_rows(["all"])) == len(rw.ROWS)
    assert [r.name for r in rw.select_rows(["dtg,reg-own", "dtg", "T0.5"])] == ["dtg", "reg-own", "T0.5"]
    with pytest.raises(ValueError, match="unknown row 'nope'"):
        rw.select_rows(["nope"])
    # Every transcribed paper row has AP50 > AP75 > AP (true of all of the paper's rows).
    for r in rw.ROWS:
        assert r.paper is None or r.paper[1] > r.paper[2] > r.paper[0] > 0


def test_same_config_same_run_and_volatile_keys_do_not_count(tmp_path):
    rows = rw.select_rows(["T1", "beta1", "dtg"])
    runs = rp.plan(rows, [0, 1], None, ["solver.max_iter=10", "solver.steps=[7]"], tmp_path, curve_points=5)
    assert len(runs) == 4  # T1 and beta1 are one config
    shared = [r for r in runs.values() if len(r.uses) == 2]
    assert sorted(u for r in shared for u in r.uses) == [("T1", 0), ("T1", 1), ("beta1", 0), ("beta1", 1)]
    run = next(iter(runs.values()))
    assert run.cfg.eval_period == 2 and run.out == tmp_path / "runs" / run.key
    other = rp.plan(rows[:1], [0], None, ["solver.max_iter=10", "solver.steps=[7]", "threads=1", "log_period=3"], tmp_path / "x", 5)
    assert set(other) <= set(runs)  # threads, log period and output folder are not part of the hash
    assert rp.plan(rows[:1], [0], None, ["eval_period=0", "solver.max_iter=10", "solver.steps=[7]"], tmp_path, 5).popitem()[1].cfg.eval_period == 0


def test_run_one_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    runs = rp.plan(rw.select_rows(["dtg"]), [0], None, [], tmp_path, 0)
    run = next(iter(runs.values()))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        run.metrics_path.write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    (run.out / "checkpoints").mkdir(parents=True)
    (run.out / "checkpoints" / "last.pth").write_bytes(b"x")
    assert run_one(run, threads=3)[0] == "resumed"
    assert calls[0][-2:] == ["--resume", "auto"] and "threads=3" in calls[0]
    assert (run.out / "run.yaml").is_file()
    assert run_one(run, threads=3) == ("cached", 0.0) and len(calls) == 1


@pytest.mark.slow
def test_two_rows_one_seed_train_once_then_come_from_the_cache(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(tiny_dataset, tmp_path / "unused", "semi.burn_in=1", "semi.alpha_warmup=1"), config)
    out = tmp_path / "rep"
    argv = ["bench", "reproduce", "--config", str(config), "--rows", "supervised,dtg", "--seeds", "0",
            "--set", "solver.max_iter=3", "--set", "solver.steps=[2]", "--jobs", "2", "--curve-points", "1", "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "2 runs: 0 cached, 2 to train" in first.err
    text = (out / "results.md").read_text()
    assert text == first.out
    main_table, rest = text.split("Gaps (", 1)
    rows = [ln for ln in main_table.splitlines() if ln.startswith(("| supervised |", "| dtg |"))]
    assert len(rows) == 2 and all(len(ln.split("|")) == 12 for ln in rows)
    assert "Convergence (" not in rest  # one evaluation per run: no last quarter to measure, no table
    raw = json.loads((out / "results.json").read_text())
    gap = raw["dtg"]["per_seed"]["0"]["AP"] - raw["supervised"]["per_seed"]["0"]["AP"]
    assert f"| dtg - supervised | 1 | {gap:.2f} |" in text  # the gap of the two runs' own metrics
    assert "+9.5" in text  # and the paper's gap beside it (36.3 - 26.8, its table 2(a))
    assert set(raw["supervised"]["per_seed"]["0"]) == {"AP", "AP50", "AP75"}
    assert raw["_curves"]["dtg"][0][-1][0] == 3  # the final evaluation, logged to TensorBoard
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = sorted(out.glob("runs/*/metrics.json"))
    assert len(metrics) == 2
    (dtg_log,) = [p.parent / "train.log" for p in metrics if "dtg" in p.parent.joinpath("run.yaml").read_text()
                  and "method: dtg" in p.parent.joinpath("run.yaml").read_text()]
    assert "--init-from" in dtg_log.read_text() and "iter_0000001.pth (iteration 1)" in dtg_log.read_text()
    stamps = [m.stat().st_mtime_ns for m in metrics]

    assert main(argv) == 0
    second = capsys.readouterr()
    assert "2 runs: 2 cached, 0 to train" in second.err and "start" not in second.err
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    assert second.out == first.out

    # --report-only trains nothing: a row whose run is missing is reported without a result
    (metrics[0].parent / "metrics.json").rename(metrics[0].parent / "metrics.moved")
    assert main([*argv, "--rows", "supervised,dtg", "--report-only"]) == 0
    third = capsys.readouterr()
    assert "report only: 1 of 2 runs finished" in third.err and "start" not in third.err
    assert "(1 without a result)" in third.out
    assert not (metrics[0].parent / "metrics.json").exists()


SHORT = ["solver.max_iter=10", "solver.steps=[7]", "semi.burn_in=4"]


def test_semi_rows_start_from_the_supervised_runs_checkpoint_at_burn_in(tmp_path):
    rows = rw.select_rows(["main"])
    runs = rp.plan(rows, [0, 1], None, SHORT, tmp_path, 0)
    by_use = {u: r for r in runs.values() for u in r.uses}
    assert len(runs) == 10  # per seed: supervised, sparse, dtg, oracle, full-labels
    for seed in (0, 1):
        sup = by_use[("supervised", seed)]
        assert sup.parent is None and sup.cfg.checkpoint_at == [4]
        for name in ("sparse", "dtg", "oracle"):
            child = by_use[(name, seed)]
            assert child.parent == sup.key and child.needs == sup.out / "checkpoints" / "iter_0000004.pth"
            assert child.extra_args == ["--init-from", str(child.needs)] and child.cfg.method == name
        assert by_use[("full-labels", seed)].parent is None  # other labeled data: its own run
    own = rp.plan(rows, [0], None, SHORT, tmp_path / "own", 0, shared_burn_in=False)
    assert all(r.parent is None for r in own.values())
    # A semi-supervised key does not change the supervised run; it does change the runs that branch off it.
    other = rp.plan(rw.select_rows(["supervised", "sparse"]), [0], None, [*SHORT, "semi.alpha=2"], tmp_path, 0)
    assert by_use[("supervised", 0)].key in other and by_use[("sparse", 0)].key not in other


def test_a_branch_needs_the_same_first_iterations():
    from dtg.config import load_config

    sup = load_config(None, ["solver.max_iter=100", "solver.steps=[70, 90]", "semi.burn_in=50"])
    semi = load_config(None, ["method=sparse", "solver.max_iter=200", "solver.steps=[150]", "semi.burn_in=50",
                              "semi.alpha=3", "data.strong_view.rotate=0", "eval_period=10"])
    assert supervised_part(semi, 50) == supervised_part(sup, 50)  # later steps and max_iter do not count
    assert supervised_part(semi) != supervised_part(sup)
    for key in ("solver.lr=0.02", "semi.ema_momentum=0.9", "model.fpn_channels=32", "solver.steps=[40, 150]"):
        changed = load_config(None, ["method=sparse", "solver.max_iter=200", "solver.steps=[150]", "semi.burn_in=50",
                                     key])
        assert supervised_part(changed, 50) != supervised_part(sup, 50), key


def test_a_start_is_what_decides_the_first_iterations_not_the_run_s_length():
    from dtg.config import load_config

    sup = load_config(None, ["solver.max_iter=100", "solver.steps=[70, 90]", "semi.burn_in=50"])
    longer = load_config(None, ["solver.max_iter=300", "solver.steps=[270, 290]", "semi.burn_in=50"])
    semi = load_config(None, ["method=dtg", "solver.max_iter=300", "solver.steps=[270, 290]", "semi.burn_in=50"])
    assert start_key(sup, "fp", 50) == start_key(longer, "fp", 50) == start_key(semi, "fp", 50)
    assert start_key(sup, "fp", 50) not in {start_key(sup, "other", 50), start_key(sup, "fp", 60),
                                            start_key(load_config(None, ["solver.lr=0.02"]), "fp", 50)}


def test_a_branch_keeps_its_key_when_the_supervised_run_it_starts_from_trains_longer(tmp_path):
    """Row sparse-u1000 (a 2000-iteration schedule) beside a 1000-iteration supervised run, and row sparse with
    every run on the 2000-iteration schedule, are one config that starts from one checkpoint (the supervised
    run's at semi.burn_in, the same first iterations): one run, one key."""
    short = ["solver.max_iter=2000", "solver.steps=[1700, 1900]"]
    a = rp.plan(rw.select_rows(["supervised", "sparse-u1000"]), [0], None, [], tmp_path, 0)
    b = rp.plan(rw.select_rows(["supervised", "sparse"]), [0], None, short, tmp_path, 0)
    child_a = next(r for r in a.values() if r.uses == [("sparse-u1000", 0)])
    child_b = next(r for r in b.values() if r.uses == [("sparse", 0)])
    assert child_a.key == child_b.key and child_a.parent != child_b.parent
    assert child_a.cfg.solver.max_iter == child_b.cfg.solver.max_iter == 2000


def test_a_branch_waits_for_its_parents_checkpoint_and_fails_without_it(tmp_path):
    parent = Run("p", None, tmp_path / "p")
    child = Run("c", None, tmp_path / "c", parent="p", needs=tmp_path / "p" / "checkpoints" / "iter_0000004.pth")
    runs = {"p": parent, "c": child}
    assert _readiness(parent, runs, {}) == "ready"
    for state in ("pending", "running"):
        assert _readiness(child, runs, {"p": state}) is None
    assert "the run it starts from, p, failed" in _readiness(child, runs, {"p": "failed (exit 1)"})
    assert "iter_0000004.pth does not exist: remove" in _readiness(child, runs, {"p": "cached"})
    child.needs.parent.mkdir(parents=True)
    child.needs.write_bytes(b"x")
    assert _readiness(child, runs, {"p": "running"}) == "ready"


def test_phased_execution_trains_the_burn_in_alone_then_the_rows_runs_side_by_side(tmp_path, monkeypatch):
    """``dtg demo``'s executor: the shared burn-in alone with every thread (up to the checkpoint its
    branches start from), then the runs of the rows; a parent no row reports stops at the burn-in."""
    import dtg.run_exec as rx

    calls = []

    def execute(runs, jobs, threads, log):
        calls.append(({k: r.stop_at for k, r in runs.items()}, jobs, threads))
        return {k: "trained" for k in runs}

    monkeypatch.setattr(rx, "execute", execute)
    runs = rp.plan([rw.method_row("sparse"), rw.method_row("dtg")], [0], None, SHORT, tmp_path, 0)
    (parent,) = [r for r in runs.values() if not r.uses]
    assert {r.parent for r in runs.values() if r.uses} == {parent.key}
    status, seconds = rx.execute_phased(runs, 2, 1, 2, lambda m: None)
    assert calls == [({parent.key: 4}, 1, 2), ({k: None for k, r in runs.items() if r.uses}, 2, 1)]
    assert parent.stop_at is None and set(seconds) == {"burn-in", "methods"} and set(status) == set(runs)
    calls.clear()  # the burn-in checkpoint exists: no phase 1
    parent.out.joinpath("checkpoints").mkdir(parents=True)
    parent.out.joinpath("checkpoints", "iter_0000004.pth").write_bytes(b"x")
    status, seconds = rx.execute_phased(runs, 2, 1, 2, lambda m: None)
    assert calls == [({k: None for k, r in runs.items() if r.uses}, 2, 1)] and set(seconds) == {"methods"}
    assert rw.method_row("dtg") is rw.ROW_BY_NAME["dtg"] and rw.method_row("dtg").overrides == {"method": "dtg"}


def test_a_burn_in_no_row_reports_trains_only_while_and_as_far_as_a_branch_needs_it(tmp_path):
    """``--rows sparse dtg``: the supervised run they branch from serves no row; it trains up to their
    checkpoint only, not at all once that checkpoint or both branches exist, while a supervised row's run
    still trains its whole schedule."""
    runs = rp.plan([rw.method_row("sparse"), rw.method_row("dtg")], [0], None, SHORT, tmp_path, 0)
    (parent,) = [r for r in runs.values() if not r.uses]
    kept = rp.trim_burn_ins(runs)
    assert set(kept) == set(runs) and parent.stop_at == 4  # nothing trained: up to the branch point only
    branches = [r for r in runs.values() if r.uses]
    for r in branches:  # both branches finished: the burn-in is not needed at all
        r.out.mkdir(parents=True)
        r.metrics_path.write_text("{}")
    assert set(rp.trim_burn_ins(runs)) == {r.key for r in branches}
    branches[0].metrics_path.unlink()  # one unfinished, but the checkpoint it starts from exists
    parent.out.joinpath("checkpoints").mkdir(parents=True)
    parent.out.joinpath("checkpoints", "iter_0000004.pth").write_bytes(b"x")
    assert set(rp.trim_burn_ins(runs)) == {r.key for r in branches}
    parent.out.joinpath("checkpoints", "iter_0000004.pth").unlink()  # needed again, but a twin trained it:
    parent.stop_at, parent.twin = None, tmp_path / "twin"  # evaluated whole, its checkpoints copied
    assert parent.key in rp.trim_burn_ins(runs) and parent.stop_at is None
    parent.twin = None  # finished without the checkpoint: kept, so that its branch fails saying so
    parent.metrics_path.write_text("{}")
    assert parent.key in rp.trim_burn_ins(runs) and parent.stop_at is None
    status = {k: ("cached" if r.metrics_path.is_file() else "pending") for k, r in runs.items()}
    assert "does not exist: remove" in _readiness(branches[0], runs, status)
    with_row = rp.plan(rw.select_rows(["supervised", "sparse"]), [0], None, SHORT, tmp_path / "row", 0)
    assert rp.trim_burn_ins(with_row) == with_row and all(r.stop_at is None for r in with_row.values())


def test_keys_added_later_leave_the_hash_alone_at_their_neutral_value():
    from dtg.config import load_config, to_dict

    base = load_config(None, ["method=sparse"])
    data = hashed_dict(base)
    assert "cpu_kernels" not in data and "class_thresholds" not in data["sparse"] and "dtg" not in data
    assert NEUTRAL["dtg.rcnn.proposals"] == 0 and NEUTRAL["sparse.class_thresholds"] == []
    # every neutral value is the shipped default (Annotated[..., Neutral(v)]) but for the defaults that
    # departed from it, which then are hashed: dtg.rcnn.background (96 since issue 25's cost switch)
    departed = {"dtg.rcnn.background": 96}
    for key, value in NEUTRAL.items():
        node = to_dict(base)
        for part in key.split("."):
            node = node[part]
        assert node == departed.get(key, value), key
    assert hashed_dict(load_config(None, ["method=dtg"]))["dtg"]["rcnn"]["background"] == 96
    for change in ("cpu_kernels=portable", "sparse.class_thresholds=[0.5, 0.5, 0.5, 0.5, 0.5]",
                   "semi.strong_bn_stats=false"):
        assert config_hash(load_config(None, ["method=sparse", change])) != config_hash(base), change
    assert config_hash(load_config(None, ["method=sparse", "threads=3"])) == config_hash(base)


@pytest.mark.slow
def test_a_supervised_run_trained_for_another_split_is_only_evaluated(tiny_dataset, tmp_path):
    import torch

    from dtg.engine.checkpoint import load_checkpoint

    base = tiny_config(tiny_dataset, tmp_path / "runs" / "a", "solver.max_iter=2", "solver.steps=[1]",
                       "checkpoint_at=[1]", "eval_period=1")
    first = Run("a", base, tmp_path / "runs" / "a")
    assert run_one(first, threads=1)[0] == "trained"
    other = tiny_config(tiny_dataset, tmp_path / "runs" / "b", "solver.max_iter=2", "solver.steps=[1]", "checkpoint_at=[1]",
                        f"data.val_json={tiny_dataset.train_labeled}", f"data.val_images={tiny_dataset.train_images}",
                        "data.unlabeled=")
    second = Run("b", other, tmp_path / "runs" / "b")
    assert training_key(other) == training_key(base)  # only the evaluation differs (val set, curve points)
    assert training_key(tiny_config(tiny_dataset, tmp_path, "solver.lr=0.02")) != training_key(base)
    second.twin = trained_twin(second, tmp_path / "runs")
    assert second.twin == first.out
    assert run_one(second, threads=1)[0] == "resumed"
    assert "evaluation only" in (second.out / "train.log").read_text()
    a, b = (load_checkpoint(r.out / "checkpoints" / "last.pth") for r in (first, second))
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])  # no step was taken
    assert (second.out / "checkpoints" / "iter_0000001.pth").is_file()
    metrics = json.loads(second.metrics_path.read_text())
    assert metrics["provenance"]["val_fingerprint"] != json.loads(first.metrics_path.read_text())["provenance"]["val_fingerprint"]
    # curve points during training do not change the weights a run ends with
    plain = Run("c", tiny_config(tiny_dataset, tmp_path / "runs" / "c", "solver.max_iter=2", "solver.steps=[1]"),
                   tmp_path / "runs" / "c")
    run_one(plain, threads=1)
    c = load_checkpoint(plain.out / "checkpoints" / "last.pth")
    assert all(torch.equal(a["student"][k], c["student"][k]) for k in a["student"])


def test_the_shorter_unlabeled_phase_branches_from_the_same_supervised_checkpoint(tmp_path):
    """Rows sparse-u1000 / dtg-u1000 (issue 25, step 5: the testbed's schedule before it): only steps after the
    burn-in differ, so they start from the supervised run's checkpoint at semi.burn_in instead of training their own."""
    runs = rp.plan(rw.select_rows(["supervised", "sparse", "sparse-u1000", "dtg-u1000"]), [0], None, [], tmp_path, 0)
    sup = next(r for r in runs.values() if r.uses == [("supervised", 0)])
    long_runs = [r for r in runs.values() if r.uses[0][0].endswith("-u1000")]
    assert len(runs) == 4 and len(long_runs) == 2
    for run in long_runs:
        assert run.parent == sup.key and run.cfg.solver.max_iter == 2000 and run.cfg.solver.steps == [1700, 1900]
        assert run.needs is not None and run.needs.name == f"iter_{run.cfg.semi.burn_in:07d}.pth"
    short = next(r for r in runs.values() if r.uses == [("sparse", 0)])
    assert short.parent == sup.key and short.key not in {r.key for r in long_runs}


def test_another_schedule_has_its_own_base_ceiling_and_share(tmp_path):
    """Rows supervised-2000 / full-labels-2000: the -u1000 rows' share of the gap is taken between a base
    and a ceiling trained on their schedule, not against the testbed's supervised and full-labels.
    The base branches at semi.burn_in from the supervised row, as the -u1000 rows do; the ceiling
    (other labeled data) trains from scratch."""
    names = ["supervised", "full-labels", "sparse-u1000", "dtg-u1000", "supervised-2000", "full-labels-2000"]
    runs = rp.plan(rw.select_rows(names), [0, 1], None, [], tmp_path, 0)
    by_use = {use: run for run in runs.values() for use in run.uses}
    for seed in (0, 1):
        base, top = by_use[("supervised-2000", seed)], by_use[("full-labels-2000", seed)]
        assert base.parent == by_use[("supervised", seed)].key and top.parent is None
        assert base.needs is not None and base.needs.name == f"iter_{base.cfg.semi.burn_in:07d}.pth"
        assert base.cfg.solver.max_iter == top.cfg.solver.max_iter == 2000
        assert top.cfg.data.train_json == top.cfg.data.full_json != base.cfg.data.train_json
        assert top.key != by_use[("full-labels", seed)].key and base.key != by_use[("supervised", seed)].key
    assert len(runs) == 12
    aps = {"supervised": 60.0, "full-labels": 80.0, "supervised-2000": 62.0, "full-labels-2000": 82.0,
           "sparse-u1000": 72.0, "dtg-u1000": 76.0}
    for (name, seed), run in by_use.items():
        run.out.mkdir(parents=True, exist_ok=True)
        ap = (aps[name] + seed) / 100.0
        run.metrics_path.write_text(json.dumps({"teacher": {"AP": ap, "AP50": ap, "AP75": ap}}))
    text = rp.report(rw.select_rows(names), runs, tmp_path / "out", "header")
    assert "| headroom: full-labels - supervised | 2 | 20.00 ± 0.00 |" in text
    assert "| headroom: full-labels-2000 - supervised-2000 | 2 | 20.00 ± 0.00 |" in text
    assert "| dtg-u1000 | 2 | 14.00 ± 0.00 | [+14.00, +14.00] | 70 % |" in text  # (76 - 62) / (82 - 62)
    assert "| sparse-u1000 | 2 | 10.00 ± 0.00 | [+10.00, +10.00] | 50 % |" in text
    assert "| dtg-u1000 - sparse-u1000 | 2 | 4.00 ± 0.00 |" in text
    assert "| full-labels-2000 - " not in text  # a ceiling is not a variant of the supervised row
