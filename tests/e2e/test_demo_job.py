"""The demo as a Ray job (``ray job submit``) on a local ``ray start --head`` cluster, with every
output in ``s3://`` on the loopback endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shared import storage
from shared.labelset import LabelSet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (``ray stop`` would also stop the tests' own Ray)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture
def head_node():
    """A one-node Ray cluster of its own (auth off, 4 CPUs); yields (dashboard URL, env)."""
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths are limited
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_demo_job_on_a_head_node_writes_everything_to_s3(head_node, s3_bucket):
    address, env = head_node
    # the job's driver and every worker get the endpoint and the (fake) credentials
    job_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    job_env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    out = storage.join(s3_bucket, "demo")
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={address}",
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": job_env}),
              "--", "python", "-m", "demo.run", "--out", out, "--train-images", "16",
              "--val-images", "4", "--image-size", "64", "--classes", "4", "--steps", "8"]
    result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    logs = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, logs
    assert "succeeded" in result.stdout, logs
    report_md = storage.join(out, "report.md")
    assert f"report: {report_md}" in result.stdout, logs

    report = storage.read_json(storage.join(out, "report.json"))
    miou = report["in_context_miou"]
    assert f"mIoU before post-training: {100 * miou['before']:.2f}" in result.stdout
    assert f"mIoU after post-training:  {100 * miou['after']:.2f}" in result.stdout
    assert report["weights"]["after"] == storage.join(out, "train", "encoder.safetensors")
    assert all(uri.startswith(out + "/figures/") and storage.size(uri) > 0
               for uri in report["figures"].values())
    labels = LabelSet(storage.join(out, "labels"))
    assert len(labels.image_ids) == 16
    assert report["pseudo_labels"]["quality"] == labels.meta["counts"]["quality"]
    assert storage.exists(storage.join(out, "eval", "results.json"))
