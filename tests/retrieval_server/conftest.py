"""The empty server in this process that the contract tests run against, once per backend."""

from __future__ import annotations

import pytest

from retrieval_server.config import ServerConfig
from tests.retrieval_server.calls import InProcess
from tests.server_harness import BACKENDS, backend_options, make_export


@pytest.fixture(params=BACKENDS)
def served(request, tmp_path):
    """An empty store (embedded, or a Milvus Lite file) served over gRPC on 127.0.0.1."""
    options = backend_options(request.param, tmp_path)
    server = InProcess(
        ServerConfig(model=make_export(tmp_path), store=tmp_path / "store", port=0, metrics_port=0, **options)
    )
    yield server
    server.close()
