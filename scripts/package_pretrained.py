"""Package the learning-curve run's last encoder as pretrained/: an fp16 checkpoint in the official MoCo
layout (backbone and MLP head of f_q, readable by main_lincls.py, detectron2's converter and
`moco-train train --init`) and a provenance JSON beside it (command, data, steps, images seen, wall
time, machine, the kNN curve, sha256).

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python -m scripts.package_pretrained --curve bench/results/learning_curve.json

The kNN figures are read from the benchmark's JSON (measured on the saved checkpoints), not recomputed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moco_retrieval.fileio import sha256_file
from moco_train.checkpoint import list_checkpoints, load_checkpoint
from moco_train.cli import main as moco_train

REPO = Path(__file__).resolve().parent.parent
MAX_BYTES = 25 * 2**20


def run_command(run_dir: Path) -> tuple[dict, float]:
    """The run's configuration (its first start record) and its training seconds (summed over sessions)."""
    start, seconds, session, last = None, 0.0, None, 0.0
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "start":
            start = start or record
            seconds, session, last = seconds + last, record["time"], 0.0
        elif record["event"] == "step" and session is not None:
            last = record["time"] - session
    return start or {}, seconds + last


def provenance(checkpoint: Path, curve: dict, out: Path) -> dict:
    state = load_checkpoint(checkpoint)
    config, seconds = run_command(checkpoint.parent)
    setup = curve["setup"]
    tau = setup["knn_tau"]
    points = curve["curves"]["ours"]
    step = int(state["global_step"])
    last = next(p for p in points if p["step"] == step)
    return {
        "file": out.name,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        "format": "official MoCo checkpoint (facebookresearch/moco): {'arch', 'state_dict': module.encoder_q.* "
        "(ResNet-18 with the CIFAR stem, MLP head fc.0/fc.2 to 128-d), 'epoch'}, float16",
        "method": "MoCo v2 (moco-train)",
        "arch": "resnet18, CIFAR stem (3x3 conv, stride 1, no max-pool), MLP head 512-512-128",
        "input": "32x32 RGB, normalised with the ImageNet mean and std",
        "data": {
            "name": "CIFAR-10 training split",
            "images": 50_000,
            "source": "../shared/datasets/cifar10-jpg.tar.gz (32x32 JPEGs)",
            "labels_used": False,
            "labels": "never used in pretraining; only to score the kNN figures below",
        },
        "training": {
            "command": "python bench/learning_curve.py, which runs: moco-train train CIFAR10/train "
            f"--epochs {setup['epochs']} -b {setup['batch_size']} --lr {setup['lr']} --momentum {setup['momentum']} "
            f"--wd {setup['wd']} --moco-k {setup['moco_k']} --moco-m {setup['moco_m']} --moco-dim {setup['dim']} "
            f"--moco-t {setup['moco_t']} --v2 --bn split --bn-splits {setup['bn_splits']} -j {setup['workers']} "
            f"--seed {setup['seed']}",
            "config": {k: v for k, v in config.items() if k not in ("time", "event")},
            "steps": step,
            "epochs": setup["epochs"],
            "batch_size": setup["batch_size"],
            "images_seen": step * setup["batch_size"],
            "wall_time_s": round(seconds),
            "img_per_s": round(step * setup["batch_size"] / seconds, 1),
            "machine": curve["machine"],
        },
        "knn": {
            "top1": last[f"tau_{tau}"]["top1"],
            "top5": last[f"tau_{tau}"]["top5"],
            "k": setup["knn_k"],
            "tau": tau,
            "queries": 10_000,
            "bank": 50_000,
            "features": "pooled 512-d backbone features, bf16 autocast",
            "random_init_top1": curve["baselines"]["random_init"][f"tau_{tau}"]["top1"],
            "raw_pixels_top1": curve["baselines"]["raw_pixels"][f"tau_{tau}"]["top1"],
        },
        "knn_curve": [
            {"step": p["step"], "images_seen": p["images_seen"], "top1": p[f"tau_{tau}"]["top1"]} for p in points
        ],
        "benchmark": "bench/results/learning_curve.json",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def linear_record(report: dict) -> dict:
    """The provenance's linear figure, from a `moco-train lincls --fast` report."""
    return {
        "top1": round(report["top1"], 2),
        "top5": round(report["top5"], 2),
        "protocol": "moco-train lincls --fast: logistic regression on the standardised pooled 512-d features, "
        f"C {report['C']:g} chosen on a stratified fifth of the training images",
        "train": report["train_images"],
        "val": report["val_images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run-dir", type=Path, default=Path.home() / ".cache" / "moco-retrieval" / "learning_curve" / "ours"
    )
    parser.add_argument("--curve", type=Path, default=REPO / "bench" / "results" / "learning_curve.json")
    parser.add_argument("--out", type=Path, default=REPO / "pretrained" / "moco_v2_resnet18_cifar10.pt")
    parser.add_argument(
        "--lincls", type=Path, default=REPO / "bench" / "results" / "pretrained_lincls.json",
        help="the encoder's `moco-train lincls --fast` report (its linear figure goes into the provenance)",
    )  # fmt: skip
    args = parser.parse_args()
    checkpoint = list_checkpoints(args.run_dir)[-1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if moco_train(["export", str(checkpoint), str(args.out), "--format", "official", "--fp16"]) != 0:
        raise SystemExit(f"exporting {checkpoint} failed")
    if args.out.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MB, over the 25 MB budget")
    curve = json.loads(args.curve.read_text())
    record = provenance(checkpoint, curve, args.out)
    if "ours_final_fp32" in curve["baselines"]:  # the same encoder's features in float32
        record["knn"]["fp32"] = curve["baselines"]["ours_final_fp32"][f"tau_{curve['setup']['knn_tau']}"]
    if args.lincls.exists():
        record["linear"] = linear_record(json.loads(args.lincls.read_text()))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.out}: {record['bytes'] / 2**20:.1f} MB, sha256 {record['sha256']}, kNN {record['knn']['top1']}%")


if __name__ == "__main__":
    main()
