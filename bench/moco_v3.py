"""MoCo v3 next to MoCo v2 on CIFAR-10 at the same wall-clock budget: kNN top-1 against images seen.

Three `moco-train train` runs, one after the other, each alone on the machine, on the 50,000
CIFAR-10 training images (labels never used), batch 128, bf16 autocast where the CPU has it:
  * v2-resnet18:   MoCo v2 with bench/learning_curve.py's recipe (SGD lr 0.06, wd 5e-4, K 4096,
                   m 0.99, τ 0.1, the small-image augmentation);
  * v3-resnet18:   --moco-v3 -a resnet18 (CIFAR stem): LARS lr 0.15 (0.3 x 128/256), wd 1e-6,
                   τ 0.2 (solo-learn's CIFAR value; the paper's 1.0 is for ResNet-50 on ImageNet);
  * v3-vit_tiny_32: --moco-v3 -a vit_tiny_32 (patch 4, width 192, 12 blocks, frozen patch
                   projection): AdamW lr 5e-4 (base --lr 1e-3 x 128/256; the official base
                   1.5e-4, 7.5e-5 at this batch, is tuned for 300
                   ImageNet epochs, far too slow for a budget of minutes), wd 0.1, τ 0.2.
v3 runs use the default 4096-wide MLPs, momentum 0.99 -> 1 (cosine) and warm up over the first
10% of their steps. Each run gets --budget-minutes of training: a 12-step probe measures its
img/s and --max-steps fills the budget, so every run's lr and momentum schedules span its own
run. kNN top-1 (k=200, the shared moco_retrieval.knn) of the checkpoints at --eval-points even
fractions of the budget (4: 1/4, 1/2, 3/4 and all of it), on the 10,000 test images against the
50,000 training images (bench/cifar.py).
lightly 1.6 has no MoCo v3 modules (no prediction head or v3 loss), so it is not in this run.

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/moco_v3.py > ~/.cache/moco-retrieval/moco_v3.log 2>&1 &
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moco_retrieval.devices import cpu_has_native_bf16
from moco_train.checkpoint import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import (  # noqa: E402
    KNN_TAUS,
    cached,
    checkpoint_scores,
    cifar_parser,
    ensure_cifar,
    eval_data,
    probe_rate,
    save_figure,
    train_run,
    train_timeline,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH = 128
COMMON = ["-b", str(BATCH), "-j", "2", "--compile", "off", "--seed", "0", "--no-progress", "--keep", "0"]
RUNS = {
    "v2-resnet18": ["--v2", "--lr", "0.06", "--wd", "5e-4", "--moco-k", "4096", "--moco-m", "0.99", "--moco-t", "0.1"],
    "v3-resnet18": ["--moco-v3", "-a", "resnet18", "--moco-t", "0.2"],
    "v3-vit_tiny_32": ["--moco-v3", "-a", "vit_tiny_32", "--lr", "1e-3", "--moco-t", "0.2"],  # 5e-4 at -b 128
}


def run(args, name: str, flags: list[str], data: dict, bf16: bool) -> dict:
    probe = args.work / f"probe-{name}"
    rate = probe_rate(args.cifar / "train", probe, args.work / "eval" / f"probe-{name}.json", BATCH, COMMON + flags)
    steps = int(args.budget_minutes * 60 * rate / BATCH) // args.eval_points * args.eval_points
    steps_per_epoch = 50_000 // BATCH
    run_dir = args.work / name
    warmup = ["--warmup-epochs", f"{0.1 * steps / steps_per_epoch:.4f}"] if "--moco-v3" in flags else []
    if not any(p.stem == f"checkpoint_{steps:08d}" for p in list_checkpoints(run_dir)):
        extra = ["--save-every-steps", str(steps // args.eval_points), "--resume", "auto", *warmup]
        train_run(args.cifar / "train", run_dir, steps, COMMON + flags + extra)
    timeline = train_timeline(run_dir)
    points = []
    for path in list_checkpoints(run_dir):
        step = int(path.stem.split("_")[1])
        scores = cached(args.work / "eval" / f"{name}_{step:08d}.json", checkpoint_scores, path, data, bf16)
        points.append({"step": step, "images_seen": step * BATCH, "train_seconds": round(timeline[step], 1), **scores})
    return {"flags": flags, "probe_img_per_s": round(rate, 2), "steps": steps, "points": points}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = f"tau_{report['setup']['knn_tau']}"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, result in report["runs"].items():
        points = result["points"]
        for ax, x in zip(axes, ("images_seen", "train_seconds")):
            ax.plot(
                [p[x] / (1e3 if x == "images_seen" else 60) for p in points],
                [p[tau]["top1"] for p in points],
                "o-",
                label=name,
            )
    axes[0].set_xlabel("images seen (thousands)")
    axes[1].set_xlabel("training minutes")
    for ax in axes:
        ax.set_ylabel(f"kNN top-1 % (k=200, τ={report['setup']['knn_tau']})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(
        f"MoCo v3 vs v2 on CIFAR-10, {report['setup']['budget_minutes']} CPU minutes each "
        "(kNN on the 10k test images, 50k bank)",
        fontsize=10,
    )
    save_figure(fig, path)


def main() -> None:
    parser = cifar_parser(__doc__, "moco_v3")
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="training time of each run")
    parser.add_argument("--eval-points", type=int, default=4, help="checkpoints evaluated per run, evenly spaced")
    parser.add_argument("--knn-tau", type=float, default=0.1, help="vote temperature of the plotted curves")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "moco_v3.json")
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    bf16 = cpu_has_native_bf16()
    data = eval_data(args.cifar, args.work / "images")
    runs = {name: run(args, name, RUNS[name], data, bf16) for name in args.runs}
    report = {
        "benchmark": "moco_v3",
        "setup": {
            "batch_size": BATCH,
            "budget_minutes": args.budget_minutes,
            "eval_points": args.eval_points,
            "knn_tau": args.knn_tau,
            "knn_taus": KNN_TAUS,
            "common_flags": COMMON,
            "knn": "10,000 CIFAR-10 test images against the 50,000 training images",
            "lightly": "lightly 1.6 has no MoCo v3 modules; not run",
        },
        "machine": machine_info(),
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_report(report, args.out, plot)
    print(
        json.dumps(
            {name: [(p["step"], p[f"tau_{args.knn_tau}"]["top1"]) for p in r["points"]] for name, r in runs.items()}
        )
    )


if __name__ == "__main__":
    main()
