"""The structured DTG / sparse config (issue 21): old keys, stored configs; run keys over today's layout and
the migration of the folders cached under the keys before it (issue 27)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from dtg.config import RENAMED, Config, ConfigError, from_dict, load_config, save_config, to_dict
from dtg.run_identity import branch_key, config_hash, run_key, start_key
from dtg.run_migration import LAYOUT, MARKER, flat_dict, flat_run_key, migrate

ROOT = Path(__file__).resolve().parents[1]

# run_key(cfg, "fp") of every shipped config (under each method) and of every `dtg bench reproduce` row on
# configs/testbed.yaml, hashed over today's layout (issue 27); the runs cached under these keys must keep them.
# The testbed's entries were re-pinned when issue 25 moved configs/testbed.yaml from 2000 to 3000 iterations:
# the runs of the 2000-iteration schedule keep their keys, now those of rows sparse-u1000, dtg-u1000 and
# supervised-2000 (= full-labels-2000: the ceiling's json is put in by `dtg bench reproduce`); the main rows'
# keys are those the rows sparse-u2000, dtg-u2000 and supervised-3000 had.
#   for each configs/*.yaml: cfg = load_config(path); cfg.method = m; run_key(cfg, "fp")
#   for each row of dtg.bench.rows.ROWS: run_key(load_config("configs/testbed.yaml", row.set_args()), "fp")
RUN_KEYS = {
    "coco_10pct.yaml:supervised": "2c275a989a5d",
    "coco_10pct.yaml:sparse": "8ff4c8c20684",
    "coco_10pct.yaml:dtg": "c57f9699b663",
    "coco_10pct.yaml:oracle": "82c560871362",
    "coco_10pct_1gpu.yaml:supervised": "b15fd1bb2a22",
    "coco_10pct_1gpu.yaml:sparse": "c1392e25de25",
    "coco_10pct_1gpu.yaml:dtg": "24a06710049a",
    "coco_10pct_1gpu.yaml:oracle": "f6372df9533e",
    "coco_full.yaml:supervised": "eade5ede2bcf",
    "coco_full.yaml:sparse": "7bfe034ac7c1",
    "coco_full.yaml:dtg": "3e2f3845807f",
    "coco_full.yaml:oracle": "40cf937017ca",
    "coco_full_1gpu.yaml:supervised": "a0b089c90326",
    "coco_full_1gpu.yaml:sparse": "4420a79206d3",
    "coco_full_1gpu.yaml:dtg": "ebd64a04bf72",
    "coco_full_1gpu.yaml:oracle": "32e4ca2bda6e",
    "embedded.yaml:supervised": "5258e38ed558",
    "embedded.yaml:sparse": "f92b38d2139a",
    "embedded.yaml:dtg": "8fac81a488c0",  # dtg.rcnn.background 96 by default (issue 25, the cost)
    "embedded.yaml:oracle": "021f68a2bedf",
    "testbed.yaml:supervised": "565432d5e21c",
    "testbed.yaml:sparse": "e7a78803349e",
    "testbed.yaml:dtg": "7455a08bb166",
    "testbed.yaml:oracle": "7eac956f9df4",
    "voc07_12.yaml:supervised": "cace5051a181",
    "voc07_12.yaml:sparse": "e7079144a3dc",
    "voc07_12.yaml:dtg": "b59445101300",
    "voc07_12.yaml:oracle": "e791fb33a15b",
    "voc07_12_1gpu.yaml:supervised": "f0f067c32510",
    "voc07_12_1gpu.yaml:sparse": "fb47264e3372",
    "voc07_12_1gpu.yaml:dtg": "9a25980c1722",
    "voc07_12_1gpu.yaml:oracle": "4a5ee6eeb351",
    "testbed.yaml:full-labels": "565432d5e21c",
    "testbed.yaml:dtg-dense": "b81f0a0e4c8e",
    "testbed.yaml:sparse-t0.9": "8951fa3d1ef6",
    "testbed.yaml:sparse-noreg": "f0ff766f8964",
    "testbed.yaml:sparse-nogeo": "e7a78803349e",
    "testbed.yaml:sparse-geo": "7b340551a9aa",
    "testbed.yaml:sparse-ema0.998": "16e2cd0c4c65",
    "testbed.yaml:sparse-constlr": "37e92c4d94b1",
    "testbed.yaml:dtg-paper": "101365966028",
    "testbed.yaml:dtg-lead": "a3bad4f972d6",
    "testbed.yaml:dtg-sub": "875cd1a62fd2",
    "testbed.yaml:dtg-p128": "ca4795fac118",
    "testbed.yaml:dtg-miou": "38a9f7f55c08",
    "testbed.yaml:dtg-topk": "85417e21eaea",
    "testbed.yaml:dtg-bg96": "7455a08bb166",
    "testbed.yaml:dtg-bg96-miou": "086b2a2805c6",
    "testbed.yaml:dtg-append": "04ac816cf8b1",
    "testbed.yaml:lead-rpn-sampled": "eba832e6e2d8",
    "testbed.yaml:lead-rpn-dense": "c371b30683ef",
    "testbed.yaml:lead-samples": "8aa10bddfc34",
    "testbed.yaml:lead-band": "a47cd35f12e1",
    "testbed.yaml:lead-beta3": "aefd517ef8f5",
    "testbed.yaml:hybrid-supnorm": "60bb7e162c9b",
    "testbed.yaml:dtg-rpn-only": "c8393f149329",
    "testbed.yaml:dtg-rcnn-only": "e6dbe76ce122",
    "testbed.yaml:hybrid": "45780b6d2d97",
    "testbed.yaml:norm-supervised": "0b1848815360",
    "testbed.yaml:anchor-area": "6d8fbb8c7205",
    "testbed.yaml:rpn-bce": "81693d131c8b",
    "testbed.yaml:dtg-subsample": "49571d584bb4",
    "testbed.yaml:inc-cls": "f2d1bf457893",
    "testbed.yaml:inc-cls-reg": "1dac5618fc60",
    "testbed.yaml:reg-own": "4aa847930e21",
    "testbed.yaml:T0.5": "ca3f89a2dd61",
    "testbed.yaml:T1": "e98ce6a3caaf",
    "testbed.yaml:T5": "04589312059a",
    "testbed.yaml:beta1": "e98ce6a3caaf",
    "testbed.yaml:beta5": "c2010bc3bd90",
    "testbed.yaml:tau0.40": "098ce707869b",
    "testbed.yaml:tau0.50": "ff92b0acee49",
    "testbed.yaml:sparse-u1000": "a903076bd8fd",
    "testbed.yaml:dtg-u1000": "4610ad792719",
    "testbed.yaml:supervised-2000": "cc261e382703",
    "testbed.yaml:full-labels-2000": "cc261e382703",
}

# The same keys before issue 27 (hashed over the flat layout), computed by the code of commit 7d0ce5e
# (before the per-stage config: flat dtg.*, the sparse keys in semi.*) in a worktree of that commit;
# the migration's test data (dtg.run_migration): it must map each to the key above.
# Before issue 27: run_key(cfg, "fp") of every shipped config (under each method) and of every `dtg bench reproduce`
# row on configs/testbed.yaml, computed by the code of commit 7d0ce5e (before the per-stage config:
# flat dtg.*, the sparse keys in semi.*) in a worktree of that commit with the script below; the
# runs cached under these keys must keep them. Exceptions, marked on their line: the GPU configs'
# sparse / dtg / oracle keys changed when issue 25 set the paper's dtg.rm_scale and dtg.rpn.transfer
# in those files (no run of them was ever cached on the project's machines), and their sparse / oracle
# keys when the runs of methods that do not read dtg.* were hashed with a frozen dtg section
# (run_identity.DTG_BLIND_METHODS); the testbed's and embedded default's dtg keys changed with dtg's
# defaults (issue 25); the testbed's is now that of the runs of row dtg-lead.
#   for each configs/*.yaml: cfg = load_config(path); cfg.method = m; run_key(cfg, "fp")
#   for each row of dtg.bench.rows.ROWS: run_key(load_config("configs/testbed.yaml", row.set_args()), "fp")
# The testbed's entries: re-pinned (run_migration.flat_run_key, the frozen old hashing) when issue 25 moved the
# testbed to 3000 iterations, as above; a comment "pinned at" stays only on the lines whose key did not change.
RUN_KEYS_7D0CE5E = {
    "coco_10pct.yaml:supervised": "2c275a989a5d",
    "coco_10pct.yaml:sparse": "056feb725125",  # hashed with the frozen dtg section (issue 25)
    "coco_10pct.yaml:dtg": "0d203ed9a547",  # rm_scale / rpn.transfer set (issue 25)
    "coco_10pct.yaml:oracle": "d02482ace471",  # hashed with the frozen dtg section (issue 25)
    "coco_10pct_1gpu.yaml:supervised": "b15fd1bb2a22",
    "coco_10pct_1gpu.yaml:sparse": "75b3485dc12c",  # hashed with the frozen dtg section (issue 25)
    "coco_10pct_1gpu.yaml:dtg": "da4c384cd2b7",  # rm_scale / rpn.transfer set (issue 25)
    "coco_10pct_1gpu.yaml:oracle": "38e3b397f561",  # hashed with the frozen dtg section (issue 25)
    "coco_full.yaml:supervised": "eade5ede2bcf",
    "coco_full.yaml:sparse": "a9c8deeb0337",  # hashed with the frozen dtg section (issue 25)
    "coco_full.yaml:dtg": "f14456eb4e56",  # rm_scale / rpn.transfer set (issue 25)
    "coco_full.yaml:oracle": "146579898294",  # hashed with the frozen dtg section (issue 25)
    "coco_full_1gpu.yaml:supervised": "a0b089c90326",
    "coco_full_1gpu.yaml:sparse": "386f930b28d2",  # hashed with the frozen dtg section (issue 25)
    "coco_full_1gpu.yaml:dtg": "93de60b348c1",  # rm_scale / rpn.transfer set (issue 25)
    "coco_full_1gpu.yaml:oracle": "b1cb6e37eb74",  # hashed with the frozen dtg section (issue 25)
    "embedded.yaml:supervised": "5258e38ed558",
    "embedded.yaml:sparse": "6f6be93f1efe",
    "embedded.yaml:dtg": "b0374abb8815",  # issue 25 changed dtg's defaults (last: dtg.rcnn.background 96)
    "embedded.yaml:oracle": "a3df0839e336",
    "testbed.yaml:supervised": "565432d5e21c",
    "testbed.yaml:sparse": "cd3c44305b77",
    "testbed.yaml:dtg": "c8d463d5262e",
    "testbed.yaml:oracle": "db694c029479",
    "voc07_12.yaml:supervised": "cace5051a181",
    "voc07_12.yaml:sparse": "fe1bf33b32a4",  # hashed with the frozen dtg section (issue 25)
    "voc07_12.yaml:dtg": "bc389be88e0a",  # rm_scale / rpn.transfer set (issue 25)
    "voc07_12.yaml:oracle": "77eb465de7d6",  # hashed with the frozen dtg section (issue 25)
    "voc07_12_1gpu.yaml:supervised": "f0f067c32510",
    "voc07_12_1gpu.yaml:sparse": "7b5fbaaf8a75",  # hashed with the frozen dtg section (issue 25)
    "voc07_12_1gpu.yaml:dtg": "2b5b434699b4",  # rm_scale / rpn.transfer set (issue 25)
    "voc07_12_1gpu.yaml:oracle": "832bf87a5e50",  # hashed with the frozen dtg section (issue 25)
    "testbed.yaml:full-labels": "565432d5e21c",
    "testbed.yaml:sparse-t0.9": "849dbe72b181",
    "testbed.yaml:sparse-noreg": "a17ff6c79e49",
    "testbed.yaml:sparse-nogeo": "cd3c44305b77",
    "testbed.yaml:sparse-geo": "ee54b21141fa",
    "testbed.yaml:sparse-ema0.998": "0baf0c19e303",
    "testbed.yaml:sparse-constlr": "1a0f161e3a5c",
    "testbed.yaml:dtg-paper": "7111a13aca06",
    "testbed.yaml:hybrid-supnorm": "0d1b3a80e7c7",
    "testbed.yaml:dtg-sub": "7bbac70d6d3b",
    "testbed.yaml:dtg-p128": "758190c792bc",
    "testbed.yaml:dtg-miou": "822cf97f4068",
    "testbed.yaml:dtg-topk": "fde3784cae14",
    "testbed.yaml:dtg-bg96": "c8d463d5262e",
    "testbed.yaml:dtg-bg96-miou": "2491fece3bbe",
    "testbed.yaml:dtg-append": "f314de236692",
    "testbed.yaml:lead-rpn-sampled": "8bd096d4a75a",
    "testbed.yaml:lead-rpn-dense": "8416d2b3f028",
    "testbed.yaml:lead-samples": "94526bf5ecb5",
    "testbed.yaml:lead-band": "6d2738cb70a6",
    "testbed.yaml:lead-beta3": "062e786bde8f",
    "testbed.yaml:dtg-lead": "d33e04dc5f6b",
    "testbed.yaml:dtg-dense": "4798dc1e2be4",
    "testbed.yaml:dtg-rpn-only": "d215d46e7c3b",
    "testbed.yaml:dtg-rcnn-only": "7a3163b70a16",
    "testbed.yaml:hybrid": "9e6b6d9ab225",
    "testbed.yaml:norm-supervised": "e02b4900152d",
    "testbed.yaml:anchor-area": "800deacd8d84",
    "testbed.yaml:rpn-bce": "7a61995c0a1f",
    "testbed.yaml:dtg-subsample": "f7da05b6f232",
    "testbed.yaml:inc-cls": "ce0650bcd11e",
    "testbed.yaml:inc-cls-reg": "e541050e7938",
    "testbed.yaml:reg-own": "8d96d1ce1fcb",
    "testbed.yaml:T0.5": "86d3e24a4a17",
    "testbed.yaml:T1": "4837bae339b7",
    "testbed.yaml:T5": "b012b3db5b02",
    "testbed.yaml:beta1": "4837bae339b7",
    "testbed.yaml:beta5": "a3e854494a11",
    "testbed.yaml:tau0.40": "9eed06f47784",
    "testbed.yaml:tau0.50": "4d41300eef87",
    "testbed.yaml:sparse-u1000": "6fbb403f9074",
    "testbed.yaml:dtg-u1000": "c00704a2c2fc",
    "testbed.yaml:supervised-2000": "cc261e382703",
    "testbed.yaml:full-labels-2000": "cc261e382703",
}


def _cases():
    from dtg.bench.rows import ROWS

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for method in ("supervised", "sparse", "dtg", "oracle"):
            yield f"{path.name}:{method}", path, [f"method={method}"], method
    for row in ROWS:
        yield f"testbed.yaml:{row.name}", ROOT / "configs" / "testbed.yaml", row.set_args(), None


@pytest.mark.parametrize("name, path, overrides, method", list(_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_run_keys_are_pinned_and_the_old_ones_recognised(name, path, overrides, method):
    cfg = _config(path, overrides, method)
    assert run_key(cfg, "fp") == RUN_KEYS[name]
    assert flat_run_key(cfg, "fp") == RUN_KEYS_7D0CE5E[name]


def _config(path, overrides, method):
    if method is None:
        return load_config(path, overrides)
    cfg = load_config(path)
    cfg.method = method
    return cfg


def test_every_pinned_key_is_checked():
    assert {name for name, *_ in _cases()} == set(RUN_KEYS_7D0CE5E) == set(RUN_KEYS)
    pairs = {(RUN_KEYS_7D0CE5E[n], RUN_KEYS[n]) for n in RUN_KEYS}  # one new key per old key, and back
    assert len(pairs) == len({o for o, _ in pairs}) == len({n for _, n in pairs})


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_key_names_its_new_key(old, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{old}=1"])
    msg = str(e.value)
    assert "\n" not in msg and f"config key '{old}' was renamed: use '{RENAMED[old][0]}'" in msg
    head, tail = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{head}:\n  {tail}: 1\n")
    with pytest.raises(ConfigError, match=f"was renamed: use '{RENAMED[old][0]}'"):
        load_config(path)


def test_a_config_stored_in_the_flat_layout_reads_back():
    cfg = load_config(None, ["method=dtg", "dtg.rcnn.inc_reg=false", "dtg.rpn.tau=0.9", "dtg.rm_weight=1.0",
                             "sparse.pseudo_score_thresh=0.8", "dtg.rpn.anchor_level=area", "dtg.rcnn.subsample=true",
                             "dtg.rcnn.background=0",
                             "dtg.rm_scale=inc", "dtg.rpn.transfer=one_to_one"])
    old = flat_dict(cfg)
    assert old["dtg"]["rm_scale"] == "inc" and old["dtg"]["rpn_transfer"] == "one_to_one"  # keys added after issue 21
    assert old["dtg"]["rcnn_inc_reg"] is False and old["dtg"]["inc_reg"] is True and old["dtg"]["beta"] == 1.0
    assert old["semi"]["pseudo_score_thresh"] == 0.8 and "sparse" not in old
    assert from_dict(old) == cfg and from_dict(to_dict(cfg)) == cfg
    assert from_dict(flat_dict(Config())) == Config()


def test_a_stored_config_without_a_later_key_reads_its_neutral_value_whatever_today_s_default(monkeypatch):
    import dtg.config.load as load

    def departed():  # today's defaults, as if they had left the neutral values since
        cfg = Config()
        cfg.dtg.rcnn.background, cfg.dtg.rcnn.member_iou, cfg.cpu_kernels = 96, 0.5, "portable"
        return cfg

    stored = to_dict(load_config(None, ["method=dtg", "dtg.rcnn.subsample=true", "dtg.rcnn.background=0"]))
    for section, key in ((stored["dtg"]["rcnn"], "background"), (stored["dtg"]["rcnn"], "member_iou"),
                         (stored, "cpu_kernels")):
        del section[key]  # written before the key existed
    monkeypatch.setattr(load, "Config", departed)
    cfg = load.from_dict(stored)  # subsample with background 0: no conflict
    assert (cfg.dtg.rcnn.background, cfg.dtg.rcnn.member_iou, cfg.cpu_kernels) == (0, 0.0, "fast")
    assert cfg.dtg.rcnn.subsample and cfg.method == "dtg"
    spelled = to_dict(load_config(None, ["dtg.rcnn.member_iou=0.3"]))
    assert load.from_dict(spelled).dtg.rcnn.member_iou == 0.3  # a stored value wins
    assert load.from_dict(to_dict(Config())) == Config()  # a dict that spells every key: as stored


def test_defaults_are_the_effective_values_of_the_flat_config():
    d = Config().dtg
    assert (d.rpn.tau, d.rpn.nms, d.rpn.uncertain, d.rcnn.tau, d.rcnn.nms, d.rcnn.uncertain) == (0.7, 0.7, 0.3, 0.45, 0.5, 1.0)
    assert (d.normalize, d.rm_input, d.T, d.rm_weight, d.rpn.targets) == ("supervised", "prob", 1.0, 0.6, "sparse")


def test_runs_of_methods_that_do_not_read_dtg_keep_their_key_whatever_dtg_says():
    base = load_config(ROOT / "configs" / "testbed.yaml")
    for method in ("sparse", "oracle", "supervised"):
        a, b = copy.deepcopy(base), load_config(ROOT / "configs" / "testbed.yaml", ["dtg.rm_weight=5", "dtg.rpn.targets=dtg"])
        a.method = b.method = method
        assert run_key(a, "fp") == run_key(b, "fp")
    a, b = copy.deepcopy(base), load_config(ROOT / "configs" / "testbed.yaml", ["dtg.rm_weight=5"])
    a.method = b.method = "dtg"
    assert run_key(a, "fp") != run_key(b, "fp")


def test_a_default_change_of_dtg_changes_the_dtg_key_only():
    for method in ("dtg", "sparse", "supervised", "oracle"):
        a = load_config(ROOT / "configs" / "testbed.yaml", [f"method={method}"])
        b = load_config(ROOT / "configs" / "testbed.yaml", [f"method={method}", "dtg.rcnn.background=64"])
        assert (run_key(a, "fp") != run_key(b, "fp")) == (method == "dtg"), method


# ----------------------------------------------------------------------------- the migration of cached runs


def _cache(tmp_path, names=None):
    """A hand-made cache: one folder per pinned old key (run.yaml, config.yaml, metrics.json, progress.json)."""
    runs = tmp_path / "out" / "runs"
    expected = {}
    for name, path, overrides, method in _cases():
        if names is not None and name not in names:
            continue
        cfg = _config(path, overrides, method)
        old, new = RUN_KEYS_7D0CE5E[name], RUN_KEYS[name]
        if old in expected:
            continue
        folder = runs / old
        folder.mkdir(parents=True)
        cfg.output_dir = str(Path("out/runs") / old)
        save_config(cfg, folder / "run.yaml")
        save_config(cfg, folder / "config.yaml")
        (folder / "metrics.json").write_text(json.dumps({"method": cfg.method, "teacher": {"AP": 0.1}, "provenance": {
            "dataset_fingerprint": "fp", "config_hash": "old"}}))
        (folder / "progress.json").write_text(json.dumps({"iteration": 1}))
        expected[old] = new
    return runs, expected


def _assert_migrated(runs, expected):
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == sorted(expected.values())
    for new in expected.values():
        for name in ("run.yaml", "config.yaml"):
            assert yaml.safe_load((runs / new / name).read_text())["output_dir"] == str(Path("out/runs") / new)
        cfg = from_dict(yaml.safe_load((runs / new / "run.yaml").read_text()))
        assert json.loads((runs / new / "metrics.json").read_text())["provenance"]["config_hash"] == config_hash(cfg)
    assert (runs / MARKER).is_file()


def _snapshot(runs):
    return {str(p.relative_to(runs)): p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}


def test_the_migration_maps_every_pinned_old_key_to_its_new_key_once(tmp_path):
    runs, expected = _cache(tmp_path)
    assert migrate(runs) == {old: new for old, new in expected.items() if old != new}
    assert any(old == new for old, new in expected.items())  # supervised keys: the same dict in both layouts
    _assert_migrated(runs, expected)
    before = _snapshot(runs)
    assert migrate(runs) == {}  # done: the marker says so
    assert migrate(runs, force=True) == {}  # scanned again: nothing to do
    assert _snapshot(runs) == before


def test_the_migration_renames_a_branch_and_its_parent(tmp_path):
    from dtg.run_identity import dataset_fingerprint

    runs = tmp_path / "runs"
    sup = load_config(ROOT / "configs" / "testbed.yaml", ["method=supervised"])
    child = load_config(ROOT / "configs" / "testbed.yaml", ["method=sparse"])
    fp = dataset_fingerprint(child.data)  # the child is unfinished: the data's fingerprint now
    p_old, c_old = flat_run_key(sup, fp), branch_key(flat_run_key(child, fp), flat_run_key(sup, fp), child.semi.burn_in)
    for key, cfg in ((p_old, sup), (c_old, child)):
        (runs / key).mkdir(parents=True)
        cfg.output_dir = str(runs / key)
        save_config(cfg, runs / key / "run.yaml")
    at = child.semi.burn_in
    p_new, c_new = run_key(sup, fp), branch_key(run_key(child, fp), start_key(child, fp, at), at)
    assert p_old == p_new and migrate(runs) == {c_old: c_new}  # a supervised key is the same in both layouts
    assert yaml.safe_load((runs / c_new / "run.yaml").read_text())["output_dir"] == str(runs / c_new)
    assert json.loads((runs / MARKER).read_text())["layout"] == LAYOUT


def test_the_migration_renames_a_branch_keyed_by_its_parent_run_to_its_start(tmp_path):
    """Until issue 25 a branch's key named the whole supervised run it started from; a marker of that scan
    does not stop the rename. A folder of a run with another supervised part is not its parent."""
    from dtg.run_identity import dataset_fingerprint

    runs = tmp_path / "runs"
    testbed = ROOT / "configs" / "testbed.yaml"
    sup = load_config(testbed, ["method=supervised"])
    other = load_config(testbed, ["method=supervised", "solver.lr=0.001"])
    child = load_config(testbed, ["method=sparse"])
    fp, at = dataset_fingerprint(child.data), child.semi.burn_in
    by_parent = branch_key(run_key(child, fp), run_key(sup, fp), at)
    by_other = branch_key(run_key(child, fp), run_key(other, fp), at)
    for key, cfg in ((run_key(sup, fp), sup), (run_key(other, fp), other), (by_parent, child), (by_other, child)):
        (runs / key).mkdir(parents=True)
        cfg.output_dir = str(runs / key)
        save_config(cfg, runs / key / "run.yaml")
    (runs / MARKER).write_text(json.dumps({"layout": "issue 27: run keys over today's config layout"}))
    today = branch_key(run_key(child, fp), start_key(child, fp, at), at)
    assert today != by_parent and migrate(runs) == {by_parent: today}
    assert (runs / by_other).is_dir() and json.loads((runs / MARKER).read_text())["unmatched"] == [by_other]
    assert migrate(runs, force=True) == {}


def test_an_interrupted_migration_completes(tmp_path, monkeypatch):
    import dtg.run_migration as m

    runs, expected = _cache(tmp_path, {n for n in RUN_KEYS if n.startswith("testbed.yaml")})
    real, calls = m._point_records, []

    def dies_after_two(folder, cfg, old):
        calls.append(folder)
        if len(calls) > 2:
            raise KeyboardInterrupt
        real(folder, cfg, old)

    monkeypatch.setattr(m, "_point_records", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        migrate(runs)
    assert not (runs / MARKER).exists() and calls[-1].name in expected.values()  # renamed, records not yet
    monkeypatch.setattr(m, "_point_records", real)
    migrate(runs)
    _assert_migrated(runs, expected)


def test_the_migration_leaves_busy_and_unknown_folders_alone(tmp_path):
    from dtg.engine.run_folder import RunLock

    runs, expected = _cache(tmp_path, {"testbed.yaml:sparse", "testbed.yaml:dtg"})
    (runs / "0123456789ab").mkdir()  # no config: not a run of a known key
    busy = next(iter(expected))
    lock = RunLock(runs / busy)
    assert lock.try_acquire()
    migrate(runs)
    assert (runs / busy).is_dir() and not (runs / MARKER).exists()  # a process trains there: later
    lock.release()
    migrate(runs)
    assert (runs / expected[busy]).is_dir() and (runs / "0123456789ab").is_dir()
    assert json.loads((runs / MARKER).read_text())["unmatched"] == ["0123456789ab"]
