"""`moco-train train | knn | export | plot`: pretraining, kNN evaluation, encoder export and run curves."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from pathlib import Path

from .backbones import RESNET_ARCHS
from .builder import BN_MODES
from .checkpoint import CheckpointError, load_file, to_export, to_official
from .config import COMPILE_MIN_STEPS, TrainConfig
from .curves import RunLogError
from .data import DataError
from .export import ExportError, export_model
from .fileio import atomic_torch_save
from .knn import DEFAULT_K, DEFAULT_TAU

USER_ERRORS = (DataError, CheckpointError, ExportError, RunLogError, OSError)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="MoCo pretraining on a folder (or list file) of unlabeled images")
    p.add_argument("data", metavar="DATA", help="image folder (any depth) or text file listing image paths")
    p.add_argument("--run-dir", required=True, help="checkpoints and log.jsonl go here")
    p.add_argument("-a", "--arch", default="resnet18", choices=RESNET_ARCHS, metavar="ARCH",
                   help="any torchvision ResNet (default resnet18)")
    p.add_argument("-j", "--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=None,
                   help="train for this many steps instead of --epochs (the lr schedule follows it)")
    p.add_argument("-b", "--batch-size", type=int, default=256,
                   help="global batch size, split evenly across processes (default 256)")
    p.add_argument("--lr", "--learning-rate", type=float, default=0.03, dest="lr",
                   help="learning rate for the global batch (MoCo: 0.03 for 256; scale linearly, "
                        "e.g. 0.06 for -b 512, as the official code's 8-GPU recipe implies)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    p.add_argument("--schedule", type=int, nargs="*", default=[120, 160], help="epochs at which lr drops ×0.1")
    p.add_argument("--cos", action="store_true", help="cosine lr schedule")
    p.add_argument("--moco-dim", type=int, default=128, help="feature dimension (default 128)")
    p.add_argument("--moco-k", type=int, default=None,
                   help="queue size (default: largest power of two <= 10%% of the images, at most 65536)")
    p.add_argument("--moco-m", type=float, default=0.999, help="key encoder momentum (default 0.999)")
    p.add_argument("--moco-t", type=float, default=None, help="softmax temperature (default 0.07; with --v2 0.2, or 0.1 for crops <= 64 px)")
    p.add_argument("--mlp", action="store_true", help="MLP projection head (MoCo v2)")
    p.add_argument("--aug-plus", action="store_true", help="MoCo v2 augmentation (blur, stronger jitter)")
    p.add_argument("--v2", action="store_true", help="MoCo v2 preset: --mlp --aug-plus --cos, --moco-t 0.2 (0.1 for crops <= 64 px)")
    p.add_argument("--symmetric", action="store_true", help="symmetric loss (both crops as queries)")
    p.add_argument("--bn", choices=("auto", *BN_MODES), default="auto",
                   help="split (auto, the default): keys shuffled (across processes under DDP) and the "
                        "global batch normalised in --bn-splits groups whatever the process count; "
                        "shuffle: keys shuffled across processes, one BN group per process (the official "
                        "per-GPU BN); sync: SyncBatchNorm, no shuffle; none: plain BN, no shuffle (leaks "
                        "batch statistics between query and key: a shortcut that hurts learning)")
    p.add_argument("--bn-splits", type=int, default=8,
                   help="BatchNorm groups over the global batch for --bn split (default 8, the official "
                        "8-GPU recipe); split inside each process when there are fewer processes")
    p.add_argument("--cifar-stem", choices=("auto", "on", "off"), default="auto",
                   help="3x3 stride-1 stem without max-pool; auto: on for images of 64 px or less")
    p.add_argument("--crop-size", type=int, default=None, help="training crop (default: image size if small, else 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, metavar="FILE",
                   help="continued pretraining: start both encoders from FILE (a moco-train export or "
                        "checkpoint, an official MoCo checkpoint, or a torchvision ResNet state dict) "
                        "instead of random weights; the projection head is re-initialised if it does not fit")
    p.add_argument("--nproc", type=int, default=1,
                   help="spawn this many training processes on this machine (DDP over 127.0.0.1; "
                        "one per GPU if CUDA is present); for several machines use torchrun")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="autocast precision; auto: bf16 (fp16 if unsupported) on GPU, bf16 on CPUs with native bf16, else float32")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the encoders (inductor; a minute or so of start-up, faster steps); "
                        "auto: on for runs of at least %d steps when a C compiler is present" % COMPILE_MIN_STEPS)
    p.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest valid checkpoint in --run-dir (fresh start if none), or a checkpoint path")
    p.add_argument("--knn-bank", default=None, help="labelled folder: kNN monitor bank")
    p.add_argument("--knn-queries", default=None, help="labelled folder: kNN monitor queries")
    p.add_argument("--knn-every", type=int, default=1, help="run the kNN monitor every N epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _knn_parser(sub) -> None:
    p = sub.add_parser("knn", help="InstDisc weighted kNN accuracy of a checkpoint or export")
    p.add_argument("--bank", required=True, help="labelled folder <class>/<images> used as the memory bank")
    p.add_argument("--queries", required=True, help="labelled folder of query images")
    p.add_argument("--checkpoint", required=True, help="training checkpoint, export, or official MoCo checkpoint")
    p.add_argument("-k", type=int, default=DEFAULT_K, help=f"neighbours (default {DEFAULT_K})")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help=f"vote temperature (default {DEFAULT_TAU})")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--predictions", default=None, help="write path,true_class,predicted_class per query (CSV)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the query encoder backbone and its metadata for serving")
    p.add_argument("checkpoint", metavar="CKPT", help="moco-train checkpoint or official MoCo checkpoint")
    p.add_argument("out", metavar="OUT", help="export file to write")
    p.add_argument("--keep-head", action="store_true",
                   help="serve the projection head's output (--moco-dim, e.g. 128-d: a 4x smaller index) "
                        "instead of the backbone's pooled features (default)")
    p.add_argument("--format", choices=("retrieval", "official"), default="retrieval",
                   help="retrieval (default): the export that moco-train knn and retrieval-server load; "
                        "official: facebookresearch/moco's checkpoint layout (state_dict with "
                        "module.encoder_q.*, the projection head included when CKPT has it), for its "
                        "main_lincls.py --pretrained and detectron2 conversion script")


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss, contrast accuracy, lr and kNN curves (RUN_DIR/curves.png)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a training run (finished or not)")
    p.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _knn_parser(sub)
    _export_parser(sub)
    _plot_parser(sub)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(
        data=args.data, run_dir=args.run_dir, arch=args.arch, workers=args.workers, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=list(args.schedule), cos=args.cos, moco_dim=args.moco_dim,
        moco_k=args.moco_k, moco_m=args.moco_m, moco_t=args.moco_t, mlp=args.mlp, aug_plus=args.aug_plus,
        symmetric=args.symmetric, bn=args.bn, bn_splits=args.bn_splits, cifar_stem=args.cifar_stem,
        crop_size=args.crop_size, seed=args.seed, init=args.init, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, save_every_steps=args.save_every_steps, keep=args.keep,
        resume=args.resume, knn_bank=args.knn_bank, knn_queries=args.knn_queries, knn_every=args.knn_every,
        progress=not args.no_progress)
    if args.v2:
        cfg.apply_v2()
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc != 1 and "RANK" not in os.environ:
        from .launch import launch
        return launch(args.argv, args.nproc, args.device, args.batch_size)
    from .trainer import train  # torch-heavy imports only for the command that needs them
    summary = train(train_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def cmd_knn(args: argparse.Namespace) -> None:
    from .evaluate import knn_evaluate
    from .trainer import resolve_device
    model, meta = export_model(to_export(load_file(args.checkpoint), args.checkpoint), args.checkpoint,
                               resolve_device(args.device))
    result = knn_evaluate(model, meta, args.bank, args.queries, k=args.k, tau=args.tau,
                          batch_size=args.batch_size, workers=args.workers)
    if args.predictions:
        classes = result.queries.classes
        with open(args.predictions, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "true_class", "predicted_class"])
            for path, true, pred in zip(result.queries.paths, result.queries.labels.tolist(),
                                        result.predictions.tolist()):
                writer.writerow([str(path), classes[true], classes[pred]])
    report = {"top1": result.top1, "top5": result.top5, "k": args.k, "tau": args.tau,
              "bank_images": len(result.bank.paths), "query_images": len(result.queries.paths),
              "fingerprint": meta.fingerprint}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"kNN (k={args.k}, tau={args.tau}): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
              f"(bank {report['bank_images']}, queries {report['query_images']})")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "official":
        official = to_official(load_file(args.checkpoint), args.checkpoint)
        atomic_torch_save(official, Path(args.out))
        print(f"wrote {args.out}: {official['arch']} in the official MoCo layout ({len(official['state_dict'])} tensors)")
        return
    blob = to_export(load_file(args.checkpoint), args.checkpoint, keep_head=args.keep_head)
    _, meta = export_model(blob, args.checkpoint)
    atomic_torch_save(blob, Path(args.out))
    print(f"wrote {args.out}: {meta.arch} (cifar stem: {meta.cifar_stem}), {meta.feature_dim}-d features, "
          f"input {meta.preprocessing.input_size}px, {meta.fingerprint}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .curves import plot_run
    print(f"wrote {plot_run(args.run_dir, args.out)}")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    try:
        status = {"train": cmd_train, "knn": cmd_knn, "export": cmd_export, "plot": cmd_plot}[args.command](args)
    except USER_ERRORS as exc:
        print(f"moco-train {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moco-train {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
