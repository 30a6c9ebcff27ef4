"""Every method x 1 and 2 processes x every precision, with real gloo processes on the CPU: each
combination trains a step with a finite loss and checkpoints it, a second run resumes from that
checkpoint and trains the next step, and the result exports an encoder that loads and embeds. In
float32, two processes give the same gradients, weights and BatchNorm statistics as one process
on the same global batch. (Bit-exact resume is tested in test_checkpoint.py and test_distributed.py.)

Each process count is one group of child processes (`python -m tests.moco_train.test_precision_matrix
matrix SPEC OUT`) that runs all the combinations in turn, so torch and the process group start once.
Low precision is emulated on CPUs without native bf16/fp16: a bf16 ResNet-18 backward there takes
torch's slow convolution path (about 1 s per image on one core, 30x float32), hence 8 px crops and
a global batch of 4.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from moco_retrieval.devices import cpu_supports_fp16_autocast
from moco_retrieval.export import embed, export_model
from moco_train import distributed
from moco_train.checkpoint import checkpoint_path, load_checkpoint, to_export
from moco_train.config import TrainConfig
from moco_train.distributed import init_distributed
from moco_train.global_bn import GlobalBatchNorm1d, GlobalBatchNorm2d
from moco_train.trainer import Trainer
from tests.moco_train.test_distributed import log_records, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the fixture runs the whole matrix

V2 = {"mlp": True, "aug_plus": True, "cos": True}
METHODS = {
    "v1": {},
    "v2": V2,
    "v2-symmetric": {**V2, "symmetric": True},
    "v3-resnet18": {"moco_v3": True},
    "v3-vit_tiny_32": {"moco_v3": True, "arch": "vit_tiny_32", "crop_size": None},
}
PRECISIONS = ["off", "bf16", *(["fp16"] if cpu_supports_fp16_autocast() else [])]
AMP_DTYPES = {"off": "None", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
TINY = dict(
    batch_size=4,
    moco_k=16,
    crop_size=8,
    bn_splits=2,
    moco_dim=16,
    moco_mlp_dim=64,
    workers=0,
    progress=False,
    seed=3,
    keep=0,
)


def run_dir(out: Path, method: str, amp: str) -> Path:
    return out / f"{method}-{amp}"


# -- the child -----------------------------------------------------------------------------------
def child_matrix(spec: dict, out: Path) -> dict:
    """Every (method, precision) in turn; what the test needs from each, per rank."""
    init_distributed("cpu")
    results = {}
    for method, amp in itertools.product(METHODS, spec["precisions"]):
        cfg = {**TINY, **METHODS[method], "amp": amp, "data": spec["data"]}
        root = run_dir(out, method, amp)
        first = Trainer(TrainConfig(**cfg, run_dir=str(root / "first"), max_steps=1))
        first.fit()
        resumed = Trainer(
            TrainConfig(
                **cfg, run_dir=str(root / "resumed"), max_steps=2, resume=str(checkpoint_path(root / "first", 1))
            )
        )
        resumed.fit()
        results[f"{method}-{amp}"] = {
            "amp_dtype": str(first.amp_dtype),
            "scaler": first.scaler.is_enabled(),
            "global_bn": sum(isinstance(m, (GlobalBatchNorm1d, GlobalBatchNorm2d)) for m in first.model.modules()),
        }
        if amp == "off" and distributed.get_rank() == 0:  # step 1's gradients, for the other process count
            grads = {n: p.grad for n, p in first.model.named_parameters() if p.grad is not None}
            torch.save(grads, root / "first" / "grads.pt")
    return results


# -- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(demo_data, tmp_path_factory) -> Path:
    """64 demo training images (8 steps per epoch at batch 8) as a list file."""
    paths = [p for c in sorted((demo_data / "train").iterdir()) for p in sorted(c.iterdir())[:7]][:64]
    listing = tmp_path_factory.mktemp("data") / "images.txt"
    listing.write_text("\n".join(map(str, paths)) + "\n")
    return listing


@pytest.fixture(scope="module")
def matrix(images, tmp_path_factory) -> dict[int, tuple[Path, list[dict]]]:
    """For 1 and 2 processes: the output folder and every rank's results."""
    spec = {"data": str(images), "precisions": PRECISIONS}
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"nproc{nproc}")
        runs[nproc] = out, run_ranks("matrix", spec, out, nproc=nproc, module=__name__, timeout=1200)
    return runs


@pytest.mark.parametrize("amp", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nproc", (1, 2))
def test_method_trains_resumes_and_exports(matrix, nproc, method, amp):
    out, ranks = matrix[nproc]
    root = run_dir(out, method, amp)
    for result in (r[f"{method}-{amp}"] for r in ranks):
        assert result["amp_dtype"] == AMP_DTYPES[amp]
        assert result["scaler"] == (amp == "fp16")  # fp16 steps go through a GradScaler
        # v3 under DDP: every BatchNorm global, the backbone's too (the official SyncBatchNorm).
        assert (result["global_bn"] > 0) == (nproc == 2 and method.startswith("v3"))
    first, resumed = log_records(root / "first"), log_records(root / "resumed")
    assert first[0]["world_size"] == nproc and first[0]["amp"] == AMP_DTYPES[amp]
    assert [r["global_step"] for r in resumed if r["event"] == "resume"] == [1]
    steps = [(r["step"], r["loss"]) for log in (first, resumed) for r in log if r["event"] == "step"]
    assert [s for s, _ in steps] == [1, 2] and all(math.isfinite(loss) for _, loss in steps), steps
    model, meta = export_model(to_export(load_checkpoint(checkpoint_path(root / "resumed", 2)), "resumed"))
    size = meta.preprocessing.input_size
    features = embed(model, torch.randn(3, 3, size, size))
    assert features.shape == (3, meta.feature_dim) and torch.isfinite(features).all()
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, floor: float, name: str) -> None:
    """max |actual - expected| <= 2e-4 x max(max |expected|, floor): float32 rounding relative to the
    tensor's own scale (an elementwise relative test fails on entries near zero of a large tensor)."""
    scale = max(expected.abs().max().item(), floor)
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= 2e-4 * scale, f"{name}: max error {error:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process_in_float32(matrix, method):
    """One step on the same global batch: DDP's mean of the two halves' gradients is the one
    process's gradient, and the weights and BatchNorm running statistics after the step (averaged
    over the processes at the checkpoint) are the one process's, to 2e-4 of each tensor's scale
    (float32 summation order: BN over a reshaped batch, the all-reduces). A gradient that is zero
    up to rounding (e.g. a shift the next BatchNorm removes) is measured against 1e-3 of the
    largest gradient of the model. Before DDP ran with static_graph, v3's GlobalBatchNorm gave
    gradients off by ~100% here."""
    (one_out, _), (two_out, _) = matrix[1], matrix[2]
    one_root, two_root = run_dir(one_out, method, "off") / "first", run_dir(two_out, method, "off") / "first"
    one_grads = torch.load(one_root / "grads.pt", weights_only=True)
    two_grads = torch.load(two_root / "grads.pt", weights_only=True)
    assert one_grads.keys() == two_grads.keys() and one_grads
    largest = max(g.abs().max().item() for g in one_grads.values())
    for name in one_grads:
        assert_close_to_scale(two_grads[name], one_grads[name], 1e-3 * largest, name)
    one_state = load_checkpoint(checkpoint_path(one_root, 1))["model"]
    two_state = load_checkpoint(checkpoint_path(two_root, 1))["model"]
    assert any("running_var" in k for k in one_state)
    for key, value in one_state.items():
        if value.is_floating_point():
            assert_close_to_scale(two_state[key], value, 1e-3, key)
        else:
            assert torch.equal(two_state[key], value), key


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = {"matrix": child_matrix}[mode](spec, out)
    torch.save(result, out / f"rank{distributed.get_rank()}.pt")
