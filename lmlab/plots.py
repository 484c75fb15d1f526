"""Pictures: where a plot says more than a table (loss curves now; attention maps and critique charts later).

matplotlib runs on its file-only backend, so plots work on a machine without a screen.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmlab.config import read_jsonl_log


def plot_loss(log_file: str | Path, out_png: str | Path) -> Path:
    """Training loss (and validation loss, when logged) against step, from a run's ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl_log(log_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), label="validation loss", color="#d62728", marker="o", markersize=3, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Loss curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
