"""Evaluation protocols by name: one preset of the settings published tables depend on.

Published in-context numbers come from two evaluation codes that differ in the settings below;
a protocol sets all of them at once so a table can be reproduced by name:

- ``dip``: our default, the DIP authors' evaluation command: the backbone's evaluation size
  (504 px at /14, 512 at /16), 10,240,000 memory patches over 2 augmentation epochs,
  temperature 0.07, identity class matching, our augmentation.
- ``hummingbird``: open-hummingbird-eval's defaults: 224 px, an unbounded memory (every patch of
  every view) over 1 epoch, temperature 0.02, Hungarian matching, its augmentation.

A preset fills only the settings a config does not set itself: an explicit ``input_size``,
``search.temperature``, ``search.matching``, ``memory.size``, ``memory.epochs`` or
``memory.augmentation`` (in the YAML file, the overrides or the constructor) wins.
docs/evaluation.md cites the source line of every value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Protocol:
    """The preset values of one protocol (None: see the field comments)."""

    name: str
    matching: str  # "identity" or "hungarian"
    input_size: int | None  # None: the backbone's evaluation size
    temperature: float
    memory_size: int | None  # None: every patch of every augmented view
    epochs: int  # augmentation passes over the memory images
    augmentation: str  # "dip" or "hummingbird" (evaluation/augment.py)


PROTOCOLS = {
    "dip": Protocol("dip", matching="identity", input_size=None, temperature=0.07,
                    memory_size=10_240_000, epochs=2, augmentation="dip"),
    "hummingbird": Protocol("hummingbird", matching="hungarian", input_size=224,
                            temperature=0.02, memory_size=None, epochs=1,
                            augmentation="hummingbird"),
}

# where each preset value goes in EvalConfig: (section or None for the top level, field)
PRESET_FIELDS = {
    "input_size": (None, "input_size"),
    "temperature": ("search", "temperature"),
    "matching": ("search", "matching"),
    "memory_size": ("memory", "size"),
    "epochs": ("memory", "epochs"),
    "augmentation": ("memory", "augmentation"),
}


def _fill(section: Any, field: str, value: Any) -> Any:
    """``section`` (a dict or a config model) with ``field`` set to ``value`` unless it sets it."""
    if isinstance(section, BaseModel):
        if field in section.model_fields_set:
            return section
        return section.model_copy(update={field: value})
    if isinstance(section, Mapping):
        return {field: value, **section}
    return section  # not a mapping: left for validation to report


def apply_protocol(data: Mapping[str, Any], default: str = "dip") -> Any:
    """Raw EvalConfig input with every preset value of its protocol it does not set filled in.

    An unknown protocol name is left untouched, so the config's own validation names it.
    """
    preset = PROTOCOLS.get(data.get("protocol", default))
    if preset is None:
        return data
    out = dict(data)
    for attr, (section, field) in PRESET_FIELDS.items():
        value = getattr(preset, attr)
        if section is None:
            out.setdefault(field, value)
        else:
            out[section] = _fill(out.get(section, {}), field, value)
    return out


def resolved_settings(cfg) -> dict[str, Any]:
    """The protocol as it ran: its name, the value of every preset setting in ``cfg``, and the
    settings an explicit value changed from the preset (recorded in every output)."""
    preset = PROTOCOLS[cfg.protocol]
    values = {}
    for attr, (section, field) in PRESET_FIELDS.items():
        values[attr] = getattr(cfg if section is None else getattr(cfg, section), field)
    changed = sorted(a for a, v in values.items() if v != getattr(preset, a))
    return {"name": cfg.protocol, **values, "overridden": changed}


def describe(settings: Mapping[str, Any]) -> str:
    """One line for reports: the protocol name and its settings."""
    size = settings["input_size"]
    size = "the backbone evaluation size" if size is None else f"{size} px"
    memory = ("every patch" if settings["memory_size"] is None
              else f"{settings['memory_size']:,} patches")
    line = (f"Protocol `{settings['name']}`: {settings['matching']} matching, input {size}, "
            f"temperature {settings['temperature']}, memory {memory} over {settings['epochs']} "
            f"augmentation epoch(s), `{settings['augmentation']}` augmentation")
    if settings.get("overridden"):
        line += f" (changed from the preset: {', '.join(settings['overridden'])})"
    return line + "."
