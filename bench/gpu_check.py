"""The prepared GPU check: one script for the first time a GPU machine is lent (issue 21, part 4).

CI has no GPU, so what only a GPU can show is gathered here in one run of at most 8 minutes on
one H200 machine without network, each part time-boxed and recorded (pass/fail and the error)
without stopping the others:

  (a) cuda_tests:   pytest tests/gpu/test_cuda.py, the outcome of every test (JUnit XML beside);
  (b) throughput:   MoCo v2 ResNet-18 (CIFAR stem, 32 px, the largest candidate batch that fits)
                    and MoCo v3 ViT-Small (224 px), compiled, bf16, each next to the bare backbone
                    step (forward + backward + SGD step of the backbone alone, same batch and
                    precision) in the same process: img/s of each and their ratio;
  (c) ddp:          one training process under torchrun in an NCCL process group: DDP, the key
                    gather and the loss all-reduce over NCCL (the backend read back from the group
                    and the run's log.jsonl);
  (d) cifar_recipe: the remaining minutes train the CIFAR recipe (MoCo v2, ResNet-18 CIFAR stem,
                    -b 512, lr 0.06, cosine, bf16, compiled) on the 50k CIFAR-10 training images for
                    as many epochs as (b)'s throughput fits in the time left, then the kNN top-1 on
                    the full bank (50k) and queries (10k) against the committed encoder's figure;
                    the fp16 export is returned (in parts of at most 15 MiB) to commit if it wins.

    bash scripts/gpu_check_prepare.sh               # here: wheels + CIFAR-10 into .gpucheck/
    bash scripts/gpu_check.sh OUT_DIR               # there: writes OUT_DIR/gpu_check.json + logs
    python bench/gpu_check.py OUT_DIR --dry-run     # anywhere: tiny CPU run of the same code path

`--dry-run` runs every part on the CPU in seconds (tiny batches, a few steps, no compile, gloo
instead of NCCL, a few hundred CIFAR images); tests/bench/test_gpu_check.py runs it in CI. The
JSON is rewritten after every part, so a check killed from outside keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/gpu_check.py` on a machine where the project is not installed

PRETRAINED_PROVENANCE = REPO / "pretrained" / "moco_v2_resnet18_cifar10.json"
CUDA_TESTS = "tests/gpu/test_cuda.py"
RETURN_PART_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB
LOG_TAIL_BYTES = 2 * 2**20  # of each part's log copied into gpu_check.log
ERROR_TAIL_CHARS = 3000
SITE_PYTHON = (3, 12)  # the GPU machine's python3, which scripts/gpu_check_prepare.sh downloads for


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU check's sizes, or the dry run's tiny CPU ones."""

    device: str  # cuda | cpu
    amp: str  # bf16 on the GPU; off on the CPU, where bf16 autocast is emulated and ~26x slower
    compile: bool
    backend: str  # the DDP part's process group: nccl | gloo
    total_s: float  # the whole check, the machine's start and the transfers excluded
    budgets: dict[str, float]  # seconds for parts a-c; d gets what is left
    resnet_batches: tuple[int, ...]  # (b) candidates, largest first
    vit_arch: str
    vit_batches: tuple[int, ...]
    warmup_steps: int  # (b) untimed steps (the first one compiles)
    timed_steps: int  # (b) at most this many timed steps ...
    timed_s: float  # ... or this many seconds, whichever comes first
    workers: int  # data-loading processes
    ddp_images: int
    ddp_steps: int
    recipe_batch: int
    max_epochs: int
    per_class: int | None  # (d) images per class of train/ and test/ (None: all)
    startup_s: float  # (d) train start-up besides compiling: imports, validating 50k files, loader
    epoch_overhead_s: float  # (d) per epoch: checkpoint, curves.png, loader turnover
    knn_reserve_s: float  # (d) time kept for export and kNN after training
    rate_share: float  # (d) the share of (b)'s MoCo rate expected at -b 512 on real data


GPU = Sizes(
    device="cuda",
    amp="bf16",
    compile=True,
    backend="nccl",
    total_s=450.0,
    budgets={"cuda_tests": 110.0, "throughput": 150.0, "ddp": 50.0},
    resnet_batches=(4096, 2048, 1024, 512),
    vit_arch="vit_small",
    vit_batches=(512, 256, 128, 64),
    warmup_steps=3,
    timed_steps=30,
    timed_s=8.0,
    workers=min(16, os.cpu_count() or 1),
    ddp_images=1024,
    ddp_steps=4,
    recipe_batch=512,
    max_epochs=200,
    per_class=None,
    startup_s=25.0,
    epoch_overhead_s=2.0,
    knn_reserve_s=60.0,
    rate_share=0.6,
)
DRY = dataclasses.replace(
    GPU,
    device="cpu",
    amp="off",
    compile=False,
    backend="gloo",
    total_s=420.0,  # seconds each on an idle CPU; the boxes leave room for a loaded CI machine
    budgets={"cuda_tests": 90.0, "throughput": 120.0, "ddp": 90.0},
    resnet_batches=(16, 8),
    vit_arch="vit_tiny_32",
    vit_batches=(8, 4),
    warmup_steps=1,
    timed_steps=2,
    timed_s=5.0,
    workers=2,
    ddp_images=16,
    ddp_steps=2,
    recipe_batch=16,
    max_epochs=1,
    per_class=16,
    startup_s=8.0,
    epoch_overhead_s=1.0,
    knn_reserve_s=25.0,
    rate_share=0.5,
)


# -- small helpers ---------------------------------------------------------------------------------
class Clock:
    """The check's deadline: every part's time box is cut to what is left of the total."""

    def __init__(self, total_s: float) -> None:
        self.start, self.total = time.monotonic(), total_s

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)


def tail(path: Path, chars: int = ERROR_TAIL_CHARS) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def run_logged(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str], stdout: Path | None = None
) -> int | None:
    """Run cmd in its own session with its output in `log` (stdout apart when given); its exit
    status, or None when it outran `timeout` and its whole process group was killed (torchrun's
    workers and DataLoader workers included)."""
    with open(log, "ab") as err, open(stdout or log, "ab") as out:
        err.write(f"$ {' '.join(cmd)}\n".encode())
        err.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            err.write(f"\n[gpu_check] killed after {timeout:.0f} s\n".encode())
            return None


def child_env(site: Path | None, dry_run: bool) -> dict[str, str]:
    """The children's environment: the repository and the carried packages importable; in the dry
    run no GPU is visible, so that it takes the CPU path on any machine."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(site or ""), env.get("PYTHONPATH", "")]))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_for_return(path: Path, out_dir: Path, part_bytes: int = RETURN_PART_BYTES) -> dict[str, Any]:
    """Copy `path` into out_dir whole, or in numbered parts when it exceeds what the device tool
    returns per file; `cat NAME.part-* > NAME` joins them (sha256 given to check)."""
    size = path.stat().st_size
    if size <= part_bytes:
        shutil.copy2(path, out_dir / path.name)
        return {"file": path.name, "bytes": size, "sha256": sha256(path), "parts": [path.name]}
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            name = f"{path.name}.part-{i:02d}"
            (out_dir / name).write_bytes(block)
            parts.append(name)
    return {
        "file": path.name,
        "bytes": size,
        "sha256": sha256(path),
        "parts": parts,
        "join": f"cat {path.name}.part-* > {path.name}",
    }


def epochs_for(
    budget_s: float, img_per_s: float, images: int, startup_s: float, epoch_overhead_s: float, max_epochs: int
) -> int:
    """Whole epochs of `images` at `img_per_s` that fit in budget_s after start-up, each paying its
    per-epoch overhead; at least 1 (a run that cannot finish one is cut by its deadline)."""
    if img_per_s <= 0:
        return 1
    per_epoch = images / img_per_s + epoch_overhead_s
    return max(1, min(max_epochs, math.floor((budget_s - startup_s) / per_epoch)))


def recipe_pipeline() -> str:
    """(d)'s data path: the GPU tensor pipeline where the trainer has --data-pipeline, else PIL."""
    return "tensor" if has_field("data_pipeline") else "pil"


def has_field(name: str) -> bool:
    """Whether TrainConfig has the option (another change adds --data-pipeline)."""
    from moco_train.config import TrainConfig

    return name in {f.name for f in dataclasses.fields(TrainConfig)}


# -- setup: carried packages, CIFAR-10, the machine ------------------------------------------------
def unpack_site(carry: Path, work: Path) -> Path | None:
    """The carried packages (carry/site.tar.xz: faiss-cpu, grpcio and friends, unpacked wheels)
    in work/site, first on sys.path here and on PYTHONPATH in the children; or loose wheels
    (carry/*.whl), unzipped there, which is what pip install --target does for them."""
    archive, wheels = carry / "site.tar.xz", sorted(carry.glob("*.whl"))
    if not archive.exists() and not wheels:
        return None
    if sys.version_info[:2] != SITE_PYTHON:  # grpcio's wheel is built for the GPU machine's python3 alone
        print(f"[gpu_check] not using {carry}: its wheels are for Python {SITE_PYTHON}", file=sys.stderr)
        return None
    site = work / "site"
    site.mkdir(parents=True, exist_ok=True)
    if archive.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(site, filter="data")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    sys.path.insert(0, str(site))
    return site


def unpack_cifar(source: Path, work: Path, per_class: int | None) -> Path:
    """A folder with train/<class>/ and test/<class>/: `source` itself, or the archive unpacked;
    with per_class, the first per_class images (sorted names) of each class of each split."""
    if source.is_dir():
        root = source
    else:
        root = work / "cifar10"
        with tarfile.open(source) as tar:
            tar.extractall(root, filter="data")
    if per_class is None:
        return root
    subset = work / "cifar10_subset"
    for split in ("train", "test"):
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (subset / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:per_class]:
                (subset / split / class_dir.name / f.name).symlink_to(f.resolve())
    return subset


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; the optional packages' versions (or why they are missing)."""
    import torch
    import torch.distributed

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
        if torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    for module in ("torchvision", "numpy", "grpc", "google.protobuf", "faiss", "onnxruntime"):
        try:
            info[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is a finding, not a failure of the check
            info[module] = f"missing: {type(exc).__name__}: {exc}"
    if not str(info["faiss"]).startswith("missing"):
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return info


# -- (a) the CUDA tests ----------------------------------------------------------------------------
def junit_outcomes(xml: Path) -> dict[str, dict[str, str]]:
    """{test id: {outcome, message}} from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:ERROR_TAIL_CHARS]
                break
        outcomes[test_id] = {"outcome": outcome, "message": message}
    return outcomes


def part_cuda_tests(ctx: Context, budget: float) -> dict[str, Any]:
    xml = ctx.out / "cuda_tests.xml"
    log = ctx.log("cuda_tests")
    cmd = [sys.executable, "-m", "pytest", CUDA_TESTS, "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    rc = run_logged(cmd, log, budget, ctx.env)
    tests = junit_outcomes(xml) if xml.exists() else {}
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    passed = rc == 0 and bool(tests) and counts["failed"] == counts["error"] == 0
    error = None if passed else ("timed out" if rc is None else f"pytest exit status {rc}") + f"\n{tail(log)}"
    return {"passed": passed, "error": error, "exit_status": rc, "counts": counts, "tests": tests}


# -- (b) throughput, in a child process (--throughput-worker) --------------------------------------
def _timed(step, batch: int, sizes: Sizes, sync) -> dict[str, float]:
    """Warm-up steps (the first compiles), then steps until timed_steps or timed_s: img/s."""
    start = time.perf_counter()
    for _ in range(sizes.warmup_steps):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    while steps < sizes.timed_steps and (steps == 0 or time.perf_counter() - start < sizes.timed_s):
        step()
        steps += 1
    sync()
    elapsed = time.perf_counter() - start
    return {"img_per_s": round(batch * steps / elapsed, 1), "timed_steps": steps, "warmup_s": round(warmup_s, 1)}


def measure_model(name: str, cfg_fields: dict[str, Any], batches: tuple[int, ...], sizes: Sizes, work: Path) -> dict:
    """MoCo's training step (Trainer.train_step on device-resident random batches: no data loading)
    at the largest candidate batch that fits, compiled as --compile on does it, and the bare
    backbone's forward + backward + SGD step on the same batch and precision, in this process."""
    import torch

    from moco_retrieval.architectures import build_backbone
    from moco_train.config import TrainConfig
    from moco_train.trainer import Trainer

    trainer = Trainer(
        TrainConfig(
            run_dir=str(work / name),
            batch_size=max(batches),
            device=sizes.device,
            amp=sizes.amp,
            compile="off",  # compiled below, once the batch is chosen
            workers=0,
            max_steps=10_000,
            progress=False,
            # no corpus decoded up front for a loader these timings never use
            **({"data_pipeline": "pil"} if has_field("data_pipeline") else {}),
            **cfg_fields,
        )
    )
    device, size = trainer.device, trainer.preprocessing.input_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch_of(n: int) -> torch.Tensor:
        return torch.randn(n, 3, size, size, device=device)

    chosen, tried = None, []
    for batch in batches:  # eager probe: one step per candidate, largest first
        try:
            trainer.train_step(batch_of(batch), batch_of(batch))
            sync()
            chosen = batch
            break
        except torch.OutOfMemoryError:
            tried.append(batch)
            torch.cuda.empty_cache()
    if chosen is None:
        raise RuntimeError(f"{name}: none of the batches {batches} fits")
    if sizes.compile:
        for encoder in trainer.model.encoders():
            encoder.compile()  # in place, as the trainer's --compile on
    im_q, im_k = batch_of(chosen), batch_of(chosen)
    moco = _timed(lambda: trainer.train_step(im_q, im_k), chosen, sizes, sync)

    bare_model = build_backbone(cfg_fields["arch"], cifar_stem=trainer.cifar_stem).to(device)
    optimizer = torch.optim.SGD(bare_model.parameters(), lr=1e-3, momentum=0.9)
    if sizes.compile:
        bare_model.compile()
    autocast = torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None)

    def bare_step() -> None:
        with autocast:
            loss = bare_model(im_q).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    bare = _timed(bare_step, chosen, sizes, sync)
    result = {
        "arch": cfg_fields["arch"],
        "method": "v3" if cfg_fields.get("moco_v3") else "v2",
        "input_size": size,
        "batch": chosen,
        "batches_that_did_not_fit": tried,
        "amp": str(trainer.amp_dtype),
        "compiled": sizes.compile,
        "moco_img_per_s": moco["img_per_s"],
        "moco_warmup_s": moco["warmup_s"],
        "bare_img_per_s": bare["img_per_s"],
        "bare_warmup_s": bare["warmup_s"],
        "moco_over_bare": round(moco["img_per_s"] / bare["img_per_s"], 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }
    return result


def recipe_data_rate(data: str, pipeline: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Pairs/s that (d)'s data path delivers at (d)'s batch, with no model step in between: the
    trainer's own loader (DataLoader workers decoding and augmenting with PIL, or the tensor
    pipeline's batched augmentation on the device), over two epochs of the folder."""
    from moco_train.config import TrainConfig
    from moco_train.trainer import Trainer

    fields = {"data_pipeline": pipeline} if has_field("data_pipeline") else {}
    trainer = Trainer(
        TrainConfig(
            data=data,
            run_dir=str(work / "data_rate"),
            batch_size=sizes.recipe_batch,
            device=sizes.device,
            compile="off",
            workers=sizes.workers,
            mlp=True,
            aug_plus=True,
            progress=False,
            **fields,
        )
    )
    start, pairs = None, 0
    for epoch in range(2):
        trainer.epoch = epoch
        for im_q, *_ in trainer._loader():  # the loader train() iterates, as it builds it
            if start is None:  # timed from the first batch: worker start-up and decoding excluded
                start = time.perf_counter()
                continue
            pairs += im_q.shape[0]
    elapsed = time.perf_counter() - start if start else 0.0
    pipeline_used = getattr(trainer, "data_pipeline", "pil")
    return {"data_pipeline": pipeline_used, "img_per_s": round(pairs / elapsed, 1) if pairs else 0.0}


def throughput_worker(args: argparse.Namespace) -> None:
    """ResNet-18, then (d)'s data rate, then the ViT (the slowest to compile, so a time box that
    runs out cuts it and not what (d) plans with); the result file is rewritten after each."""
    sizes = Sizes(**json.loads(args.sizes))
    sizes = dataclasses.replace(sizes, resnet_batches=tuple(sizes.resnet_batches), vit_batches=tuple(sizes.vit_batches))
    out, work = Path(args.result), Path(args.work)
    resnet = {"arch": "resnet18", "mlp": True, "aug_plus": True, "cos": True, "data": args.data}
    resnet["moco_k"] = max(sizes.resnet_batches)  # the queue holds at least one batch of keys
    vit = {"arch": sizes.vit_arch, "moco_v3": True, "data": args.data}
    measurements = {
        "resnet18_v2": lambda: measure_model("resnet18_v2", resnet, sizes.resnet_batches, sizes, work),
        "recipe_data": lambda: recipe_data_rate(args.data, args.pipeline, sizes, work),
        f"{sizes.vit_arch}_v3": lambda: measure_model("vit_v3", vit, sizes.vit_batches, sizes, work),
    }
    results: dict[str, Any] = {}
    for name, measure in measurements.items():
        try:
            results[name] = {"passed": True, **measure()}
        except Exception as exc:  # noqa: BLE001 - recorded; the next measurement still runs
            results[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write_text(json.dumps(results, indent=2))
        release_gpu_memory()


def release_gpu_memory() -> None:
    """The last model's memory back to the GPU before the next one probes its batch sizes."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part_throughput(ctx: Context, budget: float) -> dict[str, Any]:
    # A folder of real CIFAR images as large as the largest batch (the trainer wants a full batch
    # of files; the timed steps themselves use device-resident random batches).
    data = ctx.work / "throughput_data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    files = sorted((ctx.cifar / "train").rglob("*.jpg"))
    need = max(ctx.sizes.resnet_batches + ctx.sizes.vit_batches)
    for i in range(need):
        (data / f"{i:05d}.jpg").symlink_to(files[i % len(files)])
    result_file = ctx.work / "throughput.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--throughput-worker",
        "--data",
        str(data),
        "--result",
        str(result_file),
        "--work",
        str(ctx.work / "throughput_runs"),
        "--sizes",
        json.dumps(dataclasses.asdict(ctx.sizes)),
        "--pipeline",
        recipe_pipeline(),
    ]
    log = ctx.log("throughput")
    rc = run_logged(cmd, log, budget, ctx.env)
    models = json.loads(result_file.read_text()) if result_file.exists() else {}
    passed = rc == 0 and len(models) == 3 and all(m["passed"] for m in models.values())
    error = None
    if not passed:
        error = ("timed out" if rc is None else f"exit status {rc}") + f"\n{tail(log)}"
    return {"passed": passed, "error": error, "models": models}


# -- (c) DDP under torchrun, in a child process (--ddp-worker) -------------------------------------
def ddp_worker(args: argparse.Namespace) -> None:
    """One torchrun worker that joins a process group of `--backend` before the trainer starts. The
    trainer forms a group itself only for WORLD_SIZE > 1 (a single process trains without DDP), and
    one GPU holds one NCCL rank: so this is how one GPU exercises DDP and the collectives over NCCL."""
    import torch.distributed as dist
    import torch.nn as nn

    from moco_train.cli import build_parser, train_config
    from moco_train.trainer import Trainer

    dist.init_process_group(args.backend)  # env:// from torchrun
    try:
        argv = ["train", *json.loads(args.train_args)]
        trainer = Trainer(train_config(build_parser().parse_args(argv)))
        summary = trainer.fit()
        record = {
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "ddp": isinstance(trainer.net, nn.parallel.DistributedDataParallel),
            "device": str(trainer.device),
            "summary": summary,
        }
        Path(args.result).write_text(json.dumps(record, indent=2))
    finally:
        dist.destroy_process_group()


def part_ddp(ctx: Context, budget: float) -> dict[str, Any]:
    data = ctx.work / "ddp_data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for i, f in enumerate(sorted((ctx.cifar / "train").rglob("*.jpg"))[: ctx.sizes.ddp_images]):
        (data / f"{i:05d}.jpg").symlink_to(f)
    run_dir, record_file = ctx.work / "ddp_run", ctx.work / "ddp.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    batch = min(64, ctx.sizes.ddp_images)
    train_args = [
        str(data),
        "--run-dir",
        str(run_dir),
        "--v2",
        "-b",
        str(batch),
        "--moco-k",
        str(4 * batch),
        "--max-steps",
        str(ctx.sizes.ddp_steps),
        "--device",
        "auto" if ctx.sizes.device == "cuda" else "cpu",  # auto: cuda:LOCAL_RANK, the rank's own GPU
        "--amp",
        ctx.sizes.amp,
        "--compile",
        "off",
        "-j",
        "2",
        "--no-progress",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        str(Path(__file__).resolve()),
        "--ddp-worker",
        "--backend",
        ctx.sizes.backend,
        "--result",
        str(record_file),
        "--train-args",
        json.dumps(train_args),
    ]
    log = ctx.log("ddp")
    rc = run_logged(cmd, log, budget, ctx.env)
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    start = {}
    if (run_dir / "log.jsonl").exists():
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        start = next((r for r in records if r.get("event") == "start"), {})
    passed = (
        rc == 0
        and record.get("backend") == ctx.sizes.backend
        and record.get("ddp") is True
        and record.get("summary", {}).get("global_step") == ctx.sizes.ddp_steps
    )
    error = None if passed else ("timed out" if rc is None else f"exit status {rc}") + f"\n{tail(log)}"
    return {
        "passed": passed,
        "error": error,
        "backend": record.get("backend"),
        "ddp": record.get("ddp"),
        "world_size": record.get("world_size"),
        "device": record.get("device"),
        "loss": record.get("summary", {}).get("loss"),
        "log_start_record": {k: start.get(k) for k in ("device", "world_size", "amp", "bn", "bn_groups", "compiled")},
    }


# -- (d) the CIFAR recipe in the remaining minutes -------------------------------------------------
def committed_knn() -> dict[str, Any]:
    """The committed encoder's full-bank kNN figure and the k and tau it was measured with."""
    knn = json.loads(PRETRAINED_PROVENANCE.read_text())["knn"]
    return {"top1": knn["top1"], "k": knn["k"], "tau": knn["tau"], "bank": knn["bank"], "queries": knn["queries"]}


def part_cifar_recipe(ctx: Context, budget: float) -> dict[str, Any]:
    sizes = ctx.sizes
    train, test = ctx.cifar / "train", ctx.cifar / "test"
    images = sum(1 for _ in train.rglob("*.jpg"))
    pipeline = recipe_pipeline()
    measured = ctx.report["parts"].get("throughput", {}).get("models", {})
    resnet = measured.get("resnet18_v2", {})
    model_rate = resnet.get("moco_img_per_s", 0.0) * sizes.rate_share
    data_rate = measured.get("recipe_data", {}).get("img_per_s", 0.0)
    expected_rate = min(model_rate, data_rate) if data_rate else model_rate
    compile_s = resnet.get("moco_warmup_s", 0.0) if sizes.compile else 0.0
    train_budget = budget - sizes.knn_reserve_s
    epochs = epochs_for(
        train_budget, expected_rate, images, sizes.startup_s + compile_s, sizes.epoch_overhead_s, sizes.max_epochs
    )
    lr = 0.06 * sizes.recipe_batch / 512  # the official CIFAR-10 demo's 0.06 for -b 512, scaled linearly
    run_dir = ctx.work / "cifar_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "moco_train",
        "train",
        str(train),
        "--run-dir",
        str(run_dir),
        "--v2",
        "-b",
        str(sizes.recipe_batch),
        "--lr",
        f"{lr:g}",
        "--wd",
        "5e-4",
        "--moco-m",
        "0.99",
        "--moco-t",
        "0.1",
        "--epochs",
        str(epochs),
        "--device",
        sizes.device,
        "--amp",
        sizes.amp,
        "--compile",
        "on" if sizes.compile else "off",
        "-j",
        str(sizes.workers),
        "--keep",
        "1",
        "--seed",
        "0",
        "--no-progress",
        *(["--data-pipeline", pipeline] if pipeline == "tensor" else []),
    ]
    log = ctx.log("cifar_recipe")
    started = time.monotonic()
    rc = run_logged(cmd, log, train_budget, ctx.env, stdout=ctx.work / "cifar_train.out")
    train_s = time.monotonic() - started
    result: dict[str, Any] = {
        "data_pipeline": pipeline,
        "train_images": images,
        "batch": sizes.recipe_batch,
        "lr": lr,
        "epochs_planned": epochs,
        "expected_img_per_s": round(expected_rate, 1),
        "train_budget_s": round(train_budget, 1),
        "train_exit_status": rc,
        "train_s": round(train_s, 1),
        "cosine_completed": rc == 0,
    }
    records = []
    if (run_dir / "log.jsonl").exists():
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        shutil.copy2(run_dir / "log.jsonl", ctx.out / "cifar_log.jsonl")
    if (run_dir / "curves.png").exists():
        shutil.copy2(run_dir / "curves.png", ctx.out / "cifar_curves.png")
    epoch_records = [r for r in records if r.get("event") == "epoch"]
    result["epochs_done"] = len(epoch_records)
    if epoch_records:
        result["img_per_s"] = round(sum(r["img_per_s"] for r in epoch_records) / len(epoch_records), 1)
        result["epoch_s"] = round(sum(r["seconds"] for r in epoch_records) / len(epoch_records), 2)
        result["final_loss"] = round(epoch_records[-1]["loss"], 4)
    from moco_train.checkpoint import find_resume

    found = find_resume(run_dir)
    if found is None:
        return {"passed": False, "error": f"no checkpoint (train exit status {rc})\n{tail(log)}", **result}

    export = ctx.work / "encoder_fp16.pt"
    rc_export = run_logged(
        [sys.executable, "-m", "moco_train", "export", str(found[0]), str(export), "--fp16"],
        log,
        max(ctx.clock.left() - 5, 10),
        ctx.env,
    )
    if rc_export != 0 or not export.exists():
        return {"passed": False, "error": f"export failed ({rc_export})\n{tail(log)}", **result}
    result["encoder"] = split_for_return(export, ctx.out)
    reference = committed_knn()
    knn_out = ctx.work / "knn.out"
    rc_knn = run_logged(
        [
            sys.executable,
            "-m",
            "moco_train",
            "knn",
            "--bank",
            str(train),
            "--queries",
            str(test),
            "--checkpoint",
            str(export),
            "-k",
            str(reference["k"]),
            "--tau",
            str(reference["tau"]),
            "--batch-size",
            "1024",
            "-j",
            str(sizes.workers),
            "--json",
        ],
        log,
        max(ctx.clock.left() - 3, 10),
        ctx.env,
        stdout=knn_out,
    )
    if rc_knn != 0:
        return {"passed": False, "error": f"kNN failed ({rc_knn})\n{tail(log)}", **result}
    knn = json.loads(knn_out.read_text().strip().splitlines()[-1])
    full = (knn["bank_images"], knn["query_images"]) == (reference["bank"], reference["queries"])
    result.update(
        knn_top1=knn["top1"],
        knn_top5=knn["top5"],
        knn_k=knn["k"],
        knn_tau=knn["tau"],
        knn_bank=knn["bank_images"],
        knn_queries=knn["query_images"],
        fingerprint=knn["fingerprint"],
        committed_knn_top1=reference["top1"],
        comparable_to_committed=full,
        beats_committed=full and knn["top1"] > reference["top1"],
    )
    # Passed: the recipe trained, exported and evaluated end to end; whether it beats the committed
    # encoder is a finding (beats_committed), not a condition of the check.
    return {"passed": rc == 0, "error": None if rc == 0 else f"training cut at its deadline\n{tail(log)}", **result}


# -- the orchestration -----------------------------------------------------------------------------
@dataclass
class Context:
    """What the parts share: sizes, folders, the children's environment, the clock and the report."""

    sizes: Sizes
    out: Path
    work: Path
    cifar: Path
    env: dict[str, str]
    clock: Clock
    report: dict[str, Any]

    def log(self, part: str) -> Path:
        return self.work / f"{part}.log"


PARTS = {
    "cuda_tests": part_cuda_tests,
    "throughput": part_throughput,
    "ddp": part_ddp,
    "cifar_recipe": part_cifar_recipe,
}


def write_report(ctx: Context) -> None:
    ctx.report["wall_s"] = round(time.monotonic() - ctx.clock.start, 1)
    tmp = ctx.out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(ctx.report, indent=2) + "\n")
    tmp.replace(ctx.out / "gpu_check.json")


def append_log(ctx: Context, part: str) -> None:
    """The part's log (its last LOG_TAIL_BYTES) appended to OUT/gpu_check.log."""
    log = ctx.log(part)
    text = log.read_bytes()[-LOG_TAIL_BYTES:] if log.exists() else b""
    with open(ctx.out / "gpu_check.log", "ab") as f:
        f.write(f"\n===== {part} =====\n".encode() + text)


def run_part(ctx: Context, name: str) -> None:
    """One part in its time box (cut to what is left of the total); an exception is its failure."""
    left = ctx.clock.left()
    budget = ctx.sizes.budgets.get(name, left)
    budget = min(budget, left - 5)
    started = time.monotonic()
    if budget < 5:
        result: dict[str, Any] = {"passed": False, "error": f"skipped: {left:.0f} s left of the total"}
    elif name != "cuda_tests" and not (ctx.cifar / "train").is_dir():
        result = {"passed": False, "error": f"no CIFAR-10: {ctx.report.get('cifar')}"}
    else:
        try:
            result = PARTS[name](ctx, budget)
        except Exception as exc:  # noqa: BLE001 - one part's failure is recorded; the others still run
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}\n{tail(ctx.log(name))}"}
    result.update(seconds=round(time.monotonic() - started, 1), budget_s=round(budget, 1))
    ctx.report["parts"][name] = result
    append_log(ctx, name)
    write_report(ctx)
    print(f"[gpu_check] {name}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s", flush=True)


def default_cifar(carry: Path) -> Path:
    for candidate in (carry / "cifar10-jpg.tar.gz", REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"):
        if candidate.exists():
            return candidate
    return carry / "cifar10-jpg.tar.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="folder for gpu_check.json and the logs")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, each part in seconds")
    parser.add_argument("--carry", type=Path, default=REPO / ".gpucheck", help="what gpu_check_prepare.sh filled")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10 archive or folder (default: in --carry)")
    parser.add_argument("--total-s", type=float, help="the whole check's time box (default 450 s; dry run 420 s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    # internal: the child processes of parts (b) and (c)
    parser.add_argument("--throughput-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--train-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.throughput_worker:
        throughput_worker(args)
        return 0
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.out is None:
        parser.error("OUT is required")

    sizes = DRY if args.dry_run else GPU
    if args.total_s:
        sizes = dataclasses.replace(sizes, total_s=args.total_s)
    clock = Clock(sizes.total_s)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_bytes(b"")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report: dict[str, Any] = {"check": "gpu_check", "dry_run": args.dry_run, "sizes": dataclasses.asdict(sizes)}
    report["carry"] = {"folder": str(args.carry), "manifest": None}
    if (args.carry / "manifest.json").exists():
        report["carry"]["manifest"] = json.loads((args.carry / "manifest.json").read_text())
    site = unpack_site(args.carry, work)
    report["carry"]["site"] = str(site) if site else None
    report["machine"] = machine_info()
    report["parts"] = {}
    cifar_source = args.cifar or default_cifar(args.carry)
    ctx = Context(sizes, out, work, work / "no-cifar", child_env(site, args.dry_run), clock, report)
    try:
        started = time.monotonic()
        ctx.cifar = unpack_cifar(cifar_source, work, sizes.per_class)
        report["cifar"] = {"source": str(cifar_source), "unpack_s": round(time.monotonic() - started, 1)}
    except (OSError, tarfile.TarError) as exc:
        report["cifar"] = {"source": str(cifar_source), "error": f"{type(exc).__name__}: {exc}"}
    write_report(ctx)
    for name in args.parts.split(","):
        run_part(ctx, name)
    report["passed"] = all(p["passed"] for p in report["parts"].values())
    write_report(ctx)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({name: p["passed"] for name, p in report["parts"].items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
