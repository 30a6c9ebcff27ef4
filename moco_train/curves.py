"""RUN_DIR/curves.png: loss, contrast accuracy (for the methods that have one), learning rate and kNN
top-1 of a run, drawn from its log.jsonl (by the trainer after every epoch, and by `moco-train plot
RUN_DIR` on demand)."""

from __future__ import annotations

import json
from pathlib import Path

from moco_retrieval.fileio import atomic_write


class RunLogError(ValueError):
    """The run directory has no training log to draw (yet)."""


def read_log(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, kNN records), one per global step: after a resume the steps trained again
    from the checkpoint replace those of the interrupted session."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        raise RunLogError(f"{run_dir}: no log.jsonl (not a moco-train run directory?)")
    steps: dict[int, dict] = {}
    knn: dict[int, dict] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if record.get("event") == "step":
            steps[record["step"]] = record
        elif record.get("event") == "epoch" and "knn_top1" in record:
            knn[record["step"]] = record
    return [steps[s] for s in sorted(steps)], [knn[s] for s in sorted(knn)]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (per-step loss and accuracy are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves to `out` (default RUN_DIR/curves.png), atomically; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, knn = read_log(run_dir)
    if not steps:
        raise RunLogError(f"{run_dir}: log.jsonl has no training steps yet")
    x = [r["step"] for r in steps]
    window = max(1, len(steps) // 50)
    panels = [("loss", "loss"), ("contrast accuracy %", "acc"), ("learning rate", "lr")]
    panels = [(title, key) for title, key in panels if key in steps[0]]  # BYOL, Barlow Twins, SwAV: no accuracy
    fig, axes = plt.subplots(1, len(panels) + bool(knn), figsize=(4 * (len(panels) + bool(knn)), 3.2), dpi=100)
    for ax, (title, key) in zip(axes, panels):
        values = [r[key] for r in steps]
        if key != "lr":
            ax.plot(x, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            values = moving_average(values, window)
        ax.plot(x, values, color="tab:blue", linewidth=1.5)
        ax.set_title(title if key == "lr" or window == 1 else f"{title} (mean of {window} steps)", fontsize=10)
    if knn:
        ax = axes[-1]
        ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", color="tab:green")
        ax.set_title("kNN top-1 % (monitor)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).resolve().name), fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out
