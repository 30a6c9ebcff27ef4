"""Wrapping a gRPC method handler's behaviour, whatever its kind (unary or streaming request and
response): what the metrics and auth interceptors both need."""

from __future__ import annotations

from collections.abc import Callable

import grpc

Wrapper = Callable[[Callable], Callable]


def rewrap(handler: grpc.RpcMethodHandler, unary_response: Wrapper, stream_response: Wrapper) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `unary_response` (methods that return one
    response) or `stream_response` (methods that yield responses)."""
    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), *serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), *serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), *serializers)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), *serializers)
