"""The Jinja2 filters of the dashboard's pages: times, durations, progress bars and percentages."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

from ..serialize import when
from ..store.pagerows import Counts

__all__ = ["FILTERS", "duration", "pct", "segments"]


def duration(value: timedelta | None) -> str:
    """``850 ms``, ``12.34 s``, ``3m 07s``, ``2h 05m 09s``; empty for none."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def segments(c: Counts) -> list[tuple[str, float, float]]:
    """The progress bar of ``c`` as (class, x, width) rectangles on a 0–100 scale."""
    out: list[tuple[str, float, float]] = []
    x = 0.0
    if c.total <= 0:
        return out
    for cls, n in (("completed", c.completed), ("failed", c.failed), ("cancelled", c.cancelled)):
        if n > 0:
            width = 100.0 * n / c.total
            out.append((cls, round(x, 3), round(width, 3)))
            x += width
    return out


def pct(c: Counts) -> str:
    """:attr:`Counts.progress` as a whole percentage (an empty finished batch is 100%)."""
    return f"{100.0 * c.progress:.0f}%"


FILTERS: dict[str, Callable[..., Any]] = {"when": when, "duration": duration, "segments": segments, "pct": pct}
