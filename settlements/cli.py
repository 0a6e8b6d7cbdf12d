"""The command line: parse, call the library, turn its errors into one line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .config import PipelineConfig, load_config
from .errors import SettlementsError

if TYPE_CHECKING:
    from .pipeline import RunReport

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Map settlements from imagery: tiles -> CNN embeddings -> k-means -> per-region histograms.")
labels_app = typer.Typer(no_args_is_help=True, help="Cluster names: template, and pulling edits made in QGIS.")
app.add_typer(labels_app, name="labels")

CONFIG = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/olinda.yaml", show_default=False)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each stage's details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _config(path: Path) -> PipelineConfig:
    return load_config(path)


def _locked(cfg: PipelineConfig) -> AbstractContextManager[None]:
    """The pipeline's run lock, so a single stage never interleaves with a run."""
    from .reprocess import pipeline_lock

    return pipeline_lock(cfg, 0)


def run_summary(cfg: PipelineConfig, report: RunReport) -> str:
    """One line: what became of every tile (embedded, reused, skipped and why), clusters, time."""
    t, e = report.tiles, report.embedding
    parts = [f"{cfg.name}: {t['tiles']} tiles in {t['rasters']} raster(s)",
             f"{e['tiles_kept']} kept ({e['tiles_embedded']} embedded, {e['tiles_reused']} reused from cache)",
             f"{e['tiles_skipped']} skipped ({e['tiles_skipped_nodata']} without valid pixels, "
             f"{e['tiles_skipped_invalid']} over {cfg.tiling.max_invalid_fraction:.0%} invalid)"]
    if t.get("tiles_outside_regions"):
        parts.append(f"{t['tiles_outside_regions']} outside every region (in no histogram)")
    if t.get("cells_clipped"):
        parts.append(f"{t['cells_clipped']} grid cells outside the regions not tiled")
    return "; ".join([*parts, f"k={report.clustering['k']}", f"{report.seconds:.1f} s"])


@app.command()
def run(
    config: Path = CONFIG,
    refit: bool = typer.Option(False, help="Re-run k-means, keeping the ids and names of matching clusters."),
    wait: float = typer.Option(0.0, help="Seconds to wait for another run of this pipeline to finish."),
    force: bool = typer.Option(False, help="Run even when nothing changed since the last successful run."),
    executor: str = typer.Option("local", help="local, or dask: embed and assign on a Dask cluster."),
    scheduler: str = typer.Option(None, help="Dask scheduler address (tcp://HOST:PORT); default a LocalCluster."),
    workers: int = typer.Option(None, help="Workers of the LocalCluster (default: one per core)."),
) -> None:
    """Run every stage: tile, embed, cluster, export. Exit 0 done, 3 nothing to do, 2 bad input, 1 failure."""
    from .executors import check_executor
    from .reprocess import EXIT_NOTHING_TO_DO, pipeline_lock, up_to_date

    check_executor(executor, scheduler)  # before anything is created
    cfg = _config(config)
    if not force and not refit:  # the cheap check first
        with pipeline_lock(cfg, wait):
            unchanged = up_to_date(cfg)
        if unchanged:
            typer.echo(f"{cfg.name}: nothing to do (inputs, settings and labels unchanged since the last run)")
            sys.exit(EXIT_NOTHING_TO_DO)
    from .pipeline import run as run_pipeline

    report = run_pipeline(cfg, refit=refit, lock_timeout=wait, skip_unchanged=not force,
                          executor=executor, scheduler=scheduler, n_workers=workers)
    if report.nothing_to_do:
        typer.echo(f"{cfg.name}: nothing to do (inputs, settings and labels unchanged since the last run)")
        sys.exit(EXIT_NOTHING_TO_DO)
    typer.echo(run_summary(cfg, report))
    m = report.clustering.get("matching")
    if m:
        gone = ", ".join(f"{g['id']} ({g['name']})" for g in m["gone"]) or "none"
        typer.echo(f"  refit: ids kept {m['kept'] or 'none'}; new clusters {m['new'] or 'none'}; gone {gone}")
    for name, path in report.outputs.items():
        typer.echo(f"  {name}: {path}")


@app.command()
def tile(config: Path = CONFIG) -> None:
    """Check inputs and build the tile grid and region shares."""
    from .pipeline import stage_tile

    cfg = _config(config)
    with _locked(cfg):
        typer.echo(stage_tile(cfg))


@app.command()
def embed(config: Path = CONFIG) -> None:
    """Embed tiles with the CNN (reusing the cache)."""
    from .pipeline import stage_embed

    cfg = _config(config)
    with _locked(cfg):
        typer.echo(stage_embed(cfg))


@app.command()
def cluster(config: Path = CONFIG, refit: bool = typer.Option(False, help="Re-run k-means.")) -> None:
    """Cluster the embeddings (or assign them to the saved centroids)."""
    from .pipeline import stage_cluster

    cfg = _config(config)
    with _locked(cfg):
        typer.echo(stage_cluster(cfg, refit=refit))


@app.command()
def export(config: Path = CONFIG) -> None:
    """Write the GeoPackage, styles and pictures from the latest artifacts and labels."""
    from .pipeline import stage_export

    cfg = _config(config)
    with _locked(cfg):
        outputs = stage_export(cfg)
    for name, path in outputs.items():
        typer.echo(f"{name}: {path}")


@app.command()
def validate(config: Path = CONFIG) -> None:
    """Check inputs (readable, CRS, bands, overlap with regions, tile counts) without running the CNN."""
    from .validate import validate as check

    for line in check(_config(config)).lines():
        typer.echo(line)


@app.command()
def train(config: Path = CONFIG) -> None:
    """Train the top model on the embeddings (then fine tune, when asked) and write the blocked evaluation."""
    from .supervised.train import train as train_models

    for name, value in train_models(_config(config)).items():
        typer.echo(f"{name}: {value}")


@app.command()
def predict(
    config: Path = CONFIG,
    model: str = typer.Option("auto", help="auto (fine_tuned when trained, else top_model), top_model or fine_tuned."),
) -> None:
    """Predict every tile's class; write <name>_supervised.gpkg, map and histograms."""
    from .errors import ConfigError
    from .supervised.predict import predict as predict_tiles

    if model not in ("auto", "top_model", "fine_tuned"):
        raise ConfigError(f"--model: expected auto, top_model or fine_tuned, got {model!r}")
    for name, path in predict_tiles(_config(config), model).items():  # type: ignore[arg-type]
        typer.echo(f"{name}: {path}")


@app.command("labels-template")
def labels_template(
    config: Path = CONFIG, force: bool = typer.Option(False, help="Overwrite an existing file.")
) -> None:
    """Write the labels YAML template (cluster ids with their sizes) for the analyst to fill in."""
    import json

    import pandas as pd

    from .history import anchor_tiles
    from .labels import default_labels, read_labels, write_labels
    from .pipeline import workspace

    cfg = _config(config)
    meta = workspace(cfg).cluster_meta
    if not meta.exists():
        raise SettlementsError(f"{meta}: no clusters yet; run `settlements run {config}` first")
    sizes = json.loads(meta.read_text())["sizes"]
    if cfg.labels_path.exists() and not force:
        raise SettlementsError(f"{cfg.labels_path}: exists; use --force to rewrite it (names are kept)")
    k = cfg.clustering.k
    labels = read_labels(cfg.labels_path, k) if cfg.labels_path.exists() else default_labels(k)
    assignments = pd.read_parquet(workspace(cfg).assignments)
    write_labels(cfg.labels_path, cfg.name, labels, dict(enumerate(sizes)), anchor_tiles(assignments),
                 out_dir=cfg.output_dir)
    typer.echo(f"wrote {cfg.labels_path}")


@labels_app.command("template")
def labels_template_alias(config: Path = CONFIG, force: bool = typer.Option(False)) -> None:
    """Same as `settlements labels-template`."""
    labels_template(config, force)


cache_app = typer.Typer(no_args_is_help=True, help="The embedding cache under the work folder.")
app.add_typer(cache_app, name="cache")


@cache_app.command("prune")
def cache_prune(
    config: Path = CONFIG,
    dry_run: bool = typer.Option(False, help="Only report what would be removed."),
    wait: float = typer.Option(0.0, help="Seconds to wait for a running run of this pipeline."),
) -> None:
    """Remove cache shards the current config does not use (old rasters, settings, backbones)."""
    from .pipeline import workspace
    from .reprocess import current_cache_keys, pipeline_lock
    from .store import EmbeddingCache

    cfg = _config(config)
    with pipeline_lock(cfg, wait):
        keep = current_cache_keys(cfg)
        report = EmbeddingCache(workspace(cfg).cache).prune(keep, dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    typer.echo(f"{cfg.name}: {len(report.removed)} shard(s) removed, {len(report.kept)} kept; "
               f"{verb} {report.freed_bytes} bytes ({report.freed_bytes / 2**20:.1f} MiB)")


@labels_app.command("pull")
def labels_pull(
    gpkg: Path = typer.Argument(..., help="The pipeline's GeoPackage, e.g. outputs/olinda/olinda.gpkg",
                                show_default=False),
) -> None:
    """Read names and colours edited in the GeoPackage's `clusters` table (e.g. in QGIS) into the
    labels YAML, then regenerate every output and style."""
    from .labels import pull

    changes, outputs = pull(gpkg)
    typer.echo("\n".join(changes) if changes else f"{gpkg}: no edits in the clusters table")
    for name, path in outputs.items():
        typer.echo(f"  {name}: {path}")


def main() -> None:
    # GDAL prints its own "ERROR 1: ..." lines to stderr; the failures that matter become one RasterError line
    os.environ.setdefault("CPL_LOG", os.devnull)
    try:
        app(standalone_mode=False)
    except SettlementsError as exc:
        typer.echo("error: " + " ".join(str(exc).splitlines()), err=True)  # one line, whatever the message
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
