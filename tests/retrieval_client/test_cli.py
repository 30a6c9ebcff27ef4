"""`retrieval-client` end to end: every command run as a child process against a real server with a
small real encoder and a bearer token; contact sheets opened and measured; the few-shot benchmark."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from retrieval_client import RetrievalClient, UpsertItem
from retrieval_client.cli import walk_images
from retrieval_client.sheet import sheet_size
from tests.server_harness import ServerProcess, make_export, self_signed_certificate

TOKEN = "s3cret-token"
CLASSES = ("airplane", "cat", "ship")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "retrieval_client", *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


def copy_demo(demo_data: Path, dest: Path, split: str, per_class: int, classes=CLASSES) -> Path:
    for cls in classes:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for path in sorted((demo_data / split / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(path, dest / cls / path.name)
    return dest


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error contract: exit status 1, exactly one line on stderr, no traceback."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("retrieval-client: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    with ServerProcess(export, tmp_path_factory.mktemp("store"), "--auth-token", TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def env(server) -> dict[str, str]:
    return {"RETRIEVAL_ADDRESS": server.address, "RETRIEVAL_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def lib(server):
    with RetrievalClient(server.address, token=TOKEN, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def indexed(demo_data, tmp_path_factory, env) -> Path:
    """data/demo/train, 8 images of each of 3 classes, indexed with folder labels."""
    folder = copy_demo(demo_data, tmp_path_factory.mktemp("corpus"), "train", 8)
    proc = run_cli("index", str(folder), "--labels-from-folders", env=env)
    assert proc.returncode == 0, proc.stderr
    return folder


def test_help_everywhere():
    for command in (
        [],
        ["index"],
        ["search"],
        ["classify"],
        ["label"],
        ["unlabel"],
        ["delete"],
        ["info"],
        ["label-corpus"],
        ["evaluate"],
    ):
        proc = run_cli(*command, "--help")
        assert proc.returncode == 0 and "usage: retrieval-client" in proc.stdout, command


def test_usage_and_connection_errors(env, server, tmp_path):
    assert run_cli(env=env).returncode == 2
    assert run_cli("search", env=env).returncode == 2  # neither IMAGE nor --id
    assert run_cli("search", "--id", "x", "-k", "0", env=env).returncode == 2
    assert run_cli("evaluate", "--labelled", "a", "--queries", "b", "--shots", "1,zero", env=env).returncode == 2

    down = one_error_line(run_cli("info", "--address", "127.0.0.1:1", "--timeout", "5"))
    assert "cannot reach server at 127.0.0.1:1" in down
    assert "UNAUTHENTICATED" in one_error_line(run_cli("info", "--address", server.address))
    assert "UNAUTHENTICATED" in one_error_line(run_cli("info", "--token", "wrong", env=env))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = run_cli("info", "--address", server.address, "--token-file", str(token_file))
    assert proc.returncode == 0, proc.stderr
    assert "no-such-file" in one_error_line(run_cli("search", str(tmp_path / "no-such-file.jpg"), env=env))
    assert "NOT_FOUND" in one_error_line(run_cli("search", "--id", "no-such-id", env=env))


def test_index_is_resumable(demo_data, tmp_path, env, lib):
    folder = copy_demo(demo_data, tmp_path / "photos", "test", 5, classes=("dog", "frog"))
    (folder / "dog" / "notes.txt").write_text("not an image: not indexed")
    first = run_cli("index", str(folder), "--labels-from-folders", "--batch-size", "3", env=env)
    assert first.returncode == 0, first.stderr
    assert "indexed 10, skipped 0 (already stored unchanged), failed 0" in first.stdout
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    stored = lib.get(files)
    assert [s.label for s in stored] == [f.split("/")[0] for f in files]
    assert all(s.metadata["uri"] == (folder / s.id).resolve().as_uri() for s in stored)

    again = run_cli("index", str(folder), "--labels-from-folders", env=env)
    assert again.returncode == 0 and "indexed 0, skipped 10" in again.stdout

    shutil.copy(demo_data / "test" / "cat" / sorted(os.listdir(demo_data / "test" / "cat"))[0], folder / files[0])
    (folder / "frog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    changed = run_cli("index", str(folder), "--labels-from-folders", env=env)
    assert changed.returncode == 1
    assert "indexed 1, skipped 9 (already stored unchanged), failed 1" in changed.stdout
    assert re.search(r"failed frog/broken\.jpg: INVALID_ARGUMENT", changed.stdout)
    (updated,) = lib.get([files[0]])
    assert updated.metadata["sha256"] != stored[0].metadata["sha256"]

    by_hash = run_cli("index", str(folder / "dog"), "--id-from", "hash", env=env)
    assert by_hash.returncode == 0 and "indexed 5, skipped 0" in by_hash.stdout
    assert "indexed 0, skipped 5" in run_cli("index", str(folder / "dog"), "--id-from", "hash", env=env).stdout


def test_search_prints_a_table_and_writes_contact_sheets(indexed, tmp_path, env):
    query = sorted((indexed / "cat").glob("*.jpg"))[0]
    proc = run_cli("search", str(query), "-k", "5", "--sheet", str(tmp_path / "sheet.png"), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "id", "score", "label", "uri"] and len(lines) == 6
    rank, top_id, score, label, uri = lines[1].split()
    assert (rank, top_id, label) == ("1", f"cat/{query.name}", "cat") and float(score) > 0.999
    assert uri == query.resolve().as_uri()
    with Image.open(tmp_path / "sheet.png") as sheet:
        sheet.load()
        assert sheet.format == "PNG" and sheet.size == sheet_size(6)

    by_id = run_cli(
        "search",
        "--id",
        "ship/" + sorted(os.listdir(indexed / "ship"))[0],
        "-k",
        "4",
        "--label",
        "ship",
        "--label",
        "cat",
        "--sheet",
        str(tmp_path / "sheet.html"),
        env=env,
    )
    assert by_id.returncode == 0, by_id.stderr
    rows = [line.split() for line in by_id.stdout.strip().splitlines()[1:]]
    assert len(rows) == 4 and all(r[3] in ("ship", "cat") for r in rows)

    where = run_cli("search", str(query), "-k", "5", "--where", f"uri={query.resolve().as_uri()}", env=env)
    assert where.returncode == 0, where.stderr
    assert [line.split()[1] for line in where.stdout.strip().splitlines()[1:]] == [f"cat/{query.name}"]
    bad = run_cli("search", str(query), "--where", "uri", env=env)
    assert bad.returncode == 2 and "expected KEY=VALUE, got 'uri'" in bad.stderr
    page = (tmp_path / "sheet.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and '<div class="ph">' not in page

    # a neighbour whose file has moved away is drawn as a placeholder tile
    original = sorted((indexed / "airplane").glob("*.jpg"))[0]
    moved = original.rename(tmp_path / "moved.jpg")
    try:
        placeholders = run_cli(
            "search",
            str(moved),
            "-k",
            "3",
            "--label",
            "airplane",
            "--sheet",
            str(tmp_path / "placeholder.html"),
            env=env,
        )
    finally:
        moved.rename(original)
    assert placeholders.returncode == 0, placeholders.stderr
    assert (tmp_path / "placeholder.html").read_text().count('<div class="ph">no image</div>') == 1
    assert "unsupported sheet format" in one_error_line(
        run_cli("search", str(query), "--sheet", str(tmp_path / "sheet.txt"), env=env)
    )


def test_classify_outputs(indexed, env, lib):
    images = [str(sorted((indexed / cls).glob("*.jpg"))[0]) for cls in CLASSES]
    table = run_cli("classify", *images, "--k", "5", env=env)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.strip().splitlines()) == 1 + len(images)
    # each image is stored with its human label and is its own nearest neighbour (similarity 1):
    # at a tiny temperature its vote outweighs the others
    as_json = run_cli("classify", *images, "--k", "5", "--tau", "0.001", "--json", env=env)
    results = json.loads(as_json.stdout)
    assert [r["image"] for r in results] == images
    assert [r["label"] for r in results] == list(CLASSES)
    assert all(sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-4) for r in results)
    as_csv = run_cli("classify", *images, "--k", "5", "--tau", "0.001", "--csv", env=env)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["label"] for r in rows] == list(CLASSES)
    assert [float(r["confidence"]) for r in rows] == pytest.approx([r["confidence"] for r in results], abs=1e-3)
    # images and stored ids in one call (ClassifyBatch): in order, each as Classify answers it alone
    ids = [Path(p).relative_to(indexed).as_posix() for p in images[:2]]
    mixed = json.loads(run_cli("classify", images[2], "--id", ids[0], "--id", ids[1], "--json", env=env).stdout)
    assert [r.get("image") or r.get("id") for r in mixed] == [images[2], *ids]
    alone = [lib.classify(image=Path(images[2]).read_bytes()), *(lib.classify(id=i) for i in ids)]
    assert [(r["label"], round(r["confidence"], 4)) for r in mixed] == [
        (c.label, round(c.confidence, 4)) for c in alone
    ]


def test_search_with_several_queries_prints_each_querys_neighbours(indexed, env, lib):
    images = [str(sorted((indexed / cls).glob("*.jpg"))[1]) for cls in CLASSES[:2]]
    stored_id = sorted(p.relative_to(indexed).as_posix() for p in indexed.rglob("*.jpg"))[0]
    out = run_cli("search", *images, "--id", stored_id, "-k", "3", env=env)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.strip().splitlines()[1:]]
    expected = [lib.search(image=Path(p).read_bytes(), k=3) for p in images] + [lib.search(id=stored_id, k=3)]
    assert [(r[0], r[2]) for r in rows] == [
        (name, n.id) for name, found in zip([*images, stored_id], expected) for n in found
    ]
    usage = run_cli("search", *images, "--sheet", "x.png", env=env)
    assert usage.returncode == 2 and "--sheet draws one query" in usage.stderr


def test_label_unlabel_delete_info(indexed, demo_data, tmp_path, env, lib):
    folder = copy_demo(demo_data, tmp_path / "extra", "test", 2, classes=("truck",))
    assert run_cli("index", str(folder), env=env).returncode == 0
    ids = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    before = lib.info()
    assert run_cli("label", ids[0], "truck", env=env).returncode == 0
    assert lib.get([ids[0]])[0].label == "truck"
    info = run_cli("info", env=env)
    assert info.returncode == 0 and f"labelled_count: {before.labelled_count + 1}" in info.stdout
    assert "truck: 1" in info.stdout and "model_fingerprint: " in info.stdout
    assert run_cli("unlabel", ids[0], env=env).returncode == 0
    assert lib.get([ids[0]])[0].label == ""
    assert "NOT_FOUND" in one_error_line(run_cli("label", "no-such-id", "x", env=env))
    assert "NOT_FOUND" in one_error_line(run_cli("delete", ids[0], "no-such-id", env=env))
    assert lib.info().item_count == before.item_count  # a failed call changes nothing
    proc = run_cli("delete", *ids, "no-such-id", "--ignore-missing", env=env)
    assert proc.returncode == 0 and "deleted 2" in proc.stdout
    assert lib.info().item_count == before.item_count - 2


def test_label_corpus_writes_and_applies_proposals(indexed, demo_data, tmp_path, env, lib):
    folder = tmp_path / "unlabelled"
    copy_demo(demo_data, folder / "new", "test", 3)
    assert run_cli("index", str(folder), env=env).returncode == 0
    ours = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert all(s.label == "" for s in lib.get(ours))
    out = tmp_path / "proposals.csv"
    assert "INVALID_ARGUMENT" in one_error_line(run_cli("label-corpus", "--out", str(out), "--tau", "-1", env=env))
    assert not out.exists() and not list(tmp_path.glob(".proposals.csv.*"))  # no partial file
    proc = run_cli("label-corpus", "--out", str(out), "--k", "5", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    assert set(ours) <= set(rows) and all(rows[i]["label"] in lib.info().label_counts for i in ours)
    assert all(s.predicted_label == "" for s in lib.get(ours))  # not applied without --apply

    applied = run_cli("label-corpus", "--apply", "--min-confidence", "0.6", "--k", "5", env=env)
    assert applied.returncode == 0, applied.stderr
    streamed = {r["id"]: r for r in csv.DictReader(io.StringIO(applied.stdout))}
    assert all(float(r["confidence"]) >= 0.6 for r in streamed.values())
    for item in lib.get(ours):
        if item.id in streamed:
            assert (item.label, item.predicted_label) == ("", streamed[item.id]["label"])
        else:
            assert item.predicted_label == "" and float(rows[item.id]["confidence"]) < 0.6 + 1e-6
    lib.delete(ours)


def test_evaluate_beats_chance(export, demo_data, tmp_path):
    """30 labelled images and 20 queries per class of CIFAR-10 (random-init encoder): top-1 above 10%."""
    classes = tuple(sorted(os.listdir(demo_data / "train")))
    labelled = copy_demo(demo_data, tmp_path / "labelled", "train", 30, classes)
    queries = copy_demo(demo_data, tmp_path / "queries", "test", 20, classes)
    with ServerProcess(export, tmp_path / "store") as srv:
        proc = run_cli(
            "evaluate",
            "--labelled",
            str(labelled),
            "--queries",
            str(queries),
            "--shots",
            "1,5,all",
            "--seed",
            "3",
            "--k",
            "20",
            env={"RETRIEVAL_ADDRESS": srv.address},
        )
        assert proc.returncode == 0, proc.stderr
        with RetrievalClient(srv.address) as c:
            assert c.info().item_count == 0  # cleaned up
    assert "10 classes, 200 queries, chance 10.00%" in proc.stdout
    table = {line.split()[0]: line.split() for line in proc.stdout.strip().splitlines()[2:]}
    assert [table[s][1] for s in ("1", "5", "all")] == ["10", "50", "300"]
    assert float(table["all"][2]) > 10.0, proc.stdout
    print(proc.stdout)


def test_index_survives_a_server_killed_mid_run(export, demo_data, tmp_path):
    """SIGKILL the server while `index` uploads 300 images: one clear error line and exit 1; the same
    command against the restarted server completes and every image is stored exactly once."""
    folder = copy_demo(demo_data, tmp_path / "corpus", "train", 30, sorted(os.listdir(demo_data / "train")))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    store = tmp_path / "store"
    server = ServerProcess(export, store).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
        index = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retrieval_client",
                "index",
                str(folder),
                "--batch-size",
                "8",
                "--timeout",
                "3",
                "--address",
                server.address,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with RetrievalClient(server.address) as c:
            while index.poll() is None and c.info().item_count < 16:
                time.sleep(0.02)
        server.stop(signal.SIGKILL)
        out, err = index.communicate(timeout=120)
    finally:
        server.stop()
    line = one_error_line(subprocess.CompletedProcess(index.args, index.returncode, out, err))
    assert f"cannot reach server at {server.address}" in line and "run the same command again to resume" in line

    with ServerProcess(export, store) as restarted:
        resumed = run_cli("index", str(folder), "--address", restarted.address)
        assert resumed.returncode == 0, resumed.stderr
        indexed, skipped = map(int, re.search(r"indexed (\d+), skipped (\d+)", resumed.stdout).groups())
        assert indexed + skipped == len(files) and indexed > 0 and skipped >= 16
        with RetrievalClient(restarted.address) as c:
            assert c.info().item_count == len(files)
            stored = c.get(files)
    assert [s.id for s in stored] == files
    assert all(s.metadata["sha256"] == hashlib.sha256((folder / s.id).read_bytes()).hexdigest() for s in stored)


def test_tls_with_a_root_certificate(export, tmp_path):
    """A TLS server: the CA from RETRIEVAL_TLS_CA or --tls-ca works; plaintext gets one clear error."""
    cert, key = self_signed_certificate(tmp_path)
    with ServerProcess(export, tmp_path / "store", "--tls-cert", cert, "--tls-key", key) as srv:
        by_env = run_cli("info", env={"RETRIEVAL_ADDRESS": srv.address, "RETRIEVAL_TLS_CA": str(cert)})
        assert by_env.returncode == 0 and "item_count: 0" in by_env.stdout, by_env.stderr
        by_flag = run_cli("info", "--address", srv.address, "--tls-ca", str(cert))
        assert by_flag.returncode == 0, by_flag.stderr
        one_error_line(run_cli("info", "--address", srv.address, "--timeout", "5"))


def test_evaluate_leaves_the_store_alone_and_equals_classify_on_an_empty_store(export, demo_data, tmp_path):
    """A store already holding labels: evaluate neither lets them vote nor changes them, and a
    Classify running meanwhile gets the same answers throughout. Its accuracy equals what Classify
    gives on an empty store holding exactly the examples evaluate chose."""
    classes = tuple(sorted(os.listdir(demo_data / "train")))[:4]
    labelled = copy_demo(demo_data, tmp_path / "labelled", "train", 12, classes)
    queries = copy_demo(demo_data, tmp_path / "queries", "test", 10, classes)
    with ServerProcess(export, tmp_path / "busy") as busy:
        with RetrievalClient(busy.address) as c:  # labels of its own, which must not vote in evaluate
            images = sorted((demo_data / "test").glob("*/*.jpg"))[-30:]
            c.upsert_many([UpsertItem(f"own{i}", image=p.read_bytes(), label="own") for i, p in enumerate(images)])
            probe = images[0].read_bytes()
            expected = c.classify(image=probe, k=5)
            before = c.info()
            answers, stop = [], threading.Event()

            def classify_meanwhile() -> None:
                with RetrievalClient(busy.address) as other:
                    while not stop.is_set():
                        answers.append(other.classify(image=probe, k=5))

            watcher = threading.Thread(target=classify_meanwhile)
            watcher.start()
            try:
                flags = ["--labelled", str(labelled), "--queries", str(queries), "--shots", "3", "--seed", "5"]
                proc = run_cli("evaluate", *flags, "--k", "20", "--tau", "0.1", env={"RETRIEVAL_ADDRESS": busy.address})
            finally:
                stop.set()
                watcher.join()
            assert proc.returncode == 0, proc.stderr
            assert answers and all(a == expected for a in answers)
            after = c.info()
            assert (after.item_count, after.label_counts) == (before.item_count, before.label_counts)
    accuracy = float(next(line.split()[2] for line in proc.stdout.splitlines() if line.split()[:1] == ["3"]))

    # The same three examples per class (evaluate's draw), in an empty store, through Classify.
    files = [f for f in walk_images(labelled) if f.folder]
    pool: dict[str, list] = {}
    for f in files:
        pool.setdefault(f.folder, []).append(f)
    rng = random.Random(5 * 1_000_003 + 3)
    chosen = [f for label, members in sorted(pool.items()) for f in rng.sample(members, 3)]
    with ServerProcess(export, tmp_path / "empty") as empty, RetrievalClient(empty.address) as c:
        c.upsert_many([UpsertItem(f.rel, image=f.path.read_bytes(), label=f.folder) for f in chosen])
        query_files = [f for f in walk_images(queries) if f.folder]
        preds = c.classify_many([{"image": f.path.read_bytes()} for f in query_files], k=20, tau=0.1)
    by_classify = 100.0 * sum(p.label == f.folder for p, f in zip(preds, query_files)) / len(query_files)
    assert accuracy == pytest.approx(by_classify, abs=1e-6), proc.stdout
