"""The batches page's charts of the last day, drawn server-side as SVG (like the progress bars).

They read the relay's minute samples (``Tallies.history``: at most 1,440 rows a day, whatever the
registry's size): jobs finished per minute are the differences of the jobs-finished total; batch
durations by hour are quantiles of the differences of the duration histogram, estimated within a
bucket by linear interpolation, as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

from markupsafe import Markup, escape

from ..store.tallies import DURATION_BUCKETS

__all__ = ["Charts", "charts", "quantile"]

WINDOW = timedelta(days=1)
WIDTH, HEIGHT, PAD = 720, 140, 24  # the SVG's size and the room for the axis labels

Sample = tuple[datetime, int, list[int]]


@dataclass(frozen=True)
class Charts:
    """What the batches page draws: the SVGs and their numbers (for people without a chart, and tests)."""

    finished: list[tuple[datetime, int]]  # jobs finished in each sampled minute
    durations: list[tuple[datetime, float, float, int]]  # (hour, p50, p95, batches finished that hour)
    throughput_svg: Markup
    durations_svg: Markup

    @property
    def finished_total(self) -> int:
        return sum(n for _, n in self.finished)


def quantile(q: float, cumulative: Sequence[int]) -> float:
    """The ``q`` quantile of a histogram given as cumulative counts per bucket of
    :data:`DURATION_BUCKETS` (and +Inf last); in the +Inf bucket, its lower bound."""
    total = cumulative[-1]
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0
    for le, count in zip(DURATION_BUCKETS, cumulative):
        if count >= rank:
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = float(le), count
    return float(DURATION_BUCKETS[-1])


def _per_minute(history: Sequence[Sample]) -> list[tuple[datetime, int]]:
    # a retry_failed puts failures back (the total dips): a minute never shows fewer than 0
    return [(at, max(0, finished - before[1])) for before, (at, finished, _) in zip(history, history[1:])]


def _per_hour(history: Sequence[Sample]) -> list[tuple[datetime, float, float, int]]:
    last: dict[datetime, list[int]] = {}  # the hour -> its last sample's histogram
    for at, _, durations in history:
        last[at.replace(minute=0)] = durations
    out, hours = [], sorted(last)
    for before, hour in zip(hours, hours[1:]):
        delta = [max(0, a - b) for a, b in zip(last[hour], last[before])]
        if delta and delta[-1] > 0:
            out.append((hour, quantile(0.5, delta), quantile(0.95, delta), delta[-1]))
    return out


def _x(at: datetime, start: datetime) -> float:
    return PAD + (WIDTH - 2 * PAD) * min(1.0, max(0.0, (at - start) / WINDOW))


def _y(value: float, top: float) -> float:
    return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value / top if top else 0.0)


def _svg(title: str, start: datetime, top: float, unit: str, lines: list[tuple[str, list[tuple[datetime, float]]]],
         empty: str) -> Markup:
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>',
             f'<text x="{PAD}" y="{HEIGHT - 6}">{start:%H:%M}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 6}" text-anchor="end">now (UTC)</text>',
             f'<text x="{PAD}" y="{PAD - 8}">{escape(_number(top))} {escape(unit)}</text>']
    drawn = False
    for css, points in lines:
        if points:
            drawn = True
            path = " ".join(f"{_x(at, start):.1f},{_y(v, top):.1f}" for at, v in points)
            parts.append(f'<polyline class="{css}" points="{path}"/>')
    if not drawn:
        parts.append(f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">{escape(empty)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def charts(history: Sequence[Sample], now: datetime) -> Charts:
    """The last day's charts from the minute samples (``history``, oldest first)."""
    start = now - WINDOW
    history = [s for s in history if s[0] >= start - timedelta(hours=1)]  # an hour before: the first delta
    finished = [(at, n) for at, n in _per_minute(history) if at >= start]
    durations = [row for row in _per_hour(history) if row[0] >= start]
    none = "no samples yet: a worker's relay records one a minute"
    throughput = _svg("Jobs finished per minute, last 24 hours", start, max((n for _, n in finished), default=0),
                      "jobs/min", [("finished", [(at, float(n)) for at, n in finished])], none)
    top = max((p95 for _, _, p95, _ in durations), default=0.0)
    duration = _svg("Batch durations by hour (p50, p95), last 24 hours", start, top, "s",
                    [("p50", [(h, p50) for h, p50, _, _ in durations]),
                     ("p95", [(h, p95) for h, _, p95, _ in durations])],
                    "no top-level batch finished in the samples of the last day")
    return Charts(finished, durations, throughput, duration)
