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
    ]:
        assert words in label_problem(bad), bad
        with pytest.raises(LabelError):
            check_label(bad)
    with pytest.raises(LabelError, match="blank"):
        clean_label("   ", allow_empty=True)
    assert label_problem("🐈 gato\u200d") is None and label_problem("x" * MAX_LABEL_CHARS) is None
