"""Training options and their defaults in one place (flag names follow facebookresearch/moco's main_moco.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The queue holds at most this share of the dataset (see auto_queue_size).
QUEUE_SHARE = 0.1
MAX_QUEUE = 65536
# --compile auto compiles the encoders for runs of at least this many steps. Compiling ResNet-18
# (CIFAR stem, batch 64) added about 50 s of start-up on 2 CPU cores and made steps 1.08-1.21x
# faster (bench/results/train_throughput.json), paid back after 100-300 steps; shorter runs (smoke
# tests, the demo) stay eager.
COMPILE_MIN_STEPS = 1000


@dataclass
class TrainConfig:
    data: str
    run_dir: str
    arch: str = "resnet18"
    workers: int = 2
    epochs: int = 200
    max_steps: int | None = None       # training length in steps; overrides --epochs and sets the schedule
    batch_size: int = 256              # global batch (split evenly across processes)
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    cos: bool = False
    moco_dim: int = 128
    moco_k: int | None = None          # None: auto_queue_size
    moco_m: float = 0.999
    moco_t: float | None = None        # None: default_temperature
    mlp: bool = False
    aug_plus: bool = False
    symmetric: bool = False
    bn: str = "auto"                   # auto (= split) | split | shuffle | sync | none
    bn_splits: int = 8                 # BN groups over the global batch (split mode)
    cifar_stem: str = "auto"           # auto | on | off
    crop_size: int | None = None       # None: image size for small images, else 224
    seed: int = 0
    init: str | None = None            # start f_q/f_k from this file (continued pretraining)
    device: str = "auto"
    amp: str = "auto"                  # auto | off | bf16 | fp16
    channels_last: bool = False
    compile: str = "auto"              # auto (long runs, with a C compiler) | on | off
    save_every_steps: int = 0
    keep: int = 3
    resume: str | None = None          # None | "auto" | path
    knn_bank: str | None = None
    knn_queries: str | None = None
    knn_every: int = 1
    knn_k: int = 200
    knn_t: float = 0.07
    progress: bool = True

    def apply_v2(self) -> None:
        """MoCo v2: MLP head, stronger augmentation, cosine schedule (and its τ, default_temperature)."""
        self.mlp, self.aug_plus, self.cos = True, True, True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_temperature(cfg: TrainConfig, small: bool) -> float:
    """τ when --moco-t is not given: 0.07 (MoCo v1), 0.2 (v2: MLP head and strong augmentation), but
    0.1 for v2 on crops of 64 px or less, the official CIFAR-10 demo's value. Measured: after 300
    steps of the small-image recipe on CIFAR-10 (batch 128), kNN top-1 was 35.2% with τ = 0.1 and
    32.9% with τ = 0.2 (see the README's training section)."""
    if cfg.moco_t is not None:
        return cfg.moco_t
    if cfg.mlp and cfg.aug_plus:
        return 0.1 if small else 0.2
    return 0.07


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
