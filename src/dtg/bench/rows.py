"""The rows of ``dtg bench reproduce``: each a set of ``--set`` overrides and the paper's numbers for it.

The main rows (supervised, sparse, dtg, oracle, full labels), the ablation rows of the paper's
tables 2, 3 and 5 (DTG dense in both stages, spelled out as :data:`DENSE`), the frame's levers for
the sparse baseline, and issue 25's screens (spelled on :data:`LEAD`), so that a change of a
method's defaults leaves the meaning, and the run keys, of every spelled-out row alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

Paper = tuple[float, float, float]
MAIN_ROWS = ("supervised", "sparse", "dtg", "oracle", "full-labels")
CEILING = "full-labels"
# Rows trained on data.full_json (every train image with its boxes) instead of data.train_json.
CEILINGS = frozenset({CEILING, "full-labels-2000"})


@dataclass(frozen=True)
class Row:
    """A table row: ``--set`` overrides and the paper's (AP, AP50, AP75) on COCO 10 %, one fold."""

    name: str
    overrides: dict[str, Any]
    paper: Paper | None
    source: str

    def set_args(self) -> list[str]:
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.overrides.items()]


DTG = {"method": "dtg"}
# The rows of the paper's ablations vary DTG dense in both stages, with the defaults it had before
# issue 25 (samples normalisation, the ignore band below dtg.rcnn.tau, Rank Matching weight 3, every
# teacher proposal a RoI): spelled out, so that a change of `method=dtg`'s defaults leaves their
# meaning (and cached runs) alone.
DENSE = {"method": "dtg", "dtg.rpn.targets": "dtg", "dtg.normalize": "samples", "dtg.rcnn.uncertain": 0.1,
         "dtg.rm_weight": 3.0, "dtg.rcnn.proposals": 0, "dtg.rcnn.member_iou": 0.0, "dtg.rcnn.background": 0}
SPARSE = {"method": "sparse"}
# Issue 25's lead (the defaults from then until the cost switch): the rows screened on it keep their meaning.
LEAD = {**DENSE, "dtg.rpn.targets": "sparse", "dtg.normalize": "supervised", "dtg.rcnn.uncertain": 1.0,
        "dtg.rm_weight": 0.6}
# The testbed's schedule until issue 25 moved it to 3000 iterations: an unlabeled phase half as long (its
# learning-rate steps 300 and 100 before the end).
SHORT = {"solver.max_iter": 2000, "solver.steps": [1700, 1900]}
ROWS: tuple[Row, ...] = (
    Row("supervised", {"method": "supervised"}, (26.8, 44.9, 28.4), "T2(a) row 1 (T1 5-fold: 26.90)"),
    Row(CEILING, {"method": "supervised"}, None, "T1: supervised on all of train2017, AP 40.9 (no AP50/AP75 given)"),
    Row("sparse", {"method": "sparse"}, (34.5, 53.8, 37.1), "T2(c) spa-den / spa-den"),
    Row("dtg", DTG, (36.3, 56.4, 38.8), "T2(a) RPN+RCNN = T2(b) +RM (T1 5-fold: 35.92); ours: the defaults, a sparse RPN + dense R-CNN (T2(c): 35.5)"),
    Row("dtg-dense", DENSE, (36.3, 56.4, 38.8), "T2(a) RPN+RCNN: DTG in both stages, the defaults before issue 25"),
    Row("oracle", {"method": "oracle"}, None, "not in the paper: sparse fed the unlabeled images' ground truth"),
    # The frame's levers for a teacher's mistakes (docs/testbed.md), each against the sparse row.
    Row("sparse-t0.9", {**SPARSE, "sparse.pseudo_score_thresh": 0.9, "sparse.uncertain_score_thresh": 0.9}, None,
        "frame: the paper's pseudo-label threshold, no ignore band"),
    Row("sparse-noreg", {**SPARSE, "sparse.unsup_reg": False}, None, "frame: no unlabeled box regression (Unbiased Teacher)"),
    Row("sparse-nogeo", {**SPARSE, "data.strong_view.rotate": 0.0, "data.strong_view.shear": 0.0}, None,
        "frame: strong view without rotation and shear"),
    Row("sparse-geo", {**SPARSE, "data.strong_view.rotate": 30.0, "data.strong_view.shear": 30.0}, None,
        "frame: strong view with rotation and shear up to 30 degrees (the paper's)"),
    Row("sparse-ema0.998", {**SPARSE, "semi.ema_momentum_unsup": 0.998}, None,
        "frame: teacher EMA over ~500 steps in the unlabeled phase"),
    Row("sparse-constlr", {**SPARSE, "solver.steps": []}, None, "frame: no learning-rate decay in the unlabeled phase"),
    Row("dtg-paper", {**DENSE, "dtg.normalize": "cluster", "dtg.rpn.tau": 0.9, "dtg.rpn.uncertain": 1.0,
                      "dtg.rcnn.uncertain": 1.0}, (36.3, 56.4, 38.8),
        "the paper's DTG settings (normalize cluster, dtg.rpn.tau 0.9, no ignore bands) in this frame"),
    Row("dtg-lead", LEAD, None,
        "issue 25's lead: sparse RPN targets, supervised denominators, no R-CNN band, RM weight 0.6"),
    # Issue 25, steps 5 and 7: the lead with one R-CNN switch each.
    Row("dtg-sub", {**LEAD, "dtg.rcnn.subsample": True}, None,
        "the lead + the cost switch: every member, background sampled to model.roi_batch_size_per_image"),
    Row("dtg-p128", {**LEAD, "dtg.rcnn.proposals": 128}, None,
        "the lead + the cost switch: the teacher's 128 highest-objectness proposals per image as RoIs"),
    Row("dtg-miou", {**LEAD, "dtg.rcnn.member_iou": 0.5}, None,
        "the lead + positives only for members whose proposal overlaps the kept box by IoU >= 0.5"),
    Row("dtg-topk", {**LEAD, "dtg.rcnn.member_topk": True}, None,
        "the lead + the DTG authors' (PseCo) top-k members by sqrt(IoU x score)"),
    Row("dtg-bg96", {**LEAD, "dtg.rcnn.background": 96}, None,
        "the lead + the cost switch: every member and 96 background RoIs per image, weighted up (unbiased)"),
    Row("dtg-bg96-miou", {**LEAD, "dtg.rcnn.background": 96, "dtg.rcnn.member_iou": 0.5}, None,
        "the lead + the unbiased background draw (96 per image) + positives only for members of proposal IoU >= 0.5"),
    Row("dtg-append", {**LEAD, "dtg.rcnn.append_kept": True}, None,
        "the lead + each cluster's kept box appended as one more RoI (as sparse appends its pseudo boxes)"),
    # Issue 25, step 3: the lead with one of its four overrides undone each.
    Row("lead-rpn-dense", {**LEAD, "dtg.rpn.targets": "dtg"}, None, "the lead with DTG's own (dense) RPN stage"),
    Row("lead-samples", {**LEAD, "dtg.normalize": "samples"}, None, "the lead with INC averaged over samples"),
    Row("lead-band", {**LEAD, "dtg.rcnn.uncertain": 0.1}, None, "the lead with the R-CNN ignore band [0.1, tau)"),
    Row("lead-beta3", {**LEAD, "dtg.rm_weight": 3.0}, None, "the lead with Rank Matching weight 3"),
    # Issue 25, step 4: a dense RPN stage whose objectness loss sees what the supervised RPN's sampler lets it see.
    Row("lead-rpn-sampled", {**LEAD, "dtg.rpn.targets": "dtg", "dtg.rpn.subsample": True}, None,
        "the lead with DTG's dense RPN stage, its loss over members + background sampled to 256 anchors per image"),
    # Issue 25, step 5: sparse and the dtg defaults (spelled out) on the testbed's schedule before issue 25 (a
    # 1000-iteration unlabeled phase, max_iter 2000), the learning-rate steps as far before the end as the
    # testbed's; they branch from the same supervised checkpoint at 1000 (the steps after it are not part of
    # the supervised part), so their runs are those of rows sparse and dtg on that schedule.
    Row("sparse-u1000", {**SPARSE, **SHORT}, None, "sparse with 1000 unlabeled iterations (max_iter 2000)"),
    Row("dtg-u1000", {**LEAD, "dtg.rcnn.background": 96, **SHORT}, None,
        "the dtg defaults (= dtg-bg96) with 1000 unlabeled iterations (max_iter 2000)"),
    # ... and the base and ceiling on that schedule, so that a share of the gap compares like with like.
    Row("supervised-2000", {"method": "supervised", **SHORT}, None,
        "supervised on the -u1000 rows' schedule (max_iter 2000): their share's base"),
    Row("full-labels-2000", {"method": "supervised", **SHORT}, None,
        "full labels on the -u1000 rows' schedule (max_iter 2000): their share's ceiling"),
    Row("hybrid-supnorm", {**DENSE, "dtg.rpn.targets": "sparse", "dtg.normalize": "supervised"}, None,
        "T2(c) hybrid, INC losses on the supervised denominators"),
    Row("dtg-rpn-only", {**DENSE, "dtg.rcnn.enabled": False}, (28.5, 47.7, 29.5), "T2(a) RPN only"),
    Row("dtg-rcnn-only", {**DENSE, "dtg.rpn.enabled": False}, None, "not in the paper (T2(c) 35.5 has a sparse RPN)"),
    Row("hybrid", {**DENSE, "dtg.rpn.targets": "sparse"}, None, "T2(c) sparse RPN + dense R-CNN: AP 35.5"),
    Row("norm-supervised", {**DENSE, "dtg.normalize": "supervised"}, None, "not in the paper (loss scale)"),
    Row("anchor-area", {**DENSE, "dtg.rpn.anchor_level": "area", "dtg.rpn.anchor_ties": "up"}, None,
        "not in the paper (RPN correspondence)"),
    Row("rpn-bce", {**DENSE, "dtg.normalize": "supervised", "dtg.rpn.cls_loss": "bce"}, None,
        "not in the paper (RPN loss as supervised)"),
    Row("dtg-subsample", {**DENSE, "dtg.rcnn.subsample": True}, None, "not in the paper (cost switch)"),
    Row("inc-cls", {**DENSE, "dtg.rcnn.inc_reg": False, "dtg.rcnn.rank_matching": False}, (32.9, 54.0, 34.9),
        "T2(b) INC cls"),
    Row("inc-cls-reg", {**DENSE, "dtg.rcnn.rank_matching": False}, (35.1, 55.0, 37.6), "T2(b) + reg = T3(c) reserved box"),
    Row("reg-own", {**DENSE, "dtg.rcnn.reg_target": "own", "dtg.rcnn.rank_matching": False}, (34.3, 54.0, 36.5),
        "T3(c) all boxes"),
    Row("T0.5", {**DENSE, "dtg.T": 0.5, "dtg.rm_weight": 1.0}, (35.6, 55.1, 38.4), "T3(a) (beta 1)"),
    Row("T1", {**DENSE, "dtg.T": 1.0, "dtg.rm_weight": 1.0}, (35.8, 55.5, 38.5), "T3(a) (beta 1)"),
    Row("T5", {**DENSE, "dtg.T": 5.0, "dtg.rm_weight": 1.0}, (35.6, 55.3, 38.4), "T3(a) (beta 1)"),
    Row("beta1", {**DENSE, "dtg.T": 1.0, "dtg.rm_weight": 1.0}, (35.8, 55.5, 38.5), "T3(b) (= row T1: same runs)"),
    Row("beta5", {**DENSE, "dtg.rm_weight": 5.0}, (36.1, 55.9, 38.8), "T3(b)"),
    Row("tau0.40", {**DENSE, "dtg.rcnn.tau": 0.40}, (35.8, 55.9, 38.6), "T5 (tau_rcnn)"),
    Row("tau0.50", {**DENSE, "dtg.rcnn.tau": 0.50}, (33.9, 53.1, 36.3), "T5 (tau_rcnn)"),
)
ROW_BY_NAME = {r.name: r for r in ROWS}
# The frames a share of the supervised-to-full gap is given in: (base, ceiling, the methods on their schedule).
SHARE_FRAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("supervised", CEILING, ("sparse", "dtg", "oracle")),
    ("supervised-2000", "full-labels-2000", ("sparse-u1000", "dtg-u1000")),
)
NOTES = """\
Paper: teacher mAP on COCO val2017 with 10 % of train2017 labeled, one data fold (the ablation
setting of tables 2, 3 and 5; R50-FPN, 180k iterations on 8 GPUs). Table 1's 5-fold means at 10 %
are supervised 26.90 ± 0.08 and DTG 35.92 ± 0.26; the sparse-to-dense baseline is only in table
2(c)/(d). Rows beta = 3 and tau_rcnn = 0.45 are the `dtg` row (the paper's beta is `dtg.rm_weight`,
its tau_rcnn `dtg.rcnn.tau`). Table 3(a) was run with beta = 1
(the paper: "When we ablate T, beta is set to 1.0"), so rows T1 and beta1 are one config.
Tables 2(b) and 3(c) change the R-CNN stage only, and so do those rows here
(`dtg.rcnn.inc_reg`, `dtg.rcnn.rank_matching`, `dtg.rcnn.reg_target`). Ours: COCO AP of the EMA teacher on this config's val set,
mean ± sample std (n - 1) over seeds; gaps are paired by seed."""


def select_rows(names: Sequence[str]) -> list[Row]:
    """``main`` | ``all`` | explicit row names (comma or space separated), in table order, no repeats."""
    wanted: list[str] = []
    for name in (n for item in names for n in item.split(",") if n):
        if name == "main":
            wanted += MAIN_ROWS
        elif name == "all":
            wanted += [r.name for r in ROWS]
        elif name in ROW_BY_NAME:
            wanted.append(name)
        else:
            raise ValueError(f"unknown row '{name}' (rows: main, all, {', '.join(ROW_BY_NAME)})")
    return [ROW_BY_NAME[n] for n in dict.fromkeys(wanted)]


def method_row(method: str) -> Row:
    """The row that is ``method`` alone (``method=METHOD``, no other override): the table's own row of
    that name when it is one (supervised, sparse, dtg, oracle), else one made so. ``dtg demo``'s rows."""
    row = ROW_BY_NAME.get(method)
    return row if row is not None and row.overrides == {"method": method} else Row(method, {"method": method}, None, "")
