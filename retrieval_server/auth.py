"""Bearer-token auth as a server interceptor: `authorization: Bearer <token>` on every call except
grpc.health.v1 (probes stay open). A read-only token may call everything that does not write."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from .handlers import rewrap

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
WRITE_METHODS = (
    "/retrieval.v1.Retrieval/Upsert",
    "/retrieval.v1.Retrieval/Delete",
    "/retrieval.v1.Retrieval/SetLabels",
    "/retrieval.v1.Retrieval/SwitchModel",
)
# Writes only when the request asks for it: LabelCorpus with apply=true stores predicted labels.
APPLY_METHODS = ("/retrieval.v1.Retrieval/LabelCorpus",)


def _matches(given: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(given.encode(), token.encode())


def _deny(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    return rewrap(handler, lambda _behavior: abort, lambda _behavior: abort)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str, read_only_token: str | None = None) -> None:
        self.token = token
        self.read_only_token = read_only_token

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token (metadata 'authorization: Bearer <token>')",
                handler,
            )
        if _matches(given, self.token):
            return handler
        if not _matches(given, self.read_only_token):
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token", handler)
        if details.method in WRITE_METHODS:
            return _deny(grpc.StatusCode.PERMISSION_DENIED, "read-only token: this call writes", handler)
        if details.method in APPLY_METHODS:
            return _refuse_apply(handler)
        return handler


def _refuse_apply(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """LabelCorpus for a read-only caller: fine unless the request asks to store the proposals."""

    def guard(behavior: Callable) -> Callable:
        def guarded(request: Any, context: grpc.ServicerContext):
            if getattr(request, "apply", False):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "read-only token: LabelCorpus with apply writes")
            yield from behavior(request, context)

        return guarded

    return rewrap(handler, lambda behavior: behavior, guard)
