"""``ray job submit -- python -m labeling.run ...`` against a local ``ray start --head`` cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shared.labelset import LabelSet
from shared.synthetic import write_synthetic_dataset

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
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are limited
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


def test_labeling_job_submitted_to_a_head_node(head_node, tmp_path):
    address, env = head_node
    write_synthetic_dataset(str(tmp_path / "data"), num_train=6, num_val=0, size=(64, 64), seed=1)
    out = tmp_path / "labels"
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={address}",
              "--working-dir", str(REPO), "--", "python", "-m", "labeling.run",
              "--images", str(tmp_path / "data" / "images" / "train"), "--out", str(out),
              "--tiny", "--classes", "4", "--shard-size", "3", "--batch-size", "3", "--quiet",
              "--set", "feature_size=56", "--set", "diffcut.resolution=128"]
    result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    labels = LabelSet(str(out))
    assert len(labels.image_ids) == 6
    assert labels.meta["counts"]["images_failed"] == 0
