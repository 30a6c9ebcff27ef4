"""The one label rule (moco_retrieval.labels) that the server applies to SetLabels and Upsert and
the web page to what a person typed. The server's side: tests/retrieval_server/test_validation.py."""

from __future__ import annotations

import pytest

from moco_retrieval.labels import MAX_LABEL_CHARS, LabelError, check_label, clean_label, label_problem


def test_the_one_label_rule():
    assert check_label("cat") == "cat" and clean_label("  cat ") == "cat" and clean_label("", allow_empty=True) == ""
    for bad, words in [
        (None, "not null"),
        (3, "not int"),
        ("", "empty"),
        (" cat", "whitespace"),
        ("x" * (MAX_LABEL_CHARS + 1), "at most"),
        ("a\x00b", "U+0000 at position 1"),
        ("a\x85b", "control"),
        ("a\u2029b", "paragraph separator"),
        ("\ud800", "lone surrogate"),
        ("cat\u202eeno", "bidi control or zero-width character) (U+202E at position 3)"),  # shows as "catone"
        ("ca\u200bt", "U+200B"),
        ("\u2066cat\u2069", "U+2066"),
        ("gato\u200d", "U+200D"),  # a joiner joining nothing
        ("cat\u00addog", "U+00AD"),  # soft hyphen
        ("new\u00a0york", "a space other than U+0020"),
        ("cat\u3000x", "U+3000"),
        ("x\ue000", "private-use"),
        ("x\U000e0001", "U+E0001"),  # a language tag (Cf)
        ("x\u0378", "unassigned"),
    ]:
        assert words in label_problem(bad), bad
        with pytest.raises(LabelError):
            check_label(bad)
    with pytest.raises(LabelError, match="blank"):
        clean_label("   ", allow_empty=True)
    assert label_problem("🐈 gato") is None and label_problem("x" * MAX_LABEL_CHARS) is None
    assert label_problem("family 👨\u200d👩\u200d👧") is None  # a joiner inside an emoji sequence
    assert label_problem("chat noir, Ünïcödé, 猫, кот") is None
