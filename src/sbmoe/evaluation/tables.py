"""The one report object: tables of numbers with their marks, rendered as a dict, Markdown or LaTeX.

Modelled on ranx's ``Report``. The experiment report, the statistics comparison and the demo build
:class:`Table` rows (numbers, spreads over seeds, bold and dagger marks) and hand them to a
:class:`Report`; how a number, a mark or a caption looks in Markdown or LaTeX is decided only here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sbmoe.core.errors import UsageError

# ranx metric names -> the names papers print.
_METRIC_NAMES = {"ndcg": "nDCG", "recall": "R", "mrr": "MRR", "map": "MAP", "precision": "P", "hits": "Hits"}


def metric_label(metric: str) -> str:
    """The printed name of a ranx metric: ``ndcg@10`` -> ``nDCG@10``, ``recall@100`` -> ``R@100``."""
    name, at, cutoff = metric.partition("@")
    return _METRIC_NAMES.get(name.lower(), name) + at + cutoff


@dataclass
class Column:
    """A column of numbers (or text).

    Attributes:
        key: Key of the column's values in each row.
        header: Header text (plain text; escaped for LaTeX).
        digits: Decimal places of floats (p-values below that precision use scientific notation).
        style: ``plain``, ``signed`` (always a sign, for differences) or ``p`` (p-values).
    """

    key: str
    header: str
    digits: int = 4
    style: Literal["plain", "signed", "p"] = "plain"


@dataclass
class Cell:
    """One value with its spread over seeds and its marks (bold: best; dagger: significant)."""

    value: float | int | str | None = None
    std: float | None = None
    bold: bool = False
    dagger: bool = False


@dataclass
class Row:
    """A labelled row; columns without a cell are left blank."""

    label: str
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Table:
    """Rows of systems under numeric columns, with a caption, a LaTeX label and notes."""

    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    caption: str = ""
    label: str = ""
    notes: list[str] = field(default_factory=list)
    stub: str = "system"

    def to_dict(self) -> dict[str, Any]:
        """Caption, label, notes, column headers and every row's cells (raw numbers)."""
        return {
            "caption": self.caption,
            "label": self.label,
            "notes": self.notes,
            "columns": {c.key: c.header for c in self.columns},
            "rows": [
                {"label": r.label, "cells": {k: asdict(c) for k, c in r.cells.items()}} for r in self.rows
            ],
        }

    def to_markdown(self, notes: list[str] | tuple[str, ...] = ()) -> str:
        """A Markdown table under a ``###`` caption, this table's notes and ``notes`` below it."""
        lines = [f"### {self.caption}", ""] if self.caption else []
        lines += [
            "| " + " | ".join(_md(h) for h in [self.stub, *(c.header for c in self.columns)]) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        for row in self.rows:
            cells = [_render(row.cells.get(c.key), c, latex=False) for c in self.columns]
            lines.append("| " + " | ".join([_md(row.label), *cells]) + " |")
        for note in [*self.notes, *notes]:
            lines += ["", note]
        return "\n".join(lines) + "\n"

    def to_latex(self, notes: list[str] | tuple[str, ...] = ()) -> str:
        """A booktabs ``table`` float; the caption carries this table's notes and ``notes``."""
        caption = " ".join(
            latex_escape(_sentence(text)) for text in [self.caption, *self.notes, *notes] if text
        )
        lines = [r"\begin{table}[t]", r"\centering"]
        if caption:
            lines.append(rf"\caption{{{caption}}}")
        if self.label:
            lines.append(rf"\label{{{self.label}}}")
        header = [self.stub, *(c.header for c in self.columns)]
        lines += [
            r"\begin{tabular}{l" + "r" * len(self.columns) + "}",
            r"\toprule",
            " & ".join(latex_escape(h) for h in header) + r" \\",
            r"\midrule",
        ]
        for row in self.rows:
            cells = [_render(row.cells.get(c.key), c, latex=True) for c in self.columns]
            lines.append(" & ".join([latex_escape(row.label), *cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"


@dataclass
class Report:
    """Tables with shared notes and the data behind them; renders itself and saves by file suffix.

    Attributes:
        tables: The tables, in order.
        notes: Paragraphs for every table (the legend of marks, the test used): once below the
            tables in Markdown, in every caption in LaTeX, where each table floats on its own.
        data: What produced the tables (systems, comparisons, settings), for ``to_dict``.
    """

    tables: list[Table]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``data`` plus the rendered tables' contents under ``tables``."""
        return {**self.data, "tables": [t.to_dict() for t in self.tables], "notes": self.notes}

    def to_markdown(self) -> str:
        """Every table in Markdown, then the notes."""
        blocks = [t.to_markdown() for t in self.tables] + [note + "\n" for note in self.notes]
        return "\n".join(blocks)

    def to_latex(self) -> str:
        """Every table as a LaTeX float (needs ``\\usepackage{booktabs}``)."""
        return "\n".join(t.to_latex(self.notes) for t in self.tables)

    def save(self, path: str | Path) -> Path:
        """Write the report as ``.md``, ``.tex`` or ``.json``, chosen by ``path``'s suffix."""
        from sbmoe.core.io import atomic_open, write_json

        path = Path(path)
        if path.suffix == ".json":
            write_json(path, self.to_dict())
            return path
        renderers = {".md": self.to_markdown, ".tex": self.to_latex}
        if path.suffix not in renderers:
            raise UsageError(f"{path}: a report is saved as .md, .tex or .json")
        with atomic_open(path) as handle:
            handle.write(renderers[path.suffix]())
        return path


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    # The symbols sbmoe's own notes and headers use, so that one plain text serves both formats.
    "±": r"$\pm$",
    "†": r"$^\dagger$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "—": "---",
}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX source: special characters escaped, sbmoe's symbols as math."""
    return "".join(_LATEX.get(char, char) for char in text)


def format_p_value(value: float, digits: int = 4) -> str:
    """A p-value with ``digits`` decimals, or in scientific notation when smaller than they show."""
    if value != 0.0 and value < 10.0**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _render(cell: Cell | None, column: Column, latex: bool) -> str:
    if cell is None or cell.value is None:
        return ""
    value = cell.value
    if isinstance(value, str):
        text = latex_escape(value) if latex else _md(value)
    elif isinstance(value, int):
        text = str(value)
    elif column.style == "p":
        text = format_p_value(value, column.digits)
    else:
        text = f"{value:{'+' if column.style == 'signed' else ''}.{column.digits}f}"
    if cell.std is not None:
        text += (r" $\pm$ " if latex else " ± ") + f"{cell.std:.{column.digits}f}"
    if cell.bold:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if cell.dagger:
        text += r"$^\dagger$" if latex else " †"
    return text


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _md(text: str) -> str:
    return text.replace("|", "\\|")
