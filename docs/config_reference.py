"""The configuration reference, generated from the pipeline schema in ``settlements/config.py``.

Every key of a pipeline YAML, with its type, default and description, read from the pydantic models
themselves, so the page cannot drift from the code. ``make docs`` writes it through the MkDocs hook
below before building; ``tests/test_docs.py`` fails when a field has no description or the committed
page differs from what this module writes.

    python docs/config_reference.py           # write docs/reference/configuration.md
    python docs/config_reference.py --check   # exit 1 when that page is stale
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from settlements.config import Length, PipelineConfig

PAGE = Path(__file__).resolve().parent / "reference" / "configuration.md"

HEADER = """\
<!-- Generated from settlements/config.py by docs/config_reference.py: do not edit by hand.
     `make docs` rewrites it; tests/test_docs.py fails when it is stale. -->

# Configuration reference

A pipeline is one YAML file, `pipelines/<name>.yaml`. This page lists every key it may hold, with its
type, its default and what it does, generated from the schema the loader checks it against
(`settlements/config.py`). The guide shows them at work: [my own region](../own-region.md) for a
first pipeline, [supervised maps](../supervised.md) for `training`.

- Unknown keys and wrong types are errors that name the key; a key given twice is an error too.
- Relative paths resolve against the YAML file's folder.
- A *length* is a number with its unit: `240m`, `0.5km` (ground metres) or `16px` (pixels of the
  raster). Ground metres are measured on each raster's ellipsoid at its centre, so a 240 m tile is
  240 m across in any CRS.
- `settlements validate CONFIG` checks a pipeline against its inputs without running it.
"""


#: Defaults the loader fills in (``load_config``), where the schema alone says "required".
DERIVED_DEFAULTS = {"name": "the YAML file's name up to its first dot"}


def _rst_to_markdown(text: str) -> str:
    """A docstring's reST markup as Markdown: ``code`` and :role:`target` become `code`."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    return "\n\n".join(_rst_to_markdown(p) for p in paragraphs)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds (``Length`` is a value, not a section)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [] if annotation is Length else [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _bounds(metadata: list[Any]) -> list[str]:
    marks = {annotated_types.Ge: ("ge", ">="), annotated_types.Gt: ("gt", ">"),
             annotated_types.Le: ("le", "<="), annotated_types.Lt: ("lt", "<")}
    out = []
    for item in metadata:
        for kind, (attr, mark) in marks.items():
            if isinstance(item, kind):
                out.append(f"{mark} {getattr(item, attr):g}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            out.append(f"at least {item.min_length} item{'s' if item.min_length > 1 else ''}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            out.append(f"matching `{pattern}`")
    return out


class Reference:
    """The page: one section per config model, in the order a YAML file holds them."""

    def __init__(self, root: type[BaseModel] = PipelineConfig) -> None:
        self.sections: dict[type[BaseModel], str] = {}  # model -> its key path, e.g. rasters.scaling
        self._collect(root, "")

    def _collect(self, model: type[BaseModel], path: str) -> None:
        self.sections[model] = path
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            for sub in _models_in(field.annotation):
                if sub not in self.sections:
                    self._collect(sub, f"{path}.{name}" if path else name)

    def _link(self, model: type[BaseModel]) -> str:
        path = self.sections[model]
        return f"[{path}](#{path})"

    def type_text(self, annotation: Any) -> str:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if annotation is type(None):
            return "null"
        if annotation is Length:
            return "length"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return f"mapping, see {self._link(annotation)}"
        simple = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
        if annotation in simple:
            return simple[annotation]
        if origin is typing.Literal:
            names = [f"`{json.dumps(a)}`" if not isinstance(a, str) else f"`{a}`" for a in args]
            return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        if origin is typing.Annotated:
            base, *meta = args
            extra = _bounds([m for info in meta for m in (info.metadata if isinstance(info, FieldInfo) else [info])])
            return ", ".join([self.type_text(base), *extra])
        if origin in (typing.Union, types.UnionType):
            return " or ".join(self.type_text(a) for a in args)
        if origin is list:
            return f"list of {self.type_text(args[0])}"
        if origin is dict:
            return f"mapping of {self.type_text(args[0])} to {self.type_text(args[1])}"
        raise TypeError(f"no text for the annotation {annotation!r}: teach docs/config_reference.py its name")

    def default_text(self, key: str, field: FieldInfo) -> str:
        if key in DERIVED_DEFAULTS:
            return DERIVED_DEFAULTS[key]
        if field.is_required():
            return "required"
        value = field.get_default(call_default_factory=True)
        if isinstance(value, Length):
            return f"`{value}`"
        if isinstance(value, BaseModel):
            return f"see {self._link(type(value))}"
        return f"`{yaml.safe_dump(value, default_flow_style=True).removesuffix('...' + chr(10)).strip()}`"

    def section(self, model: type[BaseModel]) -> str:
        path = self.sections[model]
        title = "Top level" if not path else f"`{path}`"
        lines = [f"## {title} {{#{path or 'top-level'}}}", ""]
        intro = _docstring(model)
        if intro:
            lines += [intro, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            key = f"{path}.{name}" if path else name
            kind = ", ".join([self.type_text(field.annotation), *_bounds(field.metadata)])
            description = (field.description or "").replace("|", "\\|")
            anchor = "" if key in self.sections.values() else f'<span id="{key}"></span>'  # a section's heading has it
            lines.append(f"| {anchor}`{name}` | {kind} | {self.default_text(key, field)} | {description} |")
        return "\n".join(lines) + "\n"

    def page(self) -> str:
        return HEADER + "".join("\n" + self.section(model) for model in self.sections)


def undocumented_fields(root: type[BaseModel] = PipelineConfig) -> list[str]:
    """Fields of the schema (every model reachable from ``root``, ``Length`` too) without a description."""
    missing = []
    models: list[type[BaseModel]] = [*Reference(root).sections, Length]
    for model in models:
        missing += [f"{model.__name__}.{name}" for name, field in model.model_fields.items()
                    if not (field.description or "").strip()]
    return missing


def render() -> str:
    return Reference().page()


def write(page: Path = PAGE) -> bool:
    """Write the page if it changed (an unchanged file keeps its time: ``mkdocs serve`` does not loop)."""
    text = render()
    if page.is_file() and page.read_text(encoding="utf-8") == text:
        return False
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return True


def on_pre_build(config: Any) -> None:
    """MkDocs hook (``hooks:`` in mkdocs.yml): the reference is regenerated before every build."""
    write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale, writing nothing")
    args = parser.parse_args(argv)
    missing = undocumented_fields()
    if missing:
        print(f"fields without a description: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.check:
        stale = not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != render()
        if stale:
            print(f"{PAGE} is stale: run `python docs/config_reference.py`", file=sys.stderr)
        return int(stale)
    print(f"{PAGE}: {'written' if write() else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
