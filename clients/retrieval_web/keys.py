"""The label page's keyboard: one key per label, each a single key press, so no label's key is the
start of another's (typing 1 then 0 was "1" then "0", never "10"). Labels take 1-9, then 0, then the
letters that no command uses; labels beyond those have no key (click, or type the label). The page
shows every key on each card and in the legend."""

from __future__ import annotations

# The commands' keys (KeyboardEvent.key): accept the card's vote, skip, undo (Ctrl+Z undoes too).
# Their letters are no label's.
COMMAND_KEYS = ("Enter", "ArrowRight", "u")
LABEL_KEYS = tuple("1234567890") + tuple(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in COMMAND_KEYS)


def label_keys(labels: list[str]) -> list[tuple[str, str]]:
    """(key, label) for the labels in the order given, "" as the key of those beyond LABEL_KEYS."""
    return [(LABEL_KEYS[n] if n < len(LABEL_KEYS) else "", label) for n, label in enumerate(labels)]
