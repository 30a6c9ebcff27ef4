"""The search coalescer: a lone call runs at once and alone; calls arriving while a batch runs go
together into the next batch (grouped by key), each gets its own query's result or its group's
error, and a batch never exceeds max_batch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from retrieval_server.coalesce import Coalescer


class Recorder:
    """A batch function: records each call's (key, query values, excludes); the first call can be
    held until released, so that others queue up behind it."""

    def __init__(self, hold_first: bool) -> None:
        self.calls: list[tuple[object, list[float], list[int]]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, key, vectors: np.ndarray, excludes: np.ndarray) -> list:
        self.calls.append((key, vectors[:, 0].tolist(), excludes.tolist()))
        self.entered.set()
        self.release.wait(30)
        if key == "bad":
            raise ValueError("refused")
        return [(key, float(v[0]) * 10, int(e)) for v, e in zip(vectors, excludes)]


def wait_for(condition, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_a_lone_call_runs_alone():
    run = Recorder(hold_first=False)
    coalescer = Coalescer(run, max_batch=8)
    assert coalescer("k", np.array([1.0]), 7) == ("k", 10.0, 7)
    assert coalescer("k", np.array([2.0]), -1) == ("k", 20.0, -1)
    assert run.calls == [("k", [1.0], [7]), ("k", [2.0], [-1])]


def test_calls_arriving_during_a_batch_run_together_next_grouped_by_key():
    run = Recorder(hold_first=True)
    coalescer = Coalescer(run, max_batch=4)
    results: dict[int, object] = {}

    def call(i: int, key: str) -> None:
        try:
            results[i] = coalescer(key, np.array([float(i)]), i)
        except ValueError as exc:
            results[i] = exc

    first = threading.Thread(target=call, args=(0, "a"))
    first.start()
    run.entered.wait(30)  # the first call's batch is running, held
    keys = {1: "a", 2: "b", 3: "a", 4: "bad", 5: "a", 6: "b"}
    others = [threading.Thread(target=call, args=(i, key)) for i, key in keys.items()]
    for t in others:
        t.start()
        wait_for(lambda t=t: len(coalescer._waiting) == others.index(t) + 1)  # queued in this order
    run.release.set()
    for t in [first, *others]:
        t.join(30)
    # batch 1: call 0 alone; batch 2: the first max_batch=4 waiting (1-4), one index call per key in
    # order of first arrival; batch 3: the rest (5, 6)
    assert run.calls == [
        ("a", [0.0], [0]),
        ("a", [1.0, 3.0], [1, 3]),
        ("b", [2.0], [2]),
        ("bad", [4.0], [4]),
        ("a", [5.0], [5]),
        ("b", [6.0], [6]),
    ]
    for i, key in {0: "a", **keys}.items():
        if key == "bad":
            assert isinstance(results[i], ValueError)
        else:
            assert results[i] == (key, i * 10.0, i)
    assert coalescer("a", np.array([9.0]), -1) == ("a", 90.0, -1)  # idle again: runs at once


def test_an_error_outside_the_batch_function_reaches_every_caller_and_frees_the_coalescer():
    def broken(key, vectors, excludes):
        raise RuntimeError("index gone")

    coalescer = Coalescer(broken, max_batch=4)
    with pytest.raises(RuntimeError, match="index gone"):
        coalescer("k", np.array([1.0]), -1)
    with pytest.raises(RuntimeError, match="index gone"):  # not stuck "running"
        coalescer("k", np.array([1.0]), -1)
