"""``ray job submit -- python -m labeling.run ...`` against a local ``ray start --head`` cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.labelset import LabelSet
from shared.synthetic import write_synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_labeling_job_submitted_to_a_head_node(head_node, tmp_path):
    write_synthetic_dataset(str(tmp_path / "data"), num_train=6, num_val=0, size=(64, 64), seed=1)
    out = tmp_path / "labels"
    result = head_node.submit(
        ["python", "-m", "labeling.run", "--images", str(tmp_path / "data" / "images" / "train"),
         "--out", str(out), "--tiny", "--classes", "4", "--shard-size", "3", "--batch-size", "3",
         "--quiet", "--set", "feature_size=56", "--set", "diffcut.resolution=128"],
        working_dir=str(REPO), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    labels = LabelSet(str(out))
    assert len(labels.image_ids) == 6
    assert labels.meta["counts"]["images_failed"] == 0
