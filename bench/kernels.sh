#!/usr/bin/env bash
# Which CPU libraries sit in the numeric path, and does `cpu_kernels=portable` take them out?
# Trains the embedded tiny model for 60 deterministic iterations (1 thread, seed 0) under several
# kernel settings and prints the sha256 of the final student and teacher weights per setting.
# Equal hashes = bit-identical training. Run by hand from the repository root (about 1 min per row
# on 2 idle cores); docs/testbed.md, "Numbers that travel", reads its table.
set -euo pipefail
OUT=${OUT:-runs/kernels}
ITERS=${ITERS:-60}
dtg synth >/dev/null

run() {  # name, then env assignments / --set pairs
  local name=$1; shift
  local envs=() sets=()
  for a in "$@"; do
    if [[ $a == *=* && $a != cpu_kernels=* ]]; then envs+=("$a"); else sets+=(--set "$a"); fi
  done
  rm -rf "$OUT/$name"
  env "${envs[@]}" dtg train --no-progress --output-dir "$OUT/$name" --set seed=0 --set threads=1 \
    --set deterministic=true --set solver.max_iter="$ITERS" --set solver.steps="[$((ITERS - 1))]" --set solver.warmup_iters=1 \
    --set checkpoint_period="$ITERS" "${sets[@]}" >"$OUT/$name.log" 2>&1
  python - "$OUT/$name/checkpoints/last.pth" "$name" "$*" <<'EOF'
import hashlib, sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
def digest(state):
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode()); h.update(state[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
print(f"| {sys.argv[2]} | `{sys.argv[3] or '-'}` | {digest(ckpt['student'])} | {digest(ckpt['teacher'])} |")
EOF
}

mkdir -p "$OUT"
echo "| setting | environment / config | student sha256 | teacher sha256 |"
echo "|---|---|---|---|"
run fast
run fast-again
run mkl-compatible MKL_CBWR=COMPATIBLE
run no-avx512-onednn ONEDNN_MAX_CPU_ISA=AVX2
run portable cpu_kernels=portable
run portable-aten-avx2 cpu_kernels=portable ATEN_CPU_CAPABILITY=avx2
run portable-aten-default cpu_kernels=portable ATEN_CPU_CAPABILITY=default
lscpu | grep -m1 "Model name" || true
