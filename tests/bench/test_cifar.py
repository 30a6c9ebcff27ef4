"""bench/cifar.py: reading a run's training time from the trainer's log.jsonl, and the plots' log-axis ticks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests import REPO

sys.path.insert(0, str(REPO / "bench"))
from cifar import log_ticks, train_timeline  # noqa: E402 - bench/ is scripts, not a package


def write_log(run_dir: Path, sessions: list[tuple[float, list[tuple[int, float]]]]) -> None:
    """A log.jsonl as moco-train writes it: per session a start record, then one record per step."""
    lines = []
    for start, steps in sessions:
        lines.append({"time": start, "event": "start", "images": 64})
        lines += [{"time": t, "event": "step", "epoch": 0, "step": step, "loss": 1.0} for step, t in steps]
    run_dir.mkdir(exist_ok=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_resumed_session_adds_to_the_time_of_the_step_it_resumes_after(tmp_path: Path) -> None:
    # Session 1 ran steps 1-3 and was killed with its last checkpoint at step 2; session 2, 870 s
    # later, redoes step 3. Step 3's first run (10 s) and the stopped time do not count.
    write_log(tmp_path, [(100.0, [(1, 110.0), (2, 120.0), (3, 130.0)]), (1000.0, [(3, 1015.0), (4, 1025.0)])])
    assert train_timeline(tmp_path) == {1: 10.0, 2: 20.0, 3: 35.0, 4: 45.0}


def test_a_session_restarted_without_a_checkpoint_counts_alone(tmp_path: Path) -> None:
    write_log(tmp_path, [(0.0, [(1, 10.0), (2, 20.0)]), (500.0, [(1, 512.0), (2, 524.0)])])
    assert train_timeline(tmp_path) == {1: 12.0, 2: 24.0}


def test_a_value_within_five_percent_of_the_one_before_shares_its_tick() -> None:
    ticks, labels = log_ticks([256, 62, 254, 1024, 510, 254, 16384])  # end-to-end's 2B - 2 beside MoCo's K
    assert ticks == [62, 254, 510, 1024, 16384]
    assert labels == ["62", "254/256", "510", "1024", "16384"]


def test_values_an_octave_apart_keep_their_own_ticks() -> None:
    assert log_ticks([32, 64, 128]) == ([32, 64, 128], ["32", "64", "128"])
