"""Storage faults and backups, with real files: a store that runs out of space (the --store-max-mb
quota everywhere; a real 6 MB tmpfs where this machine lets the tests mount one), a store that
cannot be written, and online backup / restore while Upserts stream in."""

from __future__ import annotations

import io
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_server.store import Store
from tests import REPO
from tests.server_harness import ServerProcess, make_export, run_server_expecting_failure, server_env

pytestmark = pytest.mark.slow
BATCH, DIM = 16, 512
Code = grpc.StatusCode


def batch(seq: int) -> pb.UpsertRequest:
    """BATCH items with 512-d embeddings (2 KB each) and their batch number as metadata."""
    vectors = np.random.default_rng(seq).standard_normal((BATCH, DIM))
    return pb.UpsertRequest(
        items=[
            pb.Item(id=f"s{seq:05d}-{i:02d}", embedding=pb.Vector(values=v.tolist()), metadata={"seq": str(seq)})
            for i, v in enumerate(vectors)
        ]
    )


def fill(stub, start: int = 0, limit: int = 2000) -> tuple[list[int], grpc.RpcError | None]:
    """Stream batches from `start` until the server refuses one (or `limit` went in); the batches
    acknowledged and the error, if any."""
    acked: list[int] = []

    def requests():
        for seq in range(start, start + limit):
            yield batch(seq)

    try:
        for ack in stub.Upsert(requests()):
            acked.append(start + ack.sequence)
    except grpc.RpcError as err:
        return acked, err
    return acked, None


def stored_batches(stub, seqs: list[int]) -> dict[int, int]:
    """How many items of each batch are stored."""
    ids = [f"s{seq:05d}-{i:02d}" for seq in seqs for i in range(BATCH)]
    got = stub.Get(pb.GetRequest(ids=ids, ignore_missing=True)).items
    counts = {seq: 0 for seq in seqs}
    for item in got:
        counts[int(item.metadata["seq"])] += 1
    return counts


def assert_full_then_recovers(server: ServerProcess, err: grpc.RpcError, acked: list[int], free_space) -> None:
    """The refused batch got RESOURCE_EXHAUSTED naming the store, no acknowledged item is lost and no
    half batch is stored, reads go on, and writes work again once `free_space()` ran."""
    assert err is not None and err.code() == Code.RESOURCE_EXHAUSTED, err
    assert "no space left for the store" in err.details() and str(server.store) in err.details()
    stub = server.stub()
    refused = max(acked, default=-1) + 1
    counts = stored_batches(stub, [*acked, refused])
    assert all(counts[s] == BATCH for s in acked) and counts[refused] == 0, counts
    info = stub.Info(pb.InfoRequest())
    assert info.item_count == BATCH * len(acked)
    first = f"s{acked[0]:05d}-00"
    (item,) = stub.Get(pb.GetRequest(ids=[first], include_embedding=True)).items
    assert stub.Search(pb.SearchRequest(query=pb.Query(vector=item.embedding), k=3)).neighbors[0].id == first
    free_space()
    more, _ = fill(stub, start=10_000, limit=3)  # writes go in again, without a restart
    assert more[:1] == [10_000], "no write succeeded after space was freed"
    assert "Traceback" not in server.log()


def test_a_store_over_its_quota_refuses_writes_and_recovers(tmp_path: Path) -> None:
    """--store-max-mb: SQLite's max_page_count, the same failure as a full disk on every machine."""
    model = make_export(tmp_path)
    with ServerProcess(model, tmp_path / "store", "--store-max-mb", 1) as server:
        acked, err = fill(server.stub())
        assert len(acked) >= 3

        def delete_some() -> None:  # freed pages are reused by later writes
            ids = [f"s{seq:05d}-{i:02d}" for seq in acked[:6] for i in range(BATCH)]
            assert server.stub().Delete(pb.DeleteRequest(ids=ids)).deleted == len(ids)
            del acked[:6]

        assert_full_then_recovers(server, err, acked, delete_some)
        assert server.stop() == 0


def can_mount_tmpfs(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(directory)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_filesystem_gets_resource_exhausted_and_shutdown_stays_clean(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    if not can_mount_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the --store-max-mb test covers the same path")
    try:
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * 1024 * 1024)  # 1 MB to free once the disk is full
        model = make_export(tmp_path)
        with ServerProcess(model, mount / "store", log_dir=tmp_path) as server:
            acked, err = fill(server.stub())
            assert len(acked) >= 3
            assert_full_then_recovers(server, err, acked, ballast.unlink)
            fill(server.stub(), start=20_000)  # full again: the shutdown snapshot cannot be written
            assert server.stop() == 0, server.log()[-3000:]
            assert "index snapshot skipped" in server.log()
        with ServerProcess(model, mount / "store", log_dir=tmp_path) as again:  # every acknowledged item is there
            assert again.stub().Info(pb.InfoRequest()).item_count >= BATCH * len(acked)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_store_directory_is_a_clear_start_up_error(tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    if not can_mount_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        model = make_export(tmp_path)
        with ServerProcess(model, mount / "store", log_dir=tmp_path) as server:
            list(server.stub().Upsert(iter([batch(0)])))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        proc = run_server_expecting_failure(model, mount / "store")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and str(mount / "store") in lines[-1], proc.stderr
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrieval_server", *map(str, args)],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO,
        timeout=300,
    )


def test_backup_during_an_upsert_stream_restores_whole_batches(tmp_path: Path) -> None:
    """The backup holds every batch acknowledged before it began, perhaps more, never half a batch;
    it restores only for its model and only when its checksum holds."""
    model = make_export(tmp_path)
    with ServerProcess(model, tmp_path / "store") as server:
        acked: list[int] = []
        stop = threading.Event()

        def stream() -> None:
            def requests():
                seq = 0
                while not stop.is_set():
                    yield batch(seq)
                    seq += 1

            for ack in server.stub().Upsert(requests()):
                acked.append(ack.sequence)

        writer = threading.Thread(target=stream)
        writer.start()
        while len(acked) < 5:
            threading.Event().wait(0.02)
        before = len(acked)
        made = cli("backup", "--store", server.store, "--out", tmp_path / "backup.tar")
        stop.set()
        writer.join()
        assert made.returncode == 0, made.stderr
        assert "wrote" in made.stdout and "sha256" in made.stdout

    restored = tmp_path / "restored"
    done = cli("restore", tmp_path / "backup.tar", "--store", restored, "--model", model)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(restored / Store.FILENAME) as db:
        seqs = [int(r[0]) for r in db.execute("SELECT json_extract(metadata, '$.seq') FROM items")]
    counts = {s: seqs.count(s) for s in set(seqs)}
    assert set(range(before)) <= set(counts), "a batch acknowledged before the backup began is missing"
    assert all(n == BATCH for n in counts.values()), "half a batch in the backup"
    with ServerProcess(model, restored) as server:  # it serves: the index is rebuilt from the store
        assert server.stub().Info(pb.InfoRequest()).item_count == len(seqs)


def test_restore_refuses_another_model_a_corrupt_file_a_busy_or_existing_store(tmp_path: Path) -> None:
    model, other = make_export(tmp_path), make_export(tmp_path, seed=1, name="other.pt")
    with ServerProcess(model, tmp_path / "store") as server:
        list(server.stub().Upsert(iter([batch(0)])))
        assert cli("backup", "--store", server.store, "--out", tmp_path / "b.tar").returncode == 0
        busy = cli("restore", tmp_path / "b.tar", "--store", server.store, "--model", model, "--replace")
        assert busy.returncode == 1 and "in use by another process" in busy.stderr

    def refused(backup: Path, message: str, model: Path = model, store: str = "target") -> None:
        proc = cli("restore", backup, "--store", tmp_path / store, "--model", model)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not (tmp_path / store / Store.FILENAME).exists() or store == "store"

    refused(tmp_path / "b.tar", "holds embeddings of model", model=other)
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(tmp_path / "b.tar") as src, tarfile.open(corrupt, "w") as dst:
        for member in src.getmembers():
            data = bytearray(src.extractfile(member).read())
            if member.name == "items.sqlite3":
                data[len(data) // 2] ^= 0xFF
            member.size = len(data)
            dst.addfile(member, io.BytesIO(bytes(data)))
    refused(corrupt, "checksum mismatch")
    (tmp_path / "junk.tar").write_bytes(uuid.uuid4().bytes)
    refused(tmp_path / "junk.tar", "not a readable backup")
    refused(tmp_path / "b.tar", "already holds a store", store="store")
    assert (
        cli("restore", tmp_path / "b.tar", "--store", tmp_path / "store", "--model", model, "--replace").returncode == 0
    )
    shutil.rmtree(tmp_path / "store")
