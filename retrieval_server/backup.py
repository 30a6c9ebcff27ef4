"""Online backup and restore of a store.

A backup is one tar file: `items.sqlite3`, a consistent copy made with SQLite's online backup API
(one step, so it is the state after one committed transaction even while the server writes: every
acknowledged Upsert batch is in it entirely or not at all), and `manifest.json` with the model
fingerprint, the store version and the database's sha256. Restoring verifies the checksum, the
database's integrity and the model, then puts the database in place; the FAISS index is rebuilt
from it when the server starts. This is also the recovery path for a corrupt store.
"""

from __future__ import annotations

import json
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moco_retrieval.fileio import atomic_open, fsync_dir, sha256_file

from . import __version__
from .snapshot import SNAPSHOT_POINTER
from .store import Store, StoreLock

BACKUP_FORMAT = "moco-retrieval.store-backup"
BACKUP_VERSION = 1
DATABASE, MANIFEST = "items.sqlite3", "manifest.json"


class BackupError(Exception):
    """A backup cannot be made or restored (one line for the CLI)."""


@dataclass(frozen=True)
class Manifest:
    format: str
    version: int
    fingerprint: str  # the model whose embeddings the store holds
    dim: int
    store_id: str
    store_version: int  # the last transaction in the copy
    items: int
    labelled: int
    sha256: str  # of items.sqlite3
    created: str
    server_version: str


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def backup(store_dir: Path, out: Path) -> Manifest:
    """Copy the store in `store_dir` (served or not) into the backup file `out`, atomically."""
    source_path = store_dir / Store.FILENAME
    if not source_path.is_file():
        raise BackupError(f"{store_dir}: no store ({Store.FILENAME}) to back up")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        copy = Path(tmp) / DATABASE
        try:
            source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30.0)
            target = sqlite3.connect(copy)
            with source, target:
                source.backup(target)  # all pages in one step: one consistent read transaction
            target.execute("PRAGMA journal_mode=DELETE")  # a standalone file, no WAL beside it
            meta = _meta(target)
            items = target.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            labelled = target.execute("SELECT COUNT(*) FROM items WHERE label IS NOT NULL").fetchone()[0]
            target.close()
            source.close()
        except sqlite3.Error as exc:
            raise BackupError(f"{store_dir}: cannot copy the store ({exc})") from exc
        if "fingerprint" not in meta:
            raise BackupError(f"{store_dir}: the store has no model yet (nothing was ever served from it)")
        manifest = Manifest(
            format=BACKUP_FORMAT,
            version=BACKUP_VERSION,
            fingerprint=meta["fingerprint"],
            dim=int(meta["dim"]),
            store_id=meta.get("store_id", ""),
            store_version=int(meta.get("version", 0)),
            items=items,
            labelled=labelled,
            sha256=sha256_file(copy),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            server_version=__version__,
        )
        (Path(tmp) / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        with atomic_open(out) as f, tarfile.open(fileobj=f, mode="w") as tar:
            tar.add(Path(tmp) / MANIFEST, arcname=MANIFEST)
            tar.add(copy, arcname=DATABASE)
    return manifest


def read_manifest(tar: tarfile.TarFile, source: Path) -> Manifest:
    try:
        raw = json.loads(tar.extractfile(MANIFEST).read())
        manifest = Manifest(**raw)
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise BackupError(f"{source}: not a store backup (no valid {MANIFEST})") from exc
    if (manifest.format, manifest.version) != (BACKUP_FORMAT, BACKUP_VERSION):
        raise BackupError(f"{source}: backup format {manifest.format} v{manifest.version} is not supported")
    return manifest


def model_fingerprint(model: Path) -> str:
    """The fingerprint recorded in an export (the server verifies the weights against it at start)."""
    try:
        return torch.load(model, map_location="cpu", weights_only=True)["meta"]["fingerprint"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise BackupError(f"{model}: not a readable export ({str(exc).splitlines()[0]})") from exc


def restore(backup_file: Path, store_dir: Path, model: Path, replace: bool = False) -> Manifest:
    """Verify `backup_file` and make it the store in `store_dir`, for `model`. Refused while a
    server holds the store, when the backup belongs to another model, and over an existing store
    unless `replace`."""
    try:
        tar = tarfile.open(backup_file, "r:")  # backups are plain tar files
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{backup_file}: not a readable backup ({exc})") from exc
    with tar:
        manifest = read_manifest(tar, backup_file)
        served = model_fingerprint(model)
        if served != manifest.fingerprint:
            raise BackupError(
                f"{backup_file} holds embeddings of model {manifest.fingerprint}, not of {model} ({served}); "
                "restore it for the model that wrote it"
            )
        store_dir.mkdir(parents=True, exist_ok=True)
        with StoreLock(store_dir):
            if (store_dir / Store.FILENAME).exists() and not replace:
                raise BackupError(f"{store_dir} already holds a store; pass --replace to overwrite it")
            with tempfile.TemporaryDirectory(dir=store_dir, prefix=".restore.") as tmp:
                try:
                    tar.extract(DATABASE, tmp, filter="data")
                except (KeyError, OSError, tarfile.TarError) as exc:
                    raise BackupError(f"{backup_file}: no readable {DATABASE} inside ({exc})") from exc
                copy = Path(tmp) / DATABASE
                if sha256_file(copy) != manifest.sha256:
                    raise BackupError(f"{backup_file}: checksum mismatch, the backup is corrupt; nothing restored")
                _check_integrity(copy, backup_file)
                for stale in [
                    store_dir / f"{Store.FILENAME}-wal",
                    store_dir / f"{Store.FILENAME}-shm",
                    store_dir / SNAPSHOT_POINTER,
                    *store_dir.glob("items-v*.faiss"),
                ]:
                    stale.unlink(missing_ok=True)
                copy.replace(store_dir / Store.FILENAME)
                fsync_dir(store_dir)
    return manifest


def _check_integrity(database: Path, source: Path) -> None:
    try:
        conn = sqlite3.connect(database)
        with conn:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{source}: the database inside is not readable ({exc}); nothing restored") from exc
    if result != "ok":
        raise BackupError(f"{source}: the database inside fails its integrity check ({result}); nothing restored")
