"""Read JSONL / CSV training files into records, with errors that name the file and line.

Every record is a ``dict`` with an extra ``"_line"`` key (1-based line number in the file; for
CSV, the line the row starts on) so that later checks — a missing column, an unknown label, an
empty completion — can point at the offending line before any training starts.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) file.

    Args:
        path: the file.

    Returns:
        One dict per example, each with ``"_line"`` set to its line number.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, a file with no examples, text that is not UTF-8, a line
            that is not a JSON object; always naming ``path`` and the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use one of {SUFFIXES} (JSON lines or CSV)")
    with open(path, "rb") as f:
        raw = f.read()
    text = _decode(raw, path)
    records = _read_csv(text, path) if suffix == ".csv" else _read_jsonl(text, path)
    if not records:
        raise ValueError(f"{path}: the file holds no examples")
    return records


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: text is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "re-encode the file as UTF-8") from None


def _read_jsonl(text: str, path: str) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: each line must be a JSON object, got {type(obj).__name__}")
        obj["_line"] = i
        records.append(obj)
    return records


def _read_csv(text: str, path: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            # reader.line_num is the line the row ends on; a row without multi-line fields starts there too
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: more fields than the header {reader.fieldnames}")
            if all(v in (None, "") for v in row.values()):
                continue
            row["_line"] = reader.line_num
            records.append(row)
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return records


def require_columns(records: list[dict[str, Any]], columns: tuple[str, ...], path: str) -> None:
    """Every record must hold a non-null value for each of ``columns``.

    Raises:
        ValueError: naming the file, line, the missing column and the columns present.
    """
    for rec in records:
        for col in columns:
            if rec.get(col) is None:
                present = sorted(k for k in rec if k != "_line")
                raise ValueError(f"{path}:{rec['_line']}: missing column {col!r} (this line has {present}); "
                                 f"expected columns {list(columns)}")
