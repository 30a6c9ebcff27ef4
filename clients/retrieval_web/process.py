"""`retrieval-web` in a child process on a free port, ready once it prints its address: how the demo
and the tests run the page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class WebProcess:
    def __init__(self, *args: object, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        cmd = [sys.executable, "-m", "retrieval_web", "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        line = self.proc.stdout.readline()
        if not line.startswith("retrieval-web on http://"):
            self.proc.kill()
            raise RuntimeError(f"retrieval-web did not start: {line}{self.proc.stdout.read()}")
        self.url = line.split()[2].rstrip("/")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
