"""Replay a finished run's logged target figures through the target watch (docs/method.md, "Watching
the targets"): which warnings it would have written. Run by hand:

    python bench/watch_replay.py RUN_DIR [RUN_DIR ...]

Reads ``RUN_DIR/tb`` (TensorBoard ``train/*_per_image``, one value per logging period: the period's
last step, where the hook in training averages every step of the period, so this is a noisier
stream than the one training watches) and prints each figure's events.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dtg.engine.target_watch import FigureWatch


def replay(run: Path) -> list[str]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    lines = []
    for tag in sorted(t for t in acc.Tags().get("scalars", []) if t.startswith("train/") and t.endswith("_per_image")):
        watch = FigureWatch()
        for ev in acc.Scalars(tag):
            for e in watch.update(ev.value):
                lines.append(f"{run.name} {tag} iteration {ev.step}: {e.kind} (start {e.reference:.1f}, now {e.value:.1f})")
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(replay(Path(arg))) or f"{arg}: no figure logged")
