"""The label page's keyboard (retrieval_web/keys.py): one single key per label, never a command's."""

from __future__ import annotations

from retrieval_web.keys import COMMAND_KEYS, label_keys


def test_each_label_gets_one_key_of_its_own_and_no_command_key():
    labels = [f"label-{n}" for n in range(40)]
    pairs = label_keys(labels)
    keys = [key for key, _ in pairs if key]
    assert [label for _, label in pairs] == labels
    assert all(len(key) == 1 for key in keys) and len(keys) == len(set(keys)) == 35
    assert keys[:11] == [*"1234567890", "a"]  # the tenth label is 0: never "1" then "0"
    assert not set(keys) & set(COMMAND_KEYS) and "u" not in keys
    assert [key for key, _ in pairs[35:]] == [""] * 5  # beyond the keys: click or type


def test_few_labels_take_the_digits():
    assert label_keys(["cat", "dog"]) == [("1", "cat"), ("2", "dog")]
    assert label_keys([]) == []
