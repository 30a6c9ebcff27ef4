"""Multi-process training with real processes on 127.0.0.1 (gloo, CPU): shuffle-BN collectives, the
shared queue, 1-vs-2-process equivalence, the --nproc launcher, a killed job resumed with --resume auto,
a worker killed under torchrun --max-restarts and resumed in place, and export + kNN of a 2-process run.

Children run this module (`python -m tests.moco_train.test_distributed MODE SPEC OUT`) with the
environment torchrun would give them; each writes what it saw to OUT/rank<r>.pt for the test to check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_retrieval.net import free_port
from moco_train import distributed
from moco_train.builder import MoCo, build_encoder
from moco_train.builder_v3 import MoCoV3, build_mlp
from moco_train.checkpoint import load_checkpoint
from moco_train.config import TrainConfig
from moco_train.distributed import init_distributed
from moco_train.global_bn import synchronise_batchnorm
from moco_train.trainer import Trainer
from tests import REPO

pytestmark = pytest.mark.slow

# Tiny but real: ResNet-18 with the CIFAR stem on 16x16 crops of the demo images, batch 16, K 64.
TINY = dict(
    max_steps=6, batch_size=16, moco_k=64, crop_size=16, workers=0, amp="off", progress=False, seed=3, bn_splits=4
)


# -- children ----------------------------------------------------------------------------------
def child_collectives(out: Path) -> dict:
    """batch_shuffle/unshuffle and the enqueue order, with known inputs on each rank."""
    init_distributed("cpu")
    rank = distributed.get_rank()
    torch.manual_seed(0)
    model = MoCo(build_encoder("resnet18", 16, mlp=False, cifar_stem=True), dim=16, K=32)
    im_k = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(100 + rank))
    shuffled, _ = distributed.batch_shuffle(im_k)
    model.eval()  # BN from running statistics: a key depends on its own image only
    eval_shuffled = model._keys(im_k)
    eval_plain = F.normalize(model.encoder_k(im_k), dim=1)
    model.train()  # batch statistics of the shuffled group vs of the own group
    train_shuffled = model._keys(im_k)
    train_plain = F.normalize(model.encoder_k(im_k), dim=1)
    # Enqueue: rank r's keys are r*3 + (0, 1, 2) in every coordinate; then a symmetric step (k, k2).
    queue_model = MoCo(build_encoder("resnet18", 4, mlp=False, cifar_stem=True), dim=4, K=32)
    k = (rank * 3 + torch.arange(3.0)).unsqueeze(1).expand(3, 4).contiguous()
    queue_model._dequeue_and_enqueue(k)
    queue_model._dequeue_and_enqueue(k, k + 100)
    return {
        "im_k": im_k,
        "shuffled": shuffled,
        "eval_shuffled": eval_shuffled,
        "eval_plain": eval_plain,
        "train_shuffled": train_shuffled,
        "train_plain": train_plain,
        "queue": queue_model.queue.clone(),
        "queue_ptr": queue_model.queue_ptr.clone(),
    }


def v3_model() -> MoCoV3:
    """A tiny MoCo v3: a linear "backbone" on 2x2 images with the projection MLP, and the predictor,
    with every BatchNorm global under DDP (as the trainer makes it); the same weights in every process."""
    torch.manual_seed(0)
    model = MoCoV3(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), build_mlp(2, 16, 32, 8)), dim=8, mlp_dim=32, T=0.2)
    return synchronise_batchnorm(model, torch.device("cpu"))


def v3_views(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + rank)
    return torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)


def child_v3(out: Path) -> dict:
    """One v3 step on this rank's 4 images: logits against the keys of both ranks, and the local
    gradients (DDP would average them)."""
    init_distributed("cpu")
    model = v3_model()
    logits, labels = model(*v3_views(distributed.get_rank()))
    loss = model.loss(logits, labels)
    loss.backward()
    return {
        "logits": logits.detach(),
        "labels": labels,
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def child_train(spec: dict) -> dict:
    trainer = Trainer(TrainConfig(**spec))
    trainer.fit()
    return {"state": trainer.model.state_dict()}


def run_ranks(mode: str, spec: dict, out: Path, nproc: int, module: str = __name__, timeout: float = 300) -> list[dict]:
    """Run `python -m module mode spec out` in nproc child processes wired like torchrun; every
    rank's result (what the child saved as out/rank<r>.pt)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "PYTHONWARNINGS": "ignore",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, mode, json.dumps(spec), str(out)],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(nproc)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def moco_train(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "moco_train", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_list(demo_data, tmp_path_factory) -> Path:
    """128 demo training images (8 steps per epoch at batch 16) as a list file."""
    images = [p for c in sorted((demo_data / "train").iterdir()) for p in sorted(c.iterdir())[:13]][:128]
    listing = tmp_path_factory.mktemp("data") / "images.txt"
    listing.write_text("\n".join(map(str, images)) + "\n")
    return listing


@pytest.fixture(scope="module")
def collectives(tmp_path_factory) -> list[dict]:
    return run_ranks("collectives", {}, tmp_path_factory.mktemp("collectives"), nproc=2)


@pytest.fixture(scope="module")
def two_proc_run(image_list, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spec = {**TINY, "data": str(image_list), "run_dir": str(tmp / "run"), "max_steps": 10}  # crosses an epoch
    return tmp / "run", run_ranks("train", spec, tmp / "out", nproc=2)


# -- tests -------------------------------------------------------------------------------------
def test_shuffle_unshuffle_returns_every_key_to_its_query(collectives):
    everything = torch.cat([r["im_k"] for r in collectives])
    shuffled = torch.cat([r["shuffled"] for r in collectives])
    # The shuffle is a permutation of the global batch that moves images between processes.
    order = [int((everything - row).abs().flatten(1).sum(1).argmin()) for row in shuffled]
    assert sorted(order) == list(range(8)) and set(order[:4]) != {0, 1, 2, 3}
    for r in collectives:
        torch.testing.assert_close(r["eval_shuffled"], r["eval_plain"], rtol=1e-5, atol=1e-5)
        # In training mode the keys do change: each was normalised with another process's group.
        assert not torch.allclose(r["train_shuffled"], r["train_plain"], atol=1e-3)


def test_gathered_keys_enter_the_queue_in_global_batch_order(collectives):
    first = torch.arange(6.0)  # rank 0's three keys, then rank 1's
    expected = torch.cat([first, first, first + 100])  # a plain step, then a symmetric one (k, k2)
    for r in collectives:
        torch.testing.assert_close(r["queue"][:, :18], expected.expand(4, 18), rtol=0, atol=0)
        assert int(r["queue_ptr"]) == 18
    assert torch.equal(collectives[0]["queue"], collectives[1]["queue"])


def test_ranks_hold_identical_queue_and_weights(two_proc_run):
    run_dir, ranks = two_proc_run
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    # Everything is equal, BN running statistics too: each rank's follow its own groups, and the
    # checkpoint at the end of the run averages them over the ranks (average_batchnorm_statistics).
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(a["queue"], b["queue"]) and int(a["queue_ptr"]) == (10 * 16) % 64
    records = log_records(run_dir)
    assert records[0]["world_size"] == 2 and records[0]["bn"] == "split" and records[0]["bn_groups"] == 4
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 11))


def test_two_processes_match_one_process_with_equal_bn_groups(image_list, two_proc_run, tmp_path):
    """--bn-splits 4 means 4 BatchNorm groups over the global batch whatever the process count: one
    process splits its batch of 16 in 4 groups, two processes split their 8 in 2 groups each. The
    groups hold the same images (rank r's slice = groups 2r, 2r+1), the key permutation is the same
    (the same seeded RNG draws randperm(16) in both), DDP's gradient mean = the gradient of the
    global mean loss, and the queue is the same. So step 1's loss agrees, and so does step 2's,
    which depends on the first update (DDP's averaged gradient), the momentum update and the
    enqueued keys. Only float summation order differs (BN over a reshaped batch, the gradient
    all-reduce); MoCo's early steps amplify such rounding quickly (the same single process with
    channels_last on vs off already differs by ~2% in the loss at step 5), so later steps are not
    compared."""
    run_dir, _ = two_proc_run
    spec = {**TINY, "data": str(image_list), "run_dir": str(tmp_path / "run"), "max_steps": 2}
    run_ranks("train", spec, tmp_path / "out", nproc=1)
    one = [r["loss"] for r in log_records(tmp_path / "run") if r["event"] == "step"]
    two = [r["loss"] for r in log_records(run_dir) if r["event"] == "step"][:2]
    assert log_records(tmp_path / "run")[0]["bn_groups"] == log_records(run_dir)[0]["bn_groups"] == 4
    assert one[0] == pytest.approx(two[0], rel=1e-5)
    assert one[1] == pytest.approx(two[1], rel=1e-4)
    assert one[1] > 10 * one[0]  # step 2 really differs from step 1 (new queue, updated weights)


def test_moco_v3_contrasts_against_the_keys_of_every_process(tmp_path):
    """2 processes of 4 images = one process of 8: the logits of rank r are the rows of its images
    against all 8 keys, with the positives at 4r + i; the mean of the ranks' losses is the global
    loss, and the mean of their gradients (what DDP applies) is the global gradient, because the
    MLPs' BatchNorm statistics are all-reduced with autograd (GlobalBatchNorm1d)."""
    ranks = run_ranks("v3", {}, tmp_path, nproc=2)
    model = v3_model()
    views = [v3_views(r) for r in range(2)]
    logits, labels = model(torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views]))
    loss = model.loss(logits, labels)
    loss.backward()
    for r, result in enumerate(ranks):
        rows = torch.cat([torch.arange(4 * r, 4 * r + 4), torch.arange(8 + 4 * r, 8 + 4 * r + 4)])
        torch.testing.assert_close(result["logits"], logits[rows].detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(result["labels"], torch.arange(4 * r, 4 * r + 4).repeat(2))
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.grad is not None:
            mean = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
            torch.testing.assert_close(mean, param.grad, rtol=1e-4, atol=1e-6)


KILL_RUN = [
    "--max-steps",
    16,
    "-b",
    16,
    "--moco-k",
    64,
    "--crop-size",
    16,
    "-j",
    0,
    "--amp",
    "off",
    "--seed",
    5,
    "--save-every-steps",
    3,
    "--no-progress",
    "--resume",
    "auto",
]


@pytest.fixture(scope="module")
def reference_run(image_list, tmp_path_factory) -> Path:
    """An uninterrupted 16-step `--nproc 2` run: what every interrupted run must end with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = moco_train("train", image_list, *KILL_RUN, "--nproc", 2, "--run-dir", run_dir)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_step"] == 16  # printed once, by rank 0
    return run_dir


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while (
        not (run_dir / "log.jsonl").exists()
        or max([r.get("step", 0) for r in log_records(run_dir) if r["event"] == "step"], default=0) < step
    ):
        assert job.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)


def assert_resumed_to_reference(run_dir: Path, reference: Path) -> None:
    """The run resumed mid-epoch from a checkpoint, continued without a gap and ended bit-identical
    to the reference: same queue, same weights."""
    records = log_records(run_dir)
    resumed = [r for r in records if r["event"] == "resume"]
    assert resumed and all(3 <= r["global_step"] < 16 for r in resumed), resumed
    steps = [r["step"] for r in records if r["event"] == "step"]
    restart = len(steps) - steps[::-1].index(resumed[-1]["global_step"] + 1) - 1
    assert steps[restart:] == list(range(resumed[-1]["global_step"] + 1, 17))  # continues, no gap
    final_ref = load_checkpoint(reference / "checkpoint_00000016.pt")
    final = load_checkpoint(run_dir / "checkpoint_00000016.pt")
    for key, value in final_ref["model"].items():
        assert torch.equal(value, final["model"][key]), key


def test_two_process_job_killed_mid_epoch_resumes_exactly(image_list, reference_run, demo_data, tmp_path):
    """A `--nproc 2` job SIGKILLed mid-epoch (launcher and both workers, as on a machine failure) and
    started again with --resume auto ends exactly where an uninterrupted run ends."""
    killed = tmp_path / "killed"
    args = ["train", image_list, *KILL_RUN, "--nproc", 2, "--run-dir", killed]
    job = subprocess.Popen(
        [sys.executable, "-m", "moco_train", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_step(killed, 4, job)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    moco_train(*args)
    assert_resumed_to_reference(killed, reference_run)

    # The export of the 2-process run serves like any other: export + kNN.
    moco_train("export", killed / "checkpoint_00000016.pt", tmp_path / "model.pt")
    result = json.loads(
        moco_train(
            "knn",
            "--bank",
            demo_data / "train",
            "--queries",
            demo_data / "test",
            "--checkpoint",
            tmp_path / "model.pt",
            "-j",
            0,
            "--json",
        ).stdout
    )
    assert result["bank_images"] == 1600 and result["query_images"] == 400
    assert result["top1"] > 15.0  # 10 classes: far above chance, as a 1-process run's export is


def worker_with_rank(agent_pid: int, rank: int) -> int:
    """The pid of the torchrun worker (a child of the agent) whose environment has RANK=rank."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.parametrize("attempt", range(2))
def test_torchrun_restarts_a_killed_worker_and_resumes_exactly(image_list, reference_run, tmp_path, attempt):
    """`torchrun --max-restarts 1`: one worker SIGKILLed mid-epoch; the agent stops the other and
    starts a new round, whose workers resume from the newest checkpoint with --resume auto and end
    bit-identical to the uninterrupted run. The new round shares the agent's store with the failed
    one; before its keys were prefixed with the restart count (distributed.init_process_group), it
    sometimes hung or read the dead peer's address. Run twice: that failure was intermittent."""
    run_dir = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                "--monitor-interval",
                "0.2",
                "-m",
                "moco_train",
                "train",
                *map(str, [image_list, *KILL_RUN, "--run-dir", run_dir]),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_step(run_dir, 4 + 2 * attempt, job)
            os.kill(worker_with_rank(job.pid, 1), signal.SIGKILL)
            assert job.wait(timeout=240) == 0, log.read_text()[-4000:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    assert "restart" in log.read_text().lower()
    assert_resumed_to_reference(run_dir, reference_run)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = {"collectives": child_collectives, "v3": child_v3}[mode](out) if mode != "train" else child_train(spec)
    torch.save(result, out / f"rank{distributed.get_rank()}.pt")
