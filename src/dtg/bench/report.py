"""Numbers and pictures of ``dtg bench reproduce``: mean +- std over seeds, the markdown table, the PNG.

Pure functions over plain data (no torch), so they can be tested on hand-made numbers.
AP values here are percentages (COCO fractions x 100), as the paper prints them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

STATS = ("AP", "AP50", "AP75")
Curve = list[tuple[int, float]]  # (iteration, AP %)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator); std is NaN for n < 2.

    Raises:
        ValueError: on an empty sequence.
    """
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; just the mean for one value; ``"-"`` for none."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(x: float, digits: int = 2) -> str:
    return f"{x:+.{digits}f}"


# Two-sided 95 % quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean; low = high = NaN for n < 2.

    For paired differences (one value per seed) this is the paired t interval.

    Raises:
        ValueError: on an empty sequence.
    """
    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T975.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


def fmt_interval(values: Sequence[float], digits: int = 2) -> str:
    """``"[-0.12, +3.45]"`` (95 % t interval), ``"-"`` for fewer than 2 values."""
    if len(values) < 2:
        return "-"
    _, lo, hi = t_interval(values)
    return f"[{_signed(lo, digits)}, {_signed(hi, digits)}]"


@dataclass
class RowResult:
    """One table row: a name, its overrides, the paper's numbers and ours per seed.

    Attributes:
        per_seed: seed -> {"AP", "AP50", "AP75"} in percent (seeds whose run finished).
        failed: seeds whose run failed or has no metrics.
    """

    name: str
    overrides: str
    paper: tuple[float, float, float] | None
    source: str
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)

    def values(self, stat: str) -> list[float]:
        return [m[stat] for _, m in sorted(self.per_seed.items())]


def paired_gap(a: RowResult, b: RowResult) -> dict[str, list[float]]:
    """Per-seed ``a - b`` for every stat, over the seeds both rows finished (same seed = same data order)."""
    seeds = sorted(set(a.per_seed) & set(b.per_seed))
    return {s: [a.per_seed[k][s] - b.per_seed[k][s] for k in seeds] for s in STATS}


def _paper_cell(row: RowResult, i: int) -> str:
    return "-" if row.paper is None else f"{row.paper[i]:.1f}"


def markdown_table(rows: Sequence[RowResult]) -> str:
    """Ours (mean ± std over seeds) beside the paper's AP / AP50 / AP75 of the same row."""
    lines = [
        "| row | overrides | seeds | AP | AP50 | AP75 | paper AP | paper AP50 | paper AP75 | paper source |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        seeds = f"{len(r.per_seed)}" + (f" ({len(r.failed)} without a result)" if r.failed else "")
        ours = [fmt_mean_std(r.values(s)) for s in STATS]
        paper = [_paper_cell(r, i) for i in range(3)]
        lines.append(f"| {r.name} | {r.overrides or '-'} | {seeds} | " + " | ".join(ours + paper) + f" | {r.source} |")
    return "\n".join(lines)


def gap_table(rows: dict[str, RowResult], pairs: Sequence[tuple[str, str]]) -> str:
    """``a - b`` rows (paired by seed: mean ± std, the 95 % t interval of AP) beside the paper's gap."""
    lines = ["| gap | seeds | AP | AP 95 % interval | AP50 | AP75 | paper AP | paper AP50 | paper AP75 |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        gap = paired_gap(rows[a], rows[b])
        ours = [fmt_mean_std(gap[s]) for s in STATS]
        ours.insert(1, fmt_interval(gap["AP"]))
        pa, pb = rows[a].paper, rows[b].paper
        paper = [_signed(pa[i] - pb[i], 1) if pa and pb else "-" for i in range(3)]
        lines.append(f"| {a} - {b} | {len(gap['AP'])} | " + " | ".join(ours + paper) + " |")
    return "\n".join(lines)


def gap_share(rows: dict[str, RowResult], base: str, ceiling: str, methods: Sequence[str]) -> str:
    """Share of the ``base``-to-``ceiling`` AP gap each method recovers, over the seeds all three finished.

    share = mean_seeds(method - base) / mean_seeds(ceiling - base); the headroom row gives
    ceiling - base itself. Empty string when ``base`` or ``ceiling`` is missing.
    """
    if base not in rows or ceiling not in rows:
        return ""
    lines = ["| | seeds | AP gain over " + base + " | 95 % interval | share of the gap |", "|---|---:|---:|---|---:|"]
    head = paired_gap(rows[ceiling], rows[base])["AP"]
    if head:
        lines.append(f"| headroom: {ceiling} - {base} | {len(head)} | {fmt_mean_std(head)} | {fmt_interval(head)} | 100 % |")
    for m in methods:
        if m not in rows:
            continue
        seeds = sorted(set(rows[m].per_seed) & set(rows[base].per_seed) & set(rows[ceiling].per_seed))
        gain = [rows[m].per_seed[k]["AP"] - rows[base].per_seed[k]["AP"] for k in seeds]
        room = [rows[ceiling].per_seed[k]["AP"] - rows[base].per_seed[k]["AP"] for k in seeds]
        if not seeds:
            continue
        mean_room = statistics.fmean(room)
        share = f"{100.0 * statistics.fmean(gain) / mean_room:.0f} %" if mean_room > 0 else "- (no headroom)"
        lines.append(f"| {m} | {len(seeds)} | {fmt_mean_std(gain)} | {fmt_interval(gain)} | {share} |")
    return "\n".join(lines)


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Mean AP at the iterations every curve has (seeds evaluated on the same schedule)."""
    if not curves:
        return []
    common = set.intersection(*(set(it for it, _ in c) for c in curves))
    by_seed = [dict(c) for c in curves]
    return [(it, statistics.fmean(d[it] for d in by_seed)) for it in sorted(common)]


def last_quarter_moves(curve: Curve) -> float | None:
    """AP at the curve's last point minus AP at its last point at or before 3/4 of the way
    (the convergence check of docs/testbed.md); None when the curve has no such earlier point."""
    if not curve:
        return None
    end = curve[-1][0]
    earlier = [ap for it, ap in curve if it <= 0.75 * end]
    return curve[-1][1] - earlier[-1] if earlier else None


def convergence_table(curves: dict[str, list[Curve]]) -> str:
    """Per row: the seed-mean teacher AP at each evaluated iteration, and how far each seed's AP
    moved over the last quarter of its schedule (mean ± std); rows without a curve that reaches
    back to the last quarter's start are left out."""
    lines = []
    for name, cs in curves.items():
        mean = mean_curve([c for c in cs if c])
        moves = [m for m in (last_quarter_moves(c) for c in cs) if m is not None]
        if not mean or not moves:  # no curve, or only final evaluations (``--curve-points 0``)
            continue
        points = ", ".join(f"{it}: {ap:.1f}" for it, ap in mean)
        lines.append(f"| {name} | {len(moves)} | {points} | {fmt_mean_std(moves) if moves else '-'} |")
    if not lines:
        return ""
    return "\n".join(["| row | seeds | mean teacher AP at iteration | last quarter: AP moved |",
                      "|---|---:|---|---:|", *lines])


def read_curve(run_dir: Path, tag: str = "teacher/AP") -> Curve:
    """(iteration, AP %) of every evaluation a run logged to TensorBoard (``run_dir/tb``); [] if none."""
    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return []
    # No purging: runs resumed before the trainer's purge step was fixed purged their own last
    # evaluation. A resumed run repeats its steps exactly, so keeping the latest value of a step is safe.
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    last: dict[int, float] = {}
    for ev in acc.Scalars(tag):  # a resumed run may log a step twice: keep the latest
        last[int(ev.step)] = 100.0 * float(ev.value)
    return sorted(last.items())


# ----------------------------------------------------------------------------- PNG (Pillow only)

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int):  # noqa: ANN202 - PIL font types differ by build
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def _bars(draw, box: tuple[int, int, int, int], title: str, labels: list[str],
          values: list[tuple[float, float] | None], colour: tuple[int, int, int], font) -> None:  # noqa: ANN001
    """Horizontal bars (value, std) in ``box`` = (x0, y0, x1, y1); None draws '-'."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill="black", font=font)
    label_w, top = 150, y0 + 24
    step = min(26, max(12, (y1 - top) // max(len(labels), 1)))
    hi = max([v + (0 if math.isnan(s) else s) for v, s in (x for x in values if x)] + [1e-9])
    scale = (x1 - x0 - label_w - 60) / hi
    for i, (label, val) in enumerate(zip(labels, values)):
        y = top + i * step
        draw.text((x0, y), label[:22], fill="black", font=font)
        if val is None:
            draw.text((x0 + label_w, y), "-", fill="gray", font=font)
            continue
        v, s = val
        bx = x0 + label_w
        draw.rectangle([bx, y + 2, bx + max(1, int(v * scale)), y + step - 4], fill=colour)
        if not math.isnan(s) and s > 0:
            ym = y + step // 2 - 1
            draw.line([bx + int((v - s) * scale), ym, bx + int((v + s) * scale), ym], fill="black", width=2)
        draw.text((bx + int((v + (0 if math.isnan(s) else s)) * scale) + 4, y), f"{v:.1f}", fill="black", font=font)


def _axes_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """``n`` evenly spaced values from ``lo`` to ``hi``."""
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _curves(draw, box: tuple[int, int, int, int], curves: dict[str, list[Curve]], font) -> None:  # noqa: ANN001
    """Teacher AP vs iteration: per-seed curves thin, their mean thick, one colour per method."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), "teacher AP (%) vs iteration (thin: seeds, thick: mean)", fill="black", font=font)
    px0, py0, px1, py1 = x0 + 50, y0 + 28, x1 - 160, y1 - 30
    points = [p for cs in curves.values() for c in cs for p in c]
    if not points:
        draw.text((px0, py0 + 20), "no evaluations logged (eval_period = 0 and no tb/)", fill="gray", font=font)
        return
    max_it = max(1, max(it for it, _ in points))
    max_ap = max(1e-6, max(ap for _, ap in points)) * 1.1
    draw.rectangle([px0, py0, px1, py1], outline="black")
    for t in _axes_ticks(0.0, max_ap):
        y = py1 - int((py1 - py0) * t / max_ap)
        draw.line([px0 - 4, y, px0, y], fill="black")
        draw.text((x0, y - 7), f"{t:.1f}", fill="black", font=font)
    for t in range(0, max_it + 1, max(1, math.ceil(max_it / 5))):
        x = px0 + int((px1 - px0) * t / max_it)
        draw.line([x, py1, x, py1 + 4], fill="black")
        draw.text((x - 12, py1 + 6), str(t), fill="black", font=font)

    def xy(c: Curve) -> list[tuple[int, int]]:
        return [(px0 + int((px1 - px0) * it / max_it), py1 - int((py1 - py0) * ap / max_ap)) for it, ap in c]

    for i, (name, cs) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        for c in cs:
            if len(c) > 1:
                draw.line(xy(c), fill=colour, width=1)
        m = xy(mean_curve(cs))
        if len(m) > 1:
            draw.line(m, fill=colour, width=3)
        for p in m:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        draw.line([px1 + 15, py0 + 10 + 20 * i, px1 + 40, py0 + 10 + 20 * i], fill=colour, width=3)
        draw.text((px1 + 45, py0 + 3 + 20 * i), name, fill="black", font=font)


def plot(rows: Sequence[RowResult], curves: dict[str, list[Curve]], path: Path, title: str) -> None:
    """Write ``path`` (PNG): ours vs the paper per row (bars), and the main methods' curves."""
    from PIL import Image, ImageDraw

    font, big = _font(13), _font(16)
    width, bar_h = 1200, max(100, 30 + 26 * len(rows))
    img = Image.new("RGB", (width, 40 + bar_h + 20 + 320), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=big)
    labels = [r.name for r in rows]
    ours = [mean_std(r.values("AP")) if r.per_seed else None for r in rows]
    paper = [(r.paper[0], math.nan) if r.paper else None for r in rows]
    _bars(draw, (10, 40, width // 2 - 10, 40 + bar_h), "ours: teacher AP (%), mean ± std over seeds", labels, ours,
          COLOURS[0], font)
    _bars(draw, (width // 2 + 10, 40, width - 10, 40 + bar_h), "paper: COCO 10% AP (one fold)", labels, paper,
          COLOURS[1], font)
    _curves(draw, (10, 40 + bar_h + 20, width - 10, img.height - 5), curves, font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def plot_curves(curves: dict[str, list[Curve]], path: Path, title: str) -> None:
    """Write ``path`` (PNG): teacher AP against iteration, one colour per name (e.g. the demo's methods)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (900, 420), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=_font(16))
    _curves(draw, (10, 36, img.width - 10, img.height - 5), curves, _font(13))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
