"""Server-side SVG charts: pure functions from report data to shapes (no markup here).

The template ``templates/_charts.html`` draws the shapes as SVG, with Jinja2 autoescaping every
label; so no chart needs JavaScript or a CDN, and every chart is testable as data.

>>> c = bar_chart([("A", 0.5, "A: 50%"), ("B", 0.25, "B: 25%")], max_value=1.0)
>>> [round(b.h) for b in c.bars], [t.text for t in c.labels][:2]
([84, 42], ['A', 'B'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

WIDTH, HEIGHT = 520, 220
PAD_L, PAD_R, PAD_T, PAD_B = 40, 10, 16, 36
SERIES_CLASSES = ("s0", "s1", "s2", "s3")


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str  # the tooltip: the exact figure


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"
    cls: str = "lbl"


@dataclass(frozen=True)
class Line:
    points: str  # "x,y x,y ..."
    cls: str
    dots: tuple[tuple[float, float, str], ...] = ()


@dataclass
class Chart:
    title: str
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    grid: list[tuple[float, str]] = field(default_factory=list)  # (y, tick label)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (class, name)
    empty: str | None = None  # shown instead of a chart without data


def _plot_h(height: int) -> float:
    return height - PAD_T - PAD_B


def _grid(max_value: float, height: int, fmt: str) -> list[tuple[float, str]]:
    return [(PAD_T + _plot_h(height) * (1 - f), format(max_value * f, fmt)) for f in (0, 0.25, 0.5, 0.75, 1.0)]


def grouped_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], *, title: str = "",
                      width: int = WIDTH, height: int = HEIGHT) -> Chart:
    """One group of bars per category (e.g. stages), one bar per series (e.g. reached/open/stalled).

    >>> c = grouped_bar_chart(["new", "won"], {"reached": [10, 4], "open": [5, 0]})
    >>> len(c.bars), c.bars[0].title, c.legend
    (4, 'new, reached: 10', [('s0', 'reached'), ('s1', 'open')])
    """
    chart = Chart(title, width, height, legend=[(SERIES_CLASSES[i], n) for i, n in enumerate(series)])
    top = max((v for vals in series.values() for v in vals), default=0)
    if not groups or top <= 0:
        chart.empty = "no data yet"
        return chart
    slot = (width - PAD_L - PAD_R) / len(groups)
    bar_w = slot * 0.8 / len(series)
    chart.grid = _grid(top, height, ".0f")
    for g, group in enumerate(groups):
        x0 = PAD_L + g * slot + slot * 0.1
        for s, (name, vals) in enumerate(series.items()):
            h = _plot_h(height) * vals[g] / top
            chart.bars.append(Bar(x0 + s * bar_w, PAD_T + _plot_h(height) - h, bar_w - 1, h,
                                  SERIES_CLASSES[s % len(SERIES_CLASSES)], f"{group}, {name}: {vals[g]:g}"))
        chart.labels.append(Label(PAD_L + (g + 0.5) * slot, height - PAD_B + 14, group))
    return chart


def bar_chart(rows: Sequence[tuple[str, float | None, str]], *, title: str = "", max_value: float | None = None,
              fmt: str = ".0f", width: int = WIDTH, height: int = HEIGHT, notes: Sequence[str] = ()) -> Chart:
    """One bar per row ``(label, value or None, tooltip)``; ``notes`` go under the labels (e.g. n=).

    >>> bar_chart([("A", None, "no deals")]).empty
    'no data yet'
    """
    values = [v for _, v, _ in rows if v is not None]
    top = max_value if max_value is not None else max(values, default=0)
    chart = Chart(title, width, height)
    if not values or top <= 0:
        chart.empty = "no data yet"
        return chart
    slot = (width - PAD_L - PAD_R) / len(rows)
    chart.grid = _grid(top, height, fmt)
    for i, (label, value, tip) in enumerate(rows):
        h = _plot_h(height) * (value or 0) / top
        chart.bars.append(Bar(PAD_L + i * slot + slot * 0.15, PAD_T + _plot_h(height) - h, slot * 0.7, h, "s0", tip))
        chart.labels.append(Label(PAD_L + (i + 0.5) * slot, height - PAD_B + 14, label))
        if i < len(notes):
            chart.labels.append(Label(PAD_L + (i + 0.5) * slot, height - PAD_B + 28, notes[i], cls="note"))
    return chart


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str = "", y_min: float = 0.0,
               y_max: float = 1.0, x_label: str = "", width: int = WIDTH, height: int = HEIGHT) -> Chart:
    """Lines over a shared x axis (e.g. model version -> ROC AUC per learner).

    >>> c = line_chart({"model": [(1, 0.5), (3, 1.0)]})
    >>> c.lines[0].points
    '40.0,100.0 510.0,16.0'
    """
    chart = Chart(title, width, height, legend=[(SERIES_CLASSES[i], n) for i, n in enumerate(series)])
    xs = [x for pts in series.values() for x, _ in pts]
    if not xs:
        chart.empty = "no data yet"
        return chart
    x_lo, x_hi = min(xs), max(xs)
    span = (x_hi - x_lo) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        fy = (min(max(y, y_min), y_max) - y_min) / (y_max - y_min)
        return (round(PAD_L + (width - PAD_L - PAD_R) * (x - x_lo) / span, 1),
                round(PAD_T + _plot_h(height) * (1 - fy), 1))

    chart.grid = [(PAD_T + _plot_h(height) * (1 - f), f"{y_min + (y_max - y_min) * f:.2f}") for f in (0, .25, .5, .75, 1)]
    for i, (name, pts) in enumerate(series.items()):
        xy = [at(x, y) for x, y in pts]
        chart.lines.append(Line(" ".join(f"{a},{b}" for a, b in xy), SERIES_CLASSES[i % len(SERIES_CLASSES)],
                                tuple((a, b, f"{name} at {x:g}: {y:.3f}") for (a, b), (x, y) in zip(xy, pts))))
    chart.labels += [Label(PAD_L, height - PAD_B + 14, f"{x_lo:g}", "start"),
                     Label(width - PAD_R, height - PAD_B + 14, f"{x_hi:g}", "end"),
                     Label((PAD_L + width - PAD_R) / 2, height - PAD_B + 28, x_label, cls="note")]
    return chart


def funnel_chart(stages: dict[str, dict]) -> Chart:
    """Reached / open / stalled leads per stage, from a funnel report's ``stages``."""
    names = list(stages)
    return grouped_bar_chart(names, {k: [stages[s][k] for s in names] for k in ("reached", "open", "stalled")},
                             title="Funnel: leads that reached, are open in, and stall in each stage")


def grade_mix_chart(grade_mix: dict[str, int], grades: Sequence[str]) -> Chart:
    return bar_chart([(g, grade_mix.get(g, 0), f"{g}: {grade_mix.get(g, 0)} open leads") for g in grades],
                     title="Open leads per grade", fmt=".3g")


def success_chart(rows: Sequence[tuple[str, dict]], title: str) -> Chart:
    """Actual win rate per category (grade or score decile), with the number of closed deals under it."""
    bars = [(label, r.get("win_rate"), f"{label}: won {r.get('won', 0)} of {r.get('won', 0) + r.get('lost', 0)}")
            for label, r in rows]
    notes = [f"n={r.get('won', 0) + r.get('lost', 0)}" for _, r in rows]
    return bar_chart(bars, title=title, max_value=1.0, fmt=".0%", notes=notes)
