"""docs/<stage>.md lists every field of the stage's config models with its actual default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from evaluation.config import (
    EvalConfig,
    LinearConfig,
    LowShotConfig,
    MemoryConfig,
    SearchConfig,
)
from labeling.config import DiffCutConfig, FelzenszwalbConfig, LabelConfig
from labeling.importing import ImportConfig
from training.config import TrainConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = {
    "labeling.md": [LabelConfig, DiffCutConfig, FelzenszwalbConfig, ImportConfig],
    "training.md": [TrainConfig],
    "evaluation.md": [EvalConfig, MemoryConfig, SearchConfig, LowShotConfig, LinearConfig],
}
SOURCES = {"paper", "released", "reference", "DiffCut", "ours", ""}
ROW = re.compile(r"^\| `(\w+)` \| (.+?) \| ?(\w*) ?\| .+ \|$")


def doc_tables(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Heading `Model` -> {field: (default cell, source)} from the tables under each heading."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
        elif line.startswith("## "):
            current = None
        elif current is not None and (row := ROW.match(line)):
            current[row.group(1)] = (row.group(2), row.group(3))
    return tables


def rendered_default(model: type[BaseModel], name: str) -> str | None:
    """The default as the docs show it: JSON in backticks; None for nested models."""
    field = model.model_fields[name]
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return None
    dumped = model.model_construct(**{name: value}).model_dump(mode="json", include={name})[name]
    return f"`{json.dumps(dumped, ensure_ascii=False)}`"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_config_field_is_documented_with_its_default(page):
    tables = doc_tables((DOCS / page).read_text())
    for model in PAGES[page]:
        assert model.__name__ in tables, f"docs/{page}: no '## `{model.__name__}`' table"
        rows = tables[model.__name__]
        fields = set(model.model_fields)
        assert set(rows) == fields, (f"docs/{page} `{model.__name__}`: missing "
                                     f"{sorted(fields - set(rows))}, stale {sorted(set(rows) - fields)}")
        for name, (cell, source) in rows.items():
            assert source in SOURCES, f"docs/{page} {name}: unknown source {source!r}"
            expected = rendered_default(model, name)
            if expected is not None:
                assert cell == expected, f"docs/{page} {model.__name__}.{name}: {cell} != {expected}"


def test_the_table_reader_sees_a_wrong_default():
    text = ("## `TrainConfig`\n| field | default | source | meaning |\n|---|---|---|---|\n"
            "| `epochs` | `6` | released | passes |\n")
    rows = doc_tables(text)["TrainConfig"]
    assert rows == {"epochs": ("`6`", "released")}
    assert rows["epochs"][0] != rendered_default(TrainConfig, "epochs") == "`5`"
