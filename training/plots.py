"""The loss curve of a training run: ``loss.png`` beside ``metrics.parquet``, drawn from it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from shared import storage

METRICS_NAME, PLOT_NAME = "metrics.parquet", "loss.png"


def loss_figure(metrics: pa.Table):
    """Training loss per optimizer step (left axis) and the learning rate (right axis, dashed).

    ``metrics``: the run's metrics table (columns step, loss and, if present, lr).
    """
    from matplotlib.figure import Figure  # object API: no global pyplot state, no display

    missing = [c for c in ("step", "loss") if c not in metrics.column_names]
    if missing:
        raise ValueError(f"training metrics lack columns {missing}; have {metrics.column_names}")
    steps = np.asarray(metrics.column("step").to_numpy(zero_copy_only=False), dtype=np.float64)
    loss = np.asarray(metrics.column("loss").to_numpy(zero_copy_only=False), dtype=np.float64)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ax.plot(steps, loss, color="tab:blue", marker="." if len(steps) < 50 else None, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("in-context loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if "lr" in metrics.column_names:
        lr = np.asarray(metrics.column("lr").to_numpy(zero_copy_only=False), dtype=np.float64)
        twin = ax.twinx()
        twin.plot(steps, lr, color="tab:orange", linestyle="--", label="lr")
        twin.set_ylabel("learning rate", color="tab:orange")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_title("training loss")
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (no timestamp in the file: equal figures, equal bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def write_loss_plot(out: str) -> str | None:
    """Draw ``<out>/loss.png`` from ``<out>/metrics.parquet``; None when there are no metrics."""
    metrics_uri = storage.join(out, METRICS_NAME)
    if not storage.exists(metrics_uri):
        return None
    table = storage.read_parquet(metrics_uri)
    if table.num_rows == 0:
        return None
    uri = storage.join(out, PLOT_NAME)
    storage.write_bytes(uri, figure_png(loss_figure(table)))
    return uri
