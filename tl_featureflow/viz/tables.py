"""HTML tables of result rows, shared by the report and the feature cards.

>>> page = table_html([{"feature": Raw("<a href='#card-2-res-1'>2/res/1</a>"), "cosine": 0.91234, "label": "a < b"}])
>>> page.split("<tbody>")[1]
"<tr><td><a href='#card-2-res-1'>2/res/1</a></td><td>0.912</td><td>a &lt; b</td></tr></tbody></table>"
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["Raw", "table_html"]


class Raw(str):
    """A table cell that is already HTML (not escaped by :func:`table_html`)."""


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
               *, floats: str = "{:.3f}") -> str:
    """An HTML table of ``rows`` (dicts), cells escaped; floats formatted with ``floats``."""
    if not rows:
        return "<p class='note'>(no rows)</p>"
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return floats.format(value)
        if isinstance(value, Raw):
            return str(value)
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
