"""The demo's report: numbers from each stage's own outputs, figures, report.md and report.json."""

from __future__ import annotations

import time

import numpy as np

from shared import storage

BEFORE, AFTER = "before", "after"

SOURCE_TITLES = {
    "diffcut": "DiffCut pseudo-labels",
    "classical": "classical (Felzenszwalb) pseudo-labels",
    "oracle": "oracle labels (the scenes' ground truth)",
}


def figure_titles(sources: list[str]) -> dict[str, str]:
    """name -> title of every figure of a demo over ``sources``."""
    titles = {"correlation": "Correlation of one query patch (red box) with every patch of "
                             "another scene, per encoder",
              "segmentations_before": "Retrieved-label segmentations of validation scenes "
                                      "(image, prediction, truth), initial encoder"}
    for source in sources:
        titles[f"segmentations_{source}"] = ("Retrieved-label segmentations, after "
                                             f"post-training on {SOURCE_TITLES[source]}")
    titles["pseudo_task"] = ("A pseudo in-context task from the first label set: query, "
                             "positive, pseudo-labels")
    return titles


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
    """The report's PNGs under ``fig_dir``; ``encoders`` are (name, backbone) in ``runs`` order,
    the initial encoder first. Returns name -> URI."""
    from evaluation.bank import MemoryBank
    from evaluation.datasets import open_dataset
    from evaluation.figures import plot_correlation, plot_pseudo_task, plot_segmentations
    from evaluation.retrieval import predict_segmentation

    val = open_dataset("synthetic", eval_cfg.data_roots["synthetic"], "val")
    size = eval_cfg.input_size or encoders[0][1].spec.eval_input_size
    names = ["correlation", *(f"segmentations_{n}" for n, _ in encoders), "pseudo_task"]
    uris = {name: storage.join(fig_dir, f"{name}.png") for name in names}
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def percent(value: float | None) -> float | None:
    """A fraction as a percentage rounded to 0.01, None kept."""
    return None if value is None else round(100 * value, 2)


def verdict(rows: dict[str, dict], models: str) -> str:
    """Plain sentences on what each label source's post-training did, and what they show."""
    parts = []
    for source, row in rows.items():
        if row["gain"] is None:
            parts.append(f"{source}: no mIoU (no valid pixels); see results.json.")
            continue
        change = ("did not change the in-context mIoU" if row["gain"] == 0 else
                  f"{'raised' if row['gain'] > 0 else 'lowered'} the in-context mIoU by "
                  f"{abs(row['gain']):.2f} points")
        parts.append(f"Post-training on {SOURCE_TITLES[source]} {change} ({row['before']:.2f} "
                     f"-> {row['after']:.2f}).")
    if models == "tiny":
        parts.append(
            "These are tiny models (a 4-block, 32-wide ViT pretrained without labels on other "
            "synthetic scenes, and a random-init DiffCut): the oracle row is what the "
            "post-training machinery gives with perfect labels at this size, the other rows "
            "what it gives with this demo's pseudo-labels. None of them says what DIP does "
            "for a pretrained DINOv2R (the paper reports 79.4 -> 81.0 mIoU on Pascal VOC for "
            "ViT-S/14).")
    return " ".join(parts)


def render_markdown(report: dict) -> str:
    """report.md: the rows, the verdict, the label sources, the timings, the figures, the configs."""
    rows = report["post_training"]
    lines = [
        f"# DIP demo report ({report['models']} models)", "",
        f"Synthetic scenes: {report['scenes']['train']} unlabeled training scenes, "
        f"{report['scenes']['val']} validation scenes, {report['scenes']['size']} px; "
        f"encoder `{report['backbone']}`, initial weights `{report['weights']['before']}`.", "",
        "## In-context segmentation of the validation scenes, mIoU (%)", "",
        "| label source | before | after | gain | pseudo-label quality: Hungarian / majority |",
        "|---|---:|---:|---:|---|",
    ]
    for source, row in rows.items():
        q = row["pseudo_label_quality"]
        quality = ("ground truth" if q is None else
                   f"{_pct(percent(q['hungarian_miou']))} / {_pct(percent(q['majority_miou']))}")
        lines.append(f"| {source} | {_pct(row['before'])} | {_pct(row['after'])} | "
                     f"{_pct(row['gain'])} | {quality} |")
    lines += ["", report["verdict"], "", "## Label sources", "",
              "| source | images | segments per image | classes used / K | pairs | training steps | "
              "loss first -> last tenth |", "|---|---:|---:|---|---:|---:|---|"]
    for source, row in rows.items():
        pl, tr = row["labels"], row["training"]
        lines.append(f"| {source} | {pl['images_ok']} | {pl['segments_per_image']} | "
                     f"{pl['classes_used']} / {pl['num_classes']} | {pl['pairs']} | "
                     f"{tr.get('steps', 0)} | {tr.get('mean_loss_first_tenth')} -> "
                     f"{tr.get('mean_loss_last_tenth')} |")
    lines += ["", "## Timings (seconds)", "", "| stage | seconds |", "|---|---:|",
              *[f"| {k} | {v:.1f} |" for k, v in report["timings"].items()], "",
              "## Figures", ""]
    for name, title in report["figure_titles"].items():
        lines += [f"**{title}.**", "", f"![{name}]({report['figures_relative'][name]})", ""]
    lines += ["## Resolved configs", "",
              *[f"- {k}: `{v}`" for k, v in report["configs"].items()], ""]
    return "\n".join(lines)


def _source_row(source: str, before: float | None, after: float | None, labels, train_cfg,
                trained) -> dict:
    counts = labels.meta["counts"]
    return {
        BEFORE: percent(before), AFTER: percent(after),
        "gain": None if None in (before, after) else percent(after - before),
        # the oracle's labels are the ground truth itself: there is nothing to score
        "pseudo_label_quality": None if source == "oracle" else counts.get("quality"),
        "labels": {**{k: counts[k] for k in ("images_ok", "segments_per_image", "classes_used",
                                             "pairs")}, "num_classes": labels.num_classes,
                   "uri": labels.uri},
        "training": {**training_summary(train_cfg.out), "total_steps": trained.total_steps},
        "weights": storage.join(train_cfg.out, "encoder.safetensors"),
    }


def write_report(demo, summaries: dict, trained: dict, eval_cfg, timings: dict) -> dict:
    """Figures, report.json and report.md under the demo's output; returns the report dict.

    ``report["post_training"][source]`` = {"before", "after", "gain"} in mIoU % (plus the
    source's pseudo-label quality, label-set counts and training summary)."""
    from shared.backbones import load_backbone
    from shared.labelset import LabelSet

    from .run import join, paths, train_config

    p = paths(demo.out)
    weights = list(eval_cfg.weights)
    values, runs = miou_by_weights(eval_cfg.out, weights)
    labels = {s: LabelSet(join(p["labels"], s)) for s in demo.sources}
    rows = {s: _source_row(s, values[0], values[1 + i], labels[s],
                           train_config(demo, s, labels[s].pairs().num_rows), trained[s])
            for i, s in enumerate(demo.sources)}
    encoders = [(name, load_backbone(demo.backbone, w, tiny=eval_cfg.tiny, device="cpu"))
                for name, w in zip((BEFORE, *demo.sources), weights, strict=True)]
    start = time.perf_counter()
    figures = make_figures(p["figures"], eval_cfg, runs, labels[demo.sources[0]], encoders)
    timings = {**timings, "figures": round(time.perf_counter() - start, 2)}
    titles = figure_titles(demo.sources)
    report = {
        "models": demo.models, "backbone": demo.backbone,
        "scenes": {"train": labels[demo.sources[0]].meta["counts"]["images"],
                   "val": runs[0]["details"]["num_images"],
                   "size": demo.pick("image_size", 128, 448)},
        "post_training": rows,
        "weights": {BEFORE: weights[0], **{s: rows[s]["weights"] for s in demo.sources}},
        "verdict": verdict(rows, demo.models),
        "labeling_stage_seconds": {s: summaries[s].get("seconds", {}) for s in demo.sources},
        "timings": timings,
        "figures": figures,
        "figure_titles": {k: titles[k] for k in figures},
        "figures_relative": {k: f"figures/{k}.png" for k in figures},
        "configs": {k.removesuffix(".yaml"): storage.join(p["configs"], k)
                    for k in ["demo.yaml", *(f"{st}-{s}.yaml" for st in ("labeling", "training")
                                             for s in demo.sources), "evaluation.yaml"]},
        "report_md": storage.join(demo.out, "report.md"),
    }
    storage.write_text(report["report_md"], render_markdown(report))
    storage.write_json(storage.join(demo.out, "report.json"), report)
    return report
