"""Training options and their defaults in one place (flag names follow facebookresearch/moco's main_moco.py
and moco-v3's), and the method-dependent defaults they resolve to."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moco_retrieval.architectures import RESNET_ARCHS
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU
from moco_retrieval.options import option
from moco_retrieval.vit import VIT_ARCHS

from .builder import BN_MODES

# The queue holds at most this share of the dataset (see auto_queue_size).
QUEUE_SHARE = 0.1
MAX_QUEUE = 65536
# --compile auto compiles the encoders for runs of at least this many steps: compiling costs a
# minute or so of start-up on a CPU, which faster steps pay back only in longer runs (the README's
# training results); smoke runs and the demo stay eager.
COMPILE_MIN_STEPS = 1000
ARCHS = (*RESNET_ARCHS, *VIT_ARCHS)


class ConfigError(ValueError):
    """Options that do not fit together or this machine (a user error: reported in one line)."""


@dataclass
class TrainConfig:
    """Every `moco-train train` option: its default, flags and help (the parser is derived from it).
    None defaults depend on the method (MoCo v1/v2 or v3) and the data: see resolve()."""

    data: str = option(
        positional=True, metavar="DATA", help="image folder (any depth) or text file listing image paths"
    )
    run_dir: str = option(help="checkpoints, log.jsonl and curves.png go here")
    arch: str = option(
        "resnet18",
        "-a",
        "--arch",
        metavar="ARCH",
        choices=ARCHS,
        help=f"any torchvision ResNet, or (--moco-v3) {', '.join(VIT_ARCHS)}",
    )
    workers: int = option(2, "-j", "--workers", help="data-loading processes per training process")
    epochs: int = option(200, help="training length in passes over the data")
    max_steps: int | None = option(None, help="train for this many steps instead of --epochs (the schedules follow it)")
    batch_size: int = option(256, "-b", "--batch-size", help="global batch size, split evenly across processes")
    lr: float | None = option(
        None,
        "--lr",
        "--learning-rate",
        help="learning rate, with each official code's rule: v1/v2 take it as the rate of the "
        "global batch (default 0.03 for -b 256; scale it yourself: 0.06 for -b 512), v3 takes "
        "the base rate per 256 images and trains at lr x batch/256, as moco-v3's main_moco.py "
        "(default 0.3 with LARS, 1.5e-4 with AdamW)",
    )
    momentum: float = option(0.9, help="SGD/LARS momentum")
    weight_decay: float | None = option(
        None, "--wd", "--weight-decay", help="default 1e-4 (v1/v2), v3: 1e-6 with LARS, 0.1 with AdamW"
    )
    schedule: list[int] = option([120, 160], help="epochs at which the lr drops x0.1 (without --cos)")
    cos: bool = option(False, help="half-cosine lr schedule (after --warmup-epochs)")
    warmup_epochs: float | None = option(
        None, help="linear lr warm-up; default 0 (v1/v2), v3: 10 (ResNets) and 40 (ViTs), the official recipes'"
    )
    optimizer: str = option(
        "auto", choices=("auto", "sgd", "lars", "adamw"), help="auto: SGD (v1/v2), LARS (v3 ResNets), AdamW (v3 ViTs)"
    )
    moco_v3: bool = option(
        False,
        help="MoCo v3: no queue, keys of the whole batch, symmetric loss, predictor MLP, "
        "momentum 0.99 -> 1 (cosine), warm-up then cosine lr",
    )
    moco_dim: int | None = option(None, help="feature dimension; default 128 (v1/v2), 256 (v3)")
    moco_mlp_dim: int = option(4096, help="hidden width of v3's projection and prediction MLPs")
    moco_k: int | None = option(
        None, help="queue size (v1/v2; default: the largest power of two <= 10%% of the images, at most 65536)"
    )
    moco_m: float | None = option(
        None, help="key encoder momentum; default 0.999 (v1/v2), 0.99 (v3: the start of its cosine schedule)"
    )
    moco_m_cos: bool | None = option(
        None, "--moco-m-cos", help="raise the momentum to 1 on a half-cosine over training (default: on for v3)"
    )
    moco_t: float | None = option(
        None,
        help="softmax temperature; default 0.07 (v1), 0.2 (v2; 0.1 for crops <= 64 px), v3: 0.2 (ViT), 1.0 (ResNet)",
    )
    mlp: bool = option(False, help="MLP projection head (MoCo v2)")
    aug_plus: bool = option(False, help="MoCo v2 augmentation (stronger colour jitter, grayscale, blur)")
    symmetric: bool = option(False, help="symmetric loss L(q1,k2) + L(q2,k1) (v1/v2; v3 always is)")
    stop_grad_conv1: bool = option(
        True, help="v3 ViTs: keep the random patch projection frozen (the paper's stability fix)"
    )
    bn: str = option(
        "auto",
        choices=("auto", *BN_MODES),
        help="split (auto, the default): keys shuffled (across processes under DDP) and the global "
        "batch normalised in --bn-splits groups whatever the process count; shuffle: keys "
        "shuffled across processes, one BN group per process (the official per-GPU BN); sync: "
        "BatchNorm over the global batch (SyncBatchNorm on GPUs, the same over gloo on CPUs), "
        "no shuffle; none: plain BN, no shuffle (leaks batch statistics "
        "between query and key: a shortcut that hurts learning). v1/v2 only",
    )
    bn_splits: int = option(
        8,
        help="BatchNorm groups over the global batch for --bn split (the official 8-GPU "
        "recipe); split inside each process when there are fewer processes",
    )
    cifar_stem: str = option(
        "auto",
        choices=("auto", "on", "off"),
        help="ResNets: 3x3 stride-1 stem without max-pool; auto: on for crops of 64 px or less",
    )
    crop_min: float | None = option(
        None,
        help="smallest crop, as a share of the image's area (RandomResizedCrop scale (crop_min, 1)); default "
        "0.2 (v1/v2 and v3 ResNets, the official recipes), 0.08 (v3 ViTs, and every method on crops "
        "of 64 px or less: the official CIFAR-10 recipe)",
    )
    crop_size: int | None = option(
        None, help="training crop (default: the image size if small, else 224; a ViT's own input size)"
    )
    seed: int = option(0, help="seeds weights, data order and augmentation")
    init: str | None = option(
        None,
        metavar="FILE",
        help="continued pretraining: start both encoders from FILE (a moco-train export or "
        "checkpoint, an official MoCo checkpoint, or a torchvision ResNet state dict) "
        "instead of random weights; the projection head is re-initialised if it does "
        "not fit",
    )
    device: str = option("auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    amp: str = option(
        "auto",
        choices=("auto", "off", "bf16", "fp16"),
        help="autocast precision; auto: bf16 (fp16 if unsupported) on GPU, bf16 on CPUs with native bf16, else float32",
    )
    channels_last: bool = option(False, help="channels_last memory format")
    data_pipeline: str = option(
        "auto",
        choices=("auto", "pil", "tensor"),
        help="pil: decode and augment each image in the -j data workers; tensor: decode the corpus "
        "once into one uint8 tensor on the device and augment whole batches there (for GPUs: PIL "
        "workers cannot keep up with them on small images); auto: tensor on CUDA for crops of 64 px "
        "or less, else pil",
    )
    compile: str = option(
        "auto",
        choices=("auto", "on", "off"),
        help="torch.compile the encoders (inductor; a minute or so of start-up, faster steps); "
        f"auto: on for runs of at least {COMPILE_MIN_STEPS} steps when a C compiler is present",
    )
    save_every_steps: int = option(0, help="also checkpoint every N steps (0: every epoch only)")
    keep: int = option(3, help="checkpoints to keep (0: all)")
    resume: str | None = option(
        None, metavar="auto|PATH", help="auto: newest valid checkpoint in --run-dir (fresh start if none), or a path"
    )
    knn_bank: str | None = option(None, help="labelled folder: kNN monitor bank")
    knn_queries: str | None = option(None, help="labelled folder: kNN monitor queries")
    knn_every: int = option(1, help="run the kNN monitor every N epochs")
    knn_k: int = option(DEFAULT_K, help="kNN monitor neighbours")
    knn_t: float = option(DEFAULT_TAU, help="kNN monitor vote temperature")
    progress: bool = option(True, help="progress bar")

    def apply_v2(self) -> None:
        """MoCo v2: MLP head, stronger augmentation, cosine schedule (and its τ, see resolve)."""
        self.mlp, self.aug_plus, self.cos = True, True, True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """The method-dependent hyper-parameters a run uses: the options, their None defaults resolved."""

    lr: float
    weight_decay: float
    optimizer: str  # sgd | lars | adamw
    warmup_epochs: float
    moco_dim: int
    moco_m: float
    moco_m_cos: bool
    moco_t: float
    crop_min: float


def resolve(cfg: TrainConfig, small: bool) -> Recipe:
    """Fill in the defaults that depend on the method and the data (`small`: crops <= 64 px).

    v1/v2 follow facebookresearch/moco (lr 0.03, wd 1e-4, m 0.999, τ 0.07 or v2's 0.2, crop scale
    from 0.2). For v2 on small crops τ is 0.1, the official CIFAR-10 demo's value, which also
    learned faster than 0.2 in a short CIFAR-10 pilot (the README's training section). v3 follows
    facebookresearch/moco-v3's CONFIG.md: LARS for ResNets (base lr 0.3, wd 1e-6, τ 1.0, 10
    warm-up epochs, --crop-min 0.2), AdamW for ViTs (base lr 1.5e-4, wd 0.1, τ 0.2, 40 warm-up
    epochs, crop-min 0.08), 256-d output, m 0.99 -> 1 (cosine); its rate is base lr x batch/256,
    as its main_moco.py computes it. Crops of 64 px or less start at 0.08 (the CIFAR-10 recipe)."""

    def pick(value, default):
        return default if value is None else value

    if cfg.crop_min is not None and not 0 < cfg.crop_min <= 1:
        raise ConfigError(f"--crop-min {cfg.crop_min}: a share of the image's area, in (0, 1]")
    if cfg.moco_v3:
        vit = cfg.arch in VIT_ARCHS
        optimizer = ("adamw" if vit else "lars") if cfg.optimizer == "auto" else cfg.optimizer
        base_lr = pick(cfg.lr, {"adamw": 1.5e-4, "lars": 0.3, "sgd": 0.3}[optimizer])
        return Recipe(
            lr=base_lr * cfg.batch_size / 256,
            weight_decay=pick(cfg.weight_decay, 0.1 if optimizer == "adamw" else 1e-6),
            optimizer=optimizer,
            warmup_epochs=pick(cfg.warmup_epochs, 40 if vit else 10),
            moco_dim=pick(cfg.moco_dim, 256),
            moco_m=pick(cfg.moco_m, 0.99),
            moco_m_cos=pick(cfg.moco_m_cos, True),
            moco_t=pick(cfg.moco_t, 0.2 if vit else 1.0),
            crop_min=pick(cfg.crop_min, 0.08 if vit or small else 0.2),
        )
    v2 = cfg.mlp and cfg.aug_plus
    return Recipe(
        lr=pick(cfg.lr, 0.03),
        weight_decay=pick(cfg.weight_decay, 1e-4),
        optimizer="sgd" if cfg.optimizer == "auto" else cfg.optimizer,
        warmup_epochs=pick(cfg.warmup_epochs, 0),
        moco_dim=pick(cfg.moco_dim, 128),
        moco_m=pick(cfg.moco_m, 0.999),
        moco_m_cos=pick(cfg.moco_m_cos, False),
        moco_t=pick(cfg.moco_t, (0.1 if small else 0.2) if v2 else 0.07),
        crop_min=pick(cfg.crop_min, 0.08 if small else 0.2),
    )


def auto_queue_size(num_images: int, keys_per_step: int) -> int:
    """Default K: the largest power of two <= 10% of the dataset, within [keys per step, 65536].

    This gives 65536 on ImageNet (as in the paper) and 4096 on CIFAR-10 (as in the official CIFAR
    demo). Capping K well below the dataset size means the random initial keys are all replaced
    within the first tenth of an epoch and an image rarely meets its own stale key as a negative.
    """
    k = 1
    while k * 2 <= num_images * QUEUE_SHARE:
        k *= 2
    return max(keys_per_step, min(k, MAX_QUEUE))
