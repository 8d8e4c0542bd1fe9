"""The structured DTG / sparse config (issue 21): old keys, stored configs and run identities."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dtg.config import RENAMED, Config, ConfigError, from_dict, legacy_dict, load_config, to_dict
from dtg.run_identity import run_key

ROOT = Path(__file__).resolve().parents[1]

# run_key(cfg, "fp") of every shipped config (under each method) and of every `dtg bench reproduce`
# row on configs/testbed.yaml, computed by the code of commit 7d0ce5e (before the per-stage config:
# flat dtg.*, the sparse keys in semi.*) in a worktree of that commit with the script below; the
# runs cached under these keys must keep them. Exceptions, marked on their line: the GPU configs'
# sparse / dtg / oracle keys changed when issue 25 set the paper's dtg.rm_scale and dtg.rpn.transfer
# in those files (no run of them was ever cached on the project's machines), and their sparse / oracle
# keys when the runs of methods that do not read dtg.* were hashed with a frozen dtg section
# (run_identity.DTG_BLIND_METHODS); the testbed's and embedded default's dtg keys changed with dtg's
# defaults (issue 25); the testbed's is now that of the runs of row dtg-lead.
#   for each configs/*.yaml: cfg = load_config(path); cfg.method = m; run_key(cfg, "fp")
#   for each row of dtg.bench.reproduce.ROWS: run_key(load_config("configs/testbed.yaml", row.set_args()), "fp")
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
    "embedded.yaml:dtg": "9210927f0ab6",  # issue 25 changed dtg's defaults
    "embedded.yaml:oracle": "a3df0839e336",
    "testbed.yaml:supervised": "cc261e382703",
    "testbed.yaml:sparse": "6fbb403f9074",
    "testbed.yaml:dtg": "9b997d60c274",  # issue 25: dtg's new defaults, = row dtg-lead
    "testbed.yaml:oracle": "12a92db7826d",
    "voc07_12.yaml:supervised": "cace5051a181",
    "voc07_12.yaml:sparse": "fe1bf33b32a4",  # hashed with the frozen dtg section (issue 25)
    "voc07_12.yaml:dtg": "bc389be88e0a",  # rm_scale / rpn.transfer set (issue 25)
    "voc07_12.yaml:oracle": "77eb465de7d6",  # hashed with the frozen dtg section (issue 25)
    "voc07_12_1gpu.yaml:supervised": "f0f067c32510",
    "voc07_12_1gpu.yaml:sparse": "7b5fbaaf8a75",  # hashed with the frozen dtg section (issue 25)
    "voc07_12_1gpu.yaml:dtg": "2b5b434699b4",  # rm_scale / rpn.transfer set (issue 25)
    "voc07_12_1gpu.yaml:oracle": "832bf87a5e50",  # hashed with the frozen dtg section (issue 25)
    "testbed.yaml:full-labels": "cc261e382703",
    "testbed.yaml:sparse-t0.9": "463d1d9f9507",
    "testbed.yaml:sparse-noreg": "fb62b1a2c5c6",
    "testbed.yaml:sparse-nogeo": "6fbb403f9074",
    "testbed.yaml:sparse-geo": "3cb8f7ec39e5",
    "testbed.yaml:sparse-ema0.998": "4938fc0e9e65",
    "testbed.yaml:sparse-constlr": "7c1b1ae41b9a",
    "testbed.yaml:dtg-paper": "0473a2ef4176",
    "testbed.yaml:hybrid-supnorm": "f9c7a6003a0d",
    "testbed.yaml:dtg-sub": "e347932dda41",  # pinned at 36ba32d, where the row was added
    "testbed.yaml:dtg-p128": "4f46c93b1a85",  # pinned at a66c46a, where the row was added
    "testbed.yaml:dtg-miou": "c5708474a7ee",  # pinned at 36ba32d
    "testbed.yaml:dtg-topk": "52d3df06c03d",  # pinned at 36ba32d
    "testbed.yaml:dtg-lead": "9b997d60c274",  # pinned at e81b651, where the row was added
    "testbed.yaml:dtg-dense": "8bb5b0f54c8c",  # the dtg defaults before issue 25, spelled out: their runs
    "testbed.yaml:dtg-rpn-only": "079b7b601da5",
    "testbed.yaml:dtg-rcnn-only": "75f1eb8a8008",
    "testbed.yaml:hybrid": "9350db672924",
    "testbed.yaml:norm-supervised": "6b3399023411",
    "testbed.yaml:anchor-area": "b92cec11562a",
    "testbed.yaml:rpn-bce": "caab7d5a46b5",
    "testbed.yaml:dtg-subsample": "f5a19875903a",
    "testbed.yaml:inc-cls": "12533d6d1c40",
    "testbed.yaml:inc-cls-reg": "e173f53e91bf",
    "testbed.yaml:reg-own": "dc6e826fc93c",
    "testbed.yaml:T0.5": "e47cdb78498d",
    "testbed.yaml:T1": "030a27dccd22",
    "testbed.yaml:T5": "e641e6da7090",
    "testbed.yaml:beta1": "030a27dccd22",
    "testbed.yaml:beta5": "821fcc7aac40",
    "testbed.yaml:tau0.40": "614deb2d9978",
    "testbed.yaml:tau0.50": "ed7807af675e",
}


def _cases():
    from dtg.bench.reproduce import ROWS

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for method in ("supervised", "sparse", "dtg", "oracle"):
            yield f"{path.name}:{method}", path, [f"method={method}"], method
    for row in ROWS:
        yield f"testbed.yaml:{row.name}", ROOT / "configs" / "testbed.yaml", row.set_args(), None


@pytest.mark.parametrize("name, path, overrides, method", list(_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_run_keys_equal_those_of_the_flat_config(name, path, overrides, method):
    if method is None:
        cfg = load_config(path, overrides)
    else:
        cfg = load_config(path)
        cfg.method = method
    assert run_key(cfg, "fp") == RUN_KEYS_7D0CE5E[name]


def test_every_pinned_key_is_checked():
    assert {name for name, *_ in _cases()} == set(RUN_KEYS_7D0CE5E)


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
                             "dtg.rm_scale=inc", "dtg.rpn.transfer=one_to_one"])
    old = legacy_dict(cfg)
    assert old["dtg"]["rm_scale"] == "inc" and old["dtg"]["rpn_transfer"] == "one_to_one"  # keys added after issue 21
    assert old["dtg"]["rcnn_inc_reg"] is False and old["dtg"]["inc_reg"] is True and old["dtg"]["beta"] == 1.0
    assert old["semi"]["pseudo_score_thresh"] == 0.8 and "sparse" not in old
    assert from_dict(old) == cfg and from_dict(to_dict(cfg)) == cfg
    assert from_dict(legacy_dict(Config())) == Config()


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
