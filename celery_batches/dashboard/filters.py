"""The Jinja2 filters of the dashboard's pages (times, durations, percentages), and the markup
drawn once per batch row (status badges, progress bars, counts), written in Python: a tree page
draws 200 rows of them, and as Jinja macros they were half of its time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

from markupsafe import Markup, escape

from ..serialize import when
from ..store.pagerows import Counts

__all__ = ["FILTERS", "GLOBALS", "badge", "bar", "counts", "duration", "pct", "segments"]


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


def badge(status: Any) -> Markup:
    """A status badge: ``<span class="badge s-completed">completed</span>``."""
    name = status.name.lower()
    return Markup(f'<span class="badge s-{name}">{name}</span>')


def bar(c: Counts, label: str = "") -> Markup:
    """The progress bar of ``c`` as an SVG, described for screen readers (``label`` first)."""
    rects = "".join(f'<rect class="{cls}" x="{x}" y="0" width="{w}" height="10"/>' for cls, x, w in segments(c))
    return Markup(
        '<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img"\n'
        f'     aria-label="{escape(label)}{c.finished} of {c.total} finished: {c.completed} completed, '
        f'{c.failed} failed, {c.cancelled} cancelled, {c.pending} pending">\n'
        f'<rect class="track" x="0" y="0" width="100" height="10"/>\n{rects}</svg>')


def counts(c: Counts) -> Markup:
    """``c`` in words, with each number in a data attribute (the pages' live refresh reads them)."""
    parts = [f'<span class="n-completed">{c.completed} completed</span>']
    parts += [f'<span class="n-{cls}">{n} {cls}</span>'
              for cls, n in (("failed", c.failed), ("cancelled", c.cancelled), ("pending", c.pending)) if n]
    return Markup(
        f'<span class="counts" data-total="{c.total}" data-completed="{c.completed}" data-failed="{c.failed}"\n'
        f'      data-cancelled="{c.cancelled}" data-pending="{c.pending}">\n' + "\n".join(parts)
        + f'\n<span class="n-total">of {c.total}</span>\n</span>')


FILTERS: dict[str, Callable[..., Any]] = {"when": when, "duration": duration, "segments": segments, "pct": pct}
GLOBALS: dict[str, Callable[..., Any]] = {"badge": badge, "bar": bar, "counts": counts}
