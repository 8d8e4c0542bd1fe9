#!/usr/bin/env bash
# The prepared GPU check (about 8 minutes on one GPU): run by hand where CUDA is present, never in CI.
#
#   bash bench/gpu_check.sh            # writes runs/gpu_check/{env.txt,speed.md,smoke.txt}
#
# 1. the machine: GPU, driver, torch and CUDA versions;
# 2. dtg bench speed --sections gpu: one R50-FPN 1333 x 800 step per method (and the Mean Teacher
#    lower bound) in fp32 and AMP, with peak GPU memory;
# 3. a 200-iteration smoke run of each method on the embedded set on the GPU (100 burn-in).
# Each part has its own time limit, so a hang in one still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
python -c "import dtg" 2>/dev/null || pip install -q -e .
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} 2>&1 | tee "$OUT/env.txt"
timeout 300 python -m dtg bench speed --sections gpu --repeat 3 --out "$OUT/speed" 2>&1 | tee "$OUT/speed.md"
python -m dtg synth --no-progress >/dev/null
: > "$OUT/smoke.txt"
for m in supervised sparse dtg; do
  echo "== $m" | tee -a "$OUT/smoke.txt"
  timeout 60 python -m dtg train --no-progress --output-dir "$OUT/smoke_$m" \
    --set method=$m --set device=cuda --set solver.max_iter=200 --set "solver.steps=[150]" \
    --set solver.warmup_iters=20 --set semi.burn_in=100 --set semi.alpha_warmup=20 --set checkpoint_period=200 \
    2>&1 | tail -n 4 | tee -a "$OUT/smoke.txt"
done
