"""The demo as a Ray job (``ray job submit``) on a local ``ray start --head`` cluster, with every
output in ``s3://`` on the loopback endpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import storage
from shared.labelset import LabelSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_demo_job_on_a_head_node_writes_everything_to_s3(head_node, s3_bucket):
    # the job's driver and every worker get the endpoint and the (fake) credentials
    job_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    job_env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    out = storage.join(s3_bucket, "demo")
    result = head_node.submit(
        ["python", "-m", "demo.run", "--out", out, "--train-images", "16", "--val-images", "4",
         "--image-size", "64", "--classes", "4", "--steps", "8",
         "--sources", "diffcut,oracle"],  # the job path, not every source (test_demo has all)
        runtime_env={"env_vars": job_env}, working_dir=str(REPO))
    logs = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, logs
    assert "succeeded" in result.stdout, logs
    report_md = storage.join(out, "report.md")
    assert f"report: {report_md}" in result.stdout, logs

    report = storage.read_json(storage.join(out, "report.json"))
    for source, row in report["post_training"].items():
        assert (f"  {source:<10} before {row['before']:6.2f}  after {row['after']:6.2f}  "
                f"gain {row['gain']:6.2f}") in result.stdout, logs
    assert list(report["post_training"]) == ["diffcut", "oracle"]
    assert report["weights"]["oracle"] == storage.join(out, "train", "oracle",
                                                       "encoder.safetensors")
    assert all(uri.startswith(out + "/figures/") and storage.size(uri) > 0
               for uri in report["figures"].values())
    labels = LabelSet(storage.join(out, "labels", "diffcut"))
    assert len(labels.image_ids) == 16
    assert report["post_training"]["diffcut"]["pseudo_label_quality"] == \
        labels.meta["counts"]["quality"]
    assert storage.exists(storage.join(out, "eval", "results.json"))
