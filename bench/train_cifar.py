"""First MoCo pretraining run on CIFAR-10 on the CPU, evaluated with the InstDisc kNN classifier.

Budget (fixed so that the run fits in ~25 minutes of a shared 2-core CPU): ResNet-18 with the
CIFAR stem, MoCo v2 recipe (MLP head, v2 augmentation, cosine lr, tau 0.2) with the official CIFAR
demo's m=0.99 and wd 5e-4, split-BN in 8 groups, and a fixed number of steps (--steps) of
--batch-size images with --lr and queue --moco-k on the 50,000 training images (labels ignored).
A short run needs a short queue: K=4096 at batch 128 takes 32 steps to replace its random keys.
Then kNN top-1/top-5 (k=200, tau=0.07) on the 10,000 test images against a labelled bank of training images, for the trained
encoder, the same encoder at its random initialisation and raw pixels. By default the bank is all
50,000 training images and the queries all 10,000 test images; on a crowded CPU the first
--bank-per-class / --queries-per-class images of each class are used instead (recorded in the JSON).

    python bench/train_cifar.py --steps 60 --batch-size 64 --lr 0.06 --moco-k 1024 \
        --bank-per-class 200 --queries-per-class 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import torch

from moco_train.checkpoint import CHECKPOINT_FORMAT, to_export
from moco_train.config import TrainConfig
from moco_train.evaluate import knn_evaluate
from moco_train.export import export_model, make_export
from moco_train.knn import knn_classify, topk_accuracy
from moco_train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def ensure_cifar(root: Path) -> Path:
    """/tmp/cifar10/{train,test}/<class>/*.jpg, unpacked from the shared archive if missing."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root, filter="data")
    return root


def class_subset(root: Path, per_class: int, out: Path) -> Path:
    """A labelled folder of the first `per_class` images (sorted names) of each class, as symlinks."""
    if per_class >= min(len(list(d.iterdir())) for d in root.iterdir() if d.is_dir()):
        return root
    shutil.rmtree(out, ignore_errors=True)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            (out / class_dir.name / f.name).symlink_to(f)
    return out


def knn_of_export(blob: dict, bank: Path, test: Path) -> dict:
    model, meta = export_model(blob)
    start = time.perf_counter()
    result = knn_evaluate(model, meta, bank, test, workers=2)
    seconds = time.perf_counter() - start
    n = len(result.bank.paths) + len(result.queries.paths)
    return {"top1": result.top1, "top5": result.top5, "bank_images": len(result.bank.paths),
            "query_images": len(result.queries.paths), "embed_img_per_s": n / seconds}, result


def raw_pixel_knn(bank_result, query_result) -> dict:
    """kNN on L2-normalised raw pixels (the eval preprocessing's normalised 32x32x3 tensors, flattened)."""
    from moco_train.data import LabelledImages, collate_labelled
    from moco_train.transforms import Preprocessing, eval_transform
    from torch.utils.data import DataLoader

    def pixels(root: Path):
        ds = LabelledImages(root, eval_transform(Preprocessing.for_input_size(32)))
        feats, labels = [], []
        for images, targets, _, _ in DataLoader(ds, batch_size=500, num_workers=2, collate_fn=collate_labelled):
            feats.append(torch.nn.functional.normalize(images.flatten(1), dim=1))
            labels.append(targets)
        return torch.cat(feats), torch.cat(labels), len(ds.classes)

    bank, bank_labels, num_classes = pixels(bank_result)
    queries, query_labels, _ = pixels(query_result)
    return topk_accuracy(knn_classify(queries, bank, bank_labels, num_classes), query_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=Path("/tmp/cifar10"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bank-per-class", type=int, default=5000, help="5000: all training images")
    parser.add_argument("--queries-per-class", type=int, default=1000, help="1000: all test images")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--moco-k", type=int, default=4096)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/bench_train_cifar"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_cifar.json")
    args = parser.parse_args()

    root = ensure_cifar(args.cifar)
    shutil.rmtree(args.run_dir, ignore_errors=True)
    cfg = TrainConfig(data=str(root / "train"), run_dir=str(args.run_dir), arch="resnet18", workers=2,
                      max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4,
                      moco_k=args.moco_k, moco_m=0.99, bn="split", bn_splits=8, seed=0, amp=args.amp, progress=False)
    cfg.apply_v2()
    trainer = Trainer(cfg)
    initial = make_export({k[len("encoder_q."):]: v for k, v in trainer.model.state_dict().items()
                           if k.startswith("encoder_q.")}, arch=cfg.arch, cifar_stem=trainer.cifar_stem,
                          preprocessing=trainer.preprocessing, source="random init")
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    trained = to_export({"format": CHECKPOINT_FORMAT, **trainer.state()}, "bench")

    bank = class_subset(root / "train", args.bank_per_class, Path("/tmp/cifar10_bank"))
    test = class_subset(root / "test", args.queries_per_class, Path("/tmp/cifar10_queries"))
    trained_knn, _ = knn_of_export(trained, bank, test)
    random_knn, _ = knn_of_export(initial, bank, test)
    pixel_knn = raw_pixel_knn(bank, test)

    losses = [json.loads(line) for line in open(args.run_dir / "log.jsonl")]
    steps = [r for r in losses if r.get("event") == "step"]
    result = {
        "benchmark": "MoCo pretraining on CIFAR-10 train (labels unused), InstDisc kNN on CIFAR-10 test",
        "settings": {**cfg.to_dict(), "moco_k_used": trainer.moco_k, "cifar_stem": trainer.cifar_stem,
                     "input_size": trainer.preprocessing.input_size, "amp_dtype": str(trainer.amp_dtype),
                     "steps_per_epoch": trainer.steps_per_epoch, "epochs_trained": args.steps / trainer.steps_per_epoch,
                     "images_seen": args.steps * args.batch_size, "knn_k": 200, "knn_tau": 0.07,
                     "bank": f"first {args.bank_per_class} train images per class (sorted names)",
                     "queries": f"first {args.queries_per_class} test images per class (sorted names)"},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "note": "CPU shared with other jobs during the run"},
        "training": {"seconds": train_seconds, "img_per_s": args.steps * args.batch_size / train_seconds,
                     "first_step_loss": steps[0]["loss"], "last_10_steps_loss": sum(s["loss"] for s in steps[-10:]) / 10,
                     "last_10_steps_contrast_acc": sum(s["acc"] for s in steps[-10:]) / 10},
        "knn": {"moco_trained": trained_knn, "random_init": random_knn, "raw_pixels": pixel_knn},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["knn"], indent=2))
    print(f"training: {result['training']['img_per_s']:.1f} img/s over {train_seconds:.0f} s")


if __name__ == "__main__":
    main()
