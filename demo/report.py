"""The demo's report: numbers from each stage's own outputs, figures, report.md and report.json."""

from __future__ import annotations

import numpy as np

from shared import storage

FIGURES = {
    "correlation": "Correlation of one query patch (red box) with every patch of another scene",
    "segmentations_before": "Retrieved-label segmentations of validation scenes, before",
    "segmentations_after": "Retrieved-label segmentations of validation scenes, after",
    "pseudo_task": "A pseudo in-context task from the label set: query, positive, pseudo-labels",
}


def miou_by_weights(eval_out: str, weights: list[str]) -> tuple[list[float | None], list[dict]]:
    """mIoU of each encoder (in ``weights`` order) from the evaluation's results.json."""
    runs = storage.read_json(storage.join(eval_out, "results.json"))["runs"]
    found = {r["weights"]: r for r in runs}
    missing = [w for w in weights if w not in found]
    if missing:
        raise RuntimeError(f"{eval_out}/results.json has no run for weights {missing}")
    return [found[w]["value"] for w in weights], [found[w] for w in weights]


def training_summary(train_out: str) -> dict:
    """Steps and the loss at the first and last optimizer step (metrics.parquet)."""
    rows = storage.read_parquet(storage.join(train_out, "metrics.parquet")).to_pylist()
    if not rows:
        return {"steps": 0}
    tail = rows[-max(1, len(rows) // 10):]
    head = rows[: max(1, len(rows) // 10)]
    return {"steps": rows[-1]["step"], "first_loss": round(rows[0]["loss"], 4),
            "last_loss": round(rows[-1]["loss"], 4),
            "mean_loss_first_tenth": round(float(np.mean([r["loss"] for r in head])), 4),
            "mean_loss_last_tenth": round(float(np.mean([r["loss"] for r in tail])), 4)}


def _object_patch(mask: np.ndarray, size: int, patch: int) -> tuple[int, int]:
    """(row, col) on the size x size patch grid of the centre of the largest object class."""
    classes, counts = np.unique(mask[(mask != 0) & (mask != 255)], return_counts=True)
    grid = size // patch
    if not len(classes):
        return grid // 2, grid // 2
    ys, xs = np.nonzero(mask == classes[np.argmax(counts)])
    pick = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # an object pixel near its middle
    row = int(ys[pick] * size / mask.shape[0]) // patch
    col = int(xs[pick] * size / mask.shape[1]) // patch
    return min(row, grid - 1), min(col, grid - 1)


def make_figures(fig_dir: str, eval_cfg, runs: list[dict], labels, encoders) -> dict[str, str]:
    """The report's PNGs under ``fig_dir``; returns name -> URI."""
    from evaluation.bank import MemoryBank
    from evaluation.datasets import open_dataset
    from evaluation.figures import plot_correlation, plot_pseudo_task, plot_segmentations
    from evaluation.retrieval import predict_segmentation

    val = open_dataset("synthetic", eval_cfg.data_roots["synthetic"], "val")
    size = eval_cfg.input_size or encoders[0][1].spec.eval_input_size
    uris = {name: storage.join(fig_dir, f"{name}.png") for name in FIGURES}
    (q_img, q_mask), (r_img, _) = val.load(0), val.load(1)
    plot_correlation(q_img, r_img, _object_patch(q_mask, size, encoders[0][1].patch_size),
                     encoders, size, uris["correlation"])
    shown = [val.load(i) for i in range(min(3, len(val)))]
    for (name, backbone), run in zip(encoders, runs, strict=True):
        preds = predict_segmentation(backbone, MemoryBank(run["bank"]), [im for im, _ in shown],
                                     eval_cfg.search, size, device="cpu")
        plot_segmentations([im for im, _ in shown], preds, [m for _, m in shown], val.num_classes,
                           uris[f"segmentations_{name}"], val.ignore_index)
    query = labels.pairs().column("query_id")[0].as_py()
    plot_pseudo_task(labels, query, uris["pseudo_task"])
    return uris


def verdict(before: float | None, after: float | None, models: str, steps: int,
            images: int) -> str:
    """One plain sentence on what post-training did to the in-context mIoU."""
    if before is None or after is None:
        return "One of the evaluations produced no mIoU (no valid pixels); see results.json."
    delta = 100 * (after - before)
    change = "raised" if delta > 0 else "lowered" if delta < 0 else "did not change"
    text = (f"Post-training {change} the in-context mIoU by {abs(delta):.2f} points "
            f"({100 * before:.2f} -> {100 * after:.2f}).")
    if models == "tiny":
        text += (f" These are tiny random-init models, post-trained for {steps} steps on "
                 f"pseudo-labels of {images} scenes from a random-init segmenter and encoder: "
                 "the numbers show that the pipeline runs end to end and that training changes "
                 "the encoder, not what DIP does for a pretrained DINOv2R (the paper reports "
                 "79.4 -> 81.0 mIoU on Pascal VOC for ViT-S/14).")
    return text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def render_markdown(report: dict) -> str:
    """report.md: the numbers, the verdict, the timings, the figures, where the configs are."""
    miou, pl, tr = report["in_context_miou"], report["pseudo_labels"], report["training"]
    quality = pl.get("quality") or {}
    lines = [
        f"# DIP demo report ({report['models']} models)", "",
        f"Synthetic scenes: {report['scenes']['train']} unlabeled training scenes, "
        f"{report['scenes']['val']} validation scenes, {report['scenes']['size']} px; "
        f"encoder `{report['backbone']}`.", "",
        "## In-context segmentation (synthetic validation scenes)", "",
        "| encoder | weights | mIoU (%) |", "|---|---|---:|",
        f"| before post-training | `{report['weights']['before']}` | {_pct(miou['before'])} |",
        f"| after post-training | `{report['weights']['after']}` | {_pct(miou['after'])} |", "",
        report["verdict"], "",
        "## Pseudo-labels", "",
        f"{pl['images_ok']} images labeled, {pl['segments_per_image']} segments per image, "
        f"{pl['classes_used']} of K={pl['num_classes']} pseudo-classes used, {pl['pairs']} "
        "query/positive pairs.", "",
        "Quality against the scenes' ground truth (unsupervised mIoU, %): "
        f"Hungarian {_pct(quality.get('hungarian_miou'))}, majority "
        f"{_pct(quality.get('majority_miou'))}.", "",
        "## Training", "",
        f"{tr.get('steps', 0)} optimizer steps; loss {tr.get('first_loss')} at the first step, "
        f"{tr.get('last_loss')} at the last (mean over the first / last tenth of the steps: "
        f"{tr.get('mean_loss_first_tenth')} / {tr.get('mean_loss_last_tenth')}).", "",
        "## Timings (seconds)", "", "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in report["timings"].items()], "",
        "## Figures", "",
    ]
    for name, title in FIGURES.items():
        lines += [f"**{title}.**", "", f"![{name}]({report['figures_relative'][name]})", ""]
    lines += ["## Resolved configs", "",
              *[f"- {k}: `{v}`" for k, v in report["configs"].items()], ""]
    return "\n".join(lines)


def write_report(demo, labels, summary: dict, trained, eval_cfg, train_cfg,
                 timings: dict) -> dict:
    """Figures, report.json and report.md under the demo's output; returns the report dict."""
    import time

    from shared.backbones import load_backbone

    from .run import AFTER, BEFORE, paths

    p = paths(demo.out)
    weights = list(eval_cfg.weights)
    values, runs = miou_by_weights(eval_cfg.out, weights)
    encoders = [(name, load_backbone(demo.backbone, w, tiny=eval_cfg.tiny, device="cpu"))
                for name, w in zip((BEFORE, AFTER), weights, strict=True)]
    start = time.perf_counter()
    figures = make_figures(p["figures"], eval_cfg, runs, labels, encoders)
    timings = {**timings, "figures": round(time.perf_counter() - start, 2)}
    counts = labels.meta["counts"]
    training = {**training_summary(train_cfg.out), "total_steps": trained.total_steps}
    report = {
        "models": demo.models, "backbone": demo.backbone,
        "scenes": {"train": counts["images"], "val": runs[0]["details"]["num_images"],
                   "size": demo.pick("image_size", 128, 448)},
        "in_context_miou": {BEFORE: values[0], AFTER: values[1],
                            "delta": None if None in values else values[1] - values[0]},
        "weights": {BEFORE: weights[0], AFTER: weights[1]},
        "verdict": verdict(values[0], values[1], demo.models, training["steps"],
                           counts["images_ok"]),
        "pseudo_labels": {**{k: counts[k] for k in ("images_ok", "segments_per_image",
                                                     "classes_used", "pairs")},
                          "num_classes": labels.num_classes, "quality": counts.get("quality")},
        "training": training,
        "timings": timings,
        "labeling_stage_seconds": summary.get("seconds", {}),
        "figures": figures,
        "figures_relative": {k: f"figures/{k}.png" for k in figures},
        "configs": {k: storage.join(p["configs"], f"{k}.yaml")
                    for k in ("demo", "labeling", "training", "evaluation")},
        "report_md": storage.join(demo.out, "report.md"),
    }
    storage.write_text(report["report_md"], render_markdown(report))
    storage.write_json(storage.join(demo.out, "report.json"), report)
    return report
