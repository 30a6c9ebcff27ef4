"""Training options and their defaults in one place (flag names follow facebookresearch/moco's main_moco.py
and moco-v3's; the other methods' options are named after their official code's), and the
method-dependent defaults they resolve to."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moco_retrieval.architectures import RESNET_ARCHS, backbone_dim
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
# The objectives (moco_train/methods.py builds each); moco covers v1, v2 and (--moco-v3) v3.
METHODS = ("moco", "instdisc", "simclr", "byol", "barlow", "swav")
# Methods whose --lr is a base rate per 256 images, as their official code scales it (MoCo v3 too).
LR_PER_256 = ("simclr", "byol", "barlow", "swav")
# A recipe's warm-up (unless --warmup-epochs is given) takes at most this share of the run. The
# official recipes' largest share is MoCo v3 ViT's 40 of 300 epochs (13%), so at the papers'
# schedules it changes nothing; on a 1-10 epoch budget the rate still peaks and the cosine runs.
WARMUP_SHARE = 0.15
# BYOL's presets by schedule length (google-deepmind/byol, byol/configs/byol.py: _LR_PRESETS,
# _WD_PRESETS, _EMA_PRESETS): a run takes the preset of the shortest listed length >= its own.
BYOL_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


class ConfigError(ValueError):
    """Options that do not fit together or this machine (a user error: reported in one line)."""


class TrainingDiverged(RuntimeError):
    """A step's loss or gradients were not finite: the run stops before that step's update, so no
    checkpoint holds its weights (reported in one line, as the user errors are)."""


@dataclass
class TrainConfig:
    """Every `moco-train train` option: its default, flags and help (the parser is derived from it).
    None defaults depend on the method (MoCo v1/v2 or v3, InstDisc, ...) and the data: see resolve()."""

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
        None,
        help="linear lr warm-up, taken as given; default: the recipe's (0 for v1/v2, instdisc and swav; 10 for "
        "v3 ResNets, simclr, byol and barlow; 40 for v3 ViTs) capped at 15%% of the run",
    )
    optimizer: str = option(
        "auto", choices=("auto", "sgd", "lars", "adamw"), help="auto: SGD (v1/v2), LARS (v3 ResNets), AdamW (v3 ViTs)"
    )
    method: str = option(
        "moco",
        choices=METHODS,
        help="the objective: moco (MoCo v1/v2, or v3 with --moco-v3), instdisc (memory bank and NCE), "
        "simclr (NT-Xent over the batch), byol (online/target networks), barlow (Barlow Twins), "
        "swav (online clustering); the --moco-* options that name the projection's dimension, "
        "temperature and momentum apply to every method that has one",
    )
    moco_v3: bool = option(
        False,
        help="MoCo v3: no queue, keys of the whole batch, symmetric loss, predictor MLP, "
        "momentum 0.99 -> 1 (cosine), warm-up then cosine lr",
    )
    moco_dim: int | None = option(
        None,
        "--moco-dim",
        "--dim",
        help="output dimension of the projection head; default 128 (v1/v2, instdisc, simclr, swav), "
        "256 (v3, byol), 2048 (barlow: the official 8192 scaled down for the CPU)",
    )
    moco_mlp_dim: int | None = option(
        None,
        help="hidden width of the MLP heads: 4096 (v3's and byol's), 2048 (barlow's projector, swav's); "
        "simclr's is the backbone's width",
    )
    moco_k: int | None = option(
        None, help="queue size (v1/v2; default: the largest power of two <= 10%% of the images, at most 65536)"
    )
    moco_m: float | None = option(
        None,
        help="key (target) encoder momentum; default 0.999 (v1/v2), 0.99 (v3: the start of its cosine "
        "schedule), byol's τ_base by the run's length (0.97 up to 40 epochs, 0.99 up to 300, 0.996 beyond)",
    )
    moco_m_cos: bool | None = option(
        None, "--moco-m-cos", help="raise the momentum to 1 on a half-cosine over training (default: on for v3, byol)"
    )
    moco_t: float | None = option(
        None,
        "--moco-t",
        "--temperature",
        help="softmax temperature; default 0.07 (v1), 0.2 (v2; 0.1 for crops <= 64 px), v3: 0.2 (ViT), "
        "1.0 (ResNet); instdisc 0.07 (0.1 for crops <= 64 px), simclr 0.1 (0.5), swav 0.1",
    )
    mlp: bool = option(False, help="MLP projection head (MoCo v2)")
    aug_plus: bool = option(False, help="MoCo v2 augmentation (stronger colour jitter, grayscale, blur)")
    symmetric: bool = option(False, help="symmetric loss L(q1,k2) + L(q2,k1) (v1/v2; v3 always is)")
    stop_grad_conv1: bool = option(
        True, help="v3 ViTs: keep the random patch projection frozen (the paper's stability fix)"
    )
    nce_k: int = option(4096, help="instdisc: noise samples per image drawn from the memory bank (NCE's m)")
    nce_m: float = option(0.5, help="instdisc: memory bank momentum")
    nce_prox: float = option(
        0.0, help="instdisc: weight λ of the proximal term λ·‖v − memory‖² (0: off, as the reference code)"
    )
    simclr_head: str = option(
        "mlp",
        choices=("mlp", "linear"),
        help="simclr: SimCLR v1's 2-layer MLP head, or one Linear layer (MoCo v1's and InstDisc's head)",
    )
    barlow_lambda: float = option(5e-3, help="barlow: weight of the off-diagonal terms (the paper's λ)")
    swav_prototypes: int = option(3000, help="swav: number of prototypes")
    swav_epsilon: float = option(0.05, help="swav: entropic regularisation ε of Sinkhorn-Knopp")
    sinkhorn_iterations: int = option(3, help="swav: Sinkhorn-Knopp iterations")
    swav_queue: int = option(
        3840, help="swav: queue length in embeddings, cut to a multiple of the global batch (0: no queue)"
    )
    swav_queue_start: float = option(15, help="swav: epochs before the queue is filled (then used once full)")
    swav_freeze_prototypes: float = option(
        1, help="swav: epochs during which the prototypes are not updated (the official 313 or 5005 iterations)"
    )
    multi_crop: int = option(0, help="swav: small crops per image besides the two at the input size (official: 6)")
    multi_crop_size: int | None = option(
        None, help="swav: the small crops' side (default: the input size x 96/224, the official 224 and 96)"
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
    mlp_dim: int = 4096  # hidden width of the MLP heads
    bias_lr_scale: float = 1.0  # biases' and normalisation parameters' rate, relative to lr (Barlow Twins')
    zero_init_residual: bool = False  # each residual block's last BN starts at zero (SimCLR, BYOL, Barlow Twins)


@dataclass(frozen=True)
class SgdOptions:
    """`moco-train lincls`'s SGD protocol: facebookresearch/moco's main_lincls.py defaults."""

    epochs: int = 100
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: tuple[int, ...] = (60, 80)
    batch_size: int = 256
    seed: int = 0


def capped_warmup(recipe_epochs: float, run_epochs: float) -> float:
    """The recipe's warm-up, at most WARMUP_SHARE of the run."""
    return min(recipe_epochs, WARMUP_SHARE * run_epochs)


def resolve(cfg: TrainConfig, small: bool, epochs: float | None = None) -> Recipe:
    """Fill in the defaults that depend on the method, the data (`small`: crops <= 64 px) and the
    run's length (`epochs`, default --epochs): the recipe's warm-up is capped at WARMUP_SHARE of the
    run unless --warmup-epochs is given, and BYOL takes its preset for the run's length.

    v1/v2 follow facebookresearch/moco (lr 0.03, wd 1e-4, m 0.999, τ 0.07 or v2's 0.2, crop scale
    from 0.2). For v2 on small crops τ is 0.1, the official CIFAR-10 demo's value, which also
    learned faster than 0.2 in a short CIFAR-10 pilot (the README's training section). v3 follows
    facebookresearch/moco-v3's CONFIG.md: LARS for ResNets (base lr 0.3, wd 1e-6, τ 1.0, 10
    warm-up epochs, --crop-min 0.2), AdamW for ViTs (base lr 1.5e-4, wd 0.1, τ 0.2, 40 warm-up
    epochs, crop-min 0.08), 256-d output, m 0.99 -> 1 (cosine); its rate is base lr x batch/256,
    as its main_moco.py computes it. Crops of 64 px or less start at 0.08 (the CIFAR-10 recipe)."""

    def pick(value, default):
        return default if value is None else value

    epochs = cfg.epochs if epochs is None else epochs
    if cfg.crop_min is not None and not 0 < cfg.crop_min <= 1:
        raise ConfigError(f"--crop-min {cfg.crop_min}: a share of the image's area, in (0, 1]")
    if cfg.method != "moco":
        return resolve_other(cfg, small, epochs)
    if cfg.moco_v3:
        vit = cfg.arch in VIT_ARCHS
        optimizer = ("adamw" if vit else "lars") if cfg.optimizer == "auto" else cfg.optimizer
        base_lr = pick(cfg.lr, {"adamw": 1.5e-4, "lars": 0.3, "sgd": 0.3}[optimizer])
        return Recipe(
            lr=base_lr * cfg.batch_size / 256,
            weight_decay=pick(cfg.weight_decay, 0.1 if optimizer == "adamw" else 1e-6),
            optimizer=optimizer,
            warmup_epochs=pick(cfg.warmup_epochs, capped_warmup(40 if vit else 10, epochs)),
            moco_dim=pick(cfg.moco_dim, 256),
            moco_m=pick(cfg.moco_m, 0.99),
            moco_m_cos=pick(cfg.moco_m_cos, True),
            moco_t=pick(cfg.moco_t, 0.2 if vit else 1.0),
            crop_min=pick(cfg.crop_min, 0.08 if vit or small else 0.2),
            mlp_dim=pick(cfg.moco_mlp_dim, 4096),
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
        mlp_dim=pick(cfg.moco_mlp_dim, 4096),
    )


def paper_defaults(method: str, arch: str, small: bool, epochs: float, multi_crop: int = 0) -> dict[str, Any]:
    """What each method's paper or official code trains with for a run of `epochs` (lr: the rate
    itself for instdisc, a base rate per 256 images for the others; small: crops of 64 px or less;
    warmup_epochs: the recipe's, which resolve caps at WARMUP_SHARE of the run).
      instdisc: lemniscate.pytorch's main.py (ImageNet) and cifar.py (small): SGD 0.03, wd 1e-4
        (5e-4), τ 0.07 (0.1), 128-d, MoCo v1's crop scale 0.2;
      simclr: the paper's ImageNet recipe (LARS, base 0.3, wd 1e-6, τ 0.1, 10 warm-up epochs) or its
        official CIFAR-10 command (base 1.0, wd 1e-4, τ 0.5); 128-d out, hidden = the backbone's
        width; zero-initialised residual BNs (google-research/simclr resnet.py, init_zero);
      byol: LARS, 10 warm-up epochs, 4096-256 MLPs, τ_base cosine to 1; base lr, wd and τ_base from
        deepmind's presets by length (BYOL_PRESETS: 0.45, 1e-6, 0.97 up to 40 epochs ... 0.2, 1.5e-6,
        0.996 at 1000); zero-initialised residual BNs (byol/utils/networks.py);
      barlow: LARS base 0.2 for weights and 0.0048 for biases and BN parameters (main.py's
        --learning-rate-weights and --learning-rate-biases), wd 1.5e-6, 10 warm-up epochs, the paper's
        λ; projector 2048-2048-2048 (official: 8192, scaled down for the CPU); zero-initialised
        residual BNs (main.py: resnet50(zero_init_residual=True));
      swav: its batch-256 recipe: LARS base 0.6, wd 1e-6, no warm-up, 2048-128 head, τ 0.1; crop scale
        (0.14, 1) with multi-crop, (0.08, 1) with two crops (the official 2x224 scripts' --min_scale_crops).
    Crops of 64 px or less start at 0.08 (SwAV's multi-crop at 0.14: its small crops span (0.05, 0.14))."""
    crop_min = 0.08 if small else 0.2
    lars = dict(optimizer="lars", moco_m=0.0, moco_m_cos=False, crop_min=0.08)
    byol_lr, byol_wd, byol_tau = BYOL_PRESETS[min((n for n in BYOL_PRESETS if n >= epochs), default=max(BYOL_PRESETS))]
    return {
        "instdisc": dict(
            optimizer="sgd",
            lr=0.03,
            weight_decay=5e-4 if small else 1e-4,
            warmup_epochs=0,
            moco_dim=128,
            moco_m=0.0,
            moco_m_cos=False,
            moco_t=0.1 if small else 0.07,
            crop_min=crop_min,
            mlp_dim=0,
        ),
        "simclr": dict(
            lars,
            lr=1.0 if small else 0.3,
            weight_decay=1e-4 if small else 1e-6,
            warmup_epochs=10,
            moco_dim=128,
            moco_t=0.5 if small else 0.1,
            mlp_dim=backbone_dim(arch),
            zero_init_residual=True,
        ),
        "byol": dict(
            lars,
            lr=byol_lr,
            weight_decay=byol_wd,
            warmup_epochs=10,
            moco_dim=256,
            moco_m=byol_tau,
            moco_m_cos=True,
            moco_t=0.0,
            mlp_dim=4096,
            zero_init_residual=True,
        ),
        "barlow": dict(
            lars,
            lr=0.2,
            weight_decay=1.5e-6,
            warmup_epochs=10,
            moco_dim=2048,
            moco_t=0.0,
            mlp_dim=2048,
            bias_lr_scale=0.0048 / 0.2,
            zero_init_residual=True,
        ),
        "swav": dict(
            lars,
            lr=0.6,
            weight_decay=1e-6,
            warmup_epochs=0,
            moco_dim=128,
            moco_t=0.1,
            crop_min=0.14 if multi_crop else 0.08,
            mlp_dim=2048,
        ),
    }[method]


def resolve_other(cfg: TrainConfig, small: bool, epochs: float) -> Recipe:
    """The Recipe of instdisc, simclr, byol, barlow or swav: paper_defaults, each overridden by its
    option; --lr is the rate itself for instdisc and a base rate per 256 images for the others."""
    if cfg.moco_v3 or cfg.symmetric or cfg.mlp:
        raise ConfigError(f"--moco-v3, --symmetric and --mlp are MoCo options; --method {cfg.method} has its own head")
    if cfg.arch in VIT_ARCHS:
        raise ConfigError(f"-a {cfg.arch}: Vision Transformers train with --method moco --moco-v3")
    d = paper_defaults(cfg.method, cfg.arch, small, epochs, cfg.multi_crop)
    d["warmup_epochs"] = capped_warmup(d["warmup_epochs"], epochs)
    given = {
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": None if cfg.optimizer == "auto" else cfg.optimizer,
        "warmup_epochs": cfg.warmup_epochs,
        "moco_dim": cfg.moco_dim,
        "moco_m": cfg.moco_m,
        "moco_m_cos": cfg.moco_m_cos,
        "moco_t": cfg.moco_t,
        "crop_min": cfg.crop_min,
        "mlp_dim": cfg.moco_mlp_dim,
    }
    values = {**d, **{name: value for name, value in given.items() if value is not None}}
    if cfg.method in LR_PER_256:
        values["lr"] *= cfg.batch_size / 256
    return Recipe(**values)


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
