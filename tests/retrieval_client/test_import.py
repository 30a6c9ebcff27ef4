"""`retrieval-client import`: shards of `moco-train embed` streamed into a real server equal what Embed
returns for the same images, under the ids, labels and metadata `index` gives them; resumable; refused
for another model's vectors; incomplete directories reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval_client import RetrievalClient
from tests import REPO
from tests.images import noise_images
from tests.retrieval_client.test_cli import one_error_line, run_cli
from tests.server_harness import ServerProcess, make_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    noise_images(root / "red", 6, seed=1)
    noise_images(root / "blue", 5, seed=2, suffix=".jpg")
    (root / "blue" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def shards(corpus, export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, "-m", "moco_train", "embed", str(corpus), "--checkpoint", str(export)]
    cmd += ["--out", str(out), "--shard-size", "4", "-j", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_imported_items_equal_embed_and_index_and_a_rerun_skips_them(corpus, export, shards, tmp_path) -> None:
    with ServerProcess(export, tmp_path / "store") as server:
        env = {"RETRIEVAL_ADDRESS": server.address}
        first = run_cli("import", str(shards), "--labels-from-folders", env=env)
        assert first.returncode == 1  # the broken file is reported as failed
        assert "imported 11, skipped 0 (already stored unchanged), failed 1" in first.stdout
        assert "failed blue/broken.jpg:" in first.stdout
        again = run_cli("import", str(shards), "--labels-from-folders", env=env)
        assert "imported 0, skipped 11 (already stored unchanged), failed 1" in again.stdout

        with RetrievalClient(server.address) as client:
            files = sorted(p for p in corpus.rglob("*.*") if p.name != "broken.jpg")
            ids = [p.relative_to(corpus).as_posix() for p in files]
            stored = client.get(ids, include_embedding=True)
            embedded = client.embed([p.read_bytes() for p in files])
            np.testing.assert_allclose(np.stack([s.embedding for s in stored]), embedded, atol=1e-5)
            assert [s.label for s in stored] == [p.parent.name for p in files]
            assert [s.metadata["uri"] for s in stored] == [p.resolve().as_uri() for p in files]
            assert client.info().item_count == 11

        # `index` of the same folder finds every item stored unchanged: the two paths name items alike
        indexed = run_cli("index", str(corpus), "--labels-from-folders", env=env)
        assert "indexed 0, skipped 11 (already stored unchanged)" in indexed.stdout


def test_another_models_vectors_are_refused(shards, tmp_path) -> None:
    other = make_export(tmp_path, seed=3, name="other.pt")
    with ServerProcess(other, tmp_path / "store") as server:
        line = one_error_line(run_cli("import", str(shards), env={"RETRIEVAL_ADDRESS": server.address}))
        assert "was embedded by model" in line and "embed again with the served export" in line
        with RetrievalClient(server.address) as client:
            assert client.info().item_count == 0


def test_incomplete_and_foreign_directories(export, shards, tmp_path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in shards.iterdir():
        if f.name != "shard-00001.json":  # shard 1's completion record is missing: still being written
            (partial / f.name).write_bytes(f.read_bytes())
    with ServerProcess(export, tmp_path / "store") as server:
        env = {"RETRIEVAL_ADDRESS": server.address}
        result = run_cli("import", str(partial), env=env)
        assert result.returncode == 1
        assert "imported 8, skipped 0" in result.stdout
        assert "1 of 3 shards are not complete yet" in result.stderr
        line = one_error_line(run_cli("import", str(tmp_path), env=env))
        assert f"{tmp_path / 'manifest.json'}: not a moco-train embed output" in line
