"""The documentation: the configuration reference generated from the schema, and links that lead somewhere.

``make docs`` builds the guide with MkDocs (``--strict``: every Markdown link and anchor checked) and
then checks the built HTML; these tests need neither MkDocs nor a build, so ``make test`` runs them.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel, Field, ValidationError

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
check_links = _script("check_links")


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


def _readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_links_into_the_guide() -> None:
    links = [link for link in _readme_links() if "://" not in link]
    assert any(link.startswith("docs/") and link.endswith(".md") for link in links)
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert missing == []


def test_every_guide_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_similar_examples_use_a_shipped_pipeline() -> None:
    text = (DOCS / "similar.md").read_text(encoding="utf-8")
    used = set(re.findall(r"settlements similar (pipelines/\S+\.yaml)", text))
    assert used and all((ROOT / path).is_file() for path in used)


def _site(tmp_path: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"<html><body>{body}</body></html>", encoding="utf-8")
    return tmp_path


def test_the_link_check_passes_a_sound_site(tmp_path: Path) -> None:
    site = _site(tmp_path, {
        "index.html": '<a href="guide/a.html#step-2">a</a> <a href="https://example.org/x">out</a> <a href="#top">'
                      '<span id="top"></span>',
        "guide/a.html": '<h2 id="step-2">Step 2</h2><img src="../img.png"><a href="/index.html">home</a>',
        "img.png": "",
    })
    assert check_links.broken_links(site) == []


def test_the_link_check_finds_missing_files_anchors_and_twice_given_ids(tmp_path: Path) -> None:
    site = _site(tmp_path, {
        "index.html": '<a href="gone.html">x</a> <a href="a.html#nowhere">y</a> <p id="d"></p><p id="d"></p>',
        "a.html": '<h2 id="here">Here</h2>',
    })
    problems = check_links.broken_links(site)
    assert len(problems) == 3
    assert any("'gone.html'" in p for p in problems)
    assert any("no anchor #nowhere in a.html" in p for p in problems)
    assert any("id 'd' given 2 times" in p for p in problems)


def _yaml_blocks() -> list[tuple[str, str]]:
    """The ```yaml blocks of the README and the guide, with the file each is in."""
    blocks = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        blocks += [(path.name, block) for block in re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)]
    return blocks


def test_the_guide_s_pipeline_examples_are_valid_config() -> None:
    """Every example of a pipeline, a training section or a label source passes the schema as written."""
    import yaml

    from settlements.config import LabelSource, Training

    checked = 0
    for where, block in _yaml_blocks():
        data = yaml.safe_load(block)
        if not isinstance(data, dict):
            continue
        try:
            if "rasters" in data:
                PipelineConfig.model_validate({"name": "example", **data})
            elif set(data) == {"training"}:
                Training.model_validate(data["training"])
            elif set(data) == {"labels"}:
                LabelSource.model_validate(data["labels"])
            else:
                continue
        except ValidationError as exc:
            pytest.fail(f"{where}: an example fails the schema: {exc}")
        checked += 1
    assert checked >= 5, checked
