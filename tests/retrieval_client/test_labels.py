"""Labels are user data: `retrieval-client labels export` writes every labelled item as CSV or JSONL,
`labels import` sets a file's human labels all or nothing (an unknown id or a bad row changes
nothing and is reported), and the labels survive a backup and its restore. Against a real server."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_client import RetrievalClient, UpsertItem
from retrieval_client.labels import format_for, label_rows, read_labels, stream_labels
from retrieval_server import cli as server_cli
from tests.retrieval_client.test_cli import one_error_line, run_cli
from tests.server_harness import ServerProcess, make_export

pytestmark = pytest.mark.slow  # server child processes

IDS = [f"img/{i:02d}" for i in range(12)]
HUMAN = {"img/00": "cat", "img/01": "dog", "img/02": 'cat, the "big" one', "img/03": "chien ü"}
PREDICTED = {"img/04": ("dog", 0.75), "img/01": ("cat", 0.5)}  # img/01 has both
VECTORS_ONLY = ("--encoder", "torch")  # no image is embedded here: skip building the ONNX encoder


def fill(client: RetrievalClient) -> None:
    vectors = np.random.default_rng(0).standard_normal((len(IDS), 512)).astype(np.float32)
    client.upsert_many([UpsertItem(i, embedding=v) for i, v in zip(IDS, vectors)])
    client.set_labels(HUMAN)
    client.set_labels(
        {i: lab for i, (lab, _) in PREDICTED.items()},
        predicted=True,
        confidences=dict((i, c) for i, (_, c) in PREDICTED.items()),
    )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    directory = tmp_path_factory.mktemp("labelled")
    with ServerProcess(export, directory / "store", *VECTORS_ONLY) as server:
        with RetrievalClient(server.address) as client:
            fill(client)
        yield server


@pytest.fixture
def empty(export, tmp_path):
    """A second server holding the same items, without any label."""
    with ServerProcess(export, tmp_path / "store", *VECTORS_ONLY) as server:
        with RetrievalClient(server.address) as client:
            vectors = np.random.default_rng(0).standard_normal((len(IDS), 512)).astype(np.float32)
            client.upsert_many([UpsertItem(i, embedding=v) for i, v in zip(IDS, vectors)])
        yield server


def expected_rows() -> list[dict]:
    rows = []
    for item_id in sorted(set(HUMAN) | set(PREDICTED)):
        predicted, confidence = PREDICTED.get(item_id, ("", None))
        rows.append(
            {
                "id": item_id,
                "label": HUMAN.get(item_id, predicted),
                "source": "human" if item_id in HUMAN else "predicted",
                "predicted_label": predicted,
                "confidence": confidence,
            }
        )
    return rows


def test_export_writes_every_labelled_item_as_csv_and_jsonl(server, tmp_path):
    env = {"RETRIEVAL_ADDRESS": server.address}
    for name in ("labels.csv", "labels.jsonl"):
        result = run_cli("labels", "export", "--out", str(tmp_path / name), env=env)
        assert result.returncode == 0 and f"exported 5 labelled items as {format_for(name)}" in result.stderr
    with open(tmp_path / "labels.csv", newline="", encoding="utf-8") as f:
        from_csv = [
            {**row, "confidence": float(row["confidence"]) if row["confidence"] else None} for row in csv.DictReader(f)
        ]
    from_jsonl = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert from_csv == from_jsonl == expected_rows()
    human = run_cli("labels", "export", "--human-only", "--format", "jsonl", env=env)
    assert [json.loads(line)["id"] for line in human.stdout.splitlines()] == sorted(HUMAN)
    # the library the web page can stream from: the same text as the file, line by line
    with RetrievalClient(server.address) as client:
        assert "".join(stream_labels(label_rows(client), "csv")) == (tmp_path / "labels.csv").read_text("utf-8")


def test_import_sets_the_human_labels_all_or_nothing(server, empty, tmp_path):
    env = {"RETRIEVAL_ADDRESS": server.address}
    run_cli("labels", "export", "--out", str(tmp_path / "labels.jsonl"), env=env)
    target = {"RETRIEVAL_ADDRESS": empty.address}

    def labels() -> dict:
        with RetrievalClient(empty.address) as client:
            return {s.id: (s.label, s.predicted_label) for s in client.get(IDS)}

    unlabelled = labels()
    bad = tmp_path / "bad.csv"
    bad.write_text('id,label,source\nimg/00,cat,human\nimg/05,"tab\there",human\n', encoding="utf-8")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("id,label\nimg/00,cat\nnope/1,dog\nnope/2,dog\n", encoding="utf-8")
    line = one_error_line(run_cli("labels", "import", str(bad), env=target))
    assert "line 3: label of 'img/05': a label must not contain a control character" in line
    assert "nothing imported" in line
    result = run_cli("labels", "import", str(unknown), env=target)
    line = one_error_line(result)
    assert "2 ids are not stored ('nope/1', 'nope/2'); nothing imported" in line
    assert result.stdout.splitlines() == ["  unknown id: nope/1", "  unknown id: nope/2"]
    assert labels() == unlabelled  # nothing changed by either

    result = run_cli("labels", "import", str(tmp_path / "labels.jsonl"), env=target)
    assert result.returncode == 0, result.stderr
    assert "imported 4 human labels" in result.stdout and "1 predicted rows left out" in result.stdout
    assert labels() == {i: (HUMAN.get(i, ""), "") for i in IDS}


FORMULAS = {  # OWASP's CSV-injection payloads, and labels that start with the quote itself
    "img/00": '=HYPERLINK("http://evil.example/","click")',
    "img/01": "@SUM(1+1)*cmd|' /C calc'!A0",
    "img/02": "+1",
    "img/03": "-2 cats",
    "img/04": "'quoted",
    "img/05": "''=x",
    "img/06": "plain",
}


def test_csv_exports_neutralise_formula_cells_and_import_restores_them(empty, tmp_path):
    """A spreadsheet runs a cell starting with =, +, -, @, tab or CR: the export writes each with a
    leading quote (and a cell starting with the quote gets one more), `labels import` reads every
    label back exactly, and --raw writes and reads them verbatim."""
    env = {"RETRIEVAL_ADDRESS": empty.address}
    with RetrievalClient(empty.address) as client:
        client.set_labels(FORMULAS)
    for raw in (False, True):
        out = tmp_path / f"labels{'-raw' if raw else ''}.csv"
        result = run_cli("labels", "export", "--out", str(out), *(["--raw"] if raw else []), env=env)
        assert result.returncode == 0, result.stderr
        with open(out, newline="", encoding="utf-8") as f:
            cells = {row["id"]: row["label"] for row in csv.DictReader(f)}
        if raw:
            assert cells == FORMULAS
        else:
            assert cells == {i: ("'" + label if label[0] in "=+-@'" else label) for i, label in FORMULAS.items()}
            assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells.values())
        with RetrievalClient(empty.address) as client:
            client.set_labels(dict.fromkeys(FORMULAS, ""))  # cleared, then imported back
        imported = run_cli("labels", "import", str(out), *(["--raw"] if raw else []), env=env)
        assert imported.returncode == 0, imported.stderr
        with RetrievalClient(empty.address) as client:
            assert {s.id: s.label for s in client.get(list(FORMULAS))} == FORMULAS
    jsonl = run_cli("labels", "export", "--format", "jsonl", env=env)  # JSONL is always verbatim
    assert {json.loads(line)["id"]: json.loads(line)["label"] for line in jsonl.stdout.splitlines()} == FORMULAS


def test_read_labels_accepts_what_export_writes_and_refuses_the_rest():
    rows = read_labels(io.StringIO("id,label\na,cat\nb,dog\n"), "csv")  # the least a file needs
    assert [(r.id, r.label, r.source) for r in rows] == [("a", "cat", "human"), ("b", "dog", "human")]
    for text, fmt, problem in [
        ("id,name\na,cat\n", "csv", "must name at least id and label"),
        ("id,label\na,cat\na,dog\n", "csv", "line 3: id 'a' appears twice"),
        ("id,label,source\na,cat,robot\n", "csv", "source must be human or predicted"),
        ('{"id": "a", "label": " cat"}\n', "jsonl", "must not start or end with whitespace"),
        ('{"id": "a", "label": "cat", "confidence": "high"}\n', "jsonl", "is not a number"),
        ("[1, 2]\n", "jsonl", "line 1: not a JSON object"),
        ("{nope\n", "jsonl", "line 1: not JSON"),
    ]:
        with pytest.raises(ValueError, match=problem):
            read_labels(io.StringIO(text), fmt)


def test_human_labels_survive_a_backup_and_its_restore(server, export, tmp_path):
    env = {"RETRIEVAL_ADDRESS": server.address}
    before = run_cli("labels", "export", env=env).stdout
    assert server_cli.main(["backup", "--store", str(server.store), "--out", str(tmp_path / "store.tar")]) == 0
    restored = tmp_path / "restored"
    assert (
        server_cli.main(["restore", str(tmp_path / "store.tar"), "--store", str(restored), "--model", str(export)]) == 0
    )
    with ServerProcess(export, restored, *VECTORS_ONLY) as again:
        assert run_cli("labels", "export", env={"RETRIEVAL_ADDRESS": again.address}).stdout == before
