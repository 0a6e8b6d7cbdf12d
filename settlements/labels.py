"""The labels YAML: cluster id -> name and colour, the analyst's source of truth.

The first run writes a template (names ``cluster N``, each cluster's size as a comment-free
field); the analyst edits names and optionally colours, and the next run uses them. Clusters may
share a name. Unknown ids are ignored with a warning; ids missing from the file keep their
default name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError
from .palette import Palette, build_palette, default_cluster_name, is_colour
from .store import write_atomic

log = logging.getLogger(__name__)

HEADER = """\
# Cluster names for pipeline '{name}'.
# Look at outputs/{name}/atlas.png, then give each cluster a name (clusters may share one,
# e.g. two clusters both 'vegetation') and optionally a colour ('#rrggbb'; null = palette default).
# 'size' is the number of tiles in the cluster at the run that wrote this file (for reference).
# Rerun the pipeline (or `settlements labels pull OUTPUT.gpkg` after editing in QGIS) to apply.
"""


@dataclass(frozen=True)
class ClusterLabels:
    names: dict[int, str]
    colours: dict[int, str | None]

    @property
    def palette(self) -> Palette:
        return build_palette(self.names, self.colours)

    def label_of(self, cluster: int) -> str:
        return self.names.get(cluster, default_cluster_name(cluster))


def default_labels(k: int) -> ClusterLabels:
    return ClusterLabels({i: default_cluster_name(i) for i in range(k)}, {i: None for i in range(k)})


def read_labels(path: Path, k: int) -> ClusterLabels:
    """Labels for clusters 0..k-1 from ``path`` (defaults where the file is silent)."""
    base = default_labels(k)
    if not path.exists():
        return base
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    clusters = data.get("clusters") if isinstance(data, dict) else None
    if not isinstance(clusters, dict):
        raise ConfigError(f"{path}: expected a 'clusters' mapping of id -> {{name, colour}}")
    names, colours = dict(base.names), dict(base.colours)
    for key, entry in clusters.items():
        try:
            cid = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: clusters.{key}: cluster ids must be integers") from None
        if cid not in names:
            log.warning("%s: cluster %d is not among the %d clusters; ignored", path, cid, k)
            continue
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: clusters.{cid}: expected {{name, colour}}")
        unknown = set(entry) - {"name", "colour", "size"}
        if unknown:
            raise ConfigError(f"{path}: clusters.{cid}.{sorted(unknown)[0]}: unknown key")
        name = entry.get("name")
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{path}: clusters.{cid}.name: must be a non-empty string")
            names[cid] = name.strip()
        colour = entry.get("colour")
        if colour is not None:
            if not isinstance(colour, str) or not is_colour(colour):
                raise ConfigError(f"{path}: clusters.{cid}.colour: expected '#rrggbb', got {colour!r}")
            colours[cid] = colour.lower()
    return ClusterLabels(names, colours)


def write_labels(path: Path, pipeline: str, labels: ClusterLabels, sizes: dict[int, int]) -> None:
    """Write the labels YAML (atomically), keeping names and colours, refreshing sizes."""
    body = {"clusters": {cid: {"name": labels.names[cid], "colour": labels.colours.get(cid),
                               "size": int(sizes.get(cid, 0))} for cid in sorted(labels.names)}}
    text = HEADER.format(name=pipeline) + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
