"""`moco-train embed`: shards that cover the corpus exactly once whatever the number of processes (2 real
gloo processes under torchrun), failures recorded, complete shards skipped on a rerun, another run's
directory refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moco_retrieval.shards import Manifest, complete_shards, read_shard
from tests import REPO
from tests.images import noise_images
from tests.server_harness import make_export

SHARD = 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """23 images in nested folders and at the top, plus one corrupt file."""
    root = tmp_path_factory.mktemp("corpus")
    noise_images(root / "cats", 9, seed=1)
    noise_images(root / "dogs" / "deeper", 8, seed=2, suffix=".jpg")
    noise_images(root, 6, seed=3)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


def embed(*args: object, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "moco_train", "embed", *map(str, args), "-j", "0", "--quiet"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def all_items(out: Path) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    manifest = Manifest.read(out)
    shards = [read_shard(out, s, manifest) for s in complete_shards(out, manifest)]
    ids = [item.id for shard in shards for item in shard.items]
    return ids, np.concatenate([shard.vectors for shard in shards]), [f for shard in shards for f in shard.failed]


@pytest.mark.slow
def test_two_processes_cover_every_image_once_and_match_one(corpus, export, tmp_path) -> None:
    embed(corpus, "--checkpoint", export, "--out", tmp_path / "one", "--shard-size", SHARD)
    embed(corpus, "--checkpoint", export, "--out", tmp_path / "two", "--shard-size", SHARD, nproc=2)
    ids_one, vectors_one, failed_one = all_items(tmp_path / "one")
    ids_two, vectors_two, failed_two = all_items(tmp_path / "two")
    images = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.*"))
    assert len(ids_two) == len(set(ids_two)) == 23  # each good image exactly once
    assert sorted(ids_two + [i for i, _ in failed_two]) == images
    assert failed_two == failed_one == [("dogs/broken.jpg", failed_two[0][1])]
    assert ids_two == ids_one
    np.testing.assert_array_equal(vectors_two, vectors_one)  # the same forward, whichever rank ran it
    np.testing.assert_allclose(np.linalg.norm(vectors_one, axis=1), 1.0, atol=1e-5)
    manifest = Manifest.read(tmp_path / "two")
    assert (manifest.images, manifest.shards, manifest.dim) == (24, 4, 512)


def test_a_rerun_embeds_only_the_incomplete_shards(corpus, export, tmp_path) -> None:
    out = tmp_path / "out"
    embed(corpus, "--checkpoint", export, "--out", out, "--shard-size", SHARD)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    _, vectors, _ = all_items(out)
    (out / "shard-00002.json").unlink()  # shard 2 was interrupted before its completion record
    result = embed(corpus, "--checkpoint", export, "--out", out, "--shard-size", SHARD)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["skipped_complete"], summary["rank_images"], summary["complete"]) == (3, 7, 4)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert sorted(n for n in after if after[n] != before.get(n)) == [
        "shard-00002.json",
        "shard-00002.jsonl",
        "shard-00002.npy",
    ]
    np.testing.assert_array_equal(all_items(out)[1], vectors)


def test_another_runs_directory_is_refused_in_one_line(corpus, export, tmp_path) -> None:
    out = tmp_path / "out"
    embed(corpus, "--checkpoint", export, "--out", out, "--shard-size", SHARD)
    other = make_export(tmp_path, seed=1, name="other.pt")
    for args in (["--checkpoint", export, "--shard-size", 5], ["--checkpoint", other, "--shard-size", SHARD]):
        result = embed(corpus, *args, "--out", out, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moco-train embed: error: "), result.stderr
        assert "holds shards of another run" in lines[0] and "use a new --out" in lines[0]
    assert "shard_size" in embed(corpus, "--checkpoint", export, "--shard-size", 5, "--out", out, check=False).stderr


def test_bad_input_is_one_line_and_writes_nothing(export, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "no such folder": [tmp_path / "missing", "--shard-size", SHARD],
        "no images found": [empty, "--shard-size", SHARD],
        "must be positive": [empty, "--shard-size", 0],
    }
    for message, (data, *flags) in cases.items():
        out = tmp_path / "out"
        result = embed(data, "--checkpoint", export, "--out", out, *flags, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()
