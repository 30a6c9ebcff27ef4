"""`retrieval-web`: serve the web page for a retrieval service (a client of its gRPC API) with
waitress, a production WSGI server."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from moco_retrieval.options import add_options, from_args, option

ENV_PREFIX = "RETRIEVAL_WEB_"


@dataclass(frozen=True)
class WebConfig:
    address: str = option("127.0.0.1:50051", help="the retrieval service (gRPC host:port)")
    token: str | None = option(None, help="bearer token for the service; without one the page asks for it")
    token_file: Path | None = option(None, help="file holding the bearer token")
    tls_ca: Path | None = option(None, help="PEM root certificate of a TLS service")
    image_root: list[Path] = option(
        [], "--image-root", help="folders the items' uri metadata may point into (thumbnails); repeat for several"
    )
    host: str = option("127.0.0.1", help="address to serve the page on")
    port: int = option(8080, help="port to serve the page on (0 picks a free one)")
    threads: int = option(8, help="request threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval-web", description=__doc__)
    add_options(parser, WebConfig, env_prefix=ENV_PREFIX)
    cfg = from_args(WebConfig, parser.parse_args(argv))
    token = cfg.token
    if cfg.token_file:
        token = cfg.token_file.read_text().strip()
    missing = [str(r) for r in cfg.image_root if not r.is_dir()]
    if missing:
        print(f"retrieval-web: error: --image-root {', '.join(missing)}: no such folder", file=sys.stderr)
        return 2
    from waitress.server import create_server

    from .app import create_app

    app = create_app(cfg.address, token=token, image_roots=cfg.image_root, tls=str(cfg.tls_ca) if cfg.tls_ca else False)
    server = create_server(app, host=cfg.host, port=cfg.port, threads=cfg.threads)
    print(
        f"retrieval-web on http://{cfg.host}:{server.effective_port}/ for {cfg.address} (pid {os.getpid()})", flush=True
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
