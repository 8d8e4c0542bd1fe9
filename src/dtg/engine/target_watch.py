"""Watching the teacher's targets: say it when the unlabeled branch teaches nothing (docs/method.md,
"Watching the targets").

Each method names the per-image counts of its teacher targets and the config keys that set them
(:meth:`dtg.methods.base.Method.target_figures`: sparse's pseudo boxes, DTG's clusters and members
per stage). :class:`TargetWatchHook` averages each one over every step of a logging period (the
figure is only there once the unlabeled loss runs, after ``semi.burn_in``) and hands the period's
mean to a :class:`FigureWatch`, the pure detector of episodes:

* its reference is the mean of the first ``WatchRule.reference_periods`` periods of the unlabeled
  phase; when it is known, one line gives every figure's reference (the burn-in line);
* from then on it compares the mean of the last ``WatchRule.window`` periods (so one noisy batch
  triggers nothing) with the reference: ``nothing`` (the whole window is 0), ``collapse`` (below
  ``low`` x the reference) or ``explosion`` (above ``high`` x the reference, or ``high`` x
  ``floor`` when the reference is smaller). The first such period writes one warning line; the
  episode stays quiet until the figure is back to normal (within ``rearm_low`` .. ``rearm_high`` x
  the reference, a hysteresis against flapping), except that a collapse reaching nothing says so once.

The lines go to the log and the progress output (:meth:`dtg.engine.hooks.ProgressHook.note`).
The state (references, windows, open episodes) is in the checkpoint: a resumed run keeps its
reference; a run started with ``--init-from`` begins its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dtg.engine.hooks import HookBase
from dtg.methods.base import TargetFigure

DOWN = ("collapse", "nothing")  # in increasing severity


@dataclass(frozen=True)
class WatchRule:
    """The thresholds of :class:`FigureWatch` (documented in docs/method.md, "Watching the targets").

    Attributes:
        reference_periods: logging periods of the unlabeled phase whose mean is the reference.
        window: logging periods averaged before a comparison (and the stretch of "nothing").
        low: collapse below ``low`` x the reference.
        high: explosion above ``high`` x max(reference, ``floor``).
        floor: per image; keeps a small reference (0.3 pseudo boxes) from calling a healthy rise an explosion.
        rearm_low, rearm_high: back to normal within [``rearm_low`` x reference, ``rearm_high`` x
            max(reference, ``floor``)] (and above 0).
    """

    reference_periods: int = 3
    window: int = 3
    low: float = 0.25
    high: float = 3.0
    floor: float = 1.0
    rearm_low: float = 0.5
    rearm_high: float = 2.0


@dataclass(frozen=True)
class Event:
    """What one period did to a figure: ``kind`` is ``start`` (the reference is known), ``nothing``,
    ``collapse``, ``explosion`` (an episode begins or worsens) or ``normal`` (it ended);
    ``value``: the windowed mean now (the reference itself for ``start``)."""

    kind: str
    reference: float
    value: float


class FigureWatch:
    """The episodes of one figure, fed one mean per logging period of the unlabeled phase (no trainer)."""

    def __init__(self, rule: WatchRule = WatchRule()) -> None:
        self.rule = rule
        self.start: list[float] = []  # the first reference_periods means
        self.recent: list[float] = []  # the last window means
        self.reference: float | None = None
        self.episode: str | None = None  # the open episode's kind

    def smoothed(self) -> float:
        """The mean of the last ``window`` periods (of those seen, fewer at first)."""
        return sum(self.recent) / max(len(self.recent), 1)

    def classify(self) -> str | None:
        """``nothing``, ``collapse``, ``explosion`` or None (within the bounds) for the current window."""
        r, ref, s = self.rule, self.reference, self.smoothed()
        assert ref is not None
        if len(self.recent) == r.window and max(self.recent) <= 0.0:
            return "nothing"
        if ref > 0 and s < r.low * ref:
            return "collapse"
        if s > r.high * max(ref, r.floor):
            return "explosion"
        return None

    def normal(self) -> bool:
        """Back within the re-arm band (narrower than the warning bounds)."""
        r, ref, s = self.rule, self.reference, self.smoothed()
        assert ref is not None
        return s > 0 and s >= r.rearm_low * ref and s <= r.rearm_high * max(ref, r.floor)

    def update(self, value: float) -> list[Event]:
        """Take one period's mean; the events it causes (none, one, or ``start`` and the episode the
        reference itself opens, e.g. ``nothing`` when the first periods had no target at all)."""
        r = self.rule
        self.recent = [*self.recent, float(value)][-r.window:]
        out: list[Event] = []
        if self.reference is None:
            self.start.append(float(value))
            if len(self.start) < r.reference_periods:
                return out
            self.reference = sum(self.start) / len(self.start)
            out.append(Event("start", self.reference, self.reference))
        kind, ref, now = self.classify(), self.reference, self.smoothed()
        if self.episode is None:
            if kind is not None:
                self.episode = kind
                out.append(Event(kind, ref, now))
            return out
        worse = kind in DOWN and self.episode in DOWN and DOWN.index(kind) > DOWN.index(self.episode)
        turned = kind is not None and (kind in DOWN) != (self.episode in DOWN)  # a collapse became an explosion
        if worse or turned:
            assert kind is not None
            self.episode = kind
            out.append(Event(kind, ref, now))
        elif kind is None and self.normal():
            self.episode = None
            out.append(Event("normal", ref, now))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "recent": self.recent, "reference": self.reference, "episode": self.episode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.recent = list(state["start"]), list(state["recent"])
        self.reference, self.episode = state["reference"], state["episode"]


def config_value(cfg: Any, key: str) -> Any:
    """The value of the dotted config ``key`` in ``cfg`` (e.g. ``dtg.rpn.tau``)."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_by(figure: TargetFigure, cfg: Any) -> str:
    """``dtg.rpn.tau=0.9, dtg.rpn.uncertain=1.0``: the keys that set ``figure`` and their values."""
    return ", ".join(f"{k}={config_value(cfg, k)}" for k in figure.keys)


def start_line(figures: list[tuple[TargetFigure, Event]], first: int, last: int) -> str:
    """The burn-in line: each figure's reference, the mean over iterations ``first``..``last``."""
    values = ", ".join(f"{f.label} {e.reference:.2f}" for f, e in figures)
    return f"teacher targets per image at the start of the unlabeled phase (iterations {first}-{last}): {values}"


def event_line(kind: str, figures: list[tuple[TargetFigure, Event]], iteration: int, rule: WatchRule,
               cfg: Any) -> str:
    """One line for the figures (set by the same keys) that the same ``kind`` of event hit at ``iteration``."""
    what = {
        "nothing": f"none for {rule.window} logged periods, the unlabeled loss teaches this stage nothing",
        "collapse": f"collapsed below {rule.low:g}x their start",
        "explosion": f"exploded above {rule.high:g}x their start",
        "normal": "back to normal",
    }[kind]
    values = ", ".join(f"{f.label} {e.reference:.2f} -> {e.value:.2f}" for f, e in figures)
    line = (f"teacher targets at iteration {iteration}: {what}: {values} per image (the start of the unlabeled "
            f"phase -> the mean of the last {rule.window} logged periods)")
    return line if kind == "normal" else f"WARNING {line}; set by {set_by(figures[0][0], cfg)}"


class TargetWatchHook(HookBase):
    """Watches the method's :class:`TargetFigure` s (see the module docstring); silent without any.

    Args:
        figures: what to watch (:meth:`dtg.methods.base.Method.target_figures`).
        say: where a line goes (the progress hook's :meth:`~dtg.engine.hooks.ProgressHook.note`); None:
            ``trainer.log``.
        rule: the thresholds.
    """

    def __init__(self, figures: tuple[TargetFigure, ...], say: Callable[[str], None] | None = None,
                 rule: WatchRule = WatchRule()) -> None:
        self.figures, self.say_to, self.rule = figures, say, rule
        self.watches = {f.stat: FigureWatch(rule) for f in figures}
        self.sums = {f.stat: 0.0 for f in figures}  # this logging period's steps (this rank)
        self.counts = {f.stat: 0 for f in figures}
        self.first: int | None = None  # the first iteration of the unlabeled phase

    def say(self, line: str) -> None:
        (self.say_to or self.trainer.log)(line)

    def after_step(self) -> None:
        scalars, it = self.trainer.scalars, self.trainer.iteration
        for stat in self.sums:
            if stat in scalars:
                self.sums[stat] += float(scalars[stat])
                self.counts[stat] += 1
                if self.first is None:
                    self.first = it
        if self.trainer.logged is not None:
            self.end_period(it)

    def end_period(self, iteration: int) -> None:
        """Feed each figure seen in this period its mean; write the lines of the events: the burn-in
        line, then one line per kind of event and group of figures set by the same keys."""
        started: list[tuple[TargetFigure, Event]] = []
        groups: dict[tuple[str, tuple[str, ...]], list[tuple[TargetFigure, Event]]] = {}
        for f in self.figures:
            n = self.counts[f.stat]
            if n == 0:
                continue
            events = self.watches[f.stat].update(self.sums[f.stat] / n)
            self.sums[f.stat], self.counts[f.stat] = 0.0, 0
            for e in events:
                if e.kind == "start":
                    started.append((f, e))
                else:
                    groups.setdefault((e.kind, f.keys), []).append((f, e))
        if started:
            self.say(start_line(started, self.first or iteration, iteration))
        for (kind, _), figures in groups.items():
            self.say(event_line(kind, figures, iteration, self.rule, self.trainer.cfg))

    def state_dict(self) -> dict[str, Any]:
        return {"target_watch": {"first": self.first, "sums": self.sums, "counts": self.counts,
                                 "figures": {k: w.state_dict() for k, w in self.watches.items()}}}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        state = ckpt.get("target_watch")
        if not state:  # an older checkpoint: the watch starts over
            return
        self.first = state["first"]
        for stat, w in self.watches.items():
            if stat in state["figures"]:
                w.load_state_dict(state["figures"][stat])
                self.sums[stat], self.counts[stat] = state["sums"][stat], state["counts"][stat]
