"""What the model-upgrade tests share: a corpus on disk, a store of it served by the old model with
human and predicted labels (written through a real server, as a user's would be), the migrate
command run in this process, and a store's contents read back for comparison."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from retrieval_client import RetrievalClient, UpsertItem
from retrieval_server import cli
from tests import REPO
from tests.images import noise_images
from tests.server_harness import ServerProcess, make_export, server_env

CLASSES = ("bird", "cat", "dog")
PER_CLASS = 8
HUMAN = {f"{c}/{i:02d}.png": c for c in CLASSES for i in range(2)}  # 2 per class
PREDICTED = {"bird/05.png": ("cat", 0.5), "cat/06.png": ("cat", 0.9), "dog/07.png": ("bird", 0.4)}
GONE, BROKEN = "cat/07.png", "dog/06.png"  # unlabelled items whose image goes missing / stops decoding


@dataclass(frozen=True)
class Corpus:
    root: Path
    old: Path  # the export the source store was embedded by
    new: Path  # the export it is migrated to
    ids: list[str]


def make_corpus(directory: Path) -> Corpus:
    root = directory / "images"
    for seed, name in enumerate(CLASSES):
        noise_images(root / name, PER_CLASS, seed=seed)
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    return Corpus(
        root, make_export(directory, seed=0, name="old.pt"), make_export(directory, seed=1, name="new.pt"), ids
    )


def items_of(corpus: Corpus, ids: list[str]) -> list[UpsertItem]:
    """The items as `retrieval-client index` writes them: image bytes, a file:// uri."""
    return [
        UpsertItem(id=i, image=(corpus.root / i).read_bytes(), metadata={"uri": (corpus.root / i).resolve().as_uri()})
        for i in ids
    ]


def fill(client: RetrievalClient, corpus: Corpus) -> None:
    """Index every image, label HUMAN, and store the PREDICTED labels."""
    result = client.upsert_many(items_of(corpus, corpus.ids))
    assert result.upserted == len(corpus.ids) and not result.failures
    client.set_labels(HUMAN)
    client.set_labels(
        {i: lab for i, (lab, _) in PREDICTED.items()},
        predicted=True,
        confidences={i: c for i, (_, c) in PREDICTED.items()},
    )


def source_store(corpus: Corpus, store: Path, *args: object) -> None:
    """A store of the corpus written by a real server of the old model; then one image goes
    missing and one stops decoding."""
    # torch: the old model's embeddings are replaced anyway, and this skips building an ONNX encoder
    with ServerProcess(corpus.old, store, *args, "--encoder", "torch", log_dir=store.parent) as server:
        with RetrievalClient(server.address) as client:
            fill(client, corpus)
    (corpus.root / GONE).unlink()
    (corpus.root / BROKEN).write_bytes(b"\x89PNG not any more")


def migrate(*args: object) -> tuple[int, str, str]:
    """`retrieval-server migrate ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["migrate", *map(str, args), "-j", "0"])
    return status, out.getvalue(), err.getvalue()


def migrate_process(*args: object, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`retrieval-server migrate ARGS` as a child process (optionally under torchrun)."""
    cmd = [sys.executable, *launcher, "-m", "retrieval_server", "migrate", *map(str, args), "-j", "0"]
    return subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report(work: Path) -> dict:
    return json.loads((work / "report.json").read_text())


def contents(store: Path) -> list[tuple]:
    """Every item of an embedded store: id, labels, metadata and the embedding's bytes."""
    conn = sqlite3.connect(f"file:{store / 'items.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT id, label, predicted_label, predicted_confidence, metadata, embedding FROM items ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    """Milvus Lite's own gRPC server in a child process (`python -m milvus_lite server`): a Milvus
    that several processes share over http://127.0.0.1:PORT, as replicas share a Milvus cluster."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.log = data_dir.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(),
            )
        deadline = time.monotonic() + 60
        while "listening on" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text(errors="replace")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
