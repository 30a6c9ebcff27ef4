"""`python -m retrieval_server.healthcheck`: exit 0 when the server's grpc.health.v1 service answers
SERVING, 1 otherwise, with one line saying why. For the Docker HEALTHCHECK and exec probes.

The address defaults to 127.0.0.1 and the server's own RETRIEVAL_PORT; with RETRIEVAL_TLS_CERT set
(the server's certificate) it connects over TLS, trusting that certificate. Health needs no token.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retrieval_server.healthcheck", description=__doc__.split("\n")[0])
    p.add_argument(
        "--address",
        default=f"127.0.0.1:{os.environ.get('RETRIEVAL_PORT', '50051')}",
        help="host:port of the gRPC server (default 127.0.0.1:$RETRIEVAL_PORT or 50051)",
    )
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("RETRIEVAL_TLS_CERT"),
        help="PEM certificate to trust: connect with TLS (default $RETRIEVAL_TLS_CERT)",
    )
    p.add_argument("--server-name", default=None, help="TLS name to verify instead of the address's host")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    return p.parse_args(argv)


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    creds = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, creds, options=options)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with channel(args) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"unhealthy: {args.tls_ca}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address}: {status}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
