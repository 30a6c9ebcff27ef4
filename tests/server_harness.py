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
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import save_export
from moco_retrieval.api.v1 import retrieval_pb2_grpc
from moco_retrieval.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0


def make_export(directory: str | Path, seed: int = 0, name: str = "encoder.pt", head_dim: int | None = None,
                arch: str = "resnet18") -> Path:
    """Write a real export (32x32 input, random weights from `seed`): resnet18 with the CIFAR stem,
    512-d pooled features, or with head_dim a MoCo v1 linear projection head serving head_dim-d
    embeddings; or arch="vit_tiny_32", a MoCo v3 ViT serving its 192-d class token."""
    path = Path(directory) / name
    torch.manual_seed(seed)
    cifar_stem = arch != "vit_tiny_32"
    model = build_backbone(arch, cifar_stem=cifar_stem, head="linear" if head_dim else "none", head_dim=head_dim or 0)
    save_export(path, model.state_dict(), arch=arch, cifar_stem=cifar_stem, keep_head=bool(head_dim),
                preprocessing=Preprocessing.for_input_size(32), source=f"tests.server_harness seed={seed}")
    return path


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A random RGB PNG (distinct per seed), for tests that need many images."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: one CPU thread (the test machine is shared), repo importable."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    env.update(extra or {})
    return env


def serve_command(model: str | Path, store_dir: str | Path, *extra_args: str) -> list[str]:
    return [sys.executable, "-m", "retrieval_server", "serve", "--model", str(model), "--store", str(store_dir),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *map(str, extra_args)]


class ServerProcess:
    """`retrieval-server serve` in a child process, ready (health SERVING) when the context is entered."""

    def __init__(self, model: str | Path, store_dir: str | Path, *extra_args: str,
                 env: dict[str, str] | None = None, timeout: float = START_TIMEOUT_S) -> None:
        self.model, self.store_dir = Path(model), Path(store_dir)
        self.extra_args = [str(a) for a in extra_args]
        self.env = env
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = self.pid = 0
        self.log_path = self.ready_file = Path()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> "ServerProcess":
        tag = uuid.uuid4().hex[:8]
        self.store_dir.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.store_dir.parent / f"ready-{tag}.json"
        self.log_path = self.store_dir.parent / f"server-{tag}.log"
        cmd = serve_command(self.model, self.store_dir, "--ready-file", self.ready_file, *self.extra_args)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(self.env),
                                         cwd=REPO)
        deadline = time.monotonic() + self.timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"server not ready after {self.timeout}s:\n{self.log()}")
            time.sleep(0.05)
        info = json.loads(self.ready_file.read_text())
        self.port, self.metrics_port, self.pid = info["port"], info["metrics_port"], info["pid"]
        return self

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **options) -> grpc.Channel:
        opts = list(options.items())
        if credentials is None:
            return grpc.insecure_channel(self.address, options=opts)
        return grpc.secure_channel(self.address, credentials, options=opts)

    def stub(self, channel: grpc.Channel | None = None) -> retrieval_pb2_grpc.RetrievalStub:
        return retrieval_pb2_grpc.RetrievalStub(channel or self.channel())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait for the exit status (SIGKILL after `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ready_file.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_server_expecting_failure(model: str | Path, store_dir: str | Path, *extra_args: str,
                                 timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `serve` that should refuse to start; returns its CompletedProcess (text stderr)."""
    return subprocess.run(serve_command(model, store_dir, *extra_args), capture_output=True, text=True,
                          env=server_env(), cwd=REPO, timeout=timeout)
