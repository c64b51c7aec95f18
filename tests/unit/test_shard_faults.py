"""How per-shard work tells an image's own failure from the environment's."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from labeling import stages
from labeling.stages import Failure, ShardEnvironmentError, isolate, read_image
from shared import storage
from shared.images import encode_jpeg


def test_one_image_failing_in_a_batch_fails_alone_and_is_named():
    calls = []

    def model(batch):
        calls.append(list(batch))
        if "bad" in batch:
            raise RuntimeError("linalg did not converge")
        return [f"ok:{x}" for x in batch]

    out = isolate(model, ["a", "bad", "c"], ["/d/a.jpg", "/d/bad.jpg", "/d/c.jpg"])
    assert out[0] == "ok:a" and out[2] == "ok:c"
    assert isinstance(out[1], Failure) and "/d/bad.jpg" in out[1].error
    assert "linalg did not converge" in out[1].error
    assert calls[0] == ["a", "bad", "c"] and ["bad"] in calls
    assert isolate(model, [], []) == []


def test_an_environment_failure_in_the_models_is_raised_not_recorded():
    def model(batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="space"):
        isolate(model, ["a", "b"], ["a", "b"])


def test_several_images_all_failing_fail_the_shard():
    stages.raise_if_systemic(["one failure"], 0, "shard 3")  # a single image: recorded, not raised
    stages.raise_if_systemic(["x", "y"], 1, "shard 3")  # others passed: the images' own fault
    with pytest.raises(ShardEnvironmentError, match="shard 3: every image failed"):
        stages.raise_if_systemic(["x", "y"], 0, "shard 3")


def test_reading_sorts_input_faults_from_environment_faults(tmp_path, monkeypatch):
    good = tmp_path / "good.jpg"
    good.write_bytes(encode_jpeg(np.full((40, 40, 3), 9, np.uint8)))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert read_image(str(good)).shape == (40, 40, 3)
    for name in ("bad.jpg", "gone.jpg"):  # corrupt, or listed and then deleted
        failure = read_image(str(tmp_path / name))
        assert isinstance(failure, Failure) and name in failure.error

    def denied(uri):
        raise storage.StorageCredentialsError(f"read {uri}: credentials are missing")

    monkeypatch.setattr(storage, "read_bytes", denied)
    with pytest.raises(ShardEnvironmentError, match="good.jpg.*credentials"):
        read_image(str(good))


def test_an_image_the_check_refuses_is_recorded_by_its_uri(tmp_path):
    from labeling.segmenter import prepare_image

    thin = tmp_path / "thin.jpg"
    thin.write_bytes(encode_jpeg(np.zeros((4000, 4, 3), np.uint8)))
    failure = read_image(str(thin), lambda im, uri: prepare_image(im, uri))
    assert isinstance(failure, Failure)
    assert str(thin) in failure.error and "too small" in failure.error
