"""Pretraining throughput of moco-train against lightly's MoCo, plus kNN quality at the same budget.

Both sides train the same model on the same data for the same number of steps, each in its own
child process(es), in one run of this script:
  * backbone: torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool), random init;
  * head: MoCo v2 MLP 512-512-128 (ours: --mlp; lightly: MoCoProjectionHead(512, 512, 128));
  * loss: InfoNCE with a K-key queue, tau 0.2 (ours: the MoCo module; lightly: NTXentLoss(memory_bank_size=(K, 128)));
  * key encoder momentum 0.99 (lightly: update_momentum on backbone and head, deactivate_requires_grad);
  * SGD lr 0.06 (lightly's example), momentum 0.9, weight decay 5e-4, constant lr, global batch -b;
  * augmentation: MoCo v2 (ours: --aug-plus; lightly: MoCoV2Transform(input_size=32), same ops/parameters);
  * data: the CIFAR-10 JPEG training folder (the first --train-per-class images of each class, as
    symlinks), decoded with PIL in DataLoader workers on both sides.
Lightly is driven by the training loop of its MoCo example (examples/pytorch/moco.py), which uses
plain BatchNorm without shuffling; ours uses its defaults (split-BN in one process, cross-process
shuffle-BN in two), i.e. it does MoCo's extra shuffle work. With 2 processes lightly runs under
torch DDP with DistributedSampler and NTXentLoss(gather_distributed=True) (keys of all ranks enter
its memory bank), ours under `moco-train train --nproc 2`. Mixed precision = bf16 autocast on the
CPU on both sides (lightly's example has none: the same torch.autocast wraps its forward).

Ours runs twice: eager, and with `--compile on` (torch.compile of both encoders, what
`--compile auto` picks for runs of 1,000 steps or more); lightly's example loop runs eager.

images/s: global batch x steps after --warmup, over the time between those steps (step-end
timestamps; start-up, file validation, compilation and the final checkpoint are excluded).
start-up: seconds from launch to the end of the first step (validation, model build, compilation).
Peak memory: the largest sum of resident set sizes over the whole process tree (trainers and data
workers; shared pages count once per process), sampled every 0.2 s. Mixed precision (bf16
autocast) runs only on CPUs that compute bf16 natively (elsewhere it is emulated: about 26x slower
than fp32 per step on the AVX2 machine of bench/results/train_throughput.json) and is recorded as
skipped otherwise. Quality: the 1-process fp32 case runs --quality-steps steps for ours (compiled)
and lightly, then the InstDisc kNN (k=200, tau=0.07, moco_retrieval.knn) top-1 on the first
--queries-per-class CIFAR-10 test images per class against the first --bank-per-class training
images per class, for both encoders and the random initialisation. Finally what each option buys
(ours, 1 process, fp32, eager): channels_last, no data workers, and plain BN (--bn none: what the
single-process shuffle-BN emulation costs).

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/train_throughput.py > /tmp/train_throughput.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from moco_retrieval.architectures import build_resnet
from moco_retrieval.devices import cpu_has_native_bf16
from moco_retrieval.export import export_model, make_export
from moco_retrieval.net import free_port
from moco_retrieval.preprocessing import Preprocessing
from moco_train.checkpoint import find_resume, to_export
from moco_train.evaluate import knn_evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import class_subset, ensure_cifar  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, MOMENTUM, WD, KEY_MOMENTUM, TAU, DIM = 0.06, 0.9, 5e-4, 0.99, 0.2, 128


# -- lightly's side (runs in the child processes) ------------------------------------------------
def lightly_worker(args: argparse.Namespace) -> None:
    """lightly's MoCo example loop on a CIFAR-stem ResNet-18; writes step-end times (rank 0)."""
    import torch.distributed as dist
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform
    from torch import nn

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
        dist.init_process_group("gloo")
    torch.manual_seed(args.seed)

    class MoCo(nn.Module):  # as in lightly's examples/pytorch/moco.py
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = MoCoProjectionHead(512, 512, DIM)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    model = MoCo(resnet)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    transform = MoCoV2Transform(input_size=32)
    dataset = torchvision.datasets.ImageFolder(args.data, transform=transform)
    sampler = torch.utils.data.DistributedSampler(dataset, seed=args.seed, drop_last=True) if world > 1 else None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size // world,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    criterion = NTXentLoss(temperature=TAU, memory_bank_size=(args.moco_k, DIM), gather_distributed=world > 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp)
    times, step, epoch = [], 0, 0
    while step < args.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            x_query, x_key = batch[0]
            update_momentum(model.backbone, model.backbone_momentum, m=KEY_MOMENTUM)
            update_momentum(model.projection_head, model.projection_head_momentum, m=KEY_MOMENTUM)
            with amp:
                query = net(x_query)
                key = model.forward_momentum(x_key)
                loss = criterion(query.float(), key.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss.item()
            times.append(time.time())
            step += 1
            if step == args.steps:
                break
        epoch += 1
    if rank == 0:
        Path(args.out, "times.json").write_text(json.dumps(times))
        torch.save(model.backbone.state_dict(), Path(args.out, "backbone.pt"))
    if world > 1:
        dist.destroy_process_group()


# -- the orchestrator ----------------------------------------------------------------------------
def run_tree(procs: list[subprocess.Popen]) -> int:
    """Wait for the processes; the peak summed RSS (bytes) of them and all their descendants."""
    peak = 0
    roots = [psutil.Process(p.pid) for p in procs]
    while any(p.poll() is None for p in procs):
        rss = 0
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    rss += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        peak = max(peak, rss)
        time.sleep(0.2)
    for p in procs:
        if p.returncode != 0:
            raise RuntimeError(f"{p.args} exited with {p.returncode}")
    return peak


def rate(times: list[float], batch: int, warmup: int) -> float:
    return batch * (len(times) - 1 - warmup) / (times[-1] - times[warmup])


def measured(times: list[float], peak_rss: int, launched: float, args) -> dict:
    """images/s after warm-up, peak RSS (MB) and seconds from launch to the end of the first step."""
    return {
        "img_per_s": rate(times, args.batch_size, args.warmup),
        "peak_rss_mb": peak_rss / 2**20,
        "startup_s": times[0] - launched,
    }


def run_ours(
    work: Path,
    args,
    nproc: int,
    amp: bool,
    steps: int,
    workers: int,
    compile: bool = False,  # noqa: A002 - the --compile flag's name
    channels_last: bool = False,
    bn: str = "auto",
) -> dict:
    run_dir = work / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "moco_train",
        "train",
        str(args.train),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(steps),
        "-b",
        str(args.batch_size),
        "--moco-k",
        str(args.moco_k),
        "--moco-m",
        str(KEY_MOMENTUM),
        "--moco-t",
        str(TAU),
        "--mlp",
        "--aug-plus",
        "--lr",
        str(LR),
        "--momentum",
        str(MOMENTUM),
        "--wd",
        str(WD),
        "--schedule",
        "-j",
        str(workers),
        "--amp",
        "bf16" if amp else "off",
        "--seed",
        "0",
        "--no-progress",
        "--keep",
        "1",
        "--nproc",
        str(nproc),
        "--compile",
        "on" if compile else "off",
        "--bn",
        bn,
        *(["--channels-last"] if channels_last else []),
    ]
    launched = time.time()
    peak = run_tree([subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)])
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r["event"] == "step"]
    return {**measured(times, peak, launched, args), "run_dir": run_dir}


def run_lightly(work: Path, args, nproc: int, amp: bool, steps: int, workers: int) -> dict:
    out = work / "lightly"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        __file__,
        "--lightly-worker",
        "--data",
        str(args.train),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        str(args.batch_size),
        "--moco-k",
        str(args.moco_k),
        "--workers",
        str(workers),
        *(["--amp"] if amp else []),
    ]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    launched = time.time()
    peak = run_tree(
        [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    )
    times = json.loads((out / "times.json").read_text())
    return {**measured(times, peak, launched, args), "out": out}


def knn_top1(blob: dict, bank: Path, queries: Path) -> float:
    model, meta = export_model(blob)
    return knn_evaluate(model, meta, bank, queries, workers=2).top1


def compare(work: Path, args, nproc: int, amp: bool, steps: int, workers: int) -> tuple[dict, dict]:
    """One case: ours eager, ours compiled and lightly, same data, steps and precision."""
    eager = run_ours(work, args, nproc, amp, args.steps, workers)
    compiled = run_ours(work, args, nproc, amp, steps, workers, compile=True)
    peer = run_lightly(work, args, nproc, amp, steps, workers)
    case = {
        "processes": nproc,
        "precision": "bf16 autocast" if amp else "fp32",
        "steps": steps,
        "eager_steps": args.steps,
        "data_workers_per_process": workers,
    }
    for name, result in (("ours_eager", eager), ("ours_compiled", compiled), ("lightly", peer)):
        case.update(
            {
                f"{name}_img_per_s": round(result["img_per_s"], 2),
                f"{name}_startup_s": round(result["startup_s"], 1),
                f"{name}_peak_rss_mb": round(result["peak_rss_mb"]),
            }
        )
    case["ratio_eager"] = round(eager["img_per_s"] / peer["img_per_s"], 3)
    case["ratio_compiled"] = round(compiled["img_per_s"] / peer["img_per_s"], 3)
    return case, {"ours": compiled, "lightly": peer}


def knn_quality(args, work: Path, ours: dict, peer: dict) -> dict:
    """kNN top-1 of ours, lightly's and the randomly initialised encoder on the same bank and queries."""
    bank = class_subset(args.cifar / "train", args.bank_per_class, work / "bank")
    queries = class_subset(args.cifar / "test", args.queries_per_class, work / "queries")
    _, ckpt = find_resume(ours["run_dir"])
    preprocessing = Preprocessing.for_input_size(32)
    lightly_blob = make_export(
        torch.load(peer["out"] / "backbone.pt", weights_only=True),
        arch="resnet18",
        cifar_stem=True,
        preprocessing=preprocessing,
        source="lightly",
    )
    torch.manual_seed(0)
    init_blob = make_export(
        build_resnet("resnet18", cifar_stem=True).state_dict(),
        arch="resnet18",
        cifar_stem=True,
        preprocessing=preprocessing,
        source="random init",
    )
    return {
        "ours_knn_top1": knn_top1(to_export(ckpt, "ours"), bank, queries),
        "lightly_knn_top1": knn_top1(lightly_blob, bank, queries),
        "random_init_knn_top1": knn_top1(init_blob, bank, queries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--moco-k", type=int, default=4096)
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=5000,
        help="train on the first N training images of each class (5000: all; fewer shortens both trainers' start-up)",
    )
    parser.add_argument("--steps", type=int, default=8, help="steps of each throughput case")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the rate")
    parser.add_argument(
        "--quality-steps",
        type=int,
        default=250,
        help="steps of the 1-process fp32 case, ours (compiled) and lightly, then kNN",
    )
    parser.add_argument("--bank-per-class", type=int, default=500)
    parser.add_argument("--queries-per-class", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.json")
    parser.add_argument("--summary", action="store_true", help="print the tables of the --out results and exit")
    # internal: one lightly training process
    parser.add_argument("--lightly-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lightly_worker:
        args.out = Path(args.out)
        lightly_worker(args)
        return
    if args.summary:
        print(summary(json.loads(args.out.read_text())))
        return

    import lightly

    start = time.time()
    ensure_cifar(args.cifar)
    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    args.train = class_subset(args.cifar / "train", args.train_per_class, work / "train")
    cores = len(os.sched_getaffinity(0))
    native_bf16 = cpu_has_native_bf16()
    cases, skipped, ablations = [], [], []
    for nproc in (1, 2):
        workers = max(1, cores // nproc)  # data workers per process, the same on both sides
        for amp in (False, True):
            if amp and not native_bf16:
                skipped.append(
                    {
                        "processes": nproc,
                        "precision": "bf16 autocast",
                        "why": "this CPU has no native bf16 (AVX512-BF16/AMX): emulated, far slower than fp32",
                    }
                )
                continue
            quality = (nproc, amp) == (1, False)
            case, results = compare(work, args, nproc, amp, args.quality_steps if quality else args.steps, workers)
            if quality:
                case.update(knn_quality(args, work, results["ours"], results["lightly"]))
            cases.append(case)
            print(json.dumps(case), flush=True)
    # What each option buys (ours, 1 process, fp32, eager).
    for name, kwargs in [
        (f"default (fp32, contiguous, {cores} workers, split-BN)", {}),
        ("channels_last", dict(channels_last=True)),
        ("0 data workers", dict(workers=0)),
        ("plain BN (--bn none: no shuffle-BN emulation)", dict(bn="none")),
    ]:
        opts = {"amp": False, "workers": cores, **kwargs}
        result = run_ours(work, args, 1, steps=args.steps, **opts)
        ablations.append(
            {"variant": name, "img_per_s": round(result["img_per_s"], 2), "peak_rss_mb": round(result["peak_rss_mb"])}
        )
        print(json.dumps(ablations[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "train_throughput",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": cores,
            "native_bf16": native_bf16,
            "torch": torch.__version__,
            "lightly": lightly.__version__,
        },
        "setup": {
            "model": "resnet18 CIFAR stem + MLP head 512-512-128",
            "batch_size": args.batch_size,
            "moco_k": args.moco_k,
            "tau": TAU,
            "lr": LR,
            "weight_decay": WD,
            "key_momentum": KEY_MOMENTUM,
            "augmentation": "MoCo v2 (32 px)",
            "data": str(args.cifar / "train"),
            "train_images_per_class": args.train_per_class,
            "warmup_steps": args.warmup,
            "knn": {
                "k": 200,
                "tau": 0.07,
                "bank_per_class": args.bank_per_class,
                "queries_per_class": args.queries_per_class,
            },
        },
        "cases": cases,
        "skipped": skipped,
        "ablations_ours_1proc": ablations,
        "wall_s": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))


def summary(report: dict) -> str:
    """The README's tables, from a result file."""
    lines = [
        "| processes | precision | ours eager img/s | ours compiled img/s | lightly img/s | eager / lightly | "
        "compiled / lightly | start-up s (eager · compiled · lightly) | peak RSS MB (eager · compiled · lightly) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['processes']} | {c['precision']} | {c['ours_eager_img_per_s']} | "
            f"{c['ours_compiled_img_per_s']} | {c['lightly_img_per_s']} | {c['ratio_eager']} | {c['ratio_compiled']} | "
            f"{c['ours_eager_startup_s']} · {c['ours_compiled_startup_s']} · {c['lightly_startup_s']} | "
            f"{c['ours_eager_peak_rss_mb']} · {c['ours_compiled_peak_rss_mb']} · "
            f"{c['lightly_peak_rss_mb']} |"
        )
    for q in (c for c in report["cases"] if "ours_knn_top1" in c):
        lines.append(
            f"\nkNN top-1 after {q['steps']} steps ({q['precision']}, {q['processes']} process): ours "
            f"{q['ours_knn_top1']:.1f}%, lightly {q['lightly_knn_top1']:.1f}%, random init "
            f"{q['random_init_knn_top1']:.1f}%"
        )
    lines += ["\n| ours, 1 process | img/s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {a['variant']} | {a['img_per_s']} | {a['peak_rss_mb']} |" for a in report["ablations_ours_1proc"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
