"""SimCLR, BYOL and Barlow Twins: moco-train's implementation of each against lightly's, at equal budget.

For each method, two runs one after the other on the 50,000 CIFAR-10 training images (labels never
used), then the kNN top-1 (k=200, the shared moco_retrieval.knn) of each backbone's pooled features,
the 10,000 test images against the 50,000 training images (bench/cifar.py). Both sides get:
  * model: torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool), random init,
    and the method's heads at the same widths: SimCLR 512-512-128, BYOL projector and predictor
    4096-256, Barlow Twins projector 2048-2048-2048 (ours: moco-train's defaults; lightly:
    SimCLRProjectionHead, BYOLProjectionHead + BYOLPredictionHead, BarlowTwinsProjectionHead);
  * loss: ours (moco_train/simclr.py, byol.py, barlow.py) against lightly's NTXentLoss (τ 0.5, our
    small-image default), NegativeCosineSimilarity (as in lightly's BYOL example) and
    BarlowTwinsLoss (λ 5e-3);
  * augmentation: the small-image recipes: SimCLR's view with colour strength 0.5, no blur
    (lightly: SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0)); BYOL's asymmetric
    pair without blur for BYOL and Barlow Twins (lightly: BYOLTransform with both views'
    gaussian_blur=0); crop scale 0.08-1, ImageNet normalisation;
  * schedule: batch --batch, one epoch, LARS (moco_train.optim.LARS on both sides: biases and BN
    parameters excluded from the adaptation and weight decay) at our resolved rate and weight decay
    for the method (base lr x batch/256: SimCLR 1.0 and wd 1e-4 (its CIFAR-10 command), BYOL and
    Barlow Twins 0.2 and 1.5e-6), linear warm-up over the first 10% of the steps then a half-cosine
    (moco_train.optim.lr_factor, per step); BYOL's target momentum 0.996 -> 1 on a cosine per step
    (ours: optim.cosine_momentum; lightly: its cosine_schedule);
  * precision: bf16 autocast where the CPU computes it natively, else float32; data: PIL decoding
    and augmentation in 2 DataLoader workers.
lightly is driven by the loop of its examples for each method (examples/pytorch/simclr.py, byol.py,
barlowtwins.py): each view through the networks on its own; ours by `moco-train train --method M`.
One run per side: read a difference of a point or two as noise.

Runs, lightly's backbones and the evaluations are kept in --work; a later start with --resume
continues (ours from its last checkpoint; an interrupted lightly run starts again) and skips what
is done. JSON and plot are rewritten after every method. The results already in --out of the methods a
run does not train are kept (when data, budget, batch and lightly match), so `--methods byol` completes
a comparison on another machine.

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/methods_vs_lightly.py > ~/.cache/moco-retrieval/methods_vs_lightly.log 2>&1 &
    $BVENV/bin/python bench/methods_vs_lightly.py --smoke    # minutes, in WORK/smoke: the whole path, tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from moco_retrieval.architectures import build_backbone
from moco_retrieval.devices import cpu_has_native_bf16
from moco_train.checkpoint import list_checkpoints
from moco_train.config import TrainConfig, resolve
from moco_train.optim import LARS, lr_factor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import (  # noqa: E402
    KNN_K,
    KNN_TAUS,
    cached,
    checkpoint_scores,
    cifar_parser,
    cifar_subset,
    ensure_cifar,
    eval_data,
    knn_scores,
    save_figure,
    state_scores,
    train_run,
    train_timeline,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ("simclr", "byol", "barlow")
WARMUP_SHARE = 0.1  # of the run's steps
COMMON = ["-j", "2", "--compile", "off", "--seed", "0", "--no-progress", "--keep", "1"]


def recipe(method: str, batch: int):
    """Our resolved recipe for the method on 32 px crops: both sides train with its rates and widths."""
    return resolve(TrainConfig(data="-", run_dir="-", method=method, batch_size=batch), small=True)


# -- lightly's side (a child process) -------------------------------------------------------------
def lightly_model(method: str, r) -> tuple[nn.Module, nn.Module | None, object, object]:
    """(backbone + heads as lightly's example builds them, the momentum copy or None, criterion,
    transform) for the method, at our recipe's widths."""
    import torchvision
    from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import (
        BarlowTwinsProjectionHead,
        BYOLPredictionHead,
        BYOLProjectionHead,
        SimCLRProjectionHead,
    )
    from lightly.models.utils import deactivate_requires_grad
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    byol_views = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0),
    )
    if method == "simclr":
        head = SimCLRProjectionHead(512, r.mlp_dim, r.moco_dim)
        transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
        return nn.ModuleDict({"backbone": backbone, "head": head}), None, NTXentLoss(temperature=r.moco_t), transform
    if method == "barlow":
        head = BarlowTwinsProjectionHead(512, r.mlp_dim, r.moco_dim)
        model = nn.ModuleDict({"backbone": backbone, "head": head})
        return model, None, BarlowTwinsLoss(lambda_param=5e-3), byol_views
    online = nn.ModuleDict(
        {
            "backbone": backbone,
            "head": BYOLProjectionHead(512, r.mlp_dim, r.moco_dim),
            "predictor": BYOLPredictionHead(r.moco_dim, r.mlp_dim, r.moco_dim),
        }
    )
    target = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(online["head"])})
    deactivate_requires_grad(target)
    return online, target, NegativeCosineSimilarity(), byol_views


def lightly_worker(args) -> None:
    """One lightly run: its example's loop with our optimizer and schedule; saves the backbone and
    the step-end times."""
    import torchvision
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(0)
    r = recipe(args.method, args.batch)
    model, target, criterion, transform = lightly_model(args.method, r)
    dataset = torchvision.datasets.ImageFolder(str(args.train), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    total = args.steps or len(loader)
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], r.lr, weight_decay=r.weight_decay)
    warmup = WARMUP_SHARE * total / len(loader)  # in epochs, as lr_factor takes it
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, len(loader), warmup, cos=True, schedule=[])
    )
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16())

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model["head"](model["backbone"](x).flatten(start_dim=1))

    times, step, start = [], 0, time.time()
    while step < total:
        for (x0, x1), _ in loader:
            with amp:
                if target is None:  # SimCLR, Barlow Twins: z0 = model(x0), z1 = model(x1)
                    loss = criterion(embed(x0).float(), embed(x1).float())
                else:  # BYOL: predictions of the online network against the target's projections
                    m = cosine_schedule(step, total, 0.996, 1)
                    update_momentum(model["backbone"], target["backbone"], m=m)
                    update_momentum(model["head"], target["head"], m=m)
                    p0, p1 = (model["predictor"](embed(x)).float() for x in (x0, x1))
                    with torch.no_grad():
                        z0, z1 = (target["head"](target["backbone"](x).flatten(start_dim=1)).float() for x in (x0, x1))
                    loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            times.append(time.time() - start)
            if step == total:
                break
    torch.save(model["backbone"].state_dict(), args.out / "backbone.pt")
    (args.out / "times.json").write_text(json.dumps(times))


# -- the orchestrator ----------------------------------------------------------------------------
def run_ours(args, method: str, data: dict, bf16: bool) -> dict:
    run_dir = args.work / f"ours-{method}"
    steps = args.steps or args.steps_per_epoch
    warmup = WARMUP_SHARE * steps / args.steps_per_epoch
    flags = [*COMMON, "--method", method, "-b", str(args.batch), "--warmup-epochs", str(warmup)]

    def evaluate() -> dict:
        if not any(p.stem == f"checkpoint_{steps:08d}" for p in list_checkpoints(run_dir)):
            train_run(args.train, run_dir, steps, [*flags, "--save-every-steps", "50", "--resume", "auto"])
        scores = checkpoint_scores(list_checkpoints(run_dir)[-1], data, bf16)
        return {"steps": steps, "train_seconds": round(train_timeline(run_dir)[steps], 1), "flags": flags, **scores}

    result = cached(args.work / "eval" / f"ours-{method}.json", evaluate)
    for path in list_checkpoints(run_dir):
        path.unlink()
    return result


def run_lightly(args, method: str, data: dict, bf16: bool) -> dict:
    out = args.work / f"lightly-{method}"

    def evaluate() -> dict:
        if not (out / "backbone.pt").exists():
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--lightly-worker", method, "--out", str(out), "--train", str(args.train)]
            cmd += ["--batch", str(args.batch), *(["--steps", str(args.steps)] if args.steps else [])]
            print("$ " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
        times = json.loads((out / "times.json").read_text())
        return {
            "steps": len(times),
            "train_seconds": round(times[-1], 1),
            **state_scores(out / "backbone.pt", data, bf16),
        }

    return cached(args.work / "eval" / f"lightly-{method}.json", evaluate)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = f"tau_{report['setup']['knn_tau']}"
    names = list(report["methods"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for offset, (side, color) in zip((-0.2, 0.2), (("ours", "tab:blue"), ("lightly", "tab:orange"))):
        top1 = [report["methods"][m][side][tau]["top1"] for m in names]
        bars = ax.bar([i + offset for i in range(len(names))], top1, width=0.4, color=color, label=side)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(report["baselines"]["random_init"][tau]["top1"], color="gray", linestyle=":", label="random init")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"kNN top-1 % (k={KNN_K}, τ={report['setup']['knn_tau']})")
    ax.set_title(
        f"moco-train vs lightly 1.6, {report['setup']['budget']}, batch {report['setup']['batch']}", fontsize=10
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def kept_methods(out: Path, setup: dict, methods: list[str]) -> dict:
    """The results in `out` of the methods this run does not train, when `out` was written with the
    same data, budget, batch and lightly: a later run of the missing methods (on another machine, say,
    where --work is gone) completes the comparison instead of dropping what is already measured."""
    if not out.is_file():
        return {}
    previous = json.loads(out.read_text())
    same = ("data", "budget", "batch", "knn_tau", "lightly")
    if any(previous.get("setup", {}).get(key) != setup[key] for key in same):
        return {}
    return {m: r for m, r in previous.get("methods", {}).items() if m not in methods}


def main() -> None:
    parser = cifar_parser(__doc__, "methods_vs_lightly")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=256, help="global batch of both sides")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of one epoch")
    parser.add_argument("--knn-tau", type=float, default=0.1, help="vote temperature of the plot")
    parser.add_argument("--resume", action="store_true", help="continue the runs and evaluations kept in --work")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the whole path in minutes: 30 training and 10 test images per class, batch 16, 4 steps; "
        "in WORK/smoke, writes WORK/smoke/methods_vs_lightly_smoke.json",
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/methods_vs_lightly.json")
    parser.add_argument("--lightly-worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lightly_worker:
        args.method, args.out = args.lightly_worker, Path(args.out)
        lightly_worker(args)
        return

    import lightly

    ensure_cifar(args.cifar)
    cifar = args.cifar
    if args.smoke:  # in WORK/smoke: never mixed with a full run's
        args.work = args.work / "smoke"
        cifar = cifar_subset(args.cifar, 30, 10, args.work / "cifar")
        args.batch, args.steps = 16, 4
    default_out = REPO / "bench" / "results" / "methods_vs_lightly.json"
    args.out = args.out or (args.work / "methods_vs_lightly_smoke.json" if args.smoke else default_out)
    if (args.work / "eval").is_dir() and not args.resume:
        raise SystemExit(f"{args.work} holds an earlier run: --resume continues it (or choose another --work)")
    args.train = cifar / "train"
    args.steps_per_epoch = sum(1 for _ in args.train.rglob("*.jpg")) // args.batch
    bf16 = cpu_has_native_bf16()
    data = eval_data(cifar, args.work / "images")
    torch.manual_seed(0)  # the trainers' initial backbone: each run seeds 0, then builds its encoder
    init = build_backbone("resnet18", cifar_stem=True).eval()
    report = {
        "benchmark": "methods_vs_lightly",
        "setup": {
            "data": f"CIFAR-10 ({len(data['train'][1])} training, {len(data['test'][1])} test images)",
            "budget": f"{args.steps} steps" if args.steps else "1 epoch",
            "batch": args.batch,
            "warmup": f"{WARMUP_SHARE:.0%} of the steps, then half-cosine",
            "knn_k": KNN_K,
            "knn_tau": args.knn_tau,
            "knn_taus": KNN_TAUS,
            "knn": "every test image against every training image (pooled backbone features)",
            "lightly": lightly.__version__,
        },
        "machine": machine_info(),
        "baselines": {"random_init": cached(args.work / "eval" / "random_init.json", knn_scores, init, data, bf16)},
        "methods": {},
    }
    kept = kept_methods(args.out, report["setup"], args.methods)
    report["methods"].update(kept)
    report["setup"]["recipes"] = {m: asdict(recipe(m, args.batch)) for m in [*kept, *args.methods]}
    for method in args.methods:
        ours, peer = run_ours(args, method, data, bf16), run_lightly(args, method, data, bf16)
        tau = f"tau_{args.knn_tau}"
        report["methods"][method] = {"ours": ours, "lightly": peer, "difference": ours[tau]["top1"] - peer[tau]["top1"]}
        report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_report(report, args.out, plot)
        print(json.dumps({method: {side: report["methods"][method][side][tau] for side in ("ours", "lightly")}}))


if __name__ == "__main__":
    main()
