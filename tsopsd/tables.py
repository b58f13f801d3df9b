"""Tables for the console: one column per checkpoint, one row per metric.

    console.print(metrics_table({"before": m0, "after": m1}))
"""

from __future__ import annotations

from rich.table import Table

# (label, path into a measure() result, format)
ROWS = [
    ("mean token entropy (nats, T=1)", ("entropy", "mean"), "{:.4f}"),
    ("entropy p10 / p50 / p90", None, None),
    ("entropy, top-20% tokens", ("entropy", "top20_mean"), "{:.4f}"),
    ("entropy at sampling T", ("entropy_at_sampling_temperature",), "{:.4f}"),
    ("mean top-1 probability", ("top1_prob",), "{:.4f}"),
    ("response length (tokens)", ("response_length",), "{:.1f}"),
    ("distinct-1", ("distinct_1",), "{:.3f}"),
    ("distinct-2", ("distinct_2",), "{:.3f}"),
    ("unique completions / prompt", ("unique_completion_rate",), "{:.3f}"),
    ("accuracy (verifier)", ("accuracy",), "{:.3f}"),
    ("KL(model ‖ ref)", ("reference", "kl_model_ref"), "{:.4f}"),
    ("KL(ref ‖ model)", ("reference", "kl_ref_model"), "{:.4f}"),
    ("top-1 agreement with ref", ("reference", "top1_agreement"), "{:.3f}"),
    ("top-5 overlap with ref", ("reference", "top5_overlap"), "{:.3f}"),
    ("top-10 overlap with ref", ("reference", "top10_overlap"), "{:.3f}"),
    ("effective temperature vs ref", ("reference", "effective_temperature"), "{:.3f}"),
]


def _get(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def metrics_table(columns: dict[str, dict], title: str | None = None) -> Table:
    """A table of `measure()` results side by side; rows absent from every column are left out."""
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for label, path, fmt in ROWS:
        if path is None:  # quantiles share one row
            cells = []
            for r in columns.values():
                e = r.get("entropy")
                cells.append(f"{e['p10']:.3f} / {e['p50']:.3f} / {e['p90']:.3f}" if e else "–")
            table.add_row(label, *cells)
            continue
        values = [_get(r, path) for r in columns.values()]
        if all(v is None for v in values):
            continue
        table.add_row(label, *("–" if v is None else fmt.format(v) for v in values))
    return table
