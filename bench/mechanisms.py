"""MoCo's Figure 3 at CPU scale: kNN top-1 against the number of negatives K for the three ways of
getting negatives that the MoCo paper compares, on CIFAR-10, each point the same CPU budget.

  * end-to-end: the keys are the other images of the batch, with gradients through both sides:
    `--method simclr --simclr-head linear`, whose NT-Xent gives each image K = 2B - 2 negatives for
    a batch of B. SimCLR is the end-to-end mechanism as the field runs it (both views are queries),
    and reusing it keeps one implementation of it in the trainer; its linear head is the other two's.
    K grows only with the batch, so its points are batches (--e2e-batches), up to what this CPU
    holds in memory and computes in the budget.
  * memory bank: InstDisc as its reference code trains it (NCE with K noise samples drawn from a
    bank of one feature per image, momentum 0.5): `--method instdisc --nce-k K`.
  * MoCo: the momentum key encoder (m 0.99) and a queue of K keys: `--moco-k K`, MoCo v1's
    asymmetric InfoNCE with shuffle-BN (split-BN in 8 groups).
All three: ResNet-18 with the CIFAR stem, one linear 128-d head (MoCo v1's and InstDisc's), τ 0.1,
the small-image augmentation (crop scale 0.08-1, colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale
0.2, flip: --aug-plus, which is also SimCLR's CIFAR-10 view), SGD momentum 0.9, weight decay 5e-4,
lr 0.06 at batch 128 (end-to-end: scaled linearly with its batch), half-cosine over the run, no
warm-up, bf16 where the CPU has it. Memory bank and MoCo train at batch --batch.

Each point gets --budget-minutes of training: a 12-step probe measures its images/s and --max-steps
fills the budget (the lr schedule spans each run), so the cheaper mechanisms see more images. Then
the kNN top-1 (k=200, the shared moco_retrieval.knn) of the pooled backbone features: the 10,000
test images against all 50,000 training images (bench/cifar.py). The claim under test (MoCo v1's
Figure 3, ImageNet, ResNet-50, linear classification; their figure, not ours): MoCo >= memory
bank at every K, and end-to-end good where the batch allows but unable to scale K. A caveat of
CPU-sized budgets: a bank row is refreshed only when its image comes round, so through the first
epoch each image's positive, its own row, is still the random initial vector, and after e epochs
that vector still weighs 0.5^e in the row (before normalisation); 20 minutes is about 2.3 epochs for
the memory bank here, where the paper's runs were 200 epochs long. The memory-bank points measure the
mechanism at this budget, which handicaps it more than it does the other two.

JSON and plot are rewritten after every point. Runs, probes and evaluations are kept in --work; a
later start with --resume continues where it stopped (an interrupted run from its last checkpoint),
and skips what is done. A point's checkpoints are deleted once it is evaluated (its log stays).

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/mechanisms.py > ~/.cache/moco-retrieval/mechanisms.log 2>&1 &
    nohup $BVENV/bin/python bench/mechanisms.py --resume >> ~/.cache/moco-retrieval/mechanisms.log 2>&1 &
    $BVENV/bin/python bench/mechanisms.py --smoke    # minutes, in WORK/smoke: the whole path, tiny
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path

import torch

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
    cifar_subset,
    ensure_cifar,
    eval_data,
    knn_scores,
    log_ticks,
    probe_rate,
    save_figure,
    train_run,
    train_timeline,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LR, LR_BATCH, TAU, WD = 0.06, 128, 0.1, 5e-4
COMMON = [
    *("--aug-plus", "--cos", "--moco-dim", "128", "--moco-t", str(TAU), "--wd", str(WD), "--momentum", "0.9"),
    *("--warmup-epochs", "0", "-j", "2", "--compile", "off", "--seed", "0", "--no-progress"),
]
MECHANISMS = {"end-to-end": "tab:green", "memory bank": "tab:orange", "MoCo": "tab:blue"}


@dataclass(frozen=True)
class Point:
    mechanism: str
    negatives: int  # K
    batch: int

    @property
    def name(self) -> str:
        return f"{self.mechanism.replace(' ', '-')}-K{self.negatives}"

    def flags(self) -> list[str]:
        if self.mechanism == "end-to-end":  # simclr's --lr is per 256 images: LR at LR_BATCH, scaled linearly
            method = ["--method", "simclr", "--simclr-head", "linear", "--optimizer", "sgd"]
            return [*method, "--lr", str(LR * 256 / LR_BATCH)]
        if self.mechanism == "memory bank":
            return ["--method", "instdisc", "--nce-k", str(self.negatives), "--lr", str(LR * self.batch / LR_BATCH)]
        moco = ["--moco-k", str(self.negatives), "--moco-m", "0.99", "--bn", "split", "--bn-splits", "8"]
        return [*moco, "--lr", str(LR * self.batch / LR_BATCH)]


def points(args) -> list[Point]:
    """Memory bank then MoCo at each K (smallest first), each pair followed by one end-to-end batch
    (K = 2B - 2, largest batch first): a run stopped part-way already compares the three."""
    pairs = [[Point("memory bank", k, args.batch), Point("MoCo", k, args.batch)] for k in args.ks]
    ends = [[Point("end-to-end", 2 * b - 2, b)] for b in sorted(args.e2e_batches, reverse=True)]
    return [point for group in zip_longest(pairs, ends, fillvalue=[]) for point in chain(*group)]


def run_point(args, point: Point, data: dict, bf16: bool) -> dict:
    """Probe, train within the budget (resuming an interrupted run), evaluate, drop the checkpoints."""
    flags = [*COMMON, "-b", str(point.batch), *point.flags()]
    probe_cache = args.work / "eval" / f"probe-{point.name}.json"
    rate = probe_rate(args.train, args.work / f"probe-{point.name}", probe_cache, point.batch, flags, args.probe_steps)
    steps = args.steps or max(1, int(args.budget_minutes * 60 * rate / point.batch))
    run_dir = args.work / point.name

    def evaluate() -> dict:
        done = [p for p in list_checkpoints(run_dir) if p.stem == f"checkpoint_{steps:08d}"]
        if not done:
            train_run(
                args.train, run_dir, steps, [*flags, "--save-every-steps", "200", "--keep", "1", "--resume", "auto"]
            )
        path = list_checkpoints(run_dir)[-1]
        return {"train_seconds": round(train_timeline(run_dir)[steps], 1), **checkpoint_scores(path, data, bf16)}

    scores = cached(args.work / "eval" / f"{point.name}.json", evaluate)
    for path in list_checkpoints(run_dir):
        path.unlink()
    return {
        "mechanism": point.mechanism,
        "negatives": point.negatives,
        "batch": point.batch,
        "flags": flags,
        "probe_img_per_s": round(rate, 2),
        "steps": steps,
        "images_seen": steps * point.batch,
        **scores,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = f"tau_{report['setup']['knn_tau']}"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for mechanism, color in MECHANISMS.items():
        measured = sorted((p for p in report["points"] if p["mechanism"] == mechanism), key=lambda p: p["negatives"])
        if measured:
            ax.plot(
                [p["negatives"] for p in measured],
                [p[tau]["top1"] for p in measured],
                "o-",
                color=color,
                label=mechanism,
            )
    if "random_init" in report["baselines"]:
        ax.axhline(report["baselines"]["random_init"][tau]["top1"], color="gray", linestyle=":", label="random init")
    ax.set_xscale("log", base=2)
    ax.set_xticks(*log_ticks([p["negatives"] for p in report["points"]]))  # 2B - 2 beside a power of two
    ax.minorticks_off()
    ax.set_xlabel("negatives K (end-to-end: 2 x batch - 2; memory bank: noise samples; MoCo: queue)")
    ax.set_ylabel(f"kNN top-1 % (k={KNN_K}, τ={report['setup']['knn_tau']})")
    setup = report["setup"]
    ax.set_title(f"Three mechanisms on {setup['data']}, ResNet-18, {setup['budget']} each", fontsize=10, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    save_figure(fig, path)


def main() -> None:
    parser = cifar_parser(__doc__, "mechanisms")
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="training time of each point")
    parser.add_argument("--steps", type=int, default=None, help="train every point for this many steps instead")
    parser.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096, 16384], help="memory bank and MoCo K")
    parser.add_argument("--e2e-batches", type=int, nargs="+", default=[32, 64, 128, 256], help="end-to-end batches")
    parser.add_argument("--batch", type=int, default=128, help="memory bank and MoCo batch")
    parser.add_argument("--probe-steps", type=int, default=12, help="steps of each point's speed probe")
    parser.add_argument("--knn-tau", type=float, default=0.1, help="vote temperature of the plot")
    parser.add_argument("--resume", action="store_true", help="continue the runs and evaluations kept in --work")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the whole path in minutes: 30 training and 10 test images per class, batch 16, K 32 and 64, "
        "end-to-end batches 8 and 16, 4 steps per point; in WORK/smoke, writes WORK/smoke/mechanisms_smoke.json",
    )
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/mechanisms.json")
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    cifar = args.cifar
    if args.smoke:  # in WORK/smoke: never mixed with a full run's
        args.work = args.work / "smoke"
        cifar = cifar_subset(args.cifar, 30, 10, args.work / "cifar")
        args.batch, args.ks, args.e2e_batches, args.steps, args.probe_steps = 16, [32, 64], [8, 16], 4, 7
    args.out = args.out or (
        args.work / "mechanisms_smoke.json" if args.smoke else REPO / "bench/results/mechanisms.json"
    )
    if (args.work / "eval").is_dir() and not args.resume:
        raise SystemExit(f"{args.work} holds an earlier run: --resume continues it (or choose another --work)")
    args.train = cifar / "train"
    bf16 = cpu_has_native_bf16()
    data = eval_data(cifar, args.work / "images")
    torch.manual_seed(0)  # the trainers' initial f_q: each run seeds 0, then builds its encoder
    init = build_backbone("resnet18", cifar_stem=True).eval()
    report = {
        "benchmark": "mechanisms",
        "setup": {
            "data": f"CIFAR-10 ({len(data['train'][1])} training, {len(data['test'][1])} test images)",
            "budget": f"{args.steps} steps" if args.steps else f"{args.budget_minutes} CPU minutes",
            "common_flags": COMMON,
            "lr": f"{LR} at batch {LR_BATCH}, scaled linearly with the batch",
            "batch": args.batch,
            "ks": args.ks,
            "e2e_batches": args.e2e_batches,
            "knn_k": KNN_K,
            "knn_tau": args.knn_tau,
            "knn_taus": KNN_TAUS,
            "knn": "every test image against every training image (pooled backbone features)",
            "end_to_end": "--method simclr --simclr-head linear: NT-Xent, K = 2 x batch - 2 negatives",
            "memory_bank": "--method instdisc: NCE with K noise samples from the bank (momentum 0.5)",
            "moco": "MoCo v1 (linear head, asymmetric InfoNCE, shuffle-BN), m 0.99, queue K",
        },
        "machine": machine_info(),
        "baselines": {"random_init": cached(args.work / "eval" / "random_init.json", knn_scores, init, data, bf16)},
        "points": [],
    }
    for point in points(args):
        report["points"].append(run_point(args, point, data, bf16))
        report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_report(report, args.out, plot)
        print(
            json.dumps({k: report["points"][-1][k] for k in ("mechanism", "negatives", "steps", f"tau_{args.knn_tau}")})
        )


if __name__ == "__main__":
    main()
