"""`retrieval-server serve | backup | restore`: run the server (flags or RETRIEVAL_* environment
variables), or back up a store while it serves and restore one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moco_retrieval.options import add_options

from .config import MigrateConfig, add_serve_arguments, config_from_args, migrate_config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve an exported encoder over gRPC",
        description="Every flag can also be set as RETRIEVAL_<FLAG> (flags win).",
    )
    add_serve_arguments(serve)
    backup = commands.add_parser(
        "backup",
        help="copy a store into one file, consistently, while a server may be serving and writing it",
    )
    backup.add_argument("--store", type=Path, required=True, help="the store directory (--store of serve)")
    backup.add_argument("--out", type=Path, required=True, help="the backup file to write")
    restore = commands.add_parser(
        "restore",
        help="check a backup (checksum, integrity, model) and make it the store of a directory",
        description="The server must be stopped; its index is rebuilt from the restored store at start.",
    )
    restore.add_argument("backup", type=Path, metavar="FILE", help="a file written by `retrieval-server backup`")
    restore.add_argument("--store", type=Path, required=True, help="the store directory to restore into")
    restore.add_argument("--model", type=Path, required=True, help="the export that will serve the store")
    restore.add_argument("--replace", action="store_true", help="overwrite a store that is already there")
    migrate = commands.add_parser(
        "migrate",
        help="re-embed a store for a new export into a new store, while a server serves the old one",
        description="Re-embeds every item from its uri under --image-root with the new export (--model), "
        "carrying ids, metadata and human labels; predicted labels are recomputed. Resumable: run the same "
        "command again after an interruption. Under torchrun the embedding is spread over the processes. "
        "Missing or undecodable images are reported (exit status 1), never silently dropped.",
    )
    add_options(migrate, MigrateConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "migrate":
        return _migrate(args)
    from .backup import BackupError, backup, restore
    from .store import StoreInUse

    try:
        if args.command == "backup":
            m = backup(args.store, args.out)
            print(
                f"wrote {args.out}: {m.items} items ({m.labelled} labelled) at store version {m.store_version}, "
                f"model {m.fingerprint}, sha256 {m.sha256}"
            )
        else:
            m = restore(args.backup, args.store, args.model, replace=args.replace)
            print(
                f"restored {m.items} items ({m.labelled} labelled) from {args.backup} (store version "
                f"{m.store_version}, {m.created}) into {args.store}"
            )
    except (BackupError, StoreInUse, OSError) as exc:
        print(f"retrieval-server {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from .server import StartupError, serve  # heavy imports (torch, faiss) after argument errors

    try:
        return serve(cfg)
    except StartupError as exc:
        one_line = " ".join(str(exc).split())  # e.g. torch.load's multi-line explanations
        print(f"retrieval-server: error: {one_line}", file=sys.stderr)
        return 2


def _migrate(args: argparse.Namespace) -> int:
    cfg = migrate_config_from_args(args)
    from .migrate import MigrateError, run_migrate  # heavy imports (torch, faiss) after argument errors

    try:
        return run_migrate(cfg)
    except MigrateError as exc:
        print(f"retrieval-server migrate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("retrieval-server migrate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
