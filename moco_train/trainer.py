"""The training loop of every method: device and precision, schedule, progress/JSON logging, checkpoint
cadence, resume, the kNN monitor. What differs between methods is behind method.Method and methods.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from moco_retrieval.devices import cpu_has_native_bf16, cpu_supports_fp16_autocast, resolve_device
from moco_retrieval.export import export_model
from moco_retrieval.preprocessing import Preprocessing, is_small
from moco_retrieval.vit import VIT_ARCHS

from . import distributed
from .builder import BN_MODES
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    find_resume,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    to_export,
)
from .config import COMPILE_MIN_STEPS, WARMUP_SHARE, ConfigError, TrainConfig, TrainingDiverged, resolve
from .curves import plot_run
from .data import DataError, EpochSampler, UnlabeledImages, collate_pairs, detect_geometry, find_images, validate
from .evaluate import BankRows, extract_features, knn_against, knn_evaluate
from .global_bn import has_global_batchnorm, synchronise_batchnorm
from .methods import BuildContext, method_spec
from .optim import build_optimizer, cosine_momentum, lr_factor
from .pretrained import fit_to_init, init_encoder, read_init
from .tensor_data import TensorBatches, TensorImages, resolve_pipeline, store_side
from .transforms import PilView, ViewsTransform

# Under fp16, GradScaler skips a step whose gradients overflowed and halves its scale (its design:
# the scale was too high). A scale below this (fairseq's --min-loss-scale) is no longer overflow
# at a high scale but a loss or gradient that is not finite at all: about 29 such steps in a row.
FP16_MIN_SCALE = 1e-4


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32. auto: bf16 on GPUs that support it, else fp16 (with
    GradScaler); on the CPU bf16 where the CPU computes it natively (faster than float32 there),
    else float32 (emulated bf16 is far slower; the README's training results). fp16 on the CPU
    (with a CPU GradScaler) only when asked for and torch autocasts to it there."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if amp == "fp16" and device.type == "cpu" and not cpu_supports_fp16_autocast():
        raise ConfigError("--amp fp16: this torch cannot autocast to float16 on the CPU (use bf16)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def resolve_compile(mode: str, steps: int) -> bool:
    """Whether to torch.compile the encoders. auto: for runs of at least COMPILE_MIN_STEPS steps, where
    inductor finds the C compiler it builds its CPU kernels (and Triton its GPU launchers) with."""
    if mode == "auto":
        compilers = (os.environ.get("CC", "cc"), "gcc", "clang")
        return steps >= COMPILE_MIN_STEPS and any(shutil.which(cc) for cc in compilers)
    if mode not in ("on", "off"):
        raise ConfigError("--compile must be auto, on or off")
    return mode == "on"


def resolve_bn(bn: str, bn_splits: int, world_size: int) -> tuple[str, int]:
    """(mode, BatchNorm groups per process). auto is split. split: the keys are shuffled (across
    processes under DDP) and the global batch is normalised in --bn-splits groups whatever the
    process count: bn_splits / world groups inside each process, or one per process when there are
    at least as many processes as splits. So 1 and 2 processes run the same algorithm, as the
    official 8-GPU recipe (8 groups) does on any number of devices. shuffle: one group per process
    (the official code's per-GPU BN, literally)."""
    mode = "split" if bn == "auto" else bn
    if mode not in BN_MODES:
        raise ConfigError(f"--bn must be auto or one of {', '.join(BN_MODES)}")
    if mode != "split" or world_size >= bn_splits:
        return mode, 1
    if bn_splits % world_size:
        raise ConfigError(f"--bn-splits {bn_splits} is not divisible by the {world_size} processes")
    return mode, bn_splits // world_size


class JsonLog:
    """Appends one JSON object per line to run_dir/log.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **record: Any) -> None:
        if self.file:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class Trainer:
    """Builds data, model and optimizer from a TrainConfig and runs (or resumes) training."""

    def __init__(self, cfg: TrainConfig) -> None:
        distributed.init_distributed(cfg.device)
        self.cfg = cfg
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.main = self.rank == 0
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.spec = method_spec(cfg)
        # Only MoCo v1/v2 shuffles keys; every other method's BatchNorm is global under DDP (see _build_model).
        self.bn, self.local_bn_splits = (
            resolve_bn(cfg.bn, cfg.bn_splits, self.world) if self.spec.shuffle_bn else ("none", 1)
        )
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        if self.local_batch % self.local_bn_splits:
            raise ConfigError(
                f"--bn split needs the per-process batch ({self.local_batch}) divisible by its "
                f"{self.local_bn_splits} BatchNorm groups (--bn-splits {cfg.bn_splits})"
            )
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = JsonLog(self.run_dir / "log.jsonl", enabled=False)  # fit opens it

        # The same seed on every rank: identical initial weights and queue without a broadcast, and
        # identical RNG streams (only rank 0's key permutation is used), so rank 0's RNG state in a
        # checkpoint is every rank's. Augmentation is seeded per sample (see data.py).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self._build_data()
        self._build_model()

    def _build_data(self) -> None:
        cfg = self.cfg
        paths = find_images(cfg.data)
        if not paths:
            raise DataError(f"{cfg.data}: no image files found")
        good, self.skipped = validate(paths)
        if not good:
            raise DataError(f"{cfg.data}: none of the {len(paths)} image files can be read")
        geometry = detect_geometry(good)
        data_size = geometry.size if geometry.small else 224
        crop_size, cifar_stem = cfg.crop_size, cfg.cifar_stem
        self.init_weights = read_init(cfg.init) if cfg.init else None
        if self.init_weights is not None and cfg.arch not in VIT_ARCHS:  # train where the file's stem fits
            crop_size, cifar_stem, notice = fit_to_init(self.init_weights, cfg.init, crop_size, cifar_stem, data_size)
            if notice and self.main:
                warnings.warn(notice, stacklevel=2)
        input_size = crop_size or data_size
        if cfg.arch in VIT_ARCHS:
            if self.spec.label != "v3":
                raise ConfigError(f"-a {cfg.arch}: Vision Transformers train with --moco-v3 (--method moco)")
            vit_size = VIT_ARCHS[cfg.arch].img_size
            if cfg.crop_size not in (None, vit_size):
                raise ConfigError(f"-a {cfg.arch} takes {vit_size} px crops, not --crop-size {cfg.crop_size}")
            input_size = vit_size
        # The stem follows the crop the network sees, not the files: large photos trained at
        # --crop-size 64 need the CIFAR stem too, or the last feature map is 2x2.
        self.cifar_stem = cfg.arch not in VIT_ARCHS and (
            is_small(input_size) if cifar_stem == "auto" else cifar_stem == "on"
        )
        self.preprocessing = Preprocessing.for_input_size(input_size)
        # The run's length in epochs of the usable images (what the warm-up cap and BYOL's presets follow).
        run_epochs = cfg.max_steps / max(1, len(good) // cfg.batch_size) if cfg.max_steps else cfg.epochs
        self.recipe = resolve(cfg, is_small(input_size), run_epochs)
        views = self.spec.views(self.preprocessing, cfg, self.recipe)
        transform = ViewsTransform([PilView(self.preprocessing, view) for view in views])
        self.data_pipeline = resolve_pipeline(cfg.data_pipeline, self.device, input_size)
        if self.data_pipeline == "tensor":  # the same recipes, as batched tensor ops on the device
            side = store_side(geometry, self.preprocessing)
            self.dataset = TensorImages(
                good, transform.recipes(), self.preprocessing, side, cfg.seed, self.device, cfg.workers
            )
        else:
            self.dataset = UnlabeledImages(good, transform, cfg.seed)
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.rank, self.world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.load_failures: dict[int, str] = {}
        self.loader: DataLoader | TensorBatches | None = None
        if self.data_pipeline == "tensor":  # decoded up front: every undecodable file is known now
            self._report_failures(self.dataset.failed)

    def _build_model(self) -> None:
        cfg, recipe = self.cfg, self.recipe
        context = BuildContext(
            cifar_stem=self.cifar_stem,
            num_images=len(self.dataset),
            global_batch=cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            bn_splits=self.local_bn_splits,
            shuffle_keys=self.bn in ("split", "shuffle"),
        )
        self.model = self.spec.build(cfg, recipe, context)
        self.moco_k = getattr(self.model, "K", None)  # MoCo v1/v2's queue size
        self.init_source = "random"
        if cfg.init:
            query, *copies = self.model.encoders()
            predictor = getattr(self.model, "predictor", None)
            self.init_source = init_encoder(query, self.init_weights, cfg.init, cfg.arch, self.cifar_stem, predictor)
            self.init_weights = None  # loaded: not held for the rest of the run
            for copy in copies:
                copy.load_state_dict(query.state_dict())  # f_k.params = f_q.params
        if not self.spec.shuffle_bn or self.bn == "sync":
            # Every BatchNorm over the global batch under DDP, as moco-v3's main_moco.py (and SimCLR's,
            # BYOL's, Barlow Twins' and SwAV's official code) converts the model to SyncBatchNorm
            # (v3 needs no shuffle-BN: it has no queue to leak through).
            self.model = synchronise_batchnorm(self.model, self.device)
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.compiled = resolve_compile(cfg.compile, self.total_steps)
        if self.compiled:  # in place: parameter names, state dicts and checkpoints are unchanged
            for encoder in self.model.encoders():
                encoder.compile()
        self.net: nn.Module = self.model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The whole method's module, as in the official code, so that one DDP forward covers both
            # query passes (--symmetric, v3). Only f_q (and a predictor, prototypes) has gradients,
            # and every such parameter is used (find_unused_parameters off). Parameters and buffers are synced
            # from rank 0 at construction; no buffer broadcast at each forward: the queue stays
            # identical on all ranks by construction (gathered keys) and would cost K x dim floats
            # per step, and BN running statistics are not used in training (they are averaged
            # over the ranks at each checkpoint). With GlobalBatchNorm (gloo), whose backward
            # all-reduces, DDP's default path returned wrong gradients (relative error ~1 against
            # one process on the same batch; tests/moco_train/test_precision_matrix.py), and
            # static_graph, which routes the outputs through DDP's autograd sink, the right ones.
            self.net = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=ids,
                forward_sync_buffers=False,
                find_unused_parameters=False,
                gradient_as_bucket_view=True,
                static_graph=has_global_batchnorm(self.model),
            )
        params = [p for p in self.model.parameters() if p.requires_grad]  # not f_k, nor a frozen patch projection
        self.optimizer = build_optimizer(
            recipe.optimizer, params, recipe.lr, recipe.weight_decay, cfg.momentum, recipe.bias_lr_scale
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(
                lr_factor,
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
                warmup_epochs=recipe.warmup_epochs,
                cos=cfg.cos or self.spec.cosine,
                schedule=cfg.schedule,
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.recipe.warmup_epochs * self.steps_per_epoch)

    def schedule_line(self) -> str:
        """The rate a run peaks at and how it gets there, in one line (printed at the start)."""
        r, cfg = self.recipe, self.cfg
        warmup = (
            f"a {r.warmup_epochs:g}-epoch warm-up ({self.warmup_steps} of {self.total_steps} steps"
            + (f"; the recipe's, at most {WARMUP_SHARE:.0%} of the run)" if cfg.warmup_epochs is None else ")")
            if r.warmup_epochs
            else "no warm-up"
        )
        decay = "a half-cosine to 0" if cfg.cos or self.spec.cosine else f"x0.1 at epochs {cfg.schedule}"
        return f"schedule: {r.optimizer} at a peak lr of {r.lr:.4g} after {warmup}, then {decay}"

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": rng_state(),
            "args": self.cfg.to_dict(),
            "arch": self.cfg.arch,
            "cifar_stem": self.cifar_stem,
            "moco_k": self.moco_k,
            "encoder_prefix": self.model.query_prefix,
            "recipe": asdict(self.recipe),
            "preprocessing": self.preprocessing.to_dict(),
        }

    def save(self) -> None:
        """Rank 0 writes, with the BatchNorm statistics of every process averaged (see
        distributed.average_batchnorm_statistics); the barrier keeps every rank from running ahead
        of an unwritten checkpoint."""
        distributed.average_batchnorm_statistics(self.model)
        if self.main:
            save_checkpoint(self.run_dir, self.state(), self.cfg.keep)
        distributed.barrier()

    def resume(self, spec: str) -> bool:
        """Restore from `auto` (newest valid checkpoint in the run dir, if any) or a path."""
        if spec == "auto":
            # Rank 0 chooses, so every rank resumes from the same file even if one of them sees a
            # different set of files (the run dir must be on a filesystem shared by all nodes).
            found = find_resume(self.run_dir) if self.main else None
            path = distributed.broadcast_object(None if found is None else str(found[0]))
            if path is None:
                return False
            path = Path(path)
            blob = found[1] if self.main else load_checkpoint(path)
        else:
            path, blob = Path(spec), load_checkpoint(spec)
        try:
            self.model.load_state_dict(blob["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not match this model ({str(exc).splitlines()[0]})") from exc
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scaler.load_state_dict(blob["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = blob["epoch"], blob["step_in_epoch"], blob["global_step"]
        set_rng_state(blob["rng"])
        self.log.write(event="resume", checkpoint=str(path), global_step=self.global_step)
        if self.main:
            print(f"resumed from {path} at epoch {self.epoch} step {self.step_in_epoch}", file=sys.stderr)
        return True

    # -- the loop -----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _report_failures(self, failed: list[tuple[int, str]]) -> None:
        for index, reason in failed:
            if index not in self.load_failures:
                self.load_failures[index] = reason
                warnings.warn(f"skipping {reason}", stacklevel=2)

    def train_step(self, *views: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on a batch's views (and its samples' dataset indices, which InstDisc's
        memory bank is addressed by)."""
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        views = [view.to(self.device, non_blocking=True, memory_format=fmt) for view in views]
        if self.recipe.moco_m_cos:  # from the step count, so a resumed run continues the same schedule
            self.model.m = cosine_momentum(self.global_step, self.total_steps, self.recipe.moco_m)
        self.model.begin_step(self.global_step)
        with self._autocast():
            output = self.net(*self.model.inputs(views, index))
            loss = self.model.loss(*output)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.model.after_backward(self.global_step)
        acc = self.model.accuracy(*output)
        metrics = [loss.detach().float(), self._finite(loss)] + ([] if acc is None else [acc])
        reduced = distributed.all_reduce_mean(torch.stack(metrics)).tolist()  # over the global batch
        if reduced[1] < 1:  # the same verdict on every rank: the flag is reduced with the loss
            self._diverged(f"the loss ({reduced[0]:g}) or its gradients are not finite")
        self.scaler.step(self.optimizer)  # fp16: skipped where the scaled gradients overflowed
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < FP16_MIN_SCALE:
            self._diverged(f"GradScaler's scale fell below {FP16_MIN_SCALE:g}: its steps keep overflowing")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"loss": reduced[0], **({} if acc is None else {"acc": 100.0 * reduced[2]}), "lr": lr}

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 where the loss and every gradient are finite, else 0.0 (a tensor: no sync here). Under
        fp16 GradScaler judges the scaled gradients itself (it skips an overflow), so only the loss
        counts: a non-finite loss means the forward itself overflowed, and it has already written its
        keys into a queue or bank and its statistics into the BatchNorms, which no skip undoes."""
        finite = torch.isfinite(loss.detach())
        if self.scaler.is_enabled():
            return finite.float()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else loss.new_zeros(())
        return (finite & torch.isfinite(total)).float()

    def _diverged(self, what: str) -> None:
        """Stop at this step: its update is not applied and nothing after the last checkpoint is saved."""
        step, precision = self.global_step + 1, precision_name(self.amp_dtype)
        method = f"moco {self.spec.label}" if self.cfg.method == "moco" else self.cfg.method
        self.log.write(event="diverged", step=step, reason=what)
        raise TrainingDiverged(
            f"step {step}: {what} ({method} in {precision}); stopped before updating the weights, so the "
            f"checkpoints in {self.run_dir} are from earlier steps (try a lower --lr"
            + (")" if self.amp_dtype is None else ", or --amp off)")
        )

    def _loader(self) -> DataLoader | TensorBatches:
        """One loader for the whole run: workers decode and augment, persist across epochs and read
        the sampler's epoch from the main process; every rank runs the same number of full steps
        (the sampler drops the incomplete last global batch). The tensor pipeline's batches come
        from the decoded corpus, in the same sampler order."""
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        if self.loader is None and self.data_pipeline == "tensor":
            self.loader = TensorBatches(self.dataset, self.sampler, self.local_batch)
        elif self.loader is None:
            workers = self.cfg.workers
            self.loader = DataLoader(
                self.dataset,
                batch_size=self.local_batch,
                sampler=self.sampler,
                num_workers=workers,
                collate_fn=collate_pairs,
                drop_last=True,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator().manual_seed(self.cfg.seed),
            )
        return self.loader

    def knn_monitor(self) -> dict[str, float]:
        """kNN top-1/top-5 of the current f_q backbone, through the same export code as `moco-train knn`.
        A method with a memory bank (InstDisc) votes with it instead, as its paper's monitor does:
        the --knn-bank images' rows of the bank against the queries embedded by f_q with its head
        (the bank's space).

        It runs after the epoch's checkpoint is written, and building the eval model draws from the
        global RNGs (weight initialisation): every RNG is restored afterwards, so the run continues
        exactly as one resumed from that checkpoint does."""
        saved = rng_state()
        cfg, memory = self.cfg, self.model.knn_bank()
        try:
            blob = to_export({"format": CHECKPOINT_FORMAT, **self.state()}, "training", keep_head=memory is not None)
            model, meta = export_model(blob, device=self.device)
            if memory is None:
                result = knn_evaluate(
                    model, meta, cfg.knn_bank, cfg.knn_queries, k=cfg.knn_k, tau=cfg.knn_t, workers=cfg.workers
                )
            else:
                queries = extract_features(model, meta, cfg.knn_queries, workers=cfg.workers)
                result = knn_against(self.knn_rows.features(memory), queries, cfg.knn_k, cfg.knn_t)
        finally:
            set_rng_state(saved)
        return {"knn_top1": result.top1, "knn_top5": result.top5}

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log = JsonLog(self.run_dir / "log.jsonl", self.main)
        monitored = self.main and cfg.knn_bank and cfg.knn_queries and self.model.knn_bank() is not None
        # A memory-bank monitor's bank images are looked up among the training images now, not after an epoch.
        self.knn_rows = BankRows.find(cfg.knn_bank, self.dataset.paths) if monitored else None
        if cfg.resume:
            self.resume(cfg.resume)
        self.log.write(
            event="start",
            images=len(self.dataset),
            skipped=len(self.skipped),
            moco_k=self.moco_k,
            method=self.spec.label,
            **asdict(self.recipe),
            cifar_stem=self.cifar_stem,
            input_size=self.preprocessing.input_size,
            device=str(self.device),
            amp=str(self.amp_dtype),
            compiled=self.compiled,
            world_size=self.world,
            bn=self.bn,
            bn_groups=self.local_bn_splits * self.world,
            init=self.init_source,
            data_pipeline=self.data_pipeline,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            peak_lr=self.recipe.lr,
            warmup_steps=self.warmup_steps,
        )
        if self.main and cfg.progress:
            print(self.schedule_line(), file=sys.stderr)
        summary: dict[str, Any] = {}
        self.model.train()
        while self.global_step < self.total_steps:
            summary = self._epoch()
        self.log.write(event="end", global_step=self.global_step, **summary)
        self.log.close()
        summary.update(global_step=self.global_step, skipped_files=len(self.skipped) + len(self.load_failures))
        return summary

    def _epoch(self) -> dict[str, Any]:
        cfg = self.cfg
        steps_left = min(self.steps_per_epoch - self.step_in_epoch, self.total_steps - self.global_step)
        bar = tqdm(
            total=steps_left,
            desc=f"epoch {self.epoch}",
            disable=not (self.main and cfg.progress),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        sums, n, images, start = {}, 0, 0, time.perf_counter()
        loader = self._loader()
        for *views, index, failed in loader:
            self._report_failures(failed)
            metrics = self.train_step(*views, index=index)
            self.step_in_epoch += 1
            self.global_step += 1
            n += 1
            images += cfg.batch_size
            for key in ("loss", "acc"):
                if key in metrics:
                    sums[key] = sums.get(key, 0.0) + metrics[key]
            rate = images / (time.perf_counter() - start)
            self.log.write(event="step", epoch=self.epoch, step=self.global_step, img_per_s=round(rate, 2), **metrics)
            bar.update(1)
            shown = {key: f"{metrics[key]:.3f}" if key == "loss" else f"{metrics[key]:.1f}" for key in sums}
            bar.set_postfix(**shown, lr=f"{metrics['lr']:.4g}", img_s=f"{rate:.1f}")
            done = self.global_step >= self.total_steps
            if self.step_in_epoch == self.steps_per_epoch or done:
                break
            if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
                self.save()
        bar.close()
        elapsed = time.perf_counter() - start
        summary: dict[str, Any] = {
            "epoch": self.epoch,
            **{key: total / max(n, 1) for key, total in sums.items()},
            "img_per_s": images / elapsed,
            "seconds": elapsed,
            "load_failures": len(self.load_failures),
        }
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save()
        if (
            self.main
            and cfg.knn_bank
            and cfg.knn_queries
            and (self.epoch % cfg.knn_every == 0 or self.global_step >= self.total_steps)
        ):
            summary.update(self.knn_monitor())
        self.log.write(event="epoch", step=self.global_step, **summary)
        if self.main:
            plot_run(self.run_dir)
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) and return the last epoch's summary."""
    return Trainer(cfg).fit()
