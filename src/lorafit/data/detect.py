"""``data.format: auto``: which registered format the rows are, decided from their columns.

Every readable row is matched against every format in ``lorafit.data.formats.FORMATS`` (its
columns through ``data.columns``, then its detector: e.g. ``prompt`` as text or as messages).
``text`` counts only for rows no other format fits (alpaca files often carry a ``text`` column
too). The format that fits the most rows wins; a tie is ambiguous, no fit is unknown: both stop
with one line naming the columns found and the formats that would fit. Rows of another shape
than the chosen format are bad rows of their own (see ``mismatch``), never silently re-read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafit.data.formats import FORMATS, get_format
from lorafit.errors import DataError

SHOWN_COLUMNS = 12


@dataclass
class Detection:
    """The run's format and how it was chosen; ``counts`` is rows per shape found."""

    format: str
    detected: bool  # True: chosen by data.format auto; False: named in the config
    columns: dict[str, str]  # lorafit's column name -> the data's, for the columns the format reads
    counts: dict[str, int] = field(default_factory=dict)  # shape (format name, 'unknown', 'unreadable') -> rows

    def line(self) -> str:
        """'data format: sharegpt (auto, from column conversations; 98 of 100 rows; other shapes: chat 2)'."""
        how = "auto" if self.detected else "data.format"
        used = ", ".join(self.columns.values())
        total = sum(self.counts.values())
        text = f"data format: {self.format} ({how}, from column{'s' if len(self.columns) > 1 else ''} {used}"
        if total:
            text += f"; {self.counts.get(self.format, 0)} of {total} rows"
            others = [f"{name} {n}" for name, n in self.counts.items() if name != self.format and n]
            if others:
                text += f"; other shapes: {', '.join(others)}"
        return text + ")"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def row_formats(row: dict[str, Any], data_config: Any) -> list[str]:
    """The formats whose shape ``row`` has (the fallback ``text`` only when no other fits)."""
    fits = [name for name, fmt in FORMATS.items() if fmt.matches(row, data_config)]
    specific = [name for name in fits if not FORMATS[name].fallback]
    return specific or fits


def shape_counts(rows: list[dict[str, Any] | None], data_config: Any) -> Counter:
    counts: Counter = Counter()
    for row in rows:
        if row is None:
            counts["unreadable"] += 1
            continue
        fits = row_formats(row, data_config)
        counts[fits[0] if len(fits) == 1 else ("unknown" if not fits else "ambiguous")] += 1
    return counts


def choose_format(rows: list[dict[str, Any] | None], data_config: Any, source: str = "data.path") -> Detection:
    """The run's format: ``data.format`` when named, else the best fit of ``rows`` (see module doc)."""
    counts = shape_counts(rows, data_config)
    if data_config.format != "auto":
        fmt = get_format(data_config.format)
        return Detection(fmt.name, False, _used(fmt, rows, data_config), dict(counts))
    readable = [r for r in rows if r is not None]
    if not readable:  # every row is unreadable: the bad-row report says why, not the shape
        first = next(iter(FORMATS.values()))
        return Detection(first.name, True, {}, dict(counts))
    scores: Counter = Counter()
    for row in readable:
        scores.update(row_formats(row, data_config))
    found = _columns_found(readable)
    if not scores:  # no row has a whole shape: the format whose columns the rows have most of, if one
        scores = _partial_scores(readable, data_config)
    if not scores:
        known = "; ".join(f"{name} ({fmt.columns_text(data_config)})" for name, fmt in FORMATS.items())
        raise DataError(f"data.format: auto found no known shape in {source} (columns: {found}); formats: {known}; "
                        "set data.format and data.columns")
    best = max(scores.values())
    top = [name for name, n in scores.items() if n == best]
    if len(top) > 1:
        fits = ", ".join(f"{name} ({FORMATS[name].columns_text(data_config)})" for name in top)
        raise DataError(f"data.format: auto cannot choose for {source}: its rows (columns: {found}) fit {fits} "
                        "equally well; set data.format")
    fmt = FORMATS[top[0]]
    return Detection(fmt.name, True, _used(fmt, readable, data_config), dict(counts))


def mismatch(row: dict[str, Any], fmt_name: str, data_config: Any) -> str | None:
    """Why ``row`` is not of the run's format when it is of another ('looks like a sharegpt row
    (conversations), the data is chat'); None when it may be rendered as the run's format."""
    if FORMATS[fmt_name].matches(row, data_config):
        return None
    others = [name for name in row_formats(row, data_config) if name != fmt_name]
    if not others:
        return None  # rendering names what is missing ("missing 'summary'")
    other = FORMATS[others[0]]
    return (f"looks like a {other.name} row ({other.columns_text(data_config)}), but the data is "
            f"{fmt_name} ({FORMATS[fmt_name].columns_text(data_config)})")


def _partial_scores(rows: list[dict[str, Any]], data_config: Any) -> Counter:
    """Per format, the share of its required columns the rows have (rows missing a column are then
    bad rows saying which, e.g. "missing 'summary'", rather than an unknown shape)."""
    scores: Counter = Counter()
    for name, fmt in FORMATS.items():
        for row in rows:
            have = sum(row.get(fmt.column(c, data_config)) is not None for c in fmt.required)
            scores[name] += have / len(fmt.required)
    return Counter({name: score for name, score in scores.items() if score > 0})


def _used(fmt: Any, rows: list[dict[str, Any] | None], data_config: Any) -> dict[str, str]:
    present = set().union(*(r.keys() for r in rows if r is not None)) if rows else set()
    used = {c: fmt.column(c, data_config) for c in fmt.required}
    used.update({c: fmt.column(c, data_config) for c in fmt.optional if fmt.column(c, data_config) in present})
    return used


def _columns_found(rows: list[dict[str, Any]]) -> str:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(str(k) for k in row))
        if len(seen) > SHOWN_COLUMNS:
            break
    names = list(seen)
    text = ", ".join(names[:SHOWN_COLUMNS])
    return text + (", ..." if len(names) > SHOWN_COLUMNS else "") if names else "none"
