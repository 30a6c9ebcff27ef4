"""Helpers for tests that need a real retrieval server: a small real export and a `retrieval-server
serve` child process on 127.0.0.1 with free ports. Stable API used by server, client and deploy tests:

    model = make_export(tmp_path)                      # resnet18, CIFAR stem, 32 px, random init
    with ServerProcess(model, tmp_path / "store", "--auth-token", "t") as server:
        stub = server.stub()                           # or grpc.insecure_channel(server.address)
        requests.get(server.metrics_url)               # Prometheus text
    server.stop(signal.SIGTERM) -> exit status; server.proc is the Popen.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import make_export as export_dict
from moco_retrieval.fileio import atomic_torch_save
from moco_retrieval.preprocessing import Preprocessing
from retrieval_server import process
from tests import REPO


def make_export(
    directory: str | Path, seed: int = 0, name: str = "encoder.pt", head_dim: int | None = None, arch: str = "resnet18"
) -> Path:
    """Write a real export (32x32 input, random weights from `seed`): resnet18 with the CIFAR stem,
    512-d pooled features, or with head_dim a MoCo v1 linear projection head serving head_dim-d
    embeddings; or arch="vit_tiny_32", a MoCo v3 ViT serving its 192-d class token."""
    path = Path(directory) / name
    torch.manual_seed(seed)
    cifar_stem = arch != "vit_tiny_32"
    model = build_backbone(arch, cifar_stem=cifar_stem, head="linear" if head_dim else "none", head_dim=head_dim or 0)
    atomic_torch_save(
        export_dict(
            model.state_dict(),
            arch=arch,
            cifar_stem=cifar_stem,
            keep_head=bool(head_dim),
            preprocessing=Preprocessing.for_input_size(32),
            source=f"tests.server_harness seed={seed}",
        ),
        path,
    )
    return path


BACKENDS = ("embedded", "milvus")  # the contract tests run against both


def backend_options(backend: str, directory: str | Path) -> dict[str, str]:
    """ServerConfig fields of a backend: nothing for embedded (the --store), Milvus Lite in a file
    of `directory` for milvus."""
    if backend == "embedded":
        return {}
    return {"backend": "milvus", "milvus_uri": str(Path(directory) / "milvus.db")}


def backend_args(backend: str, directory: str | Path) -> list[str]:
    """The same as `serve` flags."""
    return [
        arg
        for name, value in backend_options(backend, directory).items()
        for arg in (f"--{name.replace('_', '-')}", value)
    ]


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A random RGB PNG (distinct per seed), for tests that need many images."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: one CPU thread (the test machine is shared), repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    env.update(extra or {})
    return env


class ServerProcess(process.ServerProcess):
    """The shared launcher (retrieval_server.process) with the tests' environment: one CPU thread,
    the repository importable."""

    def __init__(
        self,
        model: str | Path,
        store_dir: str | Path,
        *extra_args: object,
        env: dict[str, str] | None = None,
        log_dir: str | Path | None = None,
        timeout: float = process.START_TIMEOUT_S,
    ) -> None:
        super().__init__(model, store_dir, *extra_args, env=server_env(env), cwd=REPO, log_dir=log_dir, timeout=timeout)


def run_server_expecting_failure(
    model: str | Path, store_dir: str | Path, *extra_args: str, timeout: float = process.START_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run `serve` that should refuse to start; returns its CompletedProcess (text stderr)."""
    return subprocess.run(
        process.serve_command(model, store_dir, *extra_args),
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO,
        timeout=timeout,
    )


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a one-day self-signed certificate for localhost and 127.0.0.1."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
