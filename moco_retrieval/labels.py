"""The one rule for a label, shared by the server (SetLabels and Upsert refuse what breaks it, with
INVALID_ARGUMENT) and its clients (the web page cleans what a person typed with it first).

A label is a string of 1 to MAX_LABEL_CHARS characters (code points) with no leading or trailing
whitespace and no control character: no C0/C1 control (NUL, tab, newline...), no line or paragraph
separator, no lone surrogate (not valid Unicode, cannot be encoded as UTF-8). Nor anything that
displays other than it compares, so that a label cannot look like another or hide one: no format
character (Unicode category Cf: the bidi controls such as U+202E, zero-width characters such as
U+200B, the soft hyphen; the zero-width joiner only between two symbols, as in an emoji sequence),
no private-use or unassigned code point, and no space but U+0020 (the no-break and ideographic
spaces look like it and are not). Labels stored under the laxer rule before are kept and served; the
server names them at start-up (server.report_stored_labels). The server refuses an untrimmed label
rather than trimming it, so what is stored is what was sent; a client trims what a person typed
(`clean_label`) before sending it. The empty string is not a label: SetLabels takes it as "clear the
label", Upsert as "keep the stored one" (see proto/retrieval/v1/retrieval.proto)."""

from __future__ import annotations

import unicodedata

MAX_LABEL_CHARS = 200
# Unicode categories refused anywhere in a label: controls, surrogates, line and paragraph separators,
# and what is invisible or looks like something else (format, private-use and unassigned code points).
REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Cf": "an invisible format character (a bidi control or zero-width character)",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
}
SPACE = " "  # the one space a label may hold (category Zs holds the look-alikes)
ZWJ = "\u200d"  # zero-width joiner: format (Cf), but allowed between two symbols (emoji sequences)


class LabelError(ValueError):
    """A label that breaks the rule; the message names the problem."""


def label_problem(label: object) -> str | None:
    """What is wrong with `label` as a stored label (None when nothing is). The empty string is
    refused here: callers that give "" a meaning (clear, keep) handle it before asking."""
    if not isinstance(label, str):
        return f"a label must be a string, not {'null' if label is None else type(label).__name__}"
    if not label:
        return "a label must not be empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"a label is at most {MAX_LABEL_CHARS} characters, got {len(label)}"
    if label != label.strip():
        return "a label must not start or end with whitespace"
    for position, char in enumerate(label):
        category = unicodedata.category(char)
        neighbours = label[position - 1 : position + 2 : 2] if 0 < position < len(label) - 1 else ""
        if char == ZWJ and {unicodedata.category(c) for c in neighbours} == {"So"}:
            continue  # joining two symbols: an emoji sequence (👨‍👩‍👧), which shows as one
        what = REFUSED_CATEGORIES.get(category) or (
            "a space other than U+0020" if category == "Zs" and char != SPACE else None
        )
        if what:
            return f"a label must not contain {what} (U+{ord(char):04X} at position {position})"
    return None


def check_label(label: object) -> str:
    """`label` itself when it follows the rule, else LabelError naming the problem."""
    problem = label_problem(label)
    if problem:
        raise LabelError(problem)
    return label  # type: ignore[return-value]


def clean_label(label: object, allow_empty: bool = False) -> str:
    """What a person typed as a label: trimmed, then checked (LabelError). With allow_empty, an
    empty string stays "" (the clients' "clear"); a label of whitespace only is refused either way."""
    if isinstance(label, str):
        if not label and allow_empty:
            return ""
        if label and not label.strip():
            raise LabelError("a label must not be blank (whitespace only)")
        label = label.strip()
    return check_label(label)
