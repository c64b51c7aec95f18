"""The labeling service end to end with the classical segmenter (`--segmenter felzenszwalb`) on a
local Ray: its segments reach the label set unchanged and recover the synthetic ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from labeling.classical import FelzenszwalbSegmenter
from labeling.config import FelzenszwalbConfig
from labeling.pipeline import run_labeling
from labeling.quality import best_match_ious
from shared import storage
from shared.images import decode_image, decode_png
from shared.labelset import LabelSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Mean best-match IoU over every true region of the ten 64 x 80 scenes of `tiny_labeling`,
# measured: the default settings 0.760; maps blind to the image score at most 0.333 (one segment
# per image 0.333, left and right halves 0.264, 2 x 2 or 4 x 4 blocks 0.229, 16 random ids per
# pixel 0.054). The margin sits between the two, 0.16 from each.
MARGIN = 0.6


@pytest.fixture(scope="module")
def classical_run(tmp_path_factory, ray_local, tiny_labeling):
    root = tmp_path_factory.mktemp("classical")
    data = str(root / "data")
    images = tiny_labeling.images(data)
    truth = storage.join(data, "masks", "train")
    cfg = tiny_labeling.config(images, str(root / "labels"), segmenter="felzenszwalb",
                               ground_truth=truth)
    summary = run_labeling(cfg, progress=False)
    return cfg, summary, images, truth


def test_the_label_set_is_complete_and_records_the_segmenter(classical_run, tiny_labeling):
    cfg, summary, _, _ = classical_run
    assert summary["images"] == tiny_labeling.num_images + 1 and summary["images_failed"] == 1
    ls = LabelSet(cfg.out)
    assert ls.meta["segmenter"] == "felzenszwalb"
    assert ls.meta["config"]["felzenszwalb"] == FelzenszwalbConfig().model_dump()
    assert len(ls.image_ids) == tiny_labeling.num_images
    for iid in ls.image_ids:
        seg, lab = ls.segment_map(iid), ls.label_map(iid)
        assert seg.shape == lab.shape == (64, 80) and seg.dtype == np.uint16
        assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1))
        for s in np.unique(seg):  # each segment carries one pseudo-class
            assert len(np.unique(lab[seg == s])) == 1


def test_the_segments_are_the_segmenters_and_recover_the_ground_truth(classical_run):
    cfg, _, images, truth = classical_run
    ls = LabelSet(cfg.out)
    segmenter = FelzenszwalbSegmenter(config=cfg.felzenszwalb, threads=1)
    ious = []
    for iid in ls.image_ids:
        seg = ls.segment_map(iid)
        image = decode_image(storage.read_bytes(storage.join(images, f"{iid}.jpg")))
        assert np.array_equal(seg, segmenter.segment([image])[0])  # written as segmented
        mask = decode_png(storage.read_bytes(storage.join(truth, f"{iid}.png")))
        ious.append(best_match_ious(mask, seg))
    assert np.concatenate(ious).mean() > MARGIN
