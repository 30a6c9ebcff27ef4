"""`retrieval-server serve` in a child process on free ports, ready once it has written its ready
file (health is SERVING by then): how the demo, the benchmarks and the tests run a real server.

    with ServerProcess(model, store, "--auth-token", "t") as server:
        stub = server.stub()                  # or grpc.insecure_channel(server.address)
        urllib.request.urlopen(server.metrics_url)
    server.stop(signal.SIGTERM) -> exit status; server.proc is the Popen, server.log() its output.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from moco_retrieval.api.v1 import retrieval_pb2_grpc

START_TIMEOUT_S = 180.0


def serve_command(model: str | Path, store: str | Path, *extra_args: object) -> list[str]:
    """The command line of a server on 127.0.0.1 with OS-chosen gRPC and metrics ports."""
    return [
        sys.executable,
        "-m",
        "retrieval_server",
        "serve",
        "--model",
        str(model),
        "--store",
        str(store),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        *map(str, extra_args),
    ]


class ServerProcess:
    """A server child process; `start()` (or entering the context) returns once it serves."""

    def __init__(
        self,
        model: str | Path,
        store: str | Path,
        *extra_args: object,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log_dir: str | Path | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.model, self.store = Path(model), Path(store)
        self.extra_args = [str(a) for a in extra_args]
        self.env, self.cwd, self.timeout = env, cwd, timeout
        self.log_dir = Path(log_dir) if log_dir else self.store.parent
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = self.pid = 0
        self.startup_seconds = 0.0
        self.log_path = self.ready_file = Path()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> ServerProcess:
        tag = uuid.uuid4().hex[:8]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.log_dir / f"ready-{tag}.json"
        self.log_path = self.log_dir / f"server-{tag}.log"
        cmd = serve_command(self.model, self.store, "--ready-file", self.ready_file, *self.extra_args)
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {self.proc.returncode} before it was ready:\n{self.log()[-4000:]}"
                )
            if time.perf_counter() - started > self.timeout:
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"the server was not ready after {self.timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.02)
        self.startup_seconds = time.perf_counter() - started
        info = json.loads(self.ready_file.read_text())
        self.port, self.metrics_port, self.pid = info["port"], info["metrics_port"], info["pid"]
        return self

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **options: object) -> grpc.Channel:
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

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
