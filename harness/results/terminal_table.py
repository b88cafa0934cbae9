"""A results table laid out to fit a terminal, names whole.

Why: rich squeezes an over-wide table by folding cells, which broke run names into 5-character
pieces at 100 columns and collapsed a 14-run comparison into 1-character columns at 120.

Decisions (for the ``table`` format; csv, markdown and json are never reshaped):

- Row labels (run names, metric names, task ids) and numbers are never wrapped or cut.
- Headers wrap after ``/``, ``_`` or a space (``termination/`` over ``user_stop``), so a column is
  as wide as its values or its longest header piece, not its whole header. A run name in a header
  or row label is one piece, even with a ``/`` in it (``toy-grpo/eval-step-000020``).
- Row labels wrap the same way only when the longest of them leaves no room for the widest column
  (``paired/<run>/delta_ci95_high`` beside a run's column).
- The width to fit is the terminal's (``COLUMNS`` when set); output to a pipe or file with no
  ``COLUMNS`` is not limited, as before.
- A frame whose columns are runs (``df.attrs["runs_are_columns"]``: comparisons) is pivoted to one
  row per run when it is wider than the terminal and the pivot takes fewer lines to show.
- What still does not fit is printed in blocks of columns, each repeating the row labels. Where one
  value column beside the labels is still too wide (a long checkpoint path), its values wrap; run
  names never do: a table whose shortest possible row (a label and one column) is wider than the
  terminal is printed wider (two 40-character run names side by side need 90 columns).
"""

from __future__ import annotations

import io
import os
import re

import pandas as pd
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

__all__ = ["RUNS_ARE_COLUMNS", "fit_width", "print_fitted"]

RUNS_ARE_COLUMNS = "runs_are_columns"
_PIECE = r"[^/_ ]+[/_ ]*|[/_ ]+"  # a metric or field name breaks after / _ or a space
_MIN_FOLDED = 12
"""Narrowest a folded value column may get; narrower, the block is printed wider than the terminal."""
_BORDERS = 3  # cells a column adds: its left border and one space of padding each side


def fit_width(console: Console | None) -> int | None:
    """The width to fit on ``console``: its width on a terminal or when ``COLUMNS`` is set, else
    None (a pipe or file: no limit)."""
    if console is None:
        return int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else None
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console.width
    return None


def _piece_pattern(runs: list[str]) -> re.Pattern:
    """Pieces a header or label may break between: each run name whole (longest first), then the
    parts of other names."""
    names = sorted({r for r in runs if r}, key=len, reverse=True)
    return re.compile("|".join([*(re.escape(n) + "[/_ ]*" for n in names), _PIECE]))


def _wrap(text: str, width: int, pieces: re.Pattern) -> str:
    """``text`` on lines of at most ``width`` cells, broken only between ``pieces`` (a piece wider
    than ``width`` keeps its own line)."""
    lines, line = [], ""
    for piece in pieces.findall(text):
        if line and cell_len(line + piece.rstrip(" ")) > width:
            lines.append(line.rstrip(" "))
            line = piece
        else:
            line += piece
    lines.append(line.rstrip(" "))
    return "\n".join(lines)


def _longest_piece(text: str, pieces: re.Pattern) -> int:
    return max((cell_len(p.rstrip(" ")) for p in pieces.findall(text)), default=0)


class _Layout:
    """Column widths and blocks of one table (see the module docstring)."""

    def __init__(self, header: list[str], rows: list[list[str]], limit: int | None, runs: list[str]):
        self.header, self.rows, self.limit = header, rows, limit
        self.pieces = _piece_pattern(runs)
        self.widths = [max([_longest_piece(h, self.pieces), *(cell_len(r[i]) for r in rows)])
                       for i, h in enumerate(header)]
        self.widths[0] = max([cell_len(header[0]), *(cell_len(r[0]) for r in rows)])
        # The least room a column needs: its header's longest piece, and its values unless they may
        # fold (a long path), see ``tables``.
        widest = max((max(_longest_piece(h, self.pieces), min(w, _MIN_FOLDED))
                      for h, w in zip(header[1:], self.widths[1:])), default=0)
        if limit is not None and self.widths[0] + widest + 2 * _BORDERS + 1 > limit:
            shortest = max([_longest_piece(header[0], self.pieces), *(_longest_piece(r[0], self.pieces) for r in rows)])
            self.widths[0] = max(shortest, limit - widest - 2 * _BORDERS - 1)
        self.blocks = self._blocks()

    def _blocks(self) -> list[list[int]]:
        """Column positions (1-based) per block: as many as fit beside the row labels, at least one."""
        columns = list(range(1, len(self.header)))
        if self.limit is None:
            return [columns]
        blocks: list[list[int]] = [[]]
        used = self.widths[0] + _BORDERS + 1
        for col in columns:
            if blocks[-1] and used + self.widths[col] + _BORDERS > self.limit:
                blocks.append([])
                used = self.widths[0] + _BORDERS + 1
            blocks[-1].append(col)
            used += self.widths[col] + _BORDERS
        return blocks

    def lines(self) -> int:
        """How many lines the table takes: each block's rows, header lines and borders."""
        label_lines = sum(_wrap(r[0], self.widths[0], self.pieces).count("\n") + 1 for r in self.rows)
        total = 0
        for block in self.blocks:
            heading = max((_wrap(self.header[c], self.widths[c], self.pieces).count("\n") + 1 for c in block),
                          default=1)
            total += label_lines + heading + 4
        return total

    def tables(self, title: str | None) -> list[tuple[Table, int]]:
        """(rich table, the width it needs) per block."""
        out = []
        labels = [_wrap(r[0], self.widths[0], self.pieces) for r in self.rows]
        for n, block in enumerate(self.blocks):
            needed = sum(self.widths[c] for c in [0, *block]) + _BORDERS * (len(block) + 1) + 1
            fold_to = self.limit - self.widths[0] - 2 * _BORDERS - 1 if self.limit is not None else 0
            # One value column still too wide (a checkpoint path): its values wrap, the labels stay whole.
            folded = (self.limit is not None and needed > self.limit and len(block) == 1
                      and fold_to >= max(_MIN_FOLDED, _longest_piece(self.header[block[0]], self.pieces)))
            table = Table(title=title if n == 0 else None)
            table.add_column(_wrap(self.header[0], self.widths[0], self.pieces), style="bold", no_wrap=True,
                             min_width=self.widths[0])
            for col in block:
                width = fold_to if folded else self.widths[col]
                table.add_column(_wrap(self.header[col], width, self.pieces), justify="right",
                                 no_wrap=not folded, overflow="fold", min_width=width, max_width=width)
            for label, row in zip(labels, self.rows):
                table.add_row(label, *(row[c] for c in block))
            out.append((table, self.limit if folded else needed))
        return out


def _pivot(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Rows become columns: the runs (the old column headers) become the row labels."""
    return ["run", *(r[0] for r in rows)], [[header[i], *(r[i] for r in rows)] for i in range(1, len(header))]


def print_fitted(df: pd.DataFrame, header: list[str], rows: list[list[str]], title: str | None,
                 console: Console | None) -> str:
    """Print the table of ``header`` and ``rows`` (cells already formatted) fitted to ``console``
    (see the module docstring) and return it as plain text, laid out for the same width."""
    limit = fit_width(console)
    runs = header[1:] if df.attrs.get(RUNS_ARE_COLUMNS) else [r[0] for r in rows] if df.index.name == "run" else []
    layout = _Layout(header, rows, limit, runs)
    # Pivot only a table too wide for the terminal: one that fits reads as it always did (a run's
    # `results show` is one metric a line, not one wide row of wrapped headers).
    if df.attrs.get(RUNS_ARE_COLUMNS) and limit is not None and len(layout.blocks) > 1:
        pivoted = _Layout(*_pivot(header, rows), limit, runs)
        if pivoted.lines() < layout.lines():
            layout = pivoted
    tables = layout.tables(title)
    buf = Console(file=io.StringIO(), width=max([limit or 80, *(w for _, w in tables)]), color_system=None)
    for n, (table, width) in enumerate(tables):
        for target in (buf, console):
            if target is None:
                continue
            if n:
                target.print()
            _print_unfolded(target, table, max(limit or 0, width))
    return buf.file.getvalue()


def _print_unfolded(console: Console, table: Table, width: int) -> None:
    """Print ``table`` at ``width`` or wider: rich folds cells to fit a narrower console (names
    broken), and ``print(width=...)`` never goes above the console's width, so widen it meanwhile."""
    saved = console.width
    console.width = max(saved, width)
    try:
        console.print(table, width=width)
    finally:
        console.width = saved
