"""Rendering the cache's status as text (terminal, ``repr``) and HTML (Jupyter)."""

from __future__ import annotations

import html
from typing import Any, List

COLUMNS = [
    ("node ip", lambda r: str(r.get("node_ip", ""))),
    ("node", lambda r: str(r.get("node_id", ""))[:8]),
    ("memory", lambda r: f"{human(r.get('memory_bytes_used'))} / {human(r.get('memory_bytes_capacity'))}"),
    ("disk", lambda r: f"{human(r.get('disk_bytes_used'))} / {human(r.get('disk_bytes_capacity'))}"),
    ("entries", lambda r: str(r.get("entries", ""))),
    ("hits", lambda r: str(r.get("hits", ""))),
    ("misses", lambda r: str(r.get("misses", ""))),
    ("hit ratio", lambda r: ratio(r.get("hits", 0), r.get("misses", 0))),
    ("fallbacks", lambda r: str(r.get("fallbacks", ""))),
]


def human(n: Any) -> str:
    """Bytes as a short human-readable size.

    Examples
    --------
    >>> human(1536)
    '1.5 KiB'
    >>> human(None)
    '-'
    """
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def ratio(hits: int, misses: int) -> str:
    total = (hits or 0) + (misses or 0)
    return "-" if total == 0 else f"{100.0 * hits / total:.1f}%"


def _rows(status: Any) -> List[List[str]]:
    return [
        [fn(r) if "error" not in r or name.startswith("node") else r["error"] for name, fn in COLUMNS]
        for r in status.workers
    ]


def status_text(status: Any) -> str:
    """A fixed-width table, one line per worker."""
    header = [name for name, _ in COLUMNS]
    rows = _rows(status)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if not rows:
        lines.append("(no cache workers running)")
    return "\n".join(lines)


def status_html(status: Any) -> str:
    """An HTML table for Jupyter."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _rows(status)
    )
    if not body:
        body = f"<tr><td colspan='{len(COLUMNS)}'>no cache workers running</td></tr>"
    return f"<table><caption>ray_cache status</caption><tr>{head}</tr>{body}</table>"


