"""`retrieval-web` in a child process on a free port, ready once it prints its address: how the demo
and the tests run the page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class WebProcess:
    """`module`: the package to run (a benchmark runs an older copy of the page beside this one)."""

    def __init__(
        self,
        *args: object,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        module: str = "retrieval_web",
    ) -> None:
        cmd = [sys.executable, "-m", module, "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        line = self.proc.stdout.readline()
        if not line.startswith("retrieval-web on http://"):
            self.proc.kill()
            raise RuntimeError(f"retrieval-web did not start: {line}{self.proc.stdout.read()}")
        self.url = line.split()[2].rstrip("/")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
