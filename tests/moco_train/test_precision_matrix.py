"""Every method x 1 and 2 processes x every precision, with real gloo processes on the CPU: each
combination trains a step with a finite loss and checkpoints it, a second run resumes from that
checkpoint and trains the next step, and the result exports an encoder that loads and embeds. In
float32, two processes give the same gradients, weights and BatchNorm statistics as one process
on the same global batch. (Bit-exact resume is tested in test_checkpoint.py and test_distributed.py.)
MoCo runs in float32, bf16 and fp16; InstDisc, SimCLR, BYOL, Barlow Twins and SwAV (multi-crop, the
queue and the frozen prototypes on) in float32 and bf16.

Each process count is one group of child processes (`python -m tests.moco_train.test_precision_matrix
matrix SPEC OUT`) that runs all the combinations in turn, so torch and the process group start once.
The children keep the disk small: each combination's export is checked and its checkpoints deleted
in the child; the one-process group keeps its float32 step-1 weights and gradients, which the
two-process group measures itself against (and the fixture then deletes).
Low precision is emulated on CPUs without native bf16/fp16: a bf16 ResNet-18 backward there takes
torch's slow convolution path (about 1 s per image on one core, 30x float32), hence 8 px crops and
a global batch of 4.
"""

from __future__ import annotations

import json
import math
import shutil
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
MOCO = {
    "v1": {},
    "v2": V2,
    "v2-symmetric": {**V2, "symmetric": True},
    "v3-resnet18": {"moco_v3": True},
    "v3-vit_tiny_32": {"moco_v3": True, "arch": "vit_tiny_32", "crop_size": None},
}
SWAV = {  # the queue (one global batch) from the start, 2 small crops, prototypes frozen for step 1
    "method": "swav",
    "swav_prototypes": 8,
    "swav_queue": 4,
    "swav_queue_start": 0,
    "swav_freeze_prototypes": 1 / 16,
    "multi_crop": 2,
    "multi_crop_size": 4,
}
OTHERS = {
    "instdisc": {"method": "instdisc", "nce_k": 16},
    "simclr": {"method": "simclr"},
    "byol": {"method": "byol"},
    "barlow": {"method": "barlow"},
    "swav": SWAV,
}
METHODS = {**MOCO, **OTHERS}
SHUFFLE_BN = ("v1", "v2", "v2-symmetric")  # the others' BatchNorms are global under DDP
PRECISIONS = ["off", "bf16", *(["fp16"] if cpu_supports_fp16_autocast() else [])]
COMBINATIONS = [(m, amp) for m in METHODS for amp in PRECISIONS if m in MOCO or amp != "fp16"]
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
def scaled_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], floor: float) -> dict:
    """{name: (max |actual - expected|, max(max |expected|, floor))} over the floating-point tensors,
    and whether every other tensor is equal."""
    errors = {
        name: ((actual[name].float() - value.float()).abs().max().item(), max(value.abs().max().item(), floor))
        for name, value in expected.items()
        if value.is_floating_point()
    }
    exact = all(torch.equal(actual[name], value) for name, value in expected.items() if not value.is_floating_point())
    return {"errors": errors, "exact": exact and actual.keys() == expected.keys()}


def exported(root: Path) -> dict:
    """What the export of the resumed run's step-2 checkpoint embeds three random images to."""
    model, meta = export_model(to_export(load_checkpoint(checkpoint_path(root / "resumed", 2)), "resumed"))
    size = meta.preprocessing.input_size
    features = embed(model, torch.randn(3, 3, size, size))
    return {"shape": tuple(features.shape), "feature_dim": meta.feature_dim, "features": features}


def child_matrix(spec: dict, out: Path) -> dict:
    """Every (method, precision) in turn; what the test needs from each, per rank. In float32 one
    process saves its step-1 weights and gradients under spec["reference"]; two processes measure
    theirs against them."""
    init_distributed("cpu")
    main, results = distributed.get_rank() == 0, {}
    reference = Path(spec["reference"])
    for method, amp in COMBINATIONS:
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
        result = {
            "amp_dtype": str(first.amp_dtype),
            "scaler": first.scaler.is_enabled(),
            "global_bn": sum(isinstance(m, (GlobalBatchNorm1d, GlobalBatchNorm2d)) for m in first.model.modules()),
        }
        if main:
            result["export"] = exported(root)
        if amp == "off" and main:  # step 1's gradients and checkpointed weights, for the other process count
            grads = {n: p.grad.clone() for n, p in first.model.named_parameters() if p.grad is not None}
            state = load_checkpoint(checkpoint_path(root / "first", 1))["model"]
            if distributed.get_world_size() == 1:
                torch.save({"grads": grads, "state": state}, reference / f"{method}.pt")
            else:
                one = torch.load(reference / f"{method}.pt", weights_only=True)
                largest = max(g.abs().max().item() for g in one["grads"].values())
                result["vs_one_process"] = {
                    "grads": scaled_errors(grads, one["grads"], 1e-3 * largest),
                    "state": scaled_errors(state, one["state"], 1e-3),
                    "running_var": any("running_var" in k for k in one["state"]),
                }
        distributed.barrier()
        if main:
            for path in [*(root / "first").glob("checkpoint_*.pt"), *(root / "resumed").glob("checkpoint_*.pt")]:
                path.unlink()
        results[f"{method}-{amp}"] = result
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
    reference = tmp_path_factory.mktemp("one_process_float32")
    spec = {"data": str(images), "reference": str(reference)}
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"nproc{nproc}")
        runs[nproc] = out, run_ranks("matrix", spec, out, nproc=nproc, module=__name__, timeout=1200)
    shutil.rmtree(reference)
    return runs


@pytest.mark.parametrize(("method", "amp"), COMBINATIONS)
@pytest.mark.parametrize("nproc", (1, 2))
def test_method_trains_resumes_and_exports(matrix, nproc, method, amp):
    out, ranks = matrix[nproc]
    root = run_dir(out, method, amp)
    for result in (r[f"{method}-{amp}"] for r in ranks):
        assert result["amp_dtype"] == AMP_DTYPES[amp]
        assert result["scaler"] == (amp == "fp16")  # fp16 steps go through a GradScaler
        # Under DDP every BatchNorm is global (the official SyncBatchNorm), but MoCo v1/v2's shuffle-BN.
        assert (result["global_bn"] > 0) == (nproc == 2 and method not in SHUFFLE_BN)
    first, resumed = log_records(root / "first"), log_records(root / "resumed")
    assert first[0]["world_size"] == nproc and first[0]["amp"] == AMP_DTYPES[amp]
    assert [r["global_step"] for r in resumed if r["event"] == "resume"] == [1]
    steps = [(r["step"], r["loss"]) for log in (first, resumed) for r in log if r["event"] == "step"]
    assert [s for s, _ in steps] == [1, 2] and all(math.isfinite(loss) for _, loss in steps), steps
    export = ranks[0][f"{method}-{amp}"]["export"]
    features = export["features"]
    assert tuple(export["shape"]) == (3, export["feature_dim"]) and torch.isfinite(features).all()
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process_in_float32(matrix, method):
    """One step on the same global batch: DDP's mean of the two halves' gradients is the one
    process's gradient, and the weights and BatchNorm running statistics after the step (averaged
    over the processes at the checkpoint) are the one process's, to 2e-4 of each tensor's scale
    (float32 summation order: BN over a reshaped batch, the all-reduces). A gradient that is zero
    up to rounding (e.g. a shift the next BatchNorm removes) is measured against 1e-3 of the
    largest gradient of the model. Before DDP ran with static_graph, v3's GlobalBatchNorm gave
    gradients off by ~100% here. For the other methods this also checks their cross-process
    arithmetic: SimCLR's gathered negatives, Barlow Twins' summed cross-correlation, SwAV's
    Sinkhorn sums and queue rows, InstDisc's noise rows, Z and replicated bank."""
    _, ranks = matrix[2]
    compared = ranks[0][f"{method}-off"]["vs_one_process"]
    assert compared["running_var"] and compared["grads"]["errors"] and compared["state"]["exact"]
    for part in ("grads", "state"):
        for name, (error, scale) in compared[part]["errors"].items():
            assert error <= 2e-4 * scale, f"{part} {name}: max error {error:.3g} against scale {scale:.3g}"
    assert compared["grads"]["exact"]  # the same parameters have gradients


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = {"matrix": child_matrix}[mode](spec, out)
    torch.save(result, out / f"rank{distributed.get_rank()}.pt")
