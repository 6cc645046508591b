"""Loss-curve plot (PNG) from a training history; optional: skipped with a warning without matplotlib."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("canvaslm.train")


def plot_history(history: list[dict], path: str | Path) -> Path | None:
    """Train loss (and its diffusion / AR parts) per step, held-out loss where evaluated."""
    if not history:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'canvaslm[train]'); no loss plot written")
        return None
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in history], label="train loss", lw=1.2)
    for key, label in (("diffusion_loss", "diffusion"), ("ar_loss", "encoder AR")):
        if any(r.get(key) for r in history):
            ax.plot(steps, [r[key] for r in history], label=label, lw=0.8, alpha=0.7)
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
