"""Result tables: per-run records -> mean and std over seeds, as JSON and Markdown."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shared import storage

METRICS = {"miou": ("mIoU (%)", 100.0, 2), "rmse": ("RMSE (m)", 1.0, 3)}


def summarize(records: list[dict]) -> list[dict]:
    """Group records by (encoder, dataset, fraction): mean and std (ddof 0) of the metric."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["encoder"], r["dataset"], r["fraction"], r["metric"])].append(r)
    rows = []
    for (encoder, dataset, fraction, metric), rs in groups.items():
        values = np.array([np.nan if r["value"] is None else r["value"] for r in rs],
                          dtype=np.float64)
        ok = values[~np.isnan(values)]
        rows.append({"encoder": encoder, "dataset": dataset, "fraction": fraction,
                     "metric": metric, "mean": float(ok.mean()) if ok.size else None,
                     "std": float(ok.std()) if ok.size else None,
                     "seeds": [r["seed"] for r in rs]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (encoder, dataset, fraction): mean +- std over seeds."""
    lines = ["| encoder | dataset | fraction | metric | mean | std | seeds |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        name, scale, digits = METRICS[r["metric"]]
        mean = "n/a" if r["mean"] is None else f"{r['mean'] * scale:.{digits}f}"
        std = "n/a" if r["std"] is None else f"{r['std'] * scale:.{digits}f}"
        lines.append(f"| {r['encoder']} | {r['dataset']} | {r['fraction']} | {name} | "
                     f"{mean} | {std} | {len(r['seeds'])} |")
    return "\n".join(lines) + "\n"


def write_results(out_uri: str, records: list[dict]) -> list[dict]:
    """results.json (records + summary) and results.md under ``out_uri``; returns the summary."""
    rows = summarize(records)
    storage.write_json(storage.join(out_uri, "results.json"), {"summary": rows, "runs": records})
    storage.write_text(storage.join(out_uri, "results.md"), markdown_table(rows))
    return rows
