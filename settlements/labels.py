"""The labels YAML: cluster id -> name and colour, the analyst's source of truth.

The first run writes a template (names ``cluster N``, each cluster's size as a comment-free
field); the analyst edits names and optionally colours, and the next run uses them. Clusters may
share a name. Unknown ids are ignored with a warning; ids missing from the file keep their
default name.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import PipelineConfig, load_config, read_yaml
from .errors import ConfigError
from .export.previous import clusters_rows, last_run_value
from .palette import Legend, build_legend, default_cluster_name, is_colour
from .products import Outputs, outputs
from .store import write_atomic

log = logging.getLogger(__name__)

HEADER = """\
# Cluster names for pipeline '{name}'.
# Look at {atlas}, then give each cluster a name (clusters may share one,
# e.g. two clusters both 'vegetation') and optionally a colour ('#rrggbb'; null = palette default).
# 'size' is the number of tiles in the cluster at the run that wrote this file (for reference).
# 'anchors' are tiles typical of each cluster at that run (tile_id, nearest the centroid): a run that
# clusters afresh (another machine, a new work folder) gives each cluster the id whose anchors it holds.
# Rerun the pipeline (or `settlements labels pull OUTPUT.gpkg` after editing in QGIS) to apply.
"""


@dataclass(frozen=True)
class ClusterLabels:
    names: dict[int, str]
    colours: dict[int, str | None]
    anchors: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def legend(self, extra: Sequence[str] = ()) -> Legend:
        """The pipeline's legend: these clusters' names and colours, then ``extra`` labels (a model's classes)
        with the palette's colours (:func:`settlements.palette.build_legend`)."""
        return build_legend(self.names, self.colours, extra)

    def label_of(self, cluster: int) -> str:
        return self.names.get(cluster, default_cluster_name(cluster))


def default_labels(k: int) -> ClusterLabels:
    return ClusterLabels({i: default_cluster_name(i) for i in range(k)}, {i: None for i in range(k)})


def read_labels(path: Path, k: int) -> ClusterLabels:
    """Labels for clusters 0..k-1 from ``path`` (defaults where the file is silent)."""
    base = default_labels(k)
    if not path.exists() and not path.is_symlink():
        return base
    names, colours = dict(base.names), dict(base.colours)
    anchors: dict[int, tuple[int, ...]] = {}
    for cid, (name, colour, tiles) in parse_labels(path).items():
        if cid not in names:
            log.warning("%s: cluster %d is not among the %d clusters; ignored", path, cid, k)
            continue
        if name is not None:
            names[cid] = name
        if colour is not None:
            colours[cid] = colour
        if tiles is not None:
            anchors[cid] = tiles
    return ClusterLabels(names, colours, anchors)


def parse_labels(path: Path) -> dict[int, tuple[str | None, str | None, tuple[int, ...] | None]]:
    """Every entry of a labels file, checked: cluster id -> (name, colour, anchor tiles), None where unset.

    Raises :class:`ConfigError` naming the file and the entry.
    """
    data = read_yaml(path) or {}
    clusters = data.get("clusters") if isinstance(data, dict) else None
    if not isinstance(clusters, dict):
        raise ConfigError(f"{path}: expected a 'clusters' mapping of id -> {{name, colour}}")
    out: dict[int, tuple[str | None, str | None, tuple[int, ...] | None]] = {}
    for key, entry in clusters.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)  # a quoted id
        if isinstance(key, bool) or not isinstance(key, int):
            raise ConfigError(f"{path}: clusters.{key}: cluster ids must be integers")
        if key in out:
            raise ConfigError(f"{path}: clusters.{key}: given twice")
        cid = key
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: clusters.{cid}: expected {{name, colour}}")
        unknown = set(entry) - {"name", "colour", "size", "anchors"}
        if unknown:
            raise ConfigError(f"{path}: clusters.{cid}.{sorted(map(str, unknown))[0]}: unknown key")
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"{path}: clusters.{cid}.name: must be a non-empty string")
        colour = entry.get("colour")
        if colour is not None and (not isinstance(colour, str) or not is_colour(colour)):
            raise ConfigError(f"{path}: clusters.{cid}.colour: expected '#rrggbb', got {colour!r}")
        tiles = entry.get("anchors")
        if tiles is not None and (not isinstance(tiles, list)
                                  or not all(isinstance(t, int) and not isinstance(t, bool) for t in tiles)):
            raise ConfigError(f"{path}: clusters.{cid}.anchors: expected a list of tile ids")
        out[cid] = (None if name is None else name.strip(), None if colour is None else colour.lower(),
                    None if tiles is None else tuple(tiles))
    return out


class _TileIds(list):
    """A list of tile ids, written on one line."""


class _LabelsDumper(yaml.SafeDumper):
    pass


_LabelsDumper.add_representer(
    _TileIds, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def atlas_hint(labels_path: Path, pipeline: str, out_dir: Path | None) -> str:
    """Where the atlas is, as the labels file's header names it: relative to the file where possible."""
    if out_dir is None:
        return f"{Outputs(Path('.'), pipeline).atlas.name} in the pipeline's output folder"
    atlas = Outputs(Path(out_dir), pipeline).atlas
    try:
        rel = Path(os.path.relpath(atlas, Path(labels_path).resolve().parent))
    except ValueError:  # another drive
        return str(atlas)
    return f"{rel.as_posix()} (from this file's folder)" if not rel.is_absolute() else str(atlas)


def write_labels(path: Path, pipeline: str, labels: ClusterLabels, sizes: dict[int, int],
                 anchors: dict[int, list[int]] | None = None, out_dir: Path | None = None) -> None:
    """Write the labels YAML (atomically), keeping names and colours, refreshing sizes (and anchors, if given).

    ``out_dir``: the pipeline's output folder, so the header points at its atlas.png.
    """
    anchors = {int(c): list(t) for c, t in (labels.anchors if anchors is None else anchors).items()}
    body: dict = {"clusters": {}}
    for cid in sorted(labels.names):
        entry: dict[str, Any] = {"name": labels.names[cid], "colour": labels.colours.get(cid),
                                 "size": int(sizes.get(cid, 0))}
        if anchors.get(cid):
            entry["anchors"] = _TileIds(int(t) for t in anchors[cid])
        body["clusters"][cid] = entry
    text = HEADER.format(name=pipeline, atlas=atlas_hint(path, pipeline, out_dir)) + yaml.dump(
        body, Dumper=_LabelsDumper, sort_keys=False, allow_unicode=True, width=120)
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------- edits made in QGIS

def exported_snapshot(labels: ClusterLabels) -> dict[str, list[str]]:
    """What an export shows per cluster (name, colour on the map), stored with the run.

    A later pull compares the GeoPackage's ``clusters`` table with this to find what the analyst
    changed, so edits made in the YAML since the export are kept rather than overwritten.
    """
    legend = labels.legend()
    return {str(c): [labels.names[c], legend.colour(labels.names[c])] for c in sorted(labels.names)}


def read_clusters_table(gpkg: Path) -> tuple[dict[int, tuple[str, str, int]], dict[str, list[str]] | None]:
    """The ``clusters`` table (id -> label, colour, size) and the last run's exported snapshot, with sqlite3.

    The table was edited by hand (QGIS, or anyone the file was sent to): every value is checked, and
    anything odd is one :class:`ConfigError` naming the row and column.
    """
    if not gpkg.is_file():
        raise ConfigError(f"{gpkg}: GeoPackage not found")
    try:
        rows, snap = clusters_rows(gpkg)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{gpkg}: not a settlements GeoPackage with a 'clusters' table ({exc})") from None
    table: dict[int, tuple[str, str, int]] = {}
    for n, (c, label, colour, size) in enumerate(rows, 1):
        cid = _whole_number(c)
        if cid is None or cid < 0:
            raise ConfigError(f"{gpkg}: clusters row {n}: cluster: expected a cluster id (0 or more), got {c!r}")
        if cid in table:
            raise ConfigError(f"{gpkg}: clusters.{cid}: the cluster appears twice in the table")
        count = 0 if size is None else _whole_number(size)
        if count is None or count < 0:
            raise ConfigError(f"{gpkg}: clusters.{cid}.size: expected a number of tiles, got {size!r}")
        for column, value in (("label", label), ("colour", colour)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{gpkg}: clusters.{cid}.{column}: expected text, got {value!r}")
        table[cid] = (label, colour, count)
    return table, _snapshot(gpkg, snap)


def _whole_number(value: object) -> int | None:
    """An integer stored as one (or as an integral float); None for text, blobs, NULL, 2.5."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _snapshot(gpkg: Path, text: object) -> dict[str, list[str]] | None:
    """The labels snapshot of the last run (``runs.labels``): id -> [name, colour], or None if absent."""
    if text is None or text == "":
        return None
    try:
        snap = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError:
        snap = None
    if not isinstance(snap, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) or x is None for x in v)
            for v in snap.values()):
        raise ConfigError(f"{gpkg}: runs.labels: not the labels snapshot a run writes; run the pipeline again")
    return {str(k): v for k, v in snap.items()}


def merge_table_edits(gpkg: Path, current: ClusterLabels, table: dict[int, tuple[str, str, int]],
                      exported: dict[str, list[str]] | None) -> tuple[ClusterLabels, list[str]]:
    """Apply names and colours changed in the ``clusters`` table onto ``current`` (the YAML as it is now).

    A change is a difference from what the export showed (``exported``; without it, from what
    ``current`` would show). A new colour becomes the explicit colour of every cluster with that
    name, since clusters sharing a name share one colour.
    """
    if exported is None:
        exported = exported_snapshot(current)
    names, colours = dict(current.names), dict(current.colours)
    changes: list[str] = []
    recoloured: dict[int, str] = {}
    for cid, (label, colour, _) in table.items():
        if cid not in names:
            log.warning("%s: clusters row %d is not among the %d clusters; ignored", gpkg, cid, len(names))
            continue
        shown_name, shown_colour = exported.get(str(cid), [current.label_of(cid), None])
        if label is None or not str(label).strip():
            raise ConfigError(f"{gpkg}: clusters.{cid}.label: must be a non-empty name")
        label = str(label).strip()
        if label != shown_name:
            changes.append(f"cluster {cid}: name {shown_name!r} -> {label!r}")
            names[cid] = label
        if colour is None or not is_colour(str(colour).strip()):
            raise ConfigError(f"{gpkg}: clusters.{cid}.colour: expected '#rrggbb', got {colour!r}")
        colour = str(colour).strip().lower()
        if colour != (shown_colour or "").lower():
            changes.append(f"cluster {cid}: colour {shown_colour} -> {colour}")
            recoloured[cid] = colour
    for cid, colour in recoloured.items():
        for other, name in names.items():
            if name == names[cid] and (other == cid or colours.get(other) is not None):
                colours[other] = colour
    return ClusterLabels(names, colours, current.anchors), changes


def pull_edits(gpkg: Path, labels_path: Path, pipeline: str, k: int, need_snapshot: bool = False,
               target: Path | None = None, shown: Path | None = None) -> list[str]:
    """Write names and colours edited in ``gpkg``'s ``clusters`` table into the labels YAML.

    Reads ``labels_path``, writes ``target`` (default: the same file; a run stages it with its outputs);
    ``shown``: the labels file as messages name it (never a staged copy's temporary name). Returns the
    changes (empty when there are none, when the YAML already holds them, or no GeoPackage yet; the YAML is
    then untouched).
    With ``need_snapshot`` (an ordinary run) a GeoPackage without the exported snapshot, written by an
    older version, is left alone: without it, a YAML edited since could not be told from a table edit.
    """
    if not gpkg.exists():
        return []
    table, exported = read_clusters_table(gpkg)
    if exported is None and need_snapshot:
        log.info("%s: no labels snapshot in its runs table; table edits are pulled only by `labels pull`", gpkg)
        return []
    current = read_labels(labels_path, k)
    merged, changes = merge_table_edits(gpkg, current, table, exported)
    if (merged.names, merged.colours) == (current.names, current.colours):
        return []  # already in the YAML (pulled once by this command)
    if changes:
        sizes = {cid: size for cid, (_, _, size) in table.items()}
        write_labels(target or labels_path, pipeline, merged, sizes, out_dir=gpkg.resolve().parent)
        log.info("%s: %d label edit(s) pulled into %s", gpkg, len(changes), shown or labels_path)
    return changes


def stored_config_json(gpkg: Path) -> dict:
    """The resolved pipeline config of the last run that wrote ``gpkg`` (its ``runs`` table)."""
    try:
        row = last_run_value(gpkg, "config")
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{gpkg}: not a settlements GeoPackage with a 'runs' table ({exc})") from None
    if row is None:
        raise ConfigError(f"{gpkg}: the 'runs' table is empty; run the pipeline first")
    try:
        data = json.loads(row[0])
    except (TypeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"{gpkg}: runs.config: not a pipeline config")
    return data


def pipeline_of(gpkg: Path, config: Path | None = None) -> PipelineConfig:
    """The pipeline whose labels ``labels pull`` may write: ``config``, else the one that wrote ``gpkg``.

    A GeoPackage travels between people, so it is data, never instructions: its ``runs`` table
    only *points at* a config file. That file is used when it exists here and still names the
    pipeline, labels file and work folder the GeoPackage records; otherwise pass ``--config``.
    No path is ever taken from the GeoPackage itself.
    """
    if config is not None:
        cfg = load_config(config)
    else:
        stored = stored_config_json(gpkg)
        try:
            row = last_run_value(gpkg, "config_path")
        except sqlite3.DatabaseError:
            row = None
        source = Path(row[0]) if row and isinstance(row[0], str) and row[0] else None
        if source is None or not source.is_absolute() or not source.is_file():
            raise ConfigError(f"{gpkg}: the pipeline config that wrote it ({source or 'not recorded'}) is not on this "
                              "machine; pass --config PIPELINE.yaml")
        cfg = load_config(source)
        recorded = (stored.get("name"), stored.get("labels"), (stored.get("output") or {}).get("work_dir"))
        if recorded != (cfg.name, str(cfg.labels_path), str(cfg.work_dir)):
            raise ConfigError(f"{gpkg}: its pipeline config {source} no longer names the labels file and work folder "
                              "the GeoPackage records; pass --config PIPELINE.yaml")
    expected = outputs(cfg).gpkg.name
    if gpkg.name != expected:
        raise ConfigError(f"{gpkg}: expected the file name {expected} (pipeline '{cfg.name}')")
    return cfg
