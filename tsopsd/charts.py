"""Pictures of measurements for the product's commands: terminal sparklines, and PNGs with matplotlib.

    print(sparkline([0.8, 0.5, 0.2]))
    save_trajectory_png("entropy.png", measure_trajectory(...))

matplotlib is optional (the ``plot`` extra); `have_matplotlib` says whether it is there.
"""

from __future__ import annotations

from pathlib import Path

BARS = " ▁▂▃▄▅▆▇█"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def sparkline(values: list[float], width: int = 60) -> str:
    """One line of block characters for `values` (resampled to `width`)."""
    if not values:
        return ""
    step = max(1, len(values) / width)
    picked = [values[min(len(values) - 1, int(i * step))] for i in range(min(width, len(values)))]
    lo, hi = min(picked), max(picked)
    span = (hi - lo) or 1.0
    return "".join(BARS[1 + int((v - lo) / span * (len(BARS) - 2))] for v in picked)


def save_trajectory_png(path: Path, result: dict) -> Path:
    """Mean token entropy (with its p10-p90 band) over a run's checkpoints, the collapse marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["checkpoints"]
    steps = [r["step"] for r in rows]
    by_step = None not in steps and all(a < b for a, b in zip(steps, steps[1:]))  # else: the order given
    xs = steps if by_step else list(range(len(rows)))
    mean = [r["metrics"]["entropy"]["mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(xs, [r["metrics"]["entropy"]["p10"] for r in rows], [r["metrics"]["entropy"]["p90"] for r in rows],
                    alpha=0.2, linewidth=0, label="p10-p90 of token entropy")
    ax.plot(xs, mean, marker="o", label="mean token entropy")
    ax.axhline(result["collapse"]["ratio"] * mean[0], linestyle="--", color="grey",
               label=f"{result['collapse']['ratio']:g} x the first checkpoint's")
    if result["collapse"]["index"] is not None:
        i = result["collapse"]["index"]
        ax.axvline(xs[i], color="red", alpha=0.6, label="collapse: the checkpoint to reheat")
    if by_step:
        ax.set_xlabel("step")
    else:
        ax.set_xticks(xs, [Path(r["checkpoint"]).name for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("checkpoint, in the order given")
    ax.set_ylabel("nats")
    ax.set_title("entropy over a run's checkpoints")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
