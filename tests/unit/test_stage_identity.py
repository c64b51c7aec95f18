"""Each labeling stage's identity covers what changes its output, and only that."""

from __future__ import annotations

import pytest

from labeling.config import OPERATIONAL_FIELDS, STAGE_FIELDS, LabelConfig, stage_identities

STAGES = list(STAGE_FIELDS)


def changed(update: dict) -> list[str]:
    base = stage_identities(LabelConfig(), "digest", 10)
    other = stage_identities(LabelConfig.model_validate(update), "digest", 10)
    return [s for s in STAGES if base[s] != other[s]]


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
])
def test_a_setting_changes_its_stage_and_the_stages_after_it(update, expected):
    assert changed(update) == expected


@pytest.mark.parametrize("update", [{"actors": 3}, {"batch_size": 2}, {"out": "elsewhere"},
                                    {"decode_threads": 1}, {"gpus_per_actor": 0.5},
                                    {"lease_timeout": 5.0}, {"actor_resources": {"x": 1.0}}])
def test_operational_settings_change_no_stage(update):
    assert changed(update) == []


def test_the_listing_is_part_of_every_stage():
    a = stage_identities(LabelConfig(), "one", 10)
    b = stage_identities(LabelConfig(), "two", 10)
    assert all(a[s] != b[s] for s in STAGES)


def test_every_setting_is_operational_or_in_some_stage():
    """A setting nobody placed falls into the segments stage, so no change goes unnoticed."""
    ids = stage_identities(LabelConfig(), "digest", 10)
    covered = set(ids["segments"]["config"]) | set(OPERATIONAL_FIELDS)
    for stage in STAGES[1:]:
        covered |= set(ids[stage]["config"])
    assert covered == set(LabelConfig.model_fields)
