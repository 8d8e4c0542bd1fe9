"""What ``progress.json`` holds and its one-line rendering.

The trainer's progress hook (:class:`dtg.engine.hooks.ProgressHook`) writes it; the progress
monitor of :mod:`dtg.run_exec` reads it. Imports nothing of dtg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAIN_LOSSES = ("loss", "sup_rcnn_cls", "unsup_rcnn_cls", "unsup_rpn_cls")


def progress_state(method: str, iteration: int, total: int, seconds: float, steps: int,
                   scalars: dict[str, float], notes: Sequence[str] = ()) -> dict[str, Any]:
    """What ``progress.json`` holds: method, iteration / total, it/s and ETA over this process's
    ``steps`` in ``seconds``, the main losses of the last logged step and the ``notes`` for the user
    (the teacher targets' lines, :mod:`dtg.engine.target_watch`; a monitor prints each once)."""
    rate = steps / seconds if seconds > 0 and steps > 0 else 0.0
    return {"method": method, "iteration": iteration, "total": total, "it_per_s": rate,
            "eta_s": (total - iteration) / rate if rate > 0 else None,
            "losses": {k: float(scalars[k]) for k in MAIN_LOSSES if k in scalars}, "notes": list(notes)}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_line(state: dict[str, Any], label: str | None = None) -> str:
    """One line: ``dtg 420/1000 (42 %), 1.83 it/s, ETA 5:17, loss 0.812 unsup_rcnn_cls 0.101``."""
    it, total = state["iteration"], state["total"]
    losses = " ".join(f"{k} {v:.3f}" for k, v in state.get("losses", {}).items())
    return (f"{label or state['method']} {it}/{total} ({100 * it // max(total, 1)} %), {state['it_per_s']:.2f} it/s, "
            f"ETA {_clock(state['eta_s'])}{', ' + losses if losses else ''}")
