"""Each labeling stage's identity covers what changes its output, and only that."""

from __future__ import annotations

import pytest

from labeling.config import (
    OPERATIONAL_FIELDS,
    SEGMENTER_SETTINGS,
    STAGE_FIELDS,
    LabelConfig,
    stage_identities,
)

STAGES = list(STAGE_FIELDS)
WEIGHTS = {"backbone": {"source": "file", "sha256": "a" * 64}, "segmenter": None}


def changed(update: dict, base: dict | None = None) -> list[str]:
    first = stage_identities(LabelConfig.model_validate(base or {}), "digest", 10, WEIGHTS)
    other = stage_identities(LabelConfig.model_validate({**(base or {}), **update}), "digest",
                             10, WEIGHTS)
    return [s for s in STAGES if first[s] != other[s]]


@pytest.mark.parametrize("update, expected", [
    ({"classes": 50}, ["centroids", "labels", "pairs"]),
    ({"kmeans_niter": 3}, ["centroids", "labels", "pairs"]),
    ({"ground_truth": "/truth"}, ["labels", "pairs"]),
    ({"neighbours": 3}, ["pairs"]),
    ({"min_area": 0.2}, ["pairs"]),
    ({"pair_search": "ivf"}, ["pairs"]),
    ({"diffcut": {"tau": 0.4}}, STAGES),
    ({"backbone": "vitb14"}, STAGES),
    ({"shard_size": 7}, STAGES),
    ({"seed": 1}, STAGES),
    ({"weights": "/elsewhere/encoder.safetensors"}, STAGES),
    ({"feature_size": 224}, STAGES),
    ({"felzenszwalb": {"scale": 10.0}}, []),  # not the segmenter in use
])
def test_a_setting_changes_its_stage_and_the_stages_after_it(update, expected):
    assert changed(update) == expected


@pytest.mark.parametrize("update", [{"actors": 3}, {"batch_size": 2}, {"out": "elsewhere"},
                                    {"decode_threads": 1}, {"gpus_per_actor": 0.5},
                                    {"lease_timeout": 5.0}, {"actor_resources": {"x": 1.0}}])
def test_operational_settings_change_no_stage(update):
    assert changed(update) == []


def test_the_listing_is_part_of_every_stage():
    a = stage_identities(LabelConfig(), "one", 10, WEIGHTS)
    b = stage_identities(LabelConfig(), "two", 10, WEIGHTS)
    assert all(a[s] != b[s] for s in STAGES)


@pytest.mark.parametrize("weights", [
    {**WEIGHTS, "backbone": {"source": "file", "sha256": "b" * 64}},  # same name, new bytes
    {**WEIGHTS, "segmenter": {"source": "hub", "repo": "segmind/SSD-1B", "revision": "c0ffee"}},
])
def test_the_weights_content_is_part_of_every_stage(weights):
    a = stage_identities(LabelConfig(), "digest", 10, WEIGHTS)
    b = stage_identities(LabelConfig(), "digest", 10, weights)
    assert a["segments"]["weights"] == WEIGHTS and all(a[s] != b[s] for s in STAGES)


def test_only_the_segmenter_in_use_has_its_settings_in_the_identity():
    classical = {"segmenter": "felzenszwalb"}
    assert changed({"felzenszwalb": {"scale": 10.0}}, classical) == STAGES
    assert changed({"diffcut": {"tau": 0.4}}, classical) == []
    ids = stage_identities(LabelConfig.model_validate(classical), "digest", 10, WEIGHTS)
    assert "diffcut" not in ids["segments"]["config"]
    assert set(SEGMENTER_SETTINGS) == {"diffcut", "felzenszwalb"}


def test_every_setting_is_operational_or_in_some_stage():
    """A setting nobody placed falls into the segments stage, so no change goes unnoticed."""
    ids = stage_identities(LabelConfig(), "digest", 10, WEIGHTS)
    covered = set(ids["segments"]["config"]) | set(OPERATIONAL_FIELDS) | {"felzenszwalb"}
    for stage in STAGES[1:]:
        covered |= set(ids[stage]["config"])
    assert covered == set(LabelConfig.model_fields)
