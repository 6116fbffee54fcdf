"""Read training data into records, with errors that name the file and line.

Formats:

* ``.jsonl`` — one JSON object per line (only ``\\n`` ends a line: U+2028, U+0085 and other
  Unicode line separators inside strings are text, as JSON says);
* ``.json`` — a JSON array of objects (or JSON lines, as Hugging Face writes ``.json``);
* ``.csv`` / ``.tsv`` — a header row, then one example per row (quoted fields may span lines);
* ``.parquet`` / ``.arrow`` and directories — through the ``datasets`` library (``lorakit[data]``):
  a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
  ``load_from_disk`` (a ``DatasetDict``'s ``train`` split, or ``split``), any other directory of
  data files with ``datasets.load_dataset(directory)``.

Every record is a ``dict`` with an extra ``"_line"`` key (1-based line number in the file; for
CSV the line the row starts on; for a table read through ``datasets``, the row number) so that
later checks — a missing column, an unknown label, an empty completion — can point at the
offending example before any training starts.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from lorakit.extras import require

TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES


def read_records(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Read a data file or dataset directory (see the module docstring for the formats).

    Args:
        path: the file or directory.
        split: for a saved ``DatasetDict`` or a multi-split directory: which split (default ``train``).

    Returns:
        One dict per example, each with ``"_line"`` set to its line (or row) number.

    Raises:
        FileNotFoundError: no such file or directory.
        ValueError: an unknown suffix, a file with no examples, text that is not UTF-8, a line
            that is not a JSON object, an unknown split; always naming ``path`` and the line.
        lorakit.extras.MissingDependency: Parquet/Arrow/a directory without ``datasets`` installed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        records = _read_dataset_dir(path, split)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    else:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in SUFFIXES:
            raise ValueError(f"{path}: unknown data format {suffix!r}; use one of {SUFFIXES} or a dataset directory")
        if suffix in TABLE_SUFFIXES:
            records = _read_table(path, suffix)
        else:
            with open(path, "rb") as f:
                text = _decode(f.read(), path)
            if suffix in (".csv", ".tsv"):
                records = _read_csv(text, path, "\t" if suffix == ".tsv" else ",")
            elif suffix == ".json" and text.lstrip().startswith("["):
                records = _read_json_array(text, path)
            else:
                records = _read_jsonl(text, path)
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
    # split on "\n" only: str.splitlines() also splits on U+2028, U+0085, \x1c..., which JSON allows in strings
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
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


def _read_json_array(text: str, path: str) -> list[dict[str, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: a .json file must hold an array of objects (or one object per line)")
    records = []
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: item {i} of the array must be a JSON object, got {type(obj).__name__}")
        records.append({**obj, "_line": i})
    return records


def _read_csv(text: str, path: str, delimiter: str = ",") -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
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


def _rows(table) -> list[dict[str, Any]]:
    """Records of a ``datasets.Dataset``, numbered by row (1-based)."""
    return [{**row, "_line": i} for i, row in enumerate(table.to_list(), start=1)]


def _read_table(path: str, suffix: str) -> list[dict[str, Any]]:
    datasets = require("datasets", f"reading {suffix} files")
    try:
        table = datasets.Dataset.from_parquet(path) if suffix == ".parquet" else datasets.Dataset.from_file(path)
    except Exception as e:  # pyarrow's errors for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable {suffix} file ({type(e).__name__}: {e})") from None
    return _rows(table)


def _read_dataset_dir(path: str, split: str | None) -> list[dict[str, Any]]:
    datasets = require("datasets", "reading a dataset directory")
    saved = any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json",
                                                              "dataset_dict.json"))
    try:
        loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a dataset directory that the datasets library can read "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ValueError(f"{path}: no split {name!r}; this dataset has {sorted(loaded)}")
        loaded = loaded[name]
    elif split not in (None, "train"):
        raise ValueError(f"{path}: a single dataset has no split {split!r}")
    return _rows(loaded)


def require_columns(records: list[dict[str, Any]], columns: tuple[str, ...], path: str, hint: str = "") -> None:
    """Every record must hold a non-null value for each of ``columns``.

    Raises:
        ValueError: naming the file, line, the missing column, the columns present and ``hint``.
    """
    for rec in records:
        for col in columns:
            if rec.get(col) is None:
                present = sorted(k for k in rec if k != "_line")
                raise ValueError(f"{path}:{rec['_line']}: missing column {col!r} (this line has {present}); "
                                 f"expected columns {list(columns)}" + (f"; {hint}" if hint else ""))
