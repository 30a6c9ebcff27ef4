"""Every method at a user's budget with default flags only: one epoch of CIFAR-10, before and after the
recipes were fitted to the run (issue 32: warm-up capped at 15% of the run, BYOL's presets by length,
SwAV's two-crop scale, Barlow Twins' bias rate, zero-initialised residual BNs).

For each method, two runs on the 50,000 CIFAR-10 training images (labels never used), one with the
code before those changes (commit BEFORE, checked out as a git worktree in --work) and one with this
checkout's, each `moco-train train CIFAR/train --epochs 1 -b 256 [--method M | --v2]` and nothing
else: ResNet-18, the CIFAR stem, and every other choice the trainer's default for the method (the
flags it sets: --epochs 1, the budget; -b 256, the default batch, named; --v2 names MoCo v2;
--seed 0 -j 2, the defaults, named; --no-progress --keep 1 --resume auto, logging, disk and resuming).
Then both exports are measured by this checkout's code, the same way:
  * kNN top-1 (k 200, τ 0.05-0.2; bench/cifar.py): the 10,000 test images against the 50,000
    training images, on the L2-normalised backbone features;
  * fast linear top-1: `moco-train lincls --fast`'s logistic regression (moco_train.lincls.logistic_probe,
    C searched on a stratified fifth of the training images) on the raw backbone features.
A random initialisation (seed 0) is measured the same way. One run per point, on a shared 2-core CPU:
read a difference of a point or two as noise.

Runs and evaluations are kept in --work; run again, it resumes a run from its last checkpoint and
skips what is done. The JSON and plot are rewritten after every run. Methods run in the order given,
each after then before, so a run stopped part-way already compares the two.

    BVENV=$(scripts/ensure_bench_venv.sh)
    nohup $BVENV/bin/python bench/default_recipes.py > ~/.cache/moco-retrieval/default_recipes.log 2>&1 &
    $BVENV/bin/python bench/default_recipes.py --smoke     # minutes: the whole path on a tiny subset
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from moco_retrieval.architectures import build_backbone
from moco_retrieval.devices import cpu_has_native_bf16
from moco_retrieval.export import export_model, pooled
from moco_retrieval.knn import knn_classify, topk_accuracy
from moco_train.checkpoint import list_checkpoints, load_checkpoint, to_export
from moco_train.lincls import logistic_probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import (  # noqa: E402
    KNN_K,
    KNN_TAUS,
    cached,
    cifar_parser,
    cifar_subset,
    ensure_cifar,
    eval_data,
    save_figure,
    train_timeline,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEFORE = "9301c50"  # main before issue 32's recipes
METHODS = ("byol", "swav", "simclr", "barlow", "moco", "instdisc")
SIDES = ("after", "before")
FLAGS = ["--epochs", "1", "-b", "256", "--seed", "0", "-j", "2", "--no-progress", "--keep", "1", "--resume", "auto"]


def method_flags(method: str) -> list[str]:
    return ["--v2"] if method == "moco" else ["--method", method]


def before_code(work: Path) -> Path:
    """A worktree of the code before the change, made once."""
    tree = work / "before-code"
    if not (tree / "moco_train").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), BEFORE], cwd=REPO, check=True)
    return tree


def finished(run_dir: Path) -> bool:
    log = run_dir / "log.jsonl"
    return log.exists() and any(json.loads(line)["event"] == "end" for line in log.read_text().splitlines())


def train(code: Path, data: Path, run_dir: Path, method: str, smoke: bool) -> None:
    """One run of `code`'s trainer (cwd first on the path: its moco_train, not this checkout's)."""
    budget = ["--max-steps", "2", "-b", "32"] if smoke else []
    cmd = [sys.executable, "-m", "moco_train", "train", str(data), "--run-dir", str(run_dir), *FLAGS]
    cmd += method_flags(method) + budget
    print(f"[{time.strftime('%H:%M:%S')}] ({code.name}) $ " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=code, check=True)


@torch.inference_mode()
def raw_features(model: nn.Module, images: torch.Tensor, bf16: bool, batch: int = 500) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([pooled(model, images[i : i + batch]) for i in range(0, len(images), batch)])


def scores(model: nn.Module, data: dict, bf16: bool) -> dict:
    """kNN top-1/top-5 per τ and the fast linear probe's top-1/top-5, from one pass of features."""
    start = time.perf_counter()
    raw = {split: raw_features(model.eval(), data[split][0], bf16) for split in ("train", "test")}
    (_, train_labels), (_, test_labels) = data["train"], data["test"]
    result = {"embed_seconds": round(time.perf_counter() - start, 1), "precision": "bf16" if bf16 else "fp32"}
    bank, queries = (nn.functional.normalize(raw[split], dim=1) for split in ("train", "test"))
    for tau in KNN_TAUS:
        votes = knn_classify(queries, bank, train_labels, 10, k=KNN_K, tau=tau, chunk_size=1000)
        acc = topk_accuracy(votes, test_labels)
        result[f"tau_{tau}"] = {"top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2)}
    start = time.perf_counter()
    fit = logistic_probe(raw["train"].double().numpy(), train_labels.numpy(), raw["test"].double().numpy())
    acc = topk_accuracy(fit.pop("probs"), test_labels)
    result["linear"] = {"top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2), **fit}
    result["linear"]["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_scores(run_dir: Path, data: dict, bf16: bool) -> dict:
    """scores of a run's last checkpoint (f_q's backbone, through the export code serving uses), with
    its training time and steps."""
    path = list_checkpoints(run_dir)[-1]
    model, _ = export_model(to_export(load_checkpoint(path), str(path)))
    timeline = train_timeline(run_dir)
    start = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    recipe = {k: start[k] for k in ("lr", "weight_decay", "warmup_epochs", "moco_m", "crop_min") if k in start}
    return {**scores(model, data, bf16), "steps": max(timeline), "train_seconds": round(timeline[max(timeline)], 1),
            "recipe": recipe}  # fmt: skip


def random_scores(data: dict, bf16: bool) -> dict:
    torch.manual_seed(0)
    return scores(build_backbone("resnet18", cifar_stem=True), data, bf16)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in report["methods"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (key, title) in zip(axes, (("knn_top1", "kNN top-1 (k 200, τ 0.1)"), ("linear_top1", "fast linear top-1"))):
        for offset, side, colour in ((-0.2, "before", "#999999"), (0.2, "after", "#1f77b4")):
            xs = [i + offset for i, m in enumerate(methods) if side in report["methods"][m]]
            ys = [report["methods"][m][side][key] for m in methods if side in report["methods"][m]]
            if xs:  # a run stopped part-way may have one side only
                bars = ax.bar(xs, ys, width=0.4, color=colour, label=f"{side} the fitted recipes")
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(report["random_init"][key], color="#d62728", ls="--", lw=1, label="random init")
        ax.set_xticks(range(len(methods)), ["moco v2" if m == "moco" else m for m in methods])
        ax.set_xlim(-0.6, max(len(methods), 3) - 0.4)
        ax.set_title(title)
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("One epoch of CIFAR-10 with default flags (ResNet-18, batch 256)")
    fig.tight_layout()
    save_figure(fig, path)


def summary(result: dict) -> dict:
    return {"knn_top1": result["tau_0.1"]["top1"], "linear_top1": result["linear"]["top1"], **result}


def main() -> None:
    parser = cifar_parser(__doc__, "default_recipes")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "default_recipes.json")
    parser.add_argument("--smoke", action="store_true", help="2 steps of batch 32 on 200 images, in WORK/smoke")
    args = parser.parse_args()
    work = args.work / "smoke" if args.smoke else args.work
    cifar = ensure_cifar(args.cifar)
    if args.smoke:
        cifar = cifar_subset(cifar, 20, 10, work / "cifar")
        args.out = work / "default_recipes.json"
    data, bf16 = eval_data(cifar, work / "eval_images"), cpu_has_native_bf16()
    codes = {"after": REPO, "before": before_code(args.work)}
    report = {
        "setup": {
            "data": "CIFAR-10: 50,000 training images (no labels), 10,000 test images",
            "flags": "moco-train train DATA " + " ".join(FLAGS) + " [--v2 | --method M]",
            "before": f"commit {BEFORE}",
            "after": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
            "knn": {"k": KNN_K, "tau": 0.1, "taus": list(KNN_TAUS)},
            "linear": "moco_train.lincls.logistic_probe (moco-train lincls --fast) on the raw backbone features",
            "smoke": args.smoke,
        },
        "machine": machine_info(),
        "random_init": summary(cached(work / "random_init.json", random_scores, data, bf16)),
        "methods": {},
    }
    if args.out.exists() and not args.smoke:  # methods this run does not train are kept
        report["methods"] = json.loads(args.out.read_text()).get("methods", {})
    for method in args.methods:
        for side in SIDES:
            run_dir = work / side / method
            if not finished(run_dir):
                train(codes[side], cifar / "train", run_dir, method, args.smoke)
            result = cached(run_dir / "eval.json", run_scores, run_dir, data, bf16)
            report["methods"].setdefault(method, {})[side] = summary(result)
            write_report(report, args.out, plot)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
