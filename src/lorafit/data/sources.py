"""Read the user's rows from files, folders or the hub, one record per row with where it came from.

A folder is a ``save_to_disk`` data set, or else a data-set repository as the hub keeps it (data
files, optionally a README.md whose ``configs`` name the subsets; what ``hf download --repo-type
dataset`` writes), read by ``datasets.load_dataset`` exactly as a hub name is, with
``data.subset`` and ``data.split``.

A row that cannot be read (a truncated JSON line, bytes that are not UTF-8) becomes a record with
an ``error`` instead of stopping the run: it is counted and reported with its file and line. Files
are only ever opened for reading.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.builtin import is_builtin, resolve_data
from lorafit.errors import DataError
from lorafit.paths import looks_like_path

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class RawRow:
    """One input row: its data (None when unreadable), the file, and 'line N' / 'row N'."""

    source: str
    where: str
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{Path(self.source).name} {self.where}"


def as_list(path: str | list[str] | None) -> list[str]:
    if path is None:
        return []
    return [path] if isinstance(path, str) else list(path)


def resolve(path: str, field: str) -> str:
    """A ``builtin:`` name becomes its local file; a local path must exist unless it names a hub data set."""
    if is_builtin(path):
        return resolve_data(path)
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if looks_like_path(path, FILE_SUFFIXES):
        raise DataError(f"{field}: '{path}' not found")
    return path  # a hub data-set name


def all_local(paths: Iterable[str], field: str = "data.path") -> bool:
    """True when every path is a local file or folder (hub data sets are not cached by lorafit)."""
    return all(Path(resolve(p, field)).exists() for p in paths)


def load_rows(paths: Iterable[str], split: str, field: str = "data.path", subset: str | None = None) -> list[RawRow]:
    """All rows of all ``paths`` in order (files, save_to_disk folders, data-set repositories, hub names)."""
    rows: list[RawRow] = []
    for path in paths:
        rows.extend(_load_one(resolve(path, field), split, field, subset))
    return rows


def _load_one(path: str, split: str, field: str, subset: str | None = None) -> list[RawRow]:
    local = Path(path)
    if local.is_dir():
        if _is_saved_dataset(local):
            return _load_saved_dataset(local, split, field)
        return _load_hub(str(local), split, field, subset)
    if local.is_file():
        suffix = local.suffix.lower()
        what = what_file_is(local)
        if what is not None and suffix in _EXPECTED and not (suffix == ".parquet" and what == _PARQUET):
            raise DataError(f"{field}: '{local}' is {what}, not {_EXPECTED[suffix]}")
        if suffix == ".jsonl":
            return _read_jsonl(local)
        if suffix == ".json":
            return _read_json(local)
        if suffix == ".csv":
            return _read_csv(local)
        if suffix == ".parquet":
            return _read_parquet(local)
        raise DataError(f"{field}: '{local}' has an unsupported extension (use .jsonl, .json, .csv or .parquet)")
    return _load_hub(path, split, field, subset)


_PARQUET = "a parquet file"
_EXPECTED = {".jsonl": "JSON Lines text", ".json": "JSON text", ".csv": "CSV text", ".parquet": "parquet"}
_MAGIC = ((b"\x1f\x8b", "gzip-compressed data (gunzip it first)"), (b"BZh", "bzip2-compressed data"),
          (b"\xfd7zXZ\x00", "xz-compressed data"), (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
          (b"PK\x03\x04", "a zip archive (an .xlsx workbook? export it as CSV)"), (b"PAR1", _PARQUET),
          (b"ARROW1", "an Arrow file"), (b"%PDF", "a PDF document"), (b"SQLite format 3\x00", "an SQLite database"),
          (b"\xff\xfe\x00\x00", "UTF-32 text (save it as UTF-8)"), (b"\x00\x00\xfe\xff", "UTF-32 text (save it as UTF-8)"),
          (b"\xff\xfe", "UTF-16 text (save it as UTF-8)"), (b"\xfe\xff", "UTF-16 text (save it as UTF-8)"))


def what_file_is(path: Path) -> str | None:
    """What ``path`` holds when its first bytes say it is not UTF-8 text: compressed, an archive or
    spreadsheet, parquet, a document, UTF-16/32 text, a saved HTML page. None for plain text."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if head.count(0) > len(head) // 8:
        return "binary data (or UTF-16/32 text without a byte-order mark)"
    return None


def _not_json_lines(path: Path) -> str | None:
    """Why a .jsonl file none of whose lines is a JSON object is not JSON Lines at all."""
    text = path.read_bytes().decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return "is one JSON array, not JSON Lines (one object per line): name it .json"
    if text and not text.startswith("{"):
        return f"is not JSON Lines (it starts with {text.splitlines()[0][:40]!r}): CSV? name it .csv"
    return None


def _read_jsonl(path: Path) -> list[RawRow]:
    rows: list[RawRow] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(RawRow(str(path), where, None, "not UTF-8"))
                continue
            if number == 1:
                text = text.lstrip("\ufeff")  # a byte-order mark some editors write
            if not text.strip():
                continue  # blank lines (often the last one) are not rows
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                rows.append(RawRow(str(path), where, None, "invalid JSON (truncated?)"))
                continue
            if not isinstance(value, dict):
                rows.append(RawRow(str(path), where, None, f"is a JSON {type(value).__name__}, expected an object"))
                continue
            problem = unpaired_surrogate(value)
            rows.append(RawRow(str(path), where, None if problem else value, problem))
    if rows and all(r.data is None for r in rows):
        shape = _not_json_lines(path)
        if shape:
            raise DataError(f"{path}: {shape}")
    return rows


_SURROGATE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(value: Any, key: str = "") -> str | None:
    """A JSON escape like ``"\\ud83d"`` without its pair (scraped or JavaScript-exported JSON):
    valid JSON, but no character, so no tokenizer can take it; the row is bad, by line."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return f"has an unpaired surrogate escape \\u{ord(found.group()):04x} in '{key}'" if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        problem = unpaired_surrogate(item, f"{key}.{name}" if key else str(name))
        if problem:
            return problem
    return None


def _read_json(path: Path) -> list[RawRow]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines in a .json file
            return _read_jsonl(path)
        start = text.lstrip()[:40].splitlines()[0] if text.strip() else ""
        if start and start[0] not in "{[":
            raise DataError(f"{path}: is not JSON (it starts with {start!r}): CSV? name it .csv") from exc
        raise DataError(f"{path}: line {exc.lineno} invalid JSON ({exc.msg})") from exc
    if isinstance(value, dict):  # {"data": [...]} or {"train": [...]}: take the one list inside
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(value).__name__}")
    rows = []
    for number, item in enumerate(value, start=1):
        where = f"row {number}"
        if isinstance(item, dict):
            problem = unpaired_surrogate(item)
            rows.append(RawRow(str(path), where, None if problem else item, problem))
        else:
            rows.append(RawRow(str(path), where, None, f"is a JSON {type(item).__name__}, expected an object"))
    return rows


def _read_csv(path: Path) -> list[RawRow]:
    """CSV with a header; a line with non-UTF-8 bytes spoils only the row that spans it."""
    bad_lines: set[int] = set()
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad_lines.add(number)
            lines.append(raw.decode("utf-8", errors="replace"))
    text = "".join(lines).lstrip("\ufeff")
    if text.lstrip().startswith(("{", "[")):
        raise DataError(f"{path}: is JSON, not CSV (it starts with {text.lstrip()[:1]!r}): name it .jsonl or .json")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[RawRow] = []
    if reader.fieldnames is None:
        return rows
    header_end = reader.line_num
    start = header_end + 1
    try:
        for record in reader:
            end = reader.line_num
            where = f"line {start}"
            if bad_lines & set(range(start, end + 1)):
                rows.append(RawRow(str(path), where, None, "not UTF-8"))
            elif None in record or any(v is None for v in record.values()):
                rows.append(RawRow(str(path), where, None, "has a different number of fields than the header"))
            else:
                rows.append(RawRow(str(path), where, dict(record)))
            start = end + 1
    except csv.Error as exc:
        rows.append(RawRow(str(path), f"line {start}", None, f"invalid CSV ({exc})"))
    return rows


def _read_parquet(path: Path) -> list[RawRow]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        if what_file_is(path) != _PARQUET:  # not parquet at all: text (CSV? JSON?) named .parquet
            raise DataError(f"{path}: is text, not parquet: name it by its format (.csv, .jsonl, .json)") from exc
        raise DataError(f"{path}: cannot read parquet ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    return [RawRow(str(path), f"row {i}", record) for i, record in enumerate(table.to_pylist(), start=1)]


def _records(dataset: Any, source: str) -> list[RawRow]:
    return [RawRow(source, f"row {i}", dict(record)) for i, record in enumerate(dataset, start=1)]


def _is_saved_dataset(folder: Path) -> bool:
    """A ``save_to_disk`` folder (a Dataset's state, or a DatasetDict's split list)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved_dataset(folder: Path, split: str, field: str) -> list[RawRow]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{field}: '{folder}' is not a data set saved with save_to_disk ({exc.__class__.__name__})") from exc
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(f"data.split: '{split}' not in {folder} (has {', '.join(dataset)})")
        dataset = dataset[split]
    return _records(dataset, str(folder))


def _load_hub(name: str, split: str, field: str, subset: str | None = None) -> list[RawRow]:
    """A hub data set by name, or a local data-set repository folder (the same loader)."""
    import tempfile

    from datasets import load_dataset

    where = f"'{name}'" + (f" subset '{subset}'" if subset else "") + f" split '{split}'"
    local = Path(name).is_dir()
    # a local folder is prepared in a throw-away cache: datasets keys its cache of local files by
    # their relative names and mtimes only, and re-used another folder's (or an older edit's) rows
    with tempfile.TemporaryDirectory(prefix="lorafit-data-") as scratch:
        try:
            dataset = load_dataset(name, subset, split=split, **({"cache_dir": scratch} if local else {}))
            return _records(dataset, name)
        except Exception as exc:  # noqa: BLE001 - offline, unknown name, no such subset or split
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            what = "a data-set folder that" if local else "not a local file and"
            raise DataError(f"{field}: {where}: {what} could not be loaded ({first})") from exc


def fingerprint(paths: Iterable[str], split: str, field: str = "data.path", subset: str | None = None) -> str:
    """A hash of the data's bytes (files, folders; a hub name by name): the cache key's data part."""
    digest = hashlib.sha256()
    for path in paths:
        resolved = resolve(path, field)
        local = Path(resolved)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        if not local.exists():
            digest.update(f"hub:{resolved}:{subset or ''}:{split}".encode())
            continue
        for file in files:
            digest.update(str(file.relative_to(local) if local.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
