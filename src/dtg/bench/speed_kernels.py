"""``dtg bench speed --sections cpu-kernels``: what ``cpu_kernels: portable`` costs per step against ``fast``.

MKL reads ``MKL_CBWR`` at its first call, so one process cannot switch kernels: each measurement is
a fresh ``dtg bench speed --sections step`` subprocess with ``--set cpu_kernels=MODE``, the two modes
interleaved (fast, portable, portable, fast, ...) over ``rounds`` rounds so that a change of load on
a shared machine hits both alike. Each subprocess writes its per-method medians as JSON; the table
gives, per method, the median over rounds of each mode's median step time and their ratio.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

MODES = ("fast", "portable")


def round_order(r: int) -> tuple[str, ...]:
    """Round ``r``'s order of the modes, alternating so that neither always runs first."""
    return MODES if r % 2 == 0 else MODES[::-1]


def measure_round(argv: Sequence[str], mode: str, out_json: Path) -> dict[str, float]:
    """One ``dtg bench speed --sections step`` subprocess under ``mode``; its per-method medians (s)."""
    cmd = [sys.executable, "-m", "dtg", "bench", "speed", *argv, "--sections", "step", "--set", f"cpu_kernels={mode}",
           "--out", str(out_json.with_suffix(".md")), "--medians-json", str(out_json)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"cpu_kernels={mode}: the step measurement failed: {tail}")
    return json.loads(out_json.read_text())


def ratio_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: per method, the median over rounds of each mode's step median, and portable / fast."""
    methods = list(results[MODES[0]][0])
    lines = ["| method | fast s | portable s | portable / fast | per round (portable / fast) |", "|---|---:|---:|---:|---|"]
    for m in methods:
        fast = [r[m] for r in results["fast"]]
        port = [r[m] for r in results["portable"]]
        rounds = ", ".join(f"{p / f:.2f}" for f, p in zip(fast, port))
        f_med, p_med = statistics.median(fast), statistics.median(port)
        lines.append(f"| {m} | {f_med:.3f} | {p_med:.3f} | {p_med / f_med:.2f} | {rounds} |")
    return "\n".join(lines) + "\n"


def kernels_section(argv: Sequence[str], rounds: int, log: Callable[[str], None] = lambda m: None) -> str:
    """Run the interleaved rounds (``argv``: the config arguments and step options to pass on)."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="dtg_kernels_") as tmp:
        for r in range(rounds):
            for mode in round_order(r):
                log(f"round {r + 1}/{rounds}: cpu_kernels={mode}")
                results[mode].append(measure_round(argv, mode, Path(tmp) / f"r{r}_{mode}.json"))
    return (f"{rounds} rounds, each a fresh process per mode, modes interleaved; medians of the per-round "
            f"step medians.\n\n" + ratio_table(results))
