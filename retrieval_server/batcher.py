"""Dynamic batching: images of concurrent calls are decoded in a thread pool and share one model
forward (up to max_batch_size images, the first waiting at most max_delay). The queue is bounded:
slots are reserved before decoding, so a burst is refused (QueueFull) instead of growing memory."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from moco_retrieval.images import ImageDecodeError

from .encoder import Encoder
from .metrics import ServerMetrics


class QueueFull(Exception):
    """Not enough free queue slots for the request's images."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed before its images were embedded."""


@dataclass
class _Job:
    tensor: torch.Tensor
    future: Future
    deadline: float | None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class DynamicBatcher:
    def __init__(
        self,
        encoder: Encoder,
        metrics: ServerMetrics,
        *,
        max_batch_size: int,
        max_delay_s: float,
        capacity: int,
        decode_threads: int,
    ) -> None:
        self.encoder = encoder
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._reserved = 0
        self._decoding = 0  # images reserved whose decode has not finished: what a batch may wait for
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        metrics.queue_capacity.set(capacity)
        self._worker.start()

    def embed(self, images: list[bytes], deadline: float | None = None) -> list[np.ndarray | Exception]:
        """One (D,) float32 embedding per image, or the ImageDecodeError of that image.

        Raises QueueFull when the images do not all fit in the queue (nothing is queued then) and
        DeadlineExceeded when `deadline` (time.monotonic()) passes first.
        """
        if not images:
            return []
        self._reserve(len(images))
        futures = [Future() for _ in images]
        for image, future in zip(images, futures):
            self._pool.submit(self._decode, image, future, deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = wait(futures, timeout=timeout)
        if pending:
            for future in pending:
                future.cancel()  # the worker skips cancelled jobs
            raise DeadlineExceeded(f"deadline passed with {len(pending)} of {len(images)} images not embedded")
        results: list[np.ndarray | Exception] = []
        for future in futures:
            exc = future.exception()
            if isinstance(exc, ImageDecodeError):
                results.append(exc)
            elif exc is not None:
                raise exc
            else:
                results.append(future.result())
        return results

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()
        self._pool.shutdown(wait=True)

    def _reserve(self, n: int) -> None:
        with self._lock:
            if self._reserved + n > self.capacity:
                self.metrics.queue_rejected.inc(n)
                raise QueueFull(
                    f"embedding queue full: {n} images asked, {self.capacity - self._reserved} of "
                    f"{self.capacity} slots free; retry later"
                )
            self._reserved += n
            self._decoding += n
            self.metrics.queue_depth.set(self._reserved)

    def _release(self, n: int) -> None:
        with self._lock:
            self._reserved -= n
            self.metrics.queue_depth.set(self._reserved)

    def _decoded(self) -> None:
        with self._lock:
            self._decoding -= 1

    def _decode(self, image: bytes, future: Future, deadline: float | None) -> None:
        if future.cancelled() or (deadline is not None and time.monotonic() >= deadline):
            self._decoded()
            self._release(1)
            future.cancel()
            return
        try:
            tensor = self.encoder.preprocess(image)
        except Exception as exc:  # noqa: BLE001 - never leave a caller waiting
            self._decoded()
            self._release(1)
            if isinstance(exc, ImageDecodeError):
                self.metrics.decode_errors.inc()
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            return
        self._queue.put(_Job(tensor, future, deadline))
        self._decoded()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus the others queued, up to max_batch_size. It waits (at most
        max_delay) only while images are still being decoded: a batch takes the size of the queue,
        and a lone request does not wait for company that is not coming."""
        batch, stop = [first], False
        end = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    coming = self._decoding > 0
                if not coming:
                    break
                try:
                    job = self._queue.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
            if job is None:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self._release(len(batch))
            now = time.monotonic()
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the caller gave up
                if job.expired(now):
                    job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                else:
                    live.append(job)
            if live:
                self._forward(live)

    def _forward(self, jobs: list[_Job]) -> None:
        self.metrics.batch_size.observe(len(jobs))
        start = time.perf_counter()
        try:
            out = self.encoder.forward(torch.stack([job.tensor for job in jobs]))
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA OOM: fail this batch, keep serving
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        for job, vector in zip(jobs, out):
            job.future.set_result(vector)
