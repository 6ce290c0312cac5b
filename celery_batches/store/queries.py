"""Query parts every store module builds on, each defined once: the walks down a batch's subtree
and up its lineage, the columns a run's message is read from, and a table's name for hand-written
SQL."""

from __future__ import annotations

import sqlalchemy as sa

from ..models import BatchStatus

__all__ = ["ancestry", "run_message_columns", "sql_name", "subtree"]


def subtree(batches: sa.Table, roots: sa.ColumnElement[bool], *, successors: bool = False,
            depth: bool = False) -> sa.CTE:
    """The batches ``roots`` selects and all their descendants (a recursive walk of the ``parent_id``
    index); with ``successors``, also the continue-with stages still waiting on any of them; with
    ``depth``, each row's distance from its root (a ``depth`` column)."""
    b = batches
    tree = sa.select(b.c.id, *([sa.literal(0).label("depth")] if depth else [])).where(roots) \
        .cte("tree", recursive=True)
    link = b.c.parent_id == tree.c.id
    if successors:
        link = sa.or_(link, sa.and_(b.c.antecedent_id == tree.c.id, b.c.status == int(BatchStatus.CREATED)))
    return tree.union_all(sa.select(b.c.id, *([tree.c.depth + 1] if depth else [])).join(tree, link))


def ancestry(batches: sa.Table, start: str, above: sa.ColumnElement, *columns: sa.ColumnElement,
             first_depth: int = 0, max_depth: int | None = None) -> sa.CTE:
    """``start`` and the batches above it, one step at a time along ``above`` (a batch's parent, or
    its antecedent too), with ``columns`` and each row's ``depth`` (``first_depth`` for ``start``)."""
    b = batches
    up = (sa.select(b.c.id, above.label("above"), *columns, sa.literal(first_depth).label("depth"))
          .where(b.c.id == start).cte("up", recursive=True))
    step = sa.select(b.c.id, above, *columns, up.c.depth + 1).join(up, b.c.id == up.c.above)
    if max_depth is not None:
        step = step.where(up.c.depth < max_depth)
    return up.union_all(step)


def run_message_columns(runs: sa.Table) -> tuple[sa.ColumnElement, ...]:
    """What :func:`.rows.run_message` reads, and the position publishing orders a batch's runs by."""
    r = runs.c
    return (r.id, r.task_name, r.args, r.kwargs, r.options, r.batch_id, r.position, r.retries)


def sql_name(dialect: sa.Dialect, table: sa.Table) -> str:
    """A table's name for hand-written SQL, quoted where the dialect needs it (a mixed-case prefix)."""
    return dialect.identifier_preparer.format_table(table)
