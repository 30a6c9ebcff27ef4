"""`moco-train train | knn | export | embed | plot`: pretraining, kNN evaluation, encoder export, corpus
embedding and run curves."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from pathlib import Path

from moco_retrieval.devices import DeviceError, resolve_device
from moco_retrieval.export import ExportError, export_model, half, half_precision
from moco_retrieval.fileio import atomic_torch_save, atomic_write
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU
from moco_retrieval.onnx import to_onnx
from moco_retrieval.options import add_options, from_args

from .checkpoint import CheckpointError, load_file, to_export, to_official
from .config import ConfigError, SgdOptions, TrainConfig, TrainingDiverged
from .curves import RunLogError
from .data import DataError

USER_ERRORS = (
    DataError,
    ConfigError,
    DeviceError,
    CheckpointError,
    ExportError,
    RunLogError,
    TrainingDiverged,
    OSError,
)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="MoCo pretraining on a folder (or list file) of unlabeled images")
    add_options(p, TrainConfig)
    p.add_argument("--v2", action="store_true", help="MoCo v2 preset: --mlp --aug-plus --cos")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="spawn this many training processes on this machine (DDP over 127.0.0.1; "
        "one per GPU if CUDA is present); for several machines use torchrun",
    )


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


def _lincls_parser(sub) -> None:
    p = sub.add_parser(
        "lincls",
        help="linear classification on the frozen features of a checkpoint or export (main_lincls.py's "
        "protocol; --fast: cached features and a logistic regression, for the CPU)",
    )
    p.add_argument("--train", required=True, help="labelled folder <class>/<images> the classifier is trained on")
    p.add_argument("--val", required=True, help="labelled folder of the same classes it is measured on")
    p.add_argument("--checkpoint", required=True, help="training checkpoint, export, or official MoCo checkpoint")
    p.add_argument("--out", required=True, help="folder for lincls.json (and the feature cache or the checkpoint)")
    p.add_argument("--fast", action="store_true", help="cached features + logistic regression (minutes on a CPU)")
    p.add_argument("--C", type=float, default=None, help="--fast: inverse regularisation (default: searched)")
    defaults = SgdOptions()
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="default %(default)s")
    p.add_argument("--lr", type=float, default=defaults.lr, help="default %(default)s (batch 256)")
    p.add_argument("--schedule", type=int, nargs="*", default=list(defaults.schedule), help="default 60 80")
    p.add_argument("--wd", type=float, default=defaults.weight_decay, help="default %(default)s")
    p.add_argument("-b", "--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no line per epoch")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the query encoder backbone and its metadata for serving")
    p.add_argument("checkpoint", metavar="CKPT", help="moco-train checkpoint or official MoCo checkpoint")
    p.add_argument("out", metavar="OUT", help="export file to write")
    p.add_argument(
        "--keep-head",
        action="store_true",
        help="serve the projection head's output (--moco-dim, e.g. 128-d: a 4x smaller index) "
        "instead of the backbone's pooled features (default)",
    )
    p.add_argument(
        "--format",
        choices=("retrieval", "official", "onnx"),
        default="retrieval",
        help="retrieval (default): the export that moco-train knn and retrieval-server load; "
        "official: facebookresearch/moco's checkpoint layout (state_dict with "
        "module.encoder_q.*, the projection head included when CKPT has it), for its "
        "main_lincls.py --pretrained and detectron2 conversion script; onnx: the served encoder "
        "with its L2 normalisation as an ONNX graph (images in, embeddings out; the export's "
        "preprocessing in the metadata property moco_retrieval.meta)",
    )
    p.add_argument("--fp16", action="store_true", help="store the weights in half precision (half the size)")


def _embed_parser(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a corpus folder with an export into shards for `retrieval-client import`; under torchrun "
        "each process embeds its share; complete shards are skipped when run again",
    )
    p.add_argument("data", metavar="DATA", help="folder of images, at any depth (ids: paths relative to it)")
    p.add_argument("--checkpoint", required=True, help="export (or checkpoint) whose embeddings the server serves")
    p.add_argument("--out", required=True, help="folder for manifest.json and the shards")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default %(default)s)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="images per forward (default %(default)s)")
    p.add_argument("-j", "--workers", type=int, default=4, help="decoding processes (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        default="off",
        help="autocast the forward (faster; embeddings then differ from Embed's float32 ones by ~1e-2)",
    )
    p.add_argument("--quiet", action="store_true", help="no line per shard")


def _plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss, contrast accuracy, lr and kNN curves (RUN_DIR/curves.png)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --run-dir of a training run (finished or not)")
    p.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _knn_parser(sub)
    _lincls_parser(sub)
    _export_parser(sub)
    _embed_parser(sub)
    _plot_parser(sub)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    cfg = from_args(TrainConfig, args)
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

    model, meta = export_model(
        to_export(load_file(args.checkpoint), args.checkpoint), args.checkpoint, resolve_device(args.device)
    )
    result = knn_evaluate(
        model, meta, args.bank, args.queries, k=args.k, tau=args.tau, batch_size=args.batch_size, workers=args.workers
    )
    if args.predictions:
        classes = result.queries.classes
        with open(args.predictions, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "true_class", "predicted_class"])
            for path, true, pred in zip(
                result.queries.paths, result.queries.labels.tolist(), result.predictions.tolist()
            ):
                writer.writerow([str(path), classes[true], classes[pred]])
    report = {
        "top1": result.top1,
        "top5": result.top5,
        "k": args.k,
        "tau": args.tau,
        "bank_images": len(result.bank.paths),
        "query_images": len(result.queries.paths),
        "fingerprint": meta.fingerprint,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"kNN (k={args.k}, tau={args.tau}): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
            f"(bank {report['bank_images']}, queries {report['query_images']})"
        )


def cmd_lincls(args: argparse.Namespace) -> None:
    from .lincls import fast_lincls, sgd_lincls

    model, meta = export_model(
        to_export(load_file(args.checkpoint), args.checkpoint), args.checkpoint, resolve_device(args.device)
    )
    if args.fast:
        report = fast_lincls(model, meta, args.checkpoint, args.train, args.val, Path(args.out), args.C, args.seed)
        how = f"logistic regression, C {report['C']:g}"
    else:
        options = SgdOptions(
            args.epochs, args.lr, weight_decay=args.wd, schedule=tuple(args.schedule), batch_size=args.batch_size,
            seed=args.seed,
        )  # fmt: skip
        report = sgd_lincls(
            model, meta, args.checkpoint, args.train, args.val, Path(args.out), options, args.workers, args.progress
        )
        how = f"SGD, {options.epochs} epochs"
    print(
        f"linear ({how}): top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  "
        f"(train {report['train_images']}, val {report['val_images']}); {Path(args.out) / 'lincls.json'}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "official":
        official = to_official(load_file(args.checkpoint), args.checkpoint)
        if args.fp16:
            official["state_dict"] = half(official["state_dict"])
        atomic_torch_save(official, Path(args.out))
        print(
            f"wrote {args.out}: {official['arch']} in the official MoCo layout ({len(official['state_dict'])} tensors)"
        )
        return
    blob = to_export(load_file(args.checkpoint), args.checkpoint, keep_head=args.keep_head)
    if args.fp16:
        blob = half_precision(blob)
    model, meta = export_model(blob, args.checkpoint)
    if args.format == "onnx":
        onnx_model = to_onnx(model, meta)
        atomic_write(Path(args.out), lambda f: f.write(onnx_model))
        print(
            f"wrote {args.out}: {meta.arch} as ONNX ({len(onnx_model) / 2**20:.1f} MB), {meta.feature_dim}-d, "
            f"input {meta.preprocessing.input_size}px, {meta.fingerprint}"
        )
        return
    atomic_torch_save(blob, Path(args.out))
    print(
        f"wrote {args.out}: {meta.arch} (cifar stem: {meta.cifar_stem}), {meta.feature_dim}-d features, "
        f"input {meta.preprocessing.input_size}px, {meta.fingerprint}"
    )


def cmd_embed(args: argparse.Namespace) -> None:
    from .embed import run_embed

    summary = run_embed(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


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
        status = {
            "train": cmd_train,
            "knn": cmd_knn,
            "lincls": cmd_lincls,
            "export": cmd_export,
            "embed": cmd_embed,
            "plot": cmd_plot,
        }[args.command](args)
    except USER_ERRORS as exc:
        print(f"moco-train {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moco-train {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
