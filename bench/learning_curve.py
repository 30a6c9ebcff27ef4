"""Learning curve on CIFAR-10: kNN top-1 against images seen, ours and lightly's MoCo side by side.

Both trainers get the same setup, taken from RECIPE below:
  * model: torchvision ResNet-18 with the CIFAR stem, MLP head 512-512-128, BatchNorm in 8 groups
    (ours: split-BN; lightly: its SplitBatchNorm) with the keys shuffled before the key encoder
    (ours: MoCo's shuffle-BN; lightly: batch_shuffle / batch_unshuffle);
  * MoCo: queue K=4096, key momentum 0.99, temperature --moco-t, asymmetric loss;
  * optimizer: SGD lr 0.06, momentum 0.9, weight decay 5e-4, batch 128, half-cosine over --epochs;
  * augmentation: the small-image recipe (crop scale 0.08-1, colour jitter 0.4/0.4/0.4/0.1 p=0.8,
    grayscale 0.2, flip, no blur; lightly: MoCoV2Transform(input_size=32, min_scale=0.08,
    gaussian_blur=0));
  * data: the 50,000 CIFAR-10 training JPEGs (labels never used), decoded in 2 DataLoader workers.
Ours is `moco-train train`, resumable with `--resume auto`; lightly is driven by the loop of its
MoCo examples. Every --eval-every steps the encoder is saved (past the equal-budget pair, ours is
measured every --long-eval-every steps); kNN top-1/top-5 (InstDisc, k=200, the
shared moco_retrieval.knn) of every saved encoder is measured on the 10,000 test images against all
50,000 training images, for several vote temperatures. Baselines: the same network at random init
and raw pixels. Features are computed under bf16 autocast where the CPU has native bf16 (2x faster);
the last point of ours is also measured in float32 (recorded as `final_fp32`).

Every phase is cached in --work: run the script again and it resumes training from the newest
checkpoint, skips what was measured, and rewrites the JSON and the plot.

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/learning_curve.py > ~/.cache/moco-retrieval/learning_curve.log 2>&1 &
    $BVENV/bin/python bench/learning_curve.py --report    # JSON + plot from what is measured so far
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from moco_retrieval.architectures import build_backbone
from moco_retrieval.devices import cpu_has_native_bf16
from moco_train.checkpoint import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import (  # noqa: E402
    KNN_K,
    KNN_TAUS,
    cached,
    checkpoint_scores,
    cifar_parser,
    ensure_cifar,
    eval_data,
    knn_scores,
    raw_pixel_scores,
    save_figure,
    state_scores,
    train_timeline,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = dict(
    batch_size=128, lr=0.06, momentum=0.9, wd=5e-4, moco_k=4096, moco_m=0.99, dim=128, bn_splits=8, workers=2, seed=0
)


def cosine(step: int, total: int) -> float:
    """The lr multiplier of both trainers: moco-train's --cos (half-cosine over the run, per step)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


# -- ours ----------------------------------------------------------------------------------------
def train_ours(args, run_dir: Path) -> None:
    """`moco-train train` with the recipe; --resume auto continues an interrupted run exactly."""
    r = RECIPE
    flags = {
        "--run-dir": run_dir,
        "--epochs": args.epochs,
        "-b": r["batch_size"],
        "--lr": r["lr"],
        "--momentum": r["momentum"],
        "--wd": r["wd"],
        "--moco-k": r["moco_k"],
        "--moco-m": r["moco_m"],
        "--moco-dim": r["dim"],
        "--moco-t": args.moco_t,
        "--bn": "split",
        "--bn-splits": r["bn_splits"],
        "-j": r["workers"],
        "--seed": r["seed"],
        "--compile": "off",
        "--save-every-steps": args.eval_every,
        "--keep": 0,
        "--resume": "auto",
    }
    cmd = [sys.executable, "-m", "moco_train", "train", str(args.cifar / "train"), "--v2", "--no-progress"]
    cmd += [str(x) for flag, value in flags.items() for x in (flag, value)]
    subprocess.run(cmd, cwd=REPO, check=True)


# -- lightly -------------------------------------------------------------------------------------
def lightly_worker(args) -> None:
    """lightly's MoCo (examples/pytorch/moco.py and its CIFAR-10 benchmark) with the recipe; saves the
    backbone (BN statistics collated over the splits) every --eval-every steps and the step times."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.batchnorm import SplitBatchNorm
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform

    r = RECIPE
    torch.manual_seed(r["seed"])
    out = Path(args.out)
    backbone = torchvision.models.resnet18(norm_layer=partial(SplitBatchNorm, num_splits=r["bn_splits"]))
    backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    head = MoCoProjectionHead(512, 512, r["dim"])
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    for m in (backbone_m, head_m):
        deactivate_requires_grad(m)
    transform = MoCoV2Transform(input_size=32, min_scale=0.08, gaussian_blur=0.0)
    dataset = torchvision.datasets.ImageFolder(str(args.cifar / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=r["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=r["workers"],
        persistent_workers=True,
        generator=torch.Generator().manual_seed(r["seed"]),
    )
    criterion = NTXentLoss(temperature=args.moco_t, memory_bank_size=(r["moco_k"], r["dim"]))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], weight_decay=r["wd"])
    total = args.epochs * args.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s, total))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16())
    stop = args.lightly_epochs * args.steps_per_epoch
    times, step, start = {}, 0, time.time()
    while step < stop:
        for (x_query, x_key), _ in loader:
            update_momentum(backbone, backbone_m, m=r["moco_m"])
            update_momentum(head, head_m, m=r["moco_m"])
            with amp:
                query = head(backbone(x_query))
                with torch.no_grad():
                    x_key, shuffle = batch_shuffle(x_key)
                    key = batch_unshuffle(head_m(backbone_m(x_key)), shuffle)
                loss = criterion(query.float(), key.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            times[step] = time.time() - start
            if step % args.eval_every == 0 or step == stop:
                torch.save(plain_bn_state(backbone), out / f"backbone_{step:08d}.pt")
                (out / "times.json").write_text(json.dumps(times))
            if step == stop:
                break


def plain_bn_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state with each SplitBatchNorm's per-split running statistics averaged into
    plain BatchNorm buffers (what lightly's SplitBatchNorm does when switched to eval mode)."""
    state = {}
    for name, value in backbone.state_dict().items():
        module = backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
        if name.endswith(("running_mean", "running_var")) and getattr(module, "num_splits", 1) > 1:
            value = value.view(module.num_splits, -1).mean(0)
        state[name] = value.detach().clone()
    return state


def train_lightly(args, out: Path) -> None:
    """Run the lightly worker in a child process (a fresh interpreter, as ours runs), unless done."""
    done = out / f"backbone_{args.lightly_epochs * args.steps_per_epoch:08d}.pt"
    if done.exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("backbone_*.pt"):
        stale.unlink()
    cmd = [
        sys.executable,
        __file__,
        "--lightly-worker",
        "--out",
        str(out),
        "--cifar",
        str(args.cifar),
        "--epochs",
        str(args.epochs),
        "--lightly-epochs",
        str(args.lightly_epochs),
        "--eval-every",
        str(args.eval_every),
        "--moco-t",
        str(args.moco_t),
    ]
    subprocess.run(cmd, cwd=REPO, check=True)


# -- evaluation ----------------------------------------------------------------------------------
def evaluate_all(args, work: Path, data: dict, bf16: bool) -> dict:
    """Every saved encoder of both trainers and the baselines (cached per encoder)."""
    evals = work / "eval"
    curves: dict[str, list[dict]] = {"ours": [], "lightly": []}
    pair_steps = args.lightly_epochs * args.steps_per_epoch
    for path in list_checkpoints(work / "ours"):
        step = int(path.stem.split("_")[1])
        if step % (args.eval_every if step <= pair_steps else args.long_eval_every):
            continue  # past the equal-budget pair, the long run is measured more sparsely
        curves["ours"].append(
            {"step": step, **cached(evals / f"ours_{step:08d}.json", checkpoint_scores, path, data, bf16)}
        )
    for path in sorted((work / "lightly").glob("backbone_*.pt")):
        step = int(path.stem.split("_")[1])
        if step % args.eval_every:
            continue
        curves["lightly"].append(
            {"step": step, **cached(evals / f"lightly_{step:08d}.json", state_scores, path, data, bf16)}
        )
    torch.manual_seed(RECIPE["seed"])  # ours' initial f_q: the trainer seeds, then builds the encoder
    init = build_backbone("resnet18", cifar_stem=True).eval()
    baselines = {
        "random_init": cached(evals / "random_init.json", knn_scores, init, data, bf16),
        "raw_pixels": cached(evals / "raw_pixels.json", raw_pixel_scores, data),
    }
    final = list_checkpoints(work / "ours")
    if (
        bf16
        and "fp32" not in args.skip
        and final
        and final[-1].stem == f"checkpoint_{args.epochs * args.steps_per_epoch:08d}"
    ):
        baselines["ours_final_fp32"] = cached(evals / "ours_final_fp32.json", checkpoint_scores, final[-1], data, False)
    return {"curves": curves, "baselines": baselines}


# -- report --------------------------------------------------------------------------------------
def lightly_timeline(out: Path) -> dict[int, float]:
    path = out / "times.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def attach_times(points: list[dict], timeline: dict[int, float], steps_per_epoch: int) -> None:
    for p in points:
        p["images_seen"] = p["step"] * RECIPE["batch_size"]
        p["epochs"] = round(p["step"] / steps_per_epoch, 3)
        if p["step"] in timeline:
            p["train_seconds"] = round(timeline[p["step"]], 1)
            p["img_per_s"] = round(p["images_seen"] / timeline[p["step"]], 2)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = f"tau_{report['setup']['knn_tau']}"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, color in (("ours", "tab:blue"), ("lightly", "tab:orange")):
        points = report["curves"][name]
        if points:
            ax.plot(
                [p["images_seen"] / 1e3 for p in points],
                [p[tau]["top1"] for p in points],
                "o-",
                color=color,
                label=f"{name} (moco-train)" if name == "ours" else "lightly 1.6 MoCo",
            )
    for name, style in (("random_init", ":"), ("raw_pixels", "--")):
        ax.axhline(report["baselines"][name][tau]["top1"], color="gray", linestyle=style, label=name.replace("_", " "))
    ax.set_xlabel("images seen (thousands; 50k = 1 epoch)")
    ax.set_ylabel(f"kNN top-1 % (k={KNN_K}, τ={report['setup']['knn_tau']})")
    ax.set_title("MoCo v2 on CIFAR-10, ResNet-18: kNN on the 10k test images, 50k bank")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def main() -> None:
    parser = cifar_parser(__doc__, "learning_curve")
    parser.add_argument("--epochs", type=int, default=10, help="ours' run length (both trainers' lr schedule)")
    parser.add_argument(
        "--lightly-epochs",
        type=int,
        default=2,
        help="lightly trains the first N epochs of the same schedule (the equal-budget pair)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between saved encoders (default: half an epoch); a larger multiple at --report measures "
        "the equal-budget pair at fewer points",
    )
    parser.add_argument(
        "--long-eval-every",
        type=int,
        default=None,
        help="past the equal-budget pair, measure ours every N steps (default: each epoch; one measurement "
        "embeds 60k images, about 4 CPU minutes)",
    )
    parser.add_argument("--moco-t", type=float, default=0.1, help="InfoNCE temperature of both trainers")
    parser.add_argument("--knn-tau", type=float, default=0.1, help="vote temperature of the reported curve")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("ours", "lightly", "fp32"),
        help="phases not to run now (fp32: the float32 re-measurement of the final encoder)",
    )
    parser.add_argument("--report", action="store_true", help="only evaluate what is saved and write the report")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learning_curve.json")
    parser.add_argument("--lightly-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    args.steps_per_epoch = sum(1 for _ in (args.cifar / "train").rglob("*.jpg")) // RECIPE["batch_size"]
    args.eval_every = args.eval_every or args.steps_per_epoch // 2
    args.long_eval_every = args.long_eval_every or args.steps_per_epoch
    if args.lightly_worker:
        lightly_worker(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        if "lightly" not in args.skip:
            train_lightly(args, args.work / "lightly")
        if "ours" not in args.skip:
            train_ours(args, args.work / "ours")
    bf16 = cpu_has_native_bf16()
    data = eval_data(args.cifar, args.work / "images")
    measured = evaluate_all(args, args.work, data, bf16)
    attach_times(measured["curves"]["ours"], train_timeline(args.work / "ours"), args.steps_per_epoch)
    attach_times(measured["curves"]["lightly"], lightly_timeline(args.work / "lightly"), args.steps_per_epoch)

    report = {
        "benchmark": "learning_curve",
        "setup": {
            **RECIPE,
            "arch": "resnet18 (CIFAR stem) + MLP head",
            "moco_t": args.moco_t,
            "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch,
            "lightly_epochs": args.lightly_epochs,
            "eval_every_steps": args.eval_every,
            "long_eval_every_steps": args.long_eval_every,
            "knn_k": KNN_K,
            "knn_tau": args.knn_tau,
            "knn_taus": KNN_TAUS,
            "knn": "10,000 CIFAR-10 test images against the 50,000 training images",
            "labels": "never used in pretraining; only as the kNN bank's and queries' classes",
        },
        "machine": machine_info(),
        **measured,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_report(report, args.out, plot)
    print(
        json.dumps(
            {
                name: [(p["step"], p[f"tau_{args.knn_tau}"]["top1"]) for p in points]
                for name, points in measured["curves"].items()
            }
        )
    )


if __name__ == "__main__":
    main()
