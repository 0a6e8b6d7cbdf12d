"""The documentation: the configuration reference generated from the schema.

These tests need neither MkDocs nor a build, so ``make test`` runs them.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel, Field

from settlements.config import Length, PipelineConfig, Strict

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _script(name: str) -> ModuleType:
    """A script of docs/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reference = _script("config_reference")


def test_every_config_field_has_a_description() -> None:
    assert reference.undocumented_fields() == []


def test_a_field_without_description_is_found() -> None:
    class Inner(Strict):
        described: int = Field(1, description="a number")
        bare: int = 2

    class Outer(Strict):
        inner: Inner = Field(default_factory=Inner, description="a section")
        items: list[Inner] | None = Field(None, description="more sections")

    assert reference.undocumented_fields(Outer) == ["Inner.bare"]


def test_the_committed_reference_is_the_generated_one() -> None:
    """Run `.venv/bin/python docs/config_reference.py` (or `make docs`) when this fails."""
    assert reference.PAGE.read_text(encoding="utf-8") == reference.render()


def test_the_reference_lists_every_key_with_its_default() -> None:
    page = reference.render()
    sections = reference.Reference().sections
    keys = [(f"{path}.{name}" if path else name, field) for model, path in sections.items()
            for name, field in model.model_fields.items() if not field.exclude]
    assert len(keys) > 90
    for key, field in keys:
        row = next((line for line in page.splitlines()
                    if line.startswith("| ") and (f'id="{key}"' in line or f"(#{key})" in line.split("|")[2])), None)
        assert row is not None, f"{key}: no row in the reference"
        assert field.description.replace("|", "\\|") in row
    embedding = page.split("## `embedding`")[1].split("\n## ")[0]
    device = r'id="embedding\.device"></span>`device` \| `auto`, `cpu` or `cuda` \| `auto` \| where the CNN runs'
    assert re.search(device, embedding)
    assert '`tile_size` | length | `32px` |' in page
    assert "`name` | string, matching" in page and "| the YAML file's name up to its first dot |" in page
    assert '`neighbour_weight` | number, >= 0, <= 1 | `0.25` |' in page


def test_derived_defaults_name_real_fields() -> None:
    assert set(reference.DERIVED_DEFAULTS) <= set(PipelineConfig.model_fields)


def test_a_type_the_reference_cannot_name_is_an_error() -> None:
    class Odd(BaseModel):
        when: complex = Field(1j, description="odd")

    with pytest.raises(TypeError, match="teach docs/config_reference.py"):
        reference.Reference(Odd).page()


def test_length_is_a_value_not_a_section() -> None:
    assert Length not in reference.Reference().sections
