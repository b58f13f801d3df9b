"""Pictures of a run: entropy over steps and per-token entropy histograms.

PNG files with matplotlib (the optional ``plot`` extra); without it, the same data as terminal charts.
"""

from __future__ import annotations

from pathlib import Path

from tsopsd.charts import BARS, have_matplotlib, sparkline  # noqa: F401  (re-exported for the lab's callers)


def save_pngs(out: Path, curves: dict[str, list[float]], histograms: dict[str, list[float]],
              *, offsets: dict[str, int] | None = None,
              curve_title: str = "mean token entropy over steps") -> list[Path]:
    """Write ``entropy_curve.png`` and ``entropy_hist.png`` under `out`; returns the paths.

    `offsets` shifts a curve right by that many steps (a stage that follows another).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        start = (offsets or {}).get(name, 0)
        ax.plot(range(start + 1, start + len(ys) + 1), ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.set_title(curve_title)
    ax.legend()
    fig.tight_layout()
    curve = out / "entropy_curve.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max((max(v) for v in histograms.values() if v), default=1.0)
    bins = [top * i / 40 for i in range(41)]
    for name, values in histograms.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name, density=True)
    ax.set_xlabel("per-token entropy (nats)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title("per-token entropy on sampled completions")
    ax.legend()
    fig.tight_layout()
    hist = out / "entropy_hist.png"
    fig.savefig(hist, dpi=120)
    plt.close(fig)
    return [curve, hist]


def terminal_charts(curves: dict[str, list[float]], histograms: dict[str, list[float]], bins: int = 30) -> str:
    """Text versions of the two plots."""
    lines = ["entropy over steps:"]
    for name, ys in curves.items():
        if ys:
            lines.append(f"  {name:>12} {ys[0]:.3f} {sparkline(ys)} {ys[-1]:.3f}")
    lines.append("per-token entropy histograms (0 .. max):")
    top = max((max(v) for v in histograms.values() if v), default=1.0) or 1.0
    for name, values in histograms.items():
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, int(v / top * bins))] += 1
        peak = max(counts) or 1
        lines.append(f"  {name:>12} |" + "".join(BARS[0 if c == 0 else 1 + int(c / peak * (len(BARS) - 2))]
                                                  for c in counts) + f"| max {top:.2f} nats")
    return "\n".join(lines)


def save_band_plot(path: Path, panels: dict[str, dict[str, tuple[list, list, list, list]]], *, title: str,
                   xlabel: str = "continued GRPO step") -> Path:
    """One row of panels; in each, per series a mean line and a shaded interval.

    Args:
        panels: {panel title: {series label: (x, mean, low, high)}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, (x, mean, low, high) in series.items():
            (line,) = ax.plot(x, mean, label=label, linewidth=1.4)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("k" if name.startswith("pass@k") else xlabel)  # a pass@k panel's x is k, not a step
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

