#!/usr/bin/env bash
# Does a refactor change what training computes? Trains the embedded tiny model for 60 deterministic
# iterations (1 thread, seed 0, unlabeled branch from iteration 20 on) for every method, dtg dense in
# both stages with the defaults it had before issue 25 (rows dtg-dense, dtg-rpn-sparse: table 2(c)'s hybrid,
# dtg-rcnn-subsample: the cost switch; the rows dtg, dtg-rpn-sparse and dtg-rcnn-subsample of earlier
# tables), and prints
# the sha256 of the final student and teacher weights per row. Run it on the code before and after a
# change: equal hashes = bit-identical training. Run by hand from the repository root; the CLI is
# invoked as `python -m dtg`, so PYTHONPATH selects the code under test, e.g.
#   PYTHONPATH=$PWD/src OUT=runs/bitident bash bench/bitident.sh
# EXTRA="cpu_kernels=portable" adds settings to every row (portable kernels: the same hashes on Intel and AMD).
# The thresholds are lowered (THRESH) so that a teacher this young (best foreground probability
# about 0.09 at iteration 60) gives pseudo boxes and R-CNN clusters at all; the last column is the
# mean of the per-image statistics the run logged to TensorBoard (the training steps' pseudo boxes /
# clusters / members, and the final evaluation's `dtg bench targets` counts); 0 or '-' there would
# mean the unlabeled branch compared nothing. Oracle: data.full_json is the embedded default's
# annotations/train_full.json, which `dtg synth` writes. (--stop-at at max_iter is the normal end: the
# final evaluation runs.) About 1 min per row on 2 busy cores.
set -euo pipefail
OUT=${OUT:-runs/bitident}
ITERS=${ITERS:-60}
BURN_IN=${BURN_IN:-20}
PY=${PYTHON:-python}
read -r -a EXTRA <<<"${EXTRA:-}"  # more settings for every row, e.g. EXTRA="cpu_kernels=portable"
THRESH=(sparse.pseudo_score_thresh=0.06 sparse.uncertain_score_thresh=0.05 dtg.rcnn.tau=0.06 dtg.rpn.tau=0.4
        dtg.rpn.uncertain=0.3 dtg.rcnn.uncertain=0.05)
$PY -m dtg synth >/dev/null

run() {  # name, then --set pairs
  local name=$1; shift
  local sets=()
  for a in "${THRESH[@]}" "${EXTRA[@]}" "$@"; do sets+=(--set "$a"); done
  rm -rf "${OUT:?}/$name"
  OMP_NUM_THREADS=1 $PY -m dtg train --no-progress --output-dir "$OUT/$name" --stop-at "$ITERS" --set seed=0 \
    --set threads=1 --set deterministic=true --set solver.max_iter="$ITERS" --set solver.steps="[$((ITERS - 1))]" \
    --set solver.warmup_iters=1 --set checkpoint_period="$ITERS" --set semi.burn_in="$BURN_IN" --set log_period=10 \
    "${sets[@]}" >"$OUT/$name.log" 2>&1 || { echo "| $name | training failed, see $OUT/$name.log | | | |"; return; }
  $PY - "$OUT/$name" "$name" "$*" <<'EOF'
import hashlib, pathlib, sys, torch
run = pathlib.Path(sys.argv[1])
ckpt = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)
def digest(state):
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode()); h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
stats = {}
try:  # the per-image target statistics the run logged to TensorBoard (train/*per_image)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    for tag in acc.Tags().get("scalars", []):
        if tag.endswith("per_image"):
            stats[tag.split("/", 1)[-1]] = [e.value for e in acc.Scalars(tag)]
except ImportError:
    pass
shown = ", ".join(f"{k.replace('_per_image', '')} {sum(v) / len(v):.1f}" for k, v in sorted(stats.items())) or "-"
print(f"| {sys.argv[2]} | `{sys.argv[3] or '-'}` | {digest(ckpt['student'])} | {digest(ckpt['teacher'])} | {shown} |")
EOF
}

mkdir -p "$OUT"
echo "| run | config | student sha256 | teacher sha256 | logged per image (mean) |"
echo "|---|---|---|---|---|"
run supervised method=supervised
run sparse method=sparse
DENSE=(method=dtg dtg.rpn.targets=dtg dtg.normalize=samples dtg.rm_weight=3.0 dtg.rcnn.proposals=0 dtg.rcnn.member_iou=0.0 dtg.rcnn.background=0)  # dtg's defaults before issue 25
run dtg method=dtg
run dtg-dense "${DENSE[@]}"
run oracle method=oracle
run dtg-rpn-sparse "${DENSE[@]}" dtg.rpn.targets=sparse
run dtg-rcnn-subsample "${DENSE[@]}" dtg.rcnn.subsample=true
