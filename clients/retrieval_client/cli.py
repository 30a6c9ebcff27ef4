"""`retrieval-client`: index folders, search, classify, label and evaluate against a retrieval server.

Errors are one line on stderr with exit status 1 (2 for usage errors); connection settings come
from flags or RETRIEVAL_ADDRESS / RETRIEVAL_TOKEN / RETRIEVAL_TLS_CA.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from moco_retrieval.fileio import atomic_open, sha256_file
from moco_retrieval.images import CorpusFile, corpus_files
from moco_retrieval.shards import Manifest, ShardError, complete_shards, read_record, read_shard

from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, ItemFailure, RetrievalClient, RetrievalError, UpsertItem
from .labels import FORMATS, LabelFileError, format_for, import_labels, label_rows, read_labels, write_labels
from .sheet import Tile, load_thumbnail, write_sheet

EMBED_CHUNK = 256  # images per Embed call of evaluate
SWITCH_TIMEOUT = 600.0  # seconds SwitchModel may take at least (loading a model and a store, the catch-up)

PROG = "retrieval-client"


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ---- shared helpers ---------------------------------------------------------------------------


def walk_images(root: Path) -> list[CorpusFile]:
    """Every image file under `root`, recursively, in a stable (sorted) order."""
    if not root.is_dir():
        raise CommandError(f"{root}: not a directory")
    return corpus_files(root)


def read_image(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror or exc}") from None


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], out=sys.stdout) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def shown_label(label: str, predicted: str) -> str:
    """The human label, or the predicted one marked as such."""
    return label or (f"{predicted} (predicted)" if predicted else "")


# ---- commands ---------------------------------------------------------------------------------


@dataclass
class IndexPlan:
    """What `index` must upload: (id, file) pairs not stored unchanged, and what it leaves out."""

    todo: list[tuple[str, CorpusFile]]
    skipped: int
    duplicates: int
    failed: list[tuple[str, str]]


def stored_unchanged(client: RetrievalClient, wanted: dict[str, tuple[str, str]], with_labels: bool) -> set[str]:
    """The ids of `wanted` (id -> (file sha256, folder label)) that the server already stores with that
    sha256 (and label, when labels come from folders): what index and import skip."""
    stored = {s.id: s for s in client.get(list(wanted), ignore_missing=True)}
    return {
        i
        for i, (digest, label) in wanted.items()
        if (s := stored.get(i)) is not None
        and s.metadata.get("sha256") == digest
        and (not with_labels or s.label == label)
    }


def plan_index(client: RetrievalClient, files: list[CorpusFile], id_from: str, with_labels: bool) -> IndexPlan:
    """Hash every file and ask the server (Get, ignore_missing) which ids it already stores with
    the same sha256 (and folder label, when labels come from folders): those are skipped."""
    failed: list[tuple[str, str]] = []
    by_id: dict[str, tuple[CorpusFile, str]] = {}
    duplicates = 0
    for f in tqdm(files, desc="hashing", unit="img", file=sys.stderr, disable=None, leave=False):
        try:
            digest = sha256_file(f.path)
        except OSError as exc:
            failed.append((f.rel, f"cannot read: {exc.strerror or exc}"))
            continue
        item_id = digest if id_from == "hash" else f.rel
        if item_id in by_id:
            duplicates += 1
            continue
        by_id[item_id] = (f, digest)
    unchanged = stored_unchanged(client, {i: (digest, f.folder) for i, (f, digest) in by_id.items()}, with_labels)
    todo = [(i, f) for i, (f, _) in by_id.items() if i not in unchanged]
    return IndexPlan(todo, len(by_id) - len(todo), duplicates, failed)


def cmd_index(client: RetrievalClient, args: argparse.Namespace) -> int:
    plan = plan_index(client, walk_images(Path(args.dir)), args.id_from, args.labels_from_folders)
    todo = plan.todo
    read_errors: list[tuple[str, str]] = []

    def items() -> Iterator[UpsertItem]:
        for item_id, f in todo:
            try:
                data = f.path.read_bytes()
            except OSError as exc:
                read_errors.append((f.rel, f"cannot read: {exc.strerror or exc}"))
                continue
            yield UpsertItem(
                id=item_id,
                image=data,
                label=f.folder if args.labels_from_folders else "",
                metadata=f.metadata(hashlib.sha256(data).hexdigest()),
            )

    rel_of = {item_id: f.rel for item_id, f in todo}
    upload_failures: list[ItemFailure] = []
    bar = tqdm(total=len(todo), desc="indexing", unit="img", file=sys.stderr, disable=None)
    indexed = 0

    def on_ack(stored_now: int, failures: list[ItemFailure]) -> None:
        nonlocal indexed
        indexed += stored_now
        upload_failures.extend(failures)
        bar.update(stored_now + len(failures))
        if failures:
            bar.set_postfix(failed=len(upload_failures))

    try:
        client.upsert_many(items(), batch_size=args.batch_size, on_ack=on_ack)
    except RetrievalError as exc:
        raise CommandError(
            f"{exc}; {indexed} images were indexed before the error, run the same command again to resume"
        ) from None
    finally:
        bar.close()
    failed = (
        plan.failed + read_errors + [(rel_of.get(x.id, x.id), f"{x.code.name}: {x.message}") for x in upload_failures]
    )
    summary = f"indexed {indexed}, skipped {plan.skipped} (already stored unchanged)"
    if plan.duplicates:
        summary += f", {plan.duplicates} duplicate files"
    print(f"{summary}, failed {len(failed)}")
    for rel, reason in failed:
        print(f"  failed {rel}: {reason}")
    return 1 if failed else 0


def cmd_import(client: RetrievalClient, args: argparse.Namespace) -> int:
    """Stream `moco-train embed` shards into the service through Upsert with embeddings. Resumable
    like index: items the server already stores with the same file sha256 (and folder label, with
    --labels-from-folders) are skipped, so a second run uploads only what the first did not."""
    folder = Path(args.dir)
    try:
        manifest = Manifest.read(folder)
    except ShardError as exc:
        raise CommandError(str(exc)) from None
    served = client.info().model_fingerprint
    if served != manifest.fingerprint:
        raise CommandError(
            f"{folder} was embedded by model {manifest.fingerprint}, the server serves {served}: "
            "embed again with the served export"
        )
    complete = complete_shards(folder, manifest)
    total = sum(read_record(folder, s)["vectors"] for s in complete)
    imported = skipped = 0
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=total, desc="importing", unit="vec", file=sys.stderr, disable=None)
    try:
        for index in complete:
            try:
                shard = read_shard(folder, index, manifest)
            except ShardError as exc:
                raise CommandError(str(exc)) from None
            failed += shard.failed
            wanted = {i.id: (i.metadata.get("sha256", ""), i.folder) for i in shard.items}
            unchanged = stored_unchanged(client, wanted, args.labels_from_folders)
            todo = [
                UpsertItem(
                    id=item.id,
                    embedding=vector,
                    label=item.folder if args.labels_from_folders else "",
                    metadata=item.metadata,
                )
                for item, vector in zip(shard.items, shard.vectors)
                if item.id not in unchanged
            ]
            skipped += len(shard.items) - len(todo)
            bar.update(len(shard.items) - len(todo))
            result = client.upsert_many(
                todo, batch_size=args.batch_size, on_ack=lambda n, failures: bar.update(n + len(failures))
            )
            imported += result.upserted
            failed += [(x.id, f"{x.code.name}: {x.message}") for x in result.failures]
    except RetrievalError as exc:
        raise CommandError(
            f"{exc}; {imported} items were imported before the error, run the same command again to resume"
        ) from None
    finally:
        bar.close()
    print(f"imported {imported}, skipped {skipped} (already stored unchanged), failed {len(failed)}")
    for item_id, reason in failed:
        print(f"  failed {item_id}: {reason}")
    missing = manifest.shards - len(complete)
    if missing:
        print(
            f"{missing} of {manifest.shards} shards are not complete yet (moco-train embed is running or was "
            "interrupted): run import again when it has finished",
            file=sys.stderr,
        )
    return 1 if failed or missing else 0


def queries_of(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, query) of each IMAGE file, then each --id, in the order given; the query is
    {"image": bytes} or {"id": id}."""
    return [(p, {"image": read_image(p)}) for p in args.images] + [(i, {"id": i}) for i in args.id or ()]


def cmd_search(client: RetrievalClient, args: argparse.Namespace) -> int:
    queries = queries_of(args)
    results = client.search_many(
        [q for _, q in queries],
        k=args.k,
        labels=args.label or (),
        min_score=args.min_score,
        metadata=dict(args.where or ()),
    )
    several = len(queries) > 1
    print_table(
        ["query"] * several + ["rank", "id", "score", "label", "uri"],
        [
            [name] * several
            + [r, n.id, f"{n.score:.4f}", shown_label(n.label, n.predicted_label), n.metadata.get("uri", "")]
            for (name, _), neighbors in zip(queries, results)
            for r, n in enumerate(neighbors, 1)
        ],
    )
    if args.sheet:
        (name, query), neighbors = queries[0], results[0]
        if "image" in query:
            tile = Tile(load_thumbnail(query["image"]), "query", Path(name).name)
        else:
            item = client.get([name])[0]
            tile = Tile(
                load_thumbnail(item.metadata.get("uri")),
                "query",
                f"{item.id} {shown_label(item.label, item.predicted_label)}",
            )
        tiles = [tile] + [
            Tile(
                load_thumbnail(n.metadata.get("uri")), n.id, f"{n.score:.3f} {shown_label(n.label, n.predicted_label)}"
            )
            for n in neighbors
        ]
        try:
            path = write_sheet(args.sheet, tiles, title=f"Neighbours of {name}")
        except (ValueError, OSError) as exc:
            raise CommandError(str(exc)) from None
        print(f"contact sheet: {path}", file=sys.stderr)
    return 0


def cmd_classify(client: RetrievalClient, args: argparse.Namespace) -> int:
    queries = queries_of(args)
    names = [name for name, _ in queries]
    results = client.classify_many([q for _, q in queries], k=args.k, tau=args.tau, neighbors=0)
    if args.json:
        json.dump(
            [
                {next(iter(query)): name, "label": r.label, "confidence": r.confidence, "scores": dict(r.scores)}
                for (name, query), r in zip(queries, results)
            ],
            sys.stdout,
            indent=2,
        )
        print()
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["query", "label", "confidence"])
        writer.writerows([name, r.label, f"{r.confidence:.6f}"] for name, r in zip(names, results))
    else:
        print_table(
            ["query", "label", "confidence", "runner-up"],
            [
                (
                    name,
                    r.label,
                    f"{r.confidence:.4f}",
                    f"{r.scores[1][0]} {r.scores[1][1]:.4f}" if len(r.scores) > 1 else "",
                )
                for name, r in zip(names, results)
            ],
        )
    return 0


def cmd_label(client: RetrievalClient, args: argparse.Namespace) -> int:
    client.set_labels({args.id: args.label})
    print(f"{args.id}: labelled {args.label}")
    return 0


def cmd_unlabel(client: RetrievalClient, args: argparse.Namespace) -> int:
    client.set_labels({args.id: ""})
    print(f"{args.id}: label cleared")
    return 0


def cmd_delete(client: RetrievalClient, args: argparse.Namespace) -> int:
    print(f"deleted {client.delete(args.ids, ignore_missing=args.ignore_missing)}")
    return 0


def cmd_info(client: RetrievalClient, args: argparse.Namespace) -> int:
    info = client.info()
    for name, value in vars(info).items():
        if name != "label_counts":
            print(f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}")
    print("label_counts:" + ("" if info.label_counts else " none"))
    for label, count in sorted(info.label_counts.items()):
        print(f"  {label}: {count}")
    return 0


def cmd_suggest(client: RetrievalClient, args: argparse.Namespace) -> int:
    suggestions = client.suggest(
        args.n, seed=args.seed, sample=args.sample, k=args.k, tau=args.tau, uncertain_from=args.uncertain_from
    )
    if args.json:
        json.dump([vars(s) for s in suggestions], sys.stdout, indent=2)
        print()
    else:
        print_table(
            ["id", "reason", "score", "predicted", "margin", "uri"],
            [
                [
                    s.id,
                    s.reason,
                    f"{s.score:.3f}",
                    s.predicted_label or "-",
                    f"{s.margin:.3f}",
                    s.metadata.get("uri", ""),
                ]
                for s in suggestions
            ],
        )
    return 0


def cmd_duplicates(client: RetrievalClient, args: argparse.Namespace) -> int:
    groups = 0
    with _output(args.out) as out:
        writer = csv.writer(out)
        writer.writerow(["group", "id", "score", "label", "uri"])
        for groups, group in enumerate(client.duplicates(args.min_score, args.max_neighbors), start=1):
            writer.writerows([groups, n.id, f"{n.score:.6f}", n.label, n.metadata.get("uri", "")] for n in group)
    where = f", written to {args.out}" if args.out else ""
    print(f"{groups} groups of items at least {args.min_score:g} similar{where}", file=sys.stderr)
    return 0


def cmd_label_corpus(client: RetrievalClient, args: argparse.Namespace) -> int:
    count = 0
    with _output(args.out) as out:
        writer = csv.writer(out)
        writer.writerow(["id", "label", "confidence"])
        for p in client.label_corpus(k=args.k, tau=args.tau, min_confidence=args.min_confidence, apply=args.apply):
            writer.writerow([p.id, p.label, f"{p.confidence:.6f}"])
            count += 1
    applied = " and applied as predicted labels" if args.apply else " (not applied; add --apply to store them)"
    print(
        f"{count} proposals with confidence >= {args.min_confidence:g}{applied}"
        + (f", written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def cmd_labels_export(client: RetrievalClient, args: argparse.Namespace) -> int:
    fmt = format_for(args.out or "", args.format)
    with _output(args.out) as out:
        count = write_labels(label_rows(client, human_only=args.human_only), out, fmt, args.raw)
    print(f"exported {count} labelled items as {fmt}" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def cmd_labels_import(client: RetrievalClient, args: argparse.Namespace) -> int:
    fmt = format_for(args.file, args.format)
    try:
        with open(args.file, newline="", encoding="utf-8") as f:
            rows = read_labels(f, fmt, args.raw)
    except (LabelFileError, UnicodeDecodeError) as exc:
        raise CommandError(f"{args.file}: {exc}; nothing imported") from None
    result = import_labels(client, rows)
    if result.unknown:
        for item_id in result.unknown:
            print(f"  unknown id: {item_id}")
        shown = ", ".join(repr(i) for i in result.unknown[:3]) + (", ..." if len(result.unknown) > 3 else "")
        raise CommandError(f"{args.file}: {len(result.unknown)} ids are not stored ({shown}); nothing imported")
    left_out = f"; {result.predicted_rows} predicted rows left out (they are recomputed, not imported)"
    print(f"imported {result.updated} human labels from {args.file}" + (left_out if result.predicted_rows else ""))
    return 0


def cmd_switch_model(client: RetrievalClient, args: argparse.Namespace) -> int:
    client.timeout = max(client.timeout, SWITCH_TIMEOUT)
    done = client.switch_model(args.model, args.store)
    print(
        f"switched from model {done.previous_fingerprint} to {done.model_fingerprint} ({done.item_count} items); "
        f"{done.carried} items written since the migration carried, {len(done.missing)} left out"
    )
    for item_id, uri, reason in done.missing:
        print(f"  left out {item_id} ({uri}): {reason}")
    return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file that appears (atomically) only when the command succeeds."""
    if path is None:
        yield sys.stdout
        return
    with atomic_open(path, text=True) as f:
        yield f


def parse_shots(text: str) -> list[int | None]:
    """ "1,5,all" -> [1, 5, None]; None means every labelled example."""
    shots: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            shots.append(None)
        elif part.isdigit() and int(part) > 0:
            shots.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"invalid shot count {part!r} (positive integers or 'all')")
    return shots


def key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE of --where (the value may itself hold '=')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_evaluate(client: RetrievalClient, args: argparse.Namespace) -> int:
    """Few-shot accuracy without touching the store: the images are embedded by the service
    (Embed stores nothing) and the InstDisc vote runs here with the shared moco_retrieval.knn, the
    server's Classify defaults for k and tau, and classes in sorted order as the server numbers
    them: the predictions of Classify on a store holding exactly the chosen examples."""
    import torch  # only here: torch takes seconds to import, which every other command is spared

    from moco_retrieval.knn import knn_classify

    labelled = [f for f in walk_images(Path(args.labelled)) if f.folder]
    queries = [f for f in walk_images(Path(args.queries)) if f.folder]
    if not labelled or not queries:
        raise CommandError("--labelled and --queries must hold images in one folder per class")
    info = client.info()
    k, tau = args.k or info.default_k, args.tau or info.default_tau
    with tqdm(total=len(labelled) + len(queries), desc="embedding", unit="img", file=sys.stderr, disable=None) as bar:
        bank = _embed_files(client, labelled, bar)
        query_vectors = _embed_files(client, queries, bar)
    classes = sorted({f.folder for f in labelled})
    pool: dict[str, list[int]] = {}
    for i, f in enumerate(labelled):
        pool.setdefault(f.folder, []).append(i)
    truth = torch.tensor([classes.index(q.folder) if q.folder in classes else -1 for q in queries])
    rows = []
    for n in args.shots:
        rng = random.Random(args.seed * 1_000_003 + (n or 0))
        chosen = sorted(
            i
            for label, members in sorted(pool.items())
            for i in (members if n is None or n >= len(members) else rng.sample(members, n))
        )
        shares = knn_classify(
            torch.from_numpy(query_vectors),
            torch.from_numpy(bank[chosen]),
            torch.tensor([classes.index(labelled[i].folder) for i in chosen]),
            len(classes),
            k=k,
            tau=tau,
        )
        correct = int((shares.argmax(dim=1) == truth).sum())
        rows.append(("all" if n is None else n, len(chosen), f"{100.0 * correct / len(queries):.2f}"))
    print(f"{len(pool)} classes, {len(queries)} queries, chance {100.0 / len(pool):.2f}% (k={k}, tau={tau:g})")
    print_table(["shots", "labelled", "top-1 %"], rows)
    return 0


def _embed_files(client: RetrievalClient, files: list[CorpusFile], bar: tqdm) -> np.ndarray:
    vectors = []
    for start in range(0, len(files), EMBED_CHUNK):
        chunk = files[start : start + EMBED_CHUNK]
        vectors.append(client.embed([read_image(f.path) for f in chunk]))
        bar.update(len(chunk))
    return np.concatenate(vectors)


# ---- argument parsing -------------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The global options; on subcommands they default to SUPPRESS so they can follow the command."""

    def d(value):
        return value if defaults else argparse.SUPPRESS

    g = parser.add_argument_group("connection")
    g.add_argument(
        "--address",
        default=d(os.environ.get("RETRIEVAL_ADDRESS", DEFAULT_ADDRESS)),
        help=f"server host:port (env RETRIEVAL_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    g.add_argument("--token", default=d(os.environ.get("RETRIEVAL_TOKEN")), help="bearer token (env RETRIEVAL_TOKEN)")
    g.add_argument("--token-file", default=d(None), help="read the bearer token from this file")
    g.add_argument(
        "--tls-ca",
        default=d(os.environ.get("RETRIEVAL_TLS_CA")),
        help="use TLS, trusting this PEM root certificate (env RETRIEVAL_TLS_CA)",
    )
    g.add_argument("--tls", action="store_true", default=d(False), help="use TLS with the system roots")
    g.add_argument(
        "--timeout",
        type=float,
        default=d(DEFAULT_TIMEOUT),
        help="seconds per call; also how long an unreachable server is retried during index "
        f"(default {DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    _connection_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
        p = sub.add_parser(name, help=help, description=help)
        _connection_options(p, defaults=False)
        p.set_defaults(func=func, parser=p)
        return p

    def knn_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--k", type=int, help="neighbours that vote (server default if unset)")
        p.add_argument("--tau", type=float, help="vote temperature (server default if unset)")

    p = command("index", cmd_index, "upload every image under DIR (resumable: unchanged files are skipped)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--labels-from-folders", action="store_true", help="use each image's folder name as its label")
    p.add_argument(
        "--id-from",
        choices=("path", "hash"),
        default="path",
        help="item id: path relative to DIR, or sha256 of the file (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per upsert batch (default %(default)s)")

    p = command(
        "import",
        cmd_import,
        "upload the embeddings of a `moco-train embed --out DIR` (resumable: items stored unchanged are skipped)",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--labels-from-folders", action="store_true", help="use each image's folder name as its label")
    p.add_argument("--batch-size", type=int, default=256, help="items per upsert batch (default %(default)s)")

    def query_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("images", metavar="IMAGE", nargs="*", help="query image files")
        p.add_argument("--id", action="append", help="query by a stored id (repeatable, with or without images)")

    p = command(
        "search",
        cmd_search,
        "the most similar stored items to each image or stored id (several queries: one SearchBatch call)",
    )
    query_options(p)
    p.add_argument("-k", type=int, default=10, help="number of results (default %(default)s)")
    p.add_argument("--label", action="append", help="only items with this human label (repeatable)")
    p.add_argument("--min-score", type=float, help="only results with at least this cosine similarity")
    p.add_argument(
        "--where",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="only items whose metadata KEY equals VALUE (repeatable: all must hold)",
    )
    p.add_argument("--sheet", metavar="OUT", help="write a contact sheet (.png or .html) of the one query")

    p = command(
        "classify", cmd_classify, "predicted label and confidence per image or stored id (kNN vote, in batches)"
    )
    query_options(p)
    knn_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")

    p = command("label", cmd_label, "set the human label of a stored item")
    p.add_argument("id", metavar="ID")
    p.add_argument("label", metavar="LABEL")

    p = command("unlabel", cmd_unlabel, "clear the human label of a stored item")
    p.add_argument("id", metavar="ID")

    p = command("delete", cmd_delete, "remove stored items")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.add_argument("--ignore-missing", action="store_true", help="do not fail on unknown ids")

    command("info", cmd_info, "what the server serves: model, index, counts, limits")

    p = command("label-corpus", cmd_label_corpus, "kNN label proposals for every item without a human label")
    p.add_argument("--min-confidence", type=float, default=0.0, help="only proposals at least this confident")
    p.add_argument("--apply", action="store_true", help="store the proposals as predicted labels")
    p.add_argument("--out", help="write the proposals CSV here instead of stdout")
    knn_options(p)

    p = command("suggest", cmd_suggest, "which unlabelled items to label next (typical, then uncertain)")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same suggestions (default 0)")
    p.add_argument(
        "--sample", type=int, default=None, help="unlabelled items considered at most (server default 50,000)"
    )
    p.add_argument(
        "--uncertain-from",
        type=int,
        default=None,
        help="labelled items per label from which half are uncertain ones (server default 20)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    knn_options(p)

    p = command("duplicates", cmd_duplicates, "groups of near-duplicate stored items (CSV)")
    p.add_argument(
        "--min-score", type=float, default=0.95, help="cosine similarity that links two items (default 0.95)"
    )
    p.add_argument("--max-neighbors", type=int, default=None, help="nearest items checked per item (server default 10)")
    p.add_argument("--out", help="write the CSV here instead of stdout")

    labels = sub.add_parser(
        "labels", help="export or import labels as CSV or JSONL", description="export or import labels"
    )
    _connection_options(labels, defaults=False)
    actions = labels.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "export",
        help="every labelled item: id, label, source (human or predicted), predicted_label, confidence",
        description="every labelled item: id, label, source (human or predicted), predicted_label, confidence",
    )
    _connection_options(p, defaults=False)
    p.set_defaults(func=cmd_labels_export, parser=p)
    p.add_argument("--out", help="write here (.csv or .jsonl) instead of stdout, atomically")
    p.add_argument("--format", choices=FORMATS, help="csv or jsonl (default: from --out's extension, else csv)")
    p.add_argument("--human-only", action="store_true", help="only items with a human label")
    p.add_argument(
        "--raw",
        action="store_true",
        help="CSV cells verbatim: by default a cell starting with =, +, -, @, tab or CR (which a spreadsheet "
        "runs as a formula) or with ' is written with a leading ' (OWASP's rule; import undoes it)",
    )
    p = actions.add_parser(
        "import",
        help="set the human labels of a file of labels (all or nothing; predicted rows are left out)",
        description="set the human labels of a file of labels: all or nothing, unknown ids are reported",
    )
    _connection_options(p, defaults=False)
    p.set_defaults(func=cmd_labels_import, parser=p)
    p.add_argument("file", metavar="FILE", help="a file written by `labels export` (or with at least id and label)")
    p.add_argument("--format", choices=FORMATS, help="csv or jsonl (default: from the extension, else csv)")
    p.add_argument("--raw", action="store_true", help="a CSV written with `labels export --raw`: cells verbatim")

    p = command(
        "switch-model",
        cmd_switch_model,
        "switch the server to another export and the store `retrieval-server migrate` wrote for it, "
        "without failing a call (paths on the server's machine; needs the full token)",
    )
    p.add_argument("--model", required=True, help="the new export")
    p.add_argument("--store", required=True, help="the store migrated for it (migrate --to)")

    p = command("evaluate", cmd_evaluate, "few-shot labelling benchmark: top-1 accuracy of Classify per shot count")
    p.add_argument("--labelled", required=True, metavar="DIR", help="labelled pool, one folder per class")
    p.add_argument("--queries", required=True, metavar="DIR", help="queries, one folder per class")
    p.add_argument(
        "--shots",
        type=parse_shots,
        default=parse_shots("1,5,10,all"),
        help="labelled examples per class, comma separated (default 1,5,10,all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example sampling (default %(default)s)")
    knn_options(p)
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Usage errors argparse cannot express: exit status 2 with the command's usage."""
    if args.command in ("search", "classify") and not args.images and not args.id:
        args.parser.error("give at least one IMAGE or --id")
    if args.command == "search" and args.sheet and len(args.images) + len(args.id or ()) != 1:
        args.parser.error("--sheet draws one query: give one IMAGE or one --id")
    for name in ("k", "batch_size", "timeout"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            args.parser.error(f"{'-k' if name == 'k' else '--' + name.replace('_', '-')} must be positive")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"{args.token_file}: {exc.strerror or exc}") from None
    return args.token


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args)
    try:
        tls = args.tls_ca or args.tls
        with RetrievalClient(args.address, token=_token(args), tls=tls, timeout=args.timeout) as client:
            return args.func(client, args)
    except (CommandError, RetrievalError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except BrokenPipeError:  # e.g. piped into `head`: not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1
