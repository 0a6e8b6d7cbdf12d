"""The command line: parse, call the library, turn its errors into one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .config import PipelineConfig, load_config
from .errors import SettlementsError

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


@app.command()
def run(
    config: Path = CONFIG,
    refit: bool = typer.Option(False, help="Re-run k-means instead of reusing saved centroids."),
    wait: float = typer.Option(0.0, help="Seconds to wait for another run of this pipeline to finish."),
) -> None:
    """Run every stage: tile, embed, cluster, export."""
    from .pipeline import run as run_pipeline

    cfg = _config(config)
    report = run_pipeline(cfg, refit=refit, lock_timeout=wait)
    e = report.embedding
    typer.echo(f"{cfg.name}: {report.tiles['tiles']} tiles, {e['tiles_kept']} kept ({e['tiles_skipped']} skipped), "
               f"{e['tiles_embedded']} embedded, {e['tiles_reused']} reused from cache; k={report.clustering['k']}; "
               f"{report.seconds:.1f} s")
    for name, path in report.outputs.items():
        typer.echo(f"  {name}: {path}")


@app.command()
def tile(config: Path = CONFIG) -> None:
    """Check inputs and build the tile grid and region shares."""
    from .pipeline import stage_tile

    typer.echo(stage_tile(_config(config)))


@app.command()
def embed(config: Path = CONFIG) -> None:
    """Embed tiles with the CNN (reusing the cache)."""
    from .pipeline import stage_embed

    typer.echo(stage_embed(_config(config)))


@app.command()
def cluster(config: Path = CONFIG, refit: bool = typer.Option(False, help="Re-run k-means.")) -> None:
    """Cluster the embeddings (or assign them to the saved centroids)."""
    from .pipeline import stage_cluster

    typer.echo(stage_cluster(_config(config), refit=refit))


@app.command()
def export(config: Path = CONFIG) -> None:
    """Write the GeoPackage, styles and pictures from the latest artifacts and labels."""
    from .pipeline import stage_export

    for name, path in stage_export(_config(config)).items():
        typer.echo(f"{name}: {path}")


@app.command("labels-template")
def labels_template(
    config: Path = CONFIG, force: bool = typer.Option(False, help="Overwrite an existing file.")
) -> None:
    """Write the labels YAML template (cluster ids with their sizes) for the analyst to fill in."""
    import json

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
    write_labels(cfg.labels_path, cfg.name, labels, dict(enumerate(sizes)))
    typer.echo(f"wrote {cfg.labels_path}")


@labels_app.command("template")
def labels_template_alias(config: Path = CONFIG, force: bool = typer.Option(False)) -> None:
    """Same as `settlements labels-template`."""
    labels_template(config, force)


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
    try:
        app(standalone_mode=False)
    except SettlementsError as exc:
        typer.echo(f"error: {exc}", err=True)
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
