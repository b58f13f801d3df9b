"""Tables for the console: one column per checkpoint, one row per metric.

    console.print(metrics_table({"before": m0, "after": m1}))
"""

from __future__ import annotations

from rich.table import Table

# (label, path into a measure() result, format string or function of the value[, its key in "intervals"])
ROWS = [
    ("mean token entropy (nats, T=1), 95% CI", ("entropy", "mean"), "{:.4f}", "entropy"),
    ("entropy p10 / p50 / p90", None, None),
    ("entropy, top-20% tokens", ("entropy", "top20_mean"), "{:.4f}"),
    ("entropy at sampling T", ("entropy_at_sampling_temperature",), "{:.4f}"),
    ("mean top-1 probability", ("top1_prob",), "{:.4f}"),
    ("response length (tokens)", ("response_length",), "{:.1f}"),
    ("distinct-1", ("distinct_1",), "{:.3f}", "distinct_1"),
    ("distinct-2", ("distinct_2",), "{:.3f}", "distinct_2"),
    ("unique completions / prompt", ("unique_completion_rate",), "{:.3f}", "unique_completion_rate"),
    ("accuracy (verifier)", ("accuracy",), "{:.3f}", "accuracy"),
    ("KL(model ‖ ref)", ("reference", "kl_model_ref"), "{:.4f}"),
    ("KL(ref ‖ model)", ("reference", "kl_ref_model"), "{:.4f}"),
    ("top-1 agreement with ref", ("reference", "top1_agreement"), "{:.3f}", "top1_agreement"),
    ("top-5 overlap with ref", ("reference", "top5_overlap"), "{:.3f}"),
    ("top-10 overlap with ref", ("reference", "top10_overlap"), "{:.3f}"),
    ("effective temperature vs ref", ("reference", "effective_temperature"), "{:.3f}"),
    ("hidden-state cosine vs ref, min / last layer", ("reference", "layers"),
     lambda v: f"{min(v['cosine']):.3f} / {v['cosine'][-1]:.3f}"),
    ("samples (prompts x per prompt)", ("samples",), None),
]


def _cell(r: dict, path, fmt, interval_key):
    v = _get(r, path)
    if v is None:
        return "–"
    if path == ("samples",):
        return f"{v} ({r.get('prompts', '?')} x {v / max(r.get('prompts') or 1, 1):.3g})"
    text = fmt(v) if callable(fmt) else fmt.format(v)
    ci = (r.get("intervals") or {}).get(interval_key) if interval_key else None
    if ci is not None:
        text += f" ({fmt.format(ci[0])}–{fmt.format(ci[1])})"
    return text


def _get(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def metrics_table(columns: dict[str, dict], title: str | None = None, *, target: float | None = None) -> Table:
    """A table of `measure()` results side by side; rows absent from every column are left out.

    `target`: a target entropy; adds the row "entropy vs target" (each column's mean entropy relative to it).
    """
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for label, path, fmt, *ci in ROWS:
        if target is not None and label == "entropy p10 / p50 / p90":
            table.add_row(f"entropy vs target {target:.4f}",
                          *(_against(r, target) if r.get("entropy") else "–" for r in columns.values()))
        if path is None:  # quantiles share one row
            cells = []
            for r in columns.values():
                e = r.get("entropy")
                cells.append(f"{e['p10']:.3f} / {e['p50']:.3f} / {e['p90']:.3f}" if e else "–")
            table.add_row(label, *cells)
            continue
        if all(_get(r, path) is None for r in columns.values()):
            continue
        table.add_row(label, *(_cell(r, path, fmt, ci[0] if ci else None) for r in columns.values()))
    return table


def _against(r: dict, target: float) -> str:
    """The mean entropy relative to `target`, with its interval's ends relative to it."""
    text = f"{(r['entropy']['mean'] - target) / target:+.1%}"
    ci = (r.get("intervals") or {}).get("entropy")
    if ci is not None:
        text += f" ({(ci[0] - target) / target:+.0%} to {(ci[1] - target) / target:+.0%})"
    return text


def trajectory_table(result: dict) -> Table:
    """`measure_trajectory`'s checkpoints, one row each in step order; the collapse marked, the advice below."""
    import os

    from tsopsd.charts import sparkline

    rows = result["checkpoints"]
    entropies = [r["metrics"]["entropy"]["mean"] for r in rows]
    at = result["collapse"]["index"]
    paths = [r["checkpoint"] for r in rows]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    short = lambda p: os.path.relpath(os.path.abspath(p), root) if p else "none"  # noqa: E731 - names within root
    table = Table(title=f"tsopsd measure-entropy: {len(rows)} checkpoints in {root}, reference "
                        f"{short(result['reference']) if result['reference'] in paths else result['reference']}",
                  caption=f"entropy {entropies[0]:.3f} {sparkline(entropies)} {entropies[-1]:.3f}\n"
                          f"reheat: {short(result['reheat']['checkpoint'])} ({result['reheat']['why']})")
    for name in ("step", "checkpoint", "entropy (95% CI)", "p10 / p90", "unique / prompt", "top-1 agreement", "KL(model ‖ ref)",
                 ""):
        table.add_column(name, justify="left" if name in ("checkpoint", "") else "right")
    for i, r in enumerate(rows):
        m, ref = r["metrics"], r["metrics"].get("reference", {})
        ci = (m.get("intervals") or {}).get("entropy")
        table.add_row("–" if r["step"] is None else str(r["step"]), short(r["checkpoint"]),
                      f"{m['entropy']['mean']:.4f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""),
                      f"{m['entropy']['p10']:.3f} / {m['entropy']['p90']:.3f}", f"{m['unique_completion_rate']:.3f}",
                      f"{ref.get('top1_agreement', 0):.3f}", f"{ref.get('kl_model_ref', 0):.4f}",
                      f"< {result['collapse']['ratio']:g} x first: collapsed" if i == at else "")
    return table


BACKENDS = {"Backend": "one process a GPU", "DDP": "DDP replicas", "FSDP": "FSDP2 shards"}  # plan's `backend`


def plan_table(r: dict):
    """The `tsopsd plan` result: peak memory per phase (by category), then the verdict and the bound."""
    from rich.table import Table

    gib = 2**30
    short = {"weights": "weights", "optimizer state": "optim", "gradients": "grads", "activations": "activ",
             "kv cache": "KV", "logits chunks": "logits", "temporaries": "temp"}
    cats = [c for c in short if any(p["breakdown"].get(c, 0) for p in r["phases"].values())]
    verdict = "fits" if r["fits"] else "does NOT fit"
    cpu = r.get("device") == "cpu"
    t = Table(title=(f"tsopsd plan: {r['architecture']} ({r['parameters'] / 1e9:.2f}B params, "
                     f"{r['trainable_parameters'] / 1e6:.1f}M trainable), {r['mode']}, {r['dtype']}, "
                     + (f"one process on the CPU ({r['gpu_memory_bytes'] / gib:.0f} GiB RAM)" if cpu else
                        f"{BACKENDS.get(r['backend'], r['backend'])} on "
                        f"{r['gpus']} x {r['gpu_memory_bytes'] / gib:.0f} GiB") + f": {verdict}"),
              caption=(f"GiB per device (rank 0; every rank alike). {r['sequences_per_rank']} sequences of "
                       f"{r['prompt_tokens']} + {r['max_new_tokens']} tokens per rank. Activation checkpointing: "
                       f"{'on' if r['activation_checkpointing'] else 'off'} ({r['activation_checkpointing_why']}). "
                       f"Peak {r['peak_bytes'] / gib:.1f} GiB in {r['peak_phase']} + {r['reserved_bytes'] / gib:.1f} "
                       f"GiB reserved (CUDA context, allocator slack); margin {r['margin_bytes'] / gib:+.1f} GiB. "
                       f"Step: {r['step_flops'] / 1e12:.0f} "
                       f"TFLOP, {r['step_bytes'] / 1e12:.1f} TB moved, roofline {r['step_roofline_s']:.1f} s"
                       + (f" (of which {r['heldout_roofline_s']:.1f} s a step, on average, measuring held-out prompts to "
                          "steer the target)" if r.get("heldout_roofline_s") else "") + ": a lower "
                       f"bound at {r['gpu_flops'] / 1e12:.3g} TFLOP/s and {r['gpu_bandwidth'] / 1e12:.3g} TB/s "
                       f"({r.get('figures', 'H100 SXM')})"
                       + ("." if cpu else f"; estimated {r['step_estimate_s']:.0f} s a step at the efficiency measured "
                          f"on {r['estimate_calibrated_on']}.")))
    t.add_column("phase")
    t.add_column("peak", justify="right")
    for c in cats:
        t.add_column(short[c], justify="right")
    t.add_column("host", justify="right")
    t.add_column("bound s", justify="right")
    for name, p in r["phases"].items():
        t.add_row(name, f"{p['peak_bytes'] / gib:.1f}", *[f"{p['breakdown'].get(c, 0) / gib:.1f}" for c in cats],
                  f"{p['host_bytes'] / gib:.1f}", f"{p['roofline_s']:.2f}")
    return t
