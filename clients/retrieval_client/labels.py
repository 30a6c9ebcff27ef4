"""Labels are user data: every item's labels exported as CSV or JSONL, and a file of them imported
back, all or nothing. The CLI (`retrieval-client labels export | import`) and a web handler share
these functions; none of them needs more than a RetrievalClient and a text file object:

    rows = label_rows(client)                          # one LabelRow per labelled item, streamed
    write_labels(rows, out, "csv")                      # any text file object
    Response(stream_labels(label_rows(client), "jsonl"), mimetype=MEDIA_TYPES["jsonl"])  # e.g. Flask
    result = import_labels(client, read_labels(file, "csv"))

Columns (COLUMNS): id; label and source: the human label ("human"), or else the predicted one
("predicted"); predicted_label and confidence: the item's predicted label and its confidence, empty
(null) when it has none. CSV cells that a spreadsheet would run as a formula (starting with =, +, -,
@, tab or CR: OWASP's CSV-injection rule) are written with a leading ', as is a cell that starts
with ' itself, so that import restores every cell exactly; `raw` writes and reads them verbatim.
JSONL is always verbatim. Import sets the human labels of the rows whose source is "human", in one
SetLabels call: a bad row or an unknown id changes nothing, and they are reported. Predicted rows
are left out: they are a model's guesses, which LabelCorpus and `retrieval-server migrate` recompute.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TextIO

from moco_retrieval.labels import label_problem

from .client import RetrievalClient

FORMATS = ("csv", "jsonl")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl; charset=utf-8"}
COLUMNS = ("id", "label", "source", "predicted_label", "confidence")
SOURCES = ("human", "predicted")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: what a spreadsheet reads as a formula
QUOTE = "'"  # the prefix that makes a spreadsheet show a cell as text


def neutralised(cell: str) -> str:
    """The cell as a spreadsheet shows text: a leading quote where it starts like a formula, or
    with the quote (so restored() undoes it exactly)."""
    return QUOTE + cell if cell.startswith((*FORMULA_STARTS, QUOTE)) else cell


def restored(cell: str) -> str:
    """neutralised's inverse."""
    return cell[1:] if cell.startswith(QUOTE) and cell[1:].startswith((*FORMULA_STARTS, QUOTE)) else cell


class LabelFileError(ValueError):
    """A file of labels that cannot be imported (the message names the line and the problem)."""


@dataclass(frozen=True)
class LabelRow:
    id: str
    label: str
    source: str  # "human" or "predicted"
    predicted_label: str = ""
    confidence: float | None = None  # of the predicted label


def label_rows(client: RetrievalClient, human_only: bool = False) -> Iterator[LabelRow]:
    """One row per item with a human label (or, unless human_only, a predicted one), by id."""
    for item in client.list_labels(human_only=human_only):
        predicted = item.predicted_label
        yield LabelRow(
            id=item.id,
            label=item.label or predicted,
            source="human" if item.label else "predicted",
            predicted_label=predicted,
            confidence=item.predicted_confidence if predicted else None,
        )


def format_for(path: str, given: str | None = None) -> str:
    """The format named, or the one of the file's extension (.jsonl or .ndjson, else CSV)."""
    if given:
        return given
    return "jsonl" if path.lower().endswith((".jsonl", ".ndjson")) else "csv"


def stream_labels(rows: Iterable[LabelRow], fmt: str, raw: bool = False) -> Iterator[str]:
    """The file's text, line by line (CSV: the header first, cells neutralised unless raw), for a
    streamed response."""
    if fmt == "jsonl":
        for row in rows:
            yield json.dumps(asdict(row), ensure_ascii=False) + "\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    cell = (lambda text: text) if raw else neutralised
    for row in rows:
        confidence = "" if row.confidence is None else f"{row.confidence:.6f}"
        writer.writerow([cell(row.id), cell(row.label), row.source, cell(row.predicted_label), confidence])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def write_labels(rows: Iterable[LabelRow], out: TextIO, fmt: str, raw: bool = False) -> int:
    """Write the rows to a text file object; how many rows."""
    count = 0

    def counted() -> Iterator[LabelRow]:
        nonlocal count
        for row in rows:
            count += 1
            yield row

    for text in stream_labels(counted(), fmt, raw):
        out.write(text)
    return count


def _row(record: dict, where: str) -> LabelRow:
    item_id, label, source = record.get("id"), record.get("label"), record.get("source") or "human"
    if not isinstance(item_id, str) or not item_id:
        raise LabelFileError(f"{where}: no id")
    if source not in SOURCES:
        raise LabelFileError(f"{where}: source must be human or predicted, not {source!r}")
    problem = label_problem(label)
    if problem:
        raise LabelFileError(f"{where}: label of {item_id!r}: {problem}")
    confidence = record.get("confidence")
    try:
        confidence = None if confidence in (None, "") else float(confidence)
    except (TypeError, ValueError):
        raise LabelFileError(f"{where}: confidence {confidence!r} is not a number") from None
    return LabelRow(item_id, label, source, record.get("predicted_label") or "", confidence)


def read_labels(source: TextIO, fmt: str, raw: bool = False) -> list[LabelRow]:
    """Every row of a file of labels, checked (LabelFileError at the first bad one: line, problem);
    an id given twice is an error too. Only id and label are required (source defaults to human).
    CSV cells are restored from their neutralised form unless raw."""
    if fmt == "jsonl":
        records = []
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise LabelFileError(f"line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise LabelFileError(f"line {number}: not a JSON object")
            records.append((f"line {number}", record))
    else:
        reader = csv.DictReader(source)
        if not reader.fieldnames or not {"id", "label"} <= set(reader.fieldnames):
            raise LabelFileError(f"the CSV header must name at least id and label, got {reader.fieldnames}")
        cell = (lambda text: text) if raw else restored
        records = [
            (f"line {reader.line_num}", {k: cell(v) if isinstance(v, str) else v for k, v in record.items()})
            for record in reader
        ]
    rows, seen = [], set()
    for where, record in records:
        row = _row(record, where)
        if row.id in seen:
            raise LabelFileError(f"{where}: id {row.id!r} appears twice")
        seen.add(row.id)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class ImportResult:
    updated: int  # human labels set (0 when anything was refused)
    predicted_rows: int  # rows left out: predicted labels are not imported
    unknown: list[str]  # ids the service does not store (nothing was imported then)


def import_labels(client: RetrievalClient, rows: list[LabelRow]) -> ImportResult:
    """Set the human labels of the rows whose source is human, all or nothing: when an id is not
    stored nothing is set and the unknown ids are returned."""
    human = {row.id: row.label for row in rows if row.source == "human"}
    predicted_rows = len(rows) - len(human)
    stored = {item.id for item in client.get(list(human), ignore_missing=True)}
    unknown = [item_id for item_id in human if item_id not in stored]
    if unknown:
        return ImportResult(0, predicted_rows, unknown)
    return ImportResult(client.set_labels(human) if human else 0, predicted_rows, [])
