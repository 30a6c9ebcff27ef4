"""`retrieval-server serve | backup | restore`: run the server (flags or RETRIEVAL_* environment
variables), or back up a store while it serves and restore one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import add_serve_arguments, config_from_args


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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


if __name__ == "__main__":
    sys.exit(main())
