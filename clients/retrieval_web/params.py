"""The page's inputs, checked: query parameters, JSON bodies, ids, labels and search filters. A bad
one raises InputError, which the app answers with a 4xx and its message (JSON under /api/)."""

from __future__ import annotations

import math

from flask import request
from werkzeug.exceptions import BadRequest

from moco_retrieval.labels import LabelError, clean_label

MAX_ID_BYTES = 512  # as the service (proto: Item.id)
MAX_ASSIGNMENTS = 10_000  # ids of one JSON write (the page sends bigger ones in chunks)
MAX_METADATA_FILTERS = 8  # key=value pairs of one search
MAX_METADATA_CHARS = 1000  # of one key=value pair


class InputError(Exception):
    """A request the page refuses: its HTTP status and a message for the person or the script."""

    def __init__(self, message: str, status: int = 400, error: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.message, self.status, self.error = message, status, error


def check_id(item_id: object, what: str = "id") -> str:
    if not isinstance(item_id, str):
        raise InputError(f"{what} must be a string")
    try:
        size = len(item_id.encode())
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid Unicode (a lone surrogate)") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise InputError(f"{what} must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    return item_id


def check_ids(value: object, what: str = "ids", limit: int = MAX_ASSIGNMENTS) -> list[str]:
    """A JSON list (or the keys of a JSON object) of at most `limit` ids."""
    if not isinstance(value, (list, dict)):
        raise InputError(f"{what} must be a JSON {'object' if what == 'labels' else 'list'}")
    if len(value) > limit:
        raise InputError(f"at most {limit} ids per request, got {len(value)}")
    return [check_id(i, f"an id of {what}") for i in value]


def check_label(value: object, what: str = "label", allow_empty: bool = False) -> str:
    """A label as a person typed it, trimmed, then held to the service's label rule."""
    try:
        return clean_label(value, allow_empty=allow_empty)
    except LabelError as exc:
        raise InputError(f"{what}: {exc}") from None


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.values.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise InputError(f"{name} must be from {low} to {high}, got {value}")
    return value


def check_float(name: str, raw: object, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] when low_open), from a string or a JSON number."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise InputError(f"{name} must be a number")
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{name} must be a number, got {str(raw)[:40]!r}") from None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise InputError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {str(raw)[:40]}")
    return value


def float_arg(name: str, default: float | None, low: float, high: float, low_open: bool = False) -> float | None:
    raw = request.values.get(name, "")
    return default if raw == "" else check_float(name, raw, low, high, low_open)


def choice_arg(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when absent)."""
    raw = request.values.get(name, "") or choices[0]
    if raw not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {raw[:40]!r}")
    return raw


def metadata_filter(pairs: list[str]) -> dict[str, str]:
    """Search's metadata filter from "key=value" strings (split at the first "="; blank ones skipped)."""
    wanted = {}
    for pair in (p.strip() for p in pairs):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"a metadata filter is key=value, got {pair[:60]!r}")
        if len(pair) > MAX_METADATA_CHARS or any(ord(c) < 0x20 for c in pair):
            raise InputError(f"a metadata filter is at most {MAX_METADATA_CHARS} printable characters")
        wanted[key.strip()] = value.strip()
    if len(wanted) > MAX_METADATA_FILTERS:
        raise InputError(f"at most {MAX_METADATA_FILTERS} metadata filters, got {len(wanted)}")
    return wanted


def json_body(*fields: str) -> dict:
    """The request's JSON object, with only `fields` (each required)."""
    if request.mimetype != "application/json":
        raise InputError("send JSON, with Content-Type: application/json", 415, "UNSUPPORTED_MEDIA_TYPE")
    try:
        body = request.get_json()
    except (BadRequest, RecursionError):
        raise InputError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    unknown, missing = sorted(set(body) - set(fields)), [f for f in fields if f not in body]
    if unknown or missing:
        raise InputError(f"the body must have exactly the fields {', '.join(fields) or '(none)'}")
    return body


def cursor_arg(name: str) -> tuple[float, str] | None:
    """A review page's cursor, "confidence id" (the proposal a page starts after or ends before)."""
    raw = request.values.get(name, "")
    if not raw:
        return None
    confidence, _, item_id = raw.partition(" ")
    return check_float(name, confidence, 0.0, 1.0), check_id(item_id, f"the id of {name}")
