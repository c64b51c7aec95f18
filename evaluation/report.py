"""Result tables: per-run records -> mean and std over seeds, as JSON and Markdown.

Every row names its protocol, its method (``in-context`` retrieval or the ``linear`` probe)
and, for mIoU, the class matching that produced the number (``identity`` or ``hungarian``);
rows of different protocols, methods or matchings are never pooled.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shared import storage

from .protocols import describe

METRICS = {"miou": ("mIoU (%)", 100.0, 2), "rmse": ("RMSE (m)", 1.0, 3)}
GROUP = ("encoder", "dataset", "fraction", "protocol", "metric", "matching", "method")


def summarize(records: list[dict]) -> list[dict]:
    """Group records by (encoder, dataset, fraction, protocol, metric, matching, method): mean
    and std (ddof 0) of the metric over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    rows = []
    for key, rs in groups.items():
        values = np.array([np.nan if r["value"] is None else r["value"] for r in rs],
                          dtype=np.float64)
        ok = values[~np.isnan(values)]
        rows.append({**dict(zip(GROUP, key, strict=True)),
                     "mean": float(ok.mean()) if ok.size else None,
                     "std": float(ok.std()) if ok.size else None,
                     "seeds": [r["seed"] for r in rs]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per summary row (see ``summarize``): mean +- std over seeds."""
    lines = ["| encoder | dataset | fraction | protocol | metric | matching | mean | std | seeds "
             "| method |", "|---|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        name, scale, digits = METRICS[r["metric"]]
        mean = "n/a" if r["mean"] is None else f"{r['mean'] * scale:.{digits}f}"
        std = "n/a" if r["std"] is None else f"{r['std'] * scale:.{digits}f}"
        lines.append(f"| {r['encoder']} | {r['dataset']} | {r['fraction']} | "
                     f"{r.get('protocol') or 'n/a'} | {name} | {r.get('matching') or '-'} | "
                     f"{mean} | {std} | {len(r['seeds'])} | {r.get('method') or '-'} |")
    return "\n".join(lines) + "\n"


def write_results(out_uri: str, records: list[dict], protocol: dict | None = None) -> list[dict]:
    """results.json (protocol settings + records + summary) and results.md under ``out_uri``;
    returns the summary. ``protocol``: evaluation.protocols.resolved_settings of the run."""
    rows = summarize(records)
    doc = {"summary": rows, "runs": records}
    text = markdown_table(rows)
    if protocol is not None:
        doc = {"protocol": protocol, **doc}
        text = describe(protocol) + "\n\n" + text
    storage.write_json(storage.join(out_uri, "results.json"), doc)
    storage.write_text(storage.join(out_uri, "results.md"), text)
    return rows
