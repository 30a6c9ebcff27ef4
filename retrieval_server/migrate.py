"""`retrieval-server migrate`: a store re-embedded for a new export, into a new store, while a server
keeps serving the old one (which is only read, never changed).

    retrieval-server migrate --store OLD --to NEW --model new.pt --image-root ~/photos
    retrieval-server migrate --backend milvus --milvus-uri URI --milvus-collection items --to items_v2 \\
        --model new.pt --image-root ~/photos --alias items
    torchrun --nproc-per-node 8 -m retrieval_server migrate ...      # the embedding spread over processes

1. plan (rank 0): the source's items are listed in one consistent read; every input is checked
   before anything is written (a one-line error otherwise: the same model as the source, a
   destination that exists, an uri outside the image roots, an alias held by another model); the
   plan and the listing go to the work folder, so a rerun resumes the same migration.
2. embed (every rank): the shared shard engine (moco_retrieval.shard_embed, as `moco-train embed`)
   with the server's encoder for the new export; complete shards are skipped on a rerun.
3. build (rank 0): the destination from the shards, afresh on every run (so a killed and resumed run
   ends with the same store), with ids, metadata and human labels; then catch-up passes carry the
   writes made to the source meanwhile (migration.carry) until a pass finds none; predicted labels
   are recomputed (migration.predict). An embedded destination is built in the work folder and
   renamed into place at the end; it keeps in NEW/migration/ what SwitchModel needs to carry the
   writes made after it. With --alias, the alias moves to the new collection, the replicas get
   --settle-s to follow it, and a last catch-up carries what they wrote to the old one meanwhile.
4. report: WORK/report.json and a summary, with every item left out (id, uri, reason).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from moco_retrieval import process_group
from moco_retrieval.export import ExportError
from moco_retrieval.fileio import atomic_write
from moco_retrieval.shard_embed import changed_fields, listing_sha256, run_shards
from moco_retrieval.shards import Manifest, ShardError, complete_shards, read_shard
from moco_retrieval.uris import UriError, uri_path

from .backend import Backend
from .backup import BackupError, model_fingerprint
from .config import MigrateConfig, server_config
from .encoder import Encoder
from .listing import Listing, SourceError, embedded_listing, milvus_listing, read_listing, write_listing
from .migration import LISTING_FILE, MIGRATION_DIR, MigrationState, Missing, Reembedder, carry, predict, write_items
from .store import StorageError

CATCH_UP_PASSES = 5  # a source written faster than a pass carries is not chased forever (the summary says)
PLAN, LISTING, REPORT, SHARDS, PARTIAL = "plan.json", "listing.jsonl", "report.json", "shards", "store"


class MigrateError(Exception):
    """One line for the CLI: bad input (found before anything is written), or a failure that
    running the same command again resumes from."""


@dataclass(frozen=True)
class Plan:
    """What a work folder migrates; a rerun resumes it only when nothing of it changed."""

    source: str  # the store directory, or uri#collection
    source_store_id: str
    source_fingerprint: str
    fingerprint: str  # the new export's
    to: str
    image_roots: list[str]
    shard_size: int

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Report:
    source: str
    destination: str
    fingerprint: str
    items: int = 0
    labelled: int = 0
    predicted: int = 0
    carried: list[int] = field(default_factory=list)  # changes carried by each catch-up pass
    missing: list[Missing] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1


def work_folder(cfg: MigrateConfig) -> Path:
    if cfg.work:
        return Path(cfg.work)
    if cfg.backend == "embedded":
        to = Path(cfg.to)
        return to.with_name(to.name + ".migrate")
    return Path(f"migrate-{cfg.to}")


class Source:
    """The store being migrated, read only: its listing (a consistent read each time)."""

    def __init__(self, cfg: MigrateConfig) -> None:
        self.cfg = cfg
        self.collection = cfg.milvus_collection  # pinned to the collection behind an alias by pin()
        self.client = None
        if cfg.backend == "milvus":
            from pymilvus import MilvusClient, MilvusException

            try:
                self.client = MilvusClient(uri=cfg.milvus_uri, token=cfg.milvus_token or "")
            except MilvusException as exc:
                raise MigrateError(f"Milvus at {cfg.milvus_uri}: {exc}") from exc

    @property
    def name(self) -> str:
        if self.client is None:
            return str(Path(self.cfg.store).resolve())
        return f"{self.cfg.milvus_uri}#{self.cfg.milvus_collection}"

    def listing(self) -> Listing:
        try:
            if self.client is None:
                return embedded_listing(Path(self.cfg.store))
            return milvus_listing(self.client, self.collection)
        except SourceError as exc:
            raise MigrateError(str(exc)) from exc

    def pin(self, listing: Listing) -> None:
        """Read the collection of this listing from now on, even once an alias that named it moves."""
        self.collection = listing.store_id if self.client is not None else self.collection

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def check_roots(cfg: MigrateConfig, listing: Listing) -> None:
    """Every item's uri must lie under an image root (items without a usable uri are reported)."""
    for root in cfg.image_root:
        if not Path(root).is_dir():
            raise MigrateError(f"--image-root {root}: not a folder")
    outside = []
    for item_id, state in listing.items.items():
        try:
            uri_path(state.uri, cfg.image_root)
        except UriError as exc:
            if "outside the image roots" in str(exc):
                outside.append((item_id, state.uri))
    if outside:
        item_id, uri = outside[0]
        roots = " ".join(str(r) for r in cfg.image_root)
        raise MigrateError(
            f"{len(outside)} of {len(listing.items)} items have a uri outside --image-root {roots} (e.g. {item_id!r}: "
            f"{uri}); give the folders their images are in"
        )


def check_destination(cfg: MigrateConfig, source: Source, listing: Listing, plan: Plan) -> None:
    if cfg.backend == "embedded":
        to, work = Path(cfg.to).resolve(), work_folder(cfg).resolve()
        if to.exists():
            raise MigrateError(f"--to {cfg.to} exists: the destination must be a new store directory")
        if not to.parent.is_dir():
            raise MigrateError(f"--to {cfg.to}: its folder {to.parent} does not exist")
        work.parent.mkdir(parents=True, exist_ok=True)
        if os.stat(work.parent).st_dev != os.stat(to.parent).st_dev:
            raise MigrateError(f"--work {work} must be on the filesystem of --to {cfg.to} (the store is moved there)")
        return
    client = source.client
    if client.has_collection(cfg.to):
        mine = client.describe_collection(cfg.to).get("properties", {}).get("migration") == plan.id
        if not mine:  # a collection this very migration began (a rerun) is rebuilt; any other is kept
            raise MigrateError(f"--to {cfg.to}: a Milvus collection (or alias) of that name exists already")
    if cfg.alias:
        check_alias(client, cfg.alias, listing)


def check_alias(client, alias: str, listing: Listing) -> None:
    """The alias must be missing, or point at the collection being migrated."""
    if not client.has_collection(alias):
        return
    described = client.describe_collection(alias)
    target, model = described["collection_name"], described.get("properties", {}).get("fingerprint")
    if target == alias:
        raise MigrateError(
            f"--alias {alias}: {alias!r} is a collection, not an alias (serve an alias to switch replicas; see the "
            "README's Upgrading the model)"
        )
    if target != listing.store_id:
        raise MigrateError(
            f"--alias {alias} points at collection {target!r} of model {model}, not at the migrated collection "
            f"{listing.store_id!r} of model {listing.fingerprint}"
        )


def plan_migration(cfg: MigrateConfig, work: Path, source: Source) -> tuple[Plan, Listing]:
    """Check every input and write the plan and listing (or find those of the run being resumed)."""
    listing = source.listing()
    source.pin(listing)
    try:
        fingerprint = model_fingerprint(Path(cfg.model))
    except BackupError as exc:
        raise MigrateError(str(exc)) from exc
    if fingerprint == listing.fingerprint:
        raise MigrateError(f"{cfg.model} is the model the store already holds ({fingerprint}): nothing to migrate")
    plan = Plan(
        source=source.name,
        source_store_id=listing.store_id,
        source_fingerprint=listing.fingerprint,
        fingerprint=fingerprint,
        to=str(Path(cfg.to).resolve()) if cfg.backend == "embedded" else cfg.to,
        image_roots=[str(Path(r).resolve()) for r in cfg.image_root],
        shard_size=cfg.shard_size,
    )
    check_destination(cfg, source, listing, plan)
    check_roots(cfg, listing)
    if (work / PLAN).exists():
        previous = Plan(**json.loads((work / PLAN).read_text()))
        if previous != plan:
            differ = [k for k in asdict(plan) if getattr(previous, k) != getattr(plan, k)]
            raise MigrateError(
                f"{work} holds another migration ({', '.join(differ)} differ): remove it or give another --work"
            )
        return plan, dataclasses.replace(listing, items=read_listing(work / LISTING))
    work.mkdir(parents=True, exist_ok=True)
    write_listing(work / LISTING, listing.items)
    atomic_write(work / PLAN, lambda f: f.write(json.dumps(asdict(plan), indent=2).encode()))
    return plan, listing


def open_destination(cfg: MigrateConfig, work: Path, plan: Plan, source: Source, dim: int) -> Backend:
    """A new, empty destination store for the new model (rebuilt from nothing on every run: a
    partial one of an interrupted run, which check_destination recognised, is dropped)."""
    from .server import StartupError, embedded_backend

    if cfg.backend == "embedded":
        shutil.rmtree(work / PARTIAL, ignore_errors=True)
        try:
            return embedded_backend(server_config(cfg, store=work / PARTIAL, snapshot_every=0), plan.fingerprint, dim)
        except StartupError as exc:
            raise MigrateError(str(exc)) from exc
    from .milvus_backend import MilvusBackend, MilvusError

    if source.client.has_collection(cfg.to):
        source.client.drop_collection(cfg.to)
    try:
        dest = MilvusBackend.open(server_config(cfg, milvus_collection=cfg.to, snapshot_every=0), plan.fingerprint, dim)
    except MilvusError as exc:
        raise MigrateError(str(exc)) from exc
    dest.client.alter_collection_properties(cfg.to, properties={"migration": plan.id, "migrated_from": plan.source})
    return dest


def embed_shards(cfg: MigrateConfig, work: Path, plan: Plan, items: dict, encoder: Encoder) -> Reembedder:
    """Every rank: this rank's shards of the items that have an image file (the engine of
    `moco-train embed`), with a progress bar per process."""
    reembedder = Reembedder(encoder, [Path(r) for r in plan.image_roots], cfg.batch_size, cfg.workers)
    files, _unresolved = reembedder.locate(items)
    manifest = Manifest(
        fingerprint=plan.fingerprint,
        dim=encoder.dim,
        images=len(files),
        files_sha256=listing_sha256([f"{f.rel}\t{f.path}" for f in files]),
        shard_size=cfg.shard_size,
        shards=-(-len(files) // cfg.shard_size),
        source=plan.source,
    )
    out = work / SHARDS
    try:
        changed = changed_fields(out, manifest)
    except ShardError as exc:
        raise MigrateError(str(exc)) from exc
    if changed:
        raise MigrateError(f"{out} holds shards of another run ({', '.join(changed)} differ): remove {work}")
    rank, world = process_group.get_rank(), process_group.get_world_size()
    done = set(complete_shards(out, manifest))
    mine = sum(
        min(cfg.shard_size, len(files) - s * cfg.shard_size)
        for s in range(manifest.shards)
        if s % world == rank and s not in done
    )
    desc = "re-embedding" + (f" (rank {rank})" if world > 1 else "")
    with tqdm(total=mine, desc=desc, unit="img", file=sys.stderr, disable=None, position=rank) as bar:
        run_shards(
            out,
            manifest,
            files,
            encoder.transform,
            encoder.forward,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            on_shard=lambda _rank, shard: bar.update(shard.images),
        )
    return reembedder


def build(cfg: MigrateConfig, work: Path, plan: Plan, listing: Listing, source: Source, reembedder: Reembedder):
    """Rank 0: the destination from the shards, the catch-up passes and the predicted labels."""
    report = Report(source=plan.source, destination=plan.to, fingerprint=plan.fingerprint, items=len(listing.items))
    _files, unresolved = reembedder.locate(listing.items)
    missing = {m.id: m for m in unresolved}
    dest = open_destination(cfg, work, plan, source, reembedder.encoder.dim)
    try:
        manifest = Manifest.read(work / SHARDS)
        for index in complete_shards(work / SHARDS, manifest):
            shard = read_shard(work / SHARDS, index, manifest)
            write_items(dest, [item.id for item in shard.items], shard.vectors, listing.items, fresh=True)
            missing.update({i: Missing(i, listing.items[i].uri, reason) for i, reason in shard.failed})
        before = listing.items
        for _ in range(CATCH_UP_PASSES):
            now = source.listing().items
            carried = carry(dest, before, now, reembedder, cfg.k, cfg.tau)
            report.carried.append(len(carried.changes))
            for item_id in carried.changes.deleted + carried.changes.rewritten:
                missing.pop(item_id, None)
            missing.update({m.id: m for m in carried.missing})
            before = now
            if not len(carried.changes):
                break
        wanted = [i for i, s in before.items() if s.predicted_label is not None and s.label is None]
        report.predicted = predict(dest, before, wanted, cfg.k, cfg.tau, clear=False)
        if cfg.alias:
            report.carried.append(switch_alias(cfg, source, dest, before, reembedder, missing))
        report.items = dest.item_count
        report.labelled = dest.labelled_count
        if cfg.backend == "milvus":
            dest.client.alter_collection_properties(cfg.to, properties={"migration": f"{plan.id}:complete"})
    finally:
        dest.close()
    if cfg.backend == "embedded":
        state = MigrationState(
            source=plan.source,
            source_store_id=plan.source_store_id,
            source_fingerprint=plan.source_fingerprint,
            fingerprint=plan.fingerprint,
            image_roots=plan.image_roots,
            k=cfg.k,
            tau=cfg.tau,
        )
        state.write(work / PARTIAL)
        write_listing(work / PARTIAL / MIGRATION_DIR / LISTING_FILE, before)
        os.replace(work / PARTIAL, cfg.to)  # the destination appears whole, or not at all
    report.missing = sorted(missing.values(), key=lambda m: m.id)
    return report


def switch_alias(cfg: MigrateConfig, source: Source, dest: Backend, before: dict, reembedder, missing: dict) -> int:
    """Point the alias at the new collection, give the replicas --settle-s to follow it, then carry
    what they wrote to the old collection meanwhile; the changes carried."""
    client = source.client
    listing = source.listing()
    check_alias(client, cfg.alias, listing)  # again: it may have moved while this ran
    if client.has_collection(cfg.alias):
        client.alter_alias(cfg.to, cfg.alias)
    else:
        client.create_alias(cfg.to, cfg.alias)
    time.sleep(cfg.settle_s)
    carried = carry(dest, before, source.listing().items, reembedder, cfg.k, cfg.tau)
    missing.update({m.id: m for m in carried.missing})
    return len(carried.changes)


def finish(work: Path, report: Report) -> Path:
    """Write the report and remove what only a rerun needed (listing, shards, plan)."""
    path = work / REPORT
    text = json.dumps(asdict(report), indent=2, ensure_ascii=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    shutil.rmtree(work / SHARDS, ignore_errors=True)
    for name in (LISTING, PLAN):
        (work / name).unlink(missing_ok=True)
    return path


def summary(report: Report, path: Path) -> str:
    lines = [
        f"migrated {report.items} items ({report.labelled} human-labelled, {report.predicted} predicted labels "
        f"recomputed) to {report.destination} for model {report.fingerprint} in {report.seconds:.0f} s on "
        f"{report.processes} process{'es' if report.processes > 1 else ''}",
        f"writes to the source carried by the catch-up passes: {' + '.join(map(str, report.carried)) or 0}",
        f"left out: {len(report.missing)} items whose image is missing or does not decode (report: {path})",
    ]
    lines += [f"  {m.id}  {m.uri}  {m.reason}" for m in report.missing[:20]]
    if len(report.missing) > 20:
        lines.append(f"  ... and {len(report.missing) - 20} more in the report")
    return "\n".join(lines)


def run_migrate(cfg: MigrateConfig) -> int:
    """The whole command on every rank; exit status 0 (1 when items were left out)."""
    started = time.perf_counter()
    process_group.init_distributed(cfg.device)
    rank = process_group.get_rank()
    work = work_folder(cfg)
    source = plan = listing = None
    error = None
    if rank == 0:
        try:
            source = Source(cfg)
            plan, listing = plan_migration(cfg, work, source)
        except MigrateError as exc:
            error = str(exc)
    error = process_group.broadcast_object(error)
    if error is not None:
        raise MigrateError(error)
    if rank != 0:
        plan = Plan(**json.loads((work / PLAN).read_text()))
        items = read_listing(work / LISTING)
    else:
        items = listing.items
    try:
        encoder = Encoder(cfg.model, cfg.device, runtime=cfg.encoder)
    except (ExportError, OSError, RuntimeError) as exc:
        raise MigrateError(str(exc)) from exc
    reembedder = embed_shards(cfg, work, plan, items, encoder)
    processes = process_group.get_world_size()
    process_group.destroy()
    if rank != 0:
        return 0
    try:
        report = build(cfg, work, plan, listing, source, reembedder)
    except StorageError as exc:  # a full disk, a Milvus that went away: the shards are kept
        raise MigrateError(f"writing the new store failed ({exc}); run the same command again to resume") from exc
    finally:
        source.close()
    report.seconds, report.processes = time.perf_counter() - started, processes
    print(summary(report, finish(work, report)), flush=True)
    return 1 if report.missing else 0
