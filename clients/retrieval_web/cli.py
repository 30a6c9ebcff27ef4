"""`retrieval-web`: serve the web page for a retrieval service (a client of its gRPC API) with
waitress, a production WSGI server."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from moco_retrieval.options import add_options, from_args, option

from .review import AUTO_REFRESH_S
from .sessions import DEFAULT_IDLE_MINUTES, DEFAULT_LIFETIME_HOURS, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_SESSIONS

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
    behind_tls: bool = option(
        False,
        help="a TLS proxy serves the page: session cookies get Secure, and X-Forwarded-Proto is believed "
        "(https when absent; without this flag the header is ignored)",
    )
    allowed_host: list[str] = option(
        [],
        "--allowed-host",
        help="host names the page answers to (the Host header; against DNS rebinding); repeat for several. "
        "Default: 127.0.0.1, localhost and ::1 when --host is a loopback address, any otherwise",
    )
    session_idle_minutes: float = option(DEFAULT_IDLE_MINUTES, help="a session ends after this long without a request")
    session_lifetime_hours: float = option(DEFAULT_LIFETIME_HOURS, help="a session ends this long after sign-in")
    max_sessions: int = option(
        DEFAULT_MAX_SESSIONS,
        help="signed-in sessions kept (and as many anonymous ones); the least recently used goes first",
    )
    max_clients: int = option(DEFAULT_MAX_CLIENTS, help="gRPC channels kept, one per token, least recently used closed")
    review_auto_refresh_seconds: float = option(
        AUTO_REFRESH_S,
        help="the review page recomputes its stale proposals on the next visit when computing them took less "
        "than this; slower ones wait for the person's 'recompute' (0: always wait)",
    )


def default_allowed_hosts(host: str) -> list[str] | None:
    """A page on a loopback address answers to the loopback names only, so that a site whose name
    an attacker points at 127.0.0.1 (DNS rebinding) gets a 400; on any other address, any name."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return ["127.0.0.1", "localhost", "::1"] if loopback else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval-web", description=__doc__)
    add_options(parser, WebConfig, env_prefix=ENV_PREFIX)
    cfg = from_args(WebConfig, parser.parse_args(argv))
    token = cfg.token
    if cfg.token_file:
        token = cfg.token_file.read_text().strip()
    for name in ("session_idle_minutes", "session_lifetime_hours", "max_sessions", "max_clients"):
        if not getattr(cfg, name) > 0:
            print(f"retrieval-web: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if not cfg.review_auto_refresh_seconds >= 0:
        print("retrieval-web: error: --review-auto-refresh-seconds must be 0 or more", file=sys.stderr)
        return 2
    missing = [str(r) for r in cfg.image_root if not r.is_dir()]
    if missing:
        print(f"retrieval-web: error: --image-root {', '.join(missing)}: no such folder", file=sys.stderr)
        return 2
    from waitress.server import create_server

    from .app import create_app

    app = create_app(
        cfg.address,
        token=token,
        image_roots=cfg.image_root,
        tls=str(cfg.tls_ca) if cfg.tls_ca else False,
        behind_tls=cfg.behind_tls,
        allowed_hosts=cfg.allowed_host or default_allowed_hosts(cfg.host),
        session_idle_s=cfg.session_idle_minutes * 60,
        session_lifetime_s=cfg.session_lifetime_hours * 3600,
        max_sessions=cfg.max_sessions,
        max_clients=cfg.max_clients,
        review_auto_refresh_s=cfg.review_auto_refresh_seconds,
    )
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
