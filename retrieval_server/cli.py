"""`retrieval-server serve ...`: flags (or RETRIEVAL_* environment variables) -> a running server."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
