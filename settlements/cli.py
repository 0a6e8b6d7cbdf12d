"""The command line: parse, call the library, turn its errors into one line and exit code 2.

SIGINT and SIGTERM end a command with one line and exit code 130 or 143 (128 + the signal), after
every ``finally`` block has run: staged outputs and temporary files are removed, DataLoader workers
stopped, the lock released. Library warnings and log records reach stderr once each, on one line.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .config import (
    DEFAULT_EXECUTOR,
    DEFAULT_NPROBE,
    DEFAULT_PREDICT_MODEL,
    DEFAULT_SIMILAR_INDEX,
    DEFAULT_SIMILAR_TOP,
    EXACT_MAX_TILES,
    EXECUTORS,
    SIMILAR_CONTEXT,
    PipelineConfig,
    check_executor,
    check_export_format,
    check_predict_model,
    check_similar_options,
    check_wait,
    load_config,
)
from .errors import ConfigError, Interrupted, SettlementsError
from .interrupts import handle_signals, received
from .progress import log as _progress_log

if TYPE_CHECKING:
    from .pipeline import RunReport

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Map settlements from imagery: tiles -> CNN embeddings -> k-means -> per-region histograms.")
labels_app = typer.Typer(no_args_is_help=True, help="Cluster names: template, and pulling edits made in QGIS.")
app.add_typer(labels_app, name="labels")

CONFIG = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/olinda.yaml", show_default=False)


def _seconds(value: float) -> float:
    try:
        return check_wait(value)
    except ConfigError as exc:  # typer names the option itself
        raise typer.BadParameter(str(exc).removeprefix("--wait: ")) from None


WAIT = typer.Option(0.0, callback=_seconds, help="Seconds to wait for another command of this pipeline to finish "
                                                 "(0: stop at once with exit code 2).")


class _OncePerMessage(logging.Filter):
    """Each distinct message once, on one line: a warning repeated per tile, block or glyph would bury
    the line that matters, and a message spread over lines breaks the one-line-per-message rule."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = " ".join(record.getMessage().split())
        key = (record.levelno, record.name, text)
        if key in self.seen:
            return False
        self.seen.add(key)
        record.msg, record.args = text, None
        return True


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
    """Python warnings (numpy, shapely, matplotlib, ...) as one log line each, instead of two lines of source."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             os.path.basename(filename), lineno)


def _setup_logging(verbose: int, quiet: bool) -> None:
    """Who speaks: by default warnings and progress (:mod:`settlements.progress`); ``-v`` this package's INFO
    lines too; ``-vv`` every library's INFO lines as well (pyogrio's record counts, FAISS's loader, GDAL's
    notes through rasterio) and this package's DEBUG; ``-q`` errors only."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OncePerMessage())
    root = logging.INFO if verbose >= 2 else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=root, handlers=[handler])
    own = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else root
    logging.getLogger("settlements").setLevel(own)
    # progress has a handler of its own: plain, time-stamped lines, also where the rest is quiet
    shown = _progress_log
    shown.handlers.clear()
    shown.propagate = False
    shown.setLevel(logging.ERROR if quiet else logging.INFO)
    lines = logging.StreamHandler()
    lines.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    shown.addHandler(lines)
    warnings.showwarning = _warning_to_log


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Log each step's details (-vv: every library's too); before or after the "
                                     "command."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no warnings, no progress."),
) -> None:
    _setup_logging(verbose, quiet)


_VERBOSITY = re.compile(r"^(-v+|-q|--verbose|--quiet)$")


def verbosity_first(args: list[str]) -> list[str]:
    """``args`` with ``-v``, ``-vv``, ``--verbose``, ``-q`` and ``--quiet`` moved before the command, wherever
    they were given (``settlements run -v CONFIG`` is ``settlements -v run CONFIG``); nothing after ``--``."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if _VERBOSITY.match(a)]
    return flags + [a for a in args[:end] if not _VERBOSITY.match(a)] + args[end:]


def _config(path: Path) -> PipelineConfig:
    return load_config(path)


def run_summary(cfg: PipelineConfig, report: RunReport) -> str:
    """One line: what became of every tile (embedded, reused, skipped and why), clusters (and how much
    k-means restarts agree), time."""
    t, e = report.tiles, report.embedding
    parts = [f"{cfg.name}: {t['tiles']} tiles in {t['rasters']} raster(s)",
             f"{e['tiles_kept']} kept ({e['tiles_embedded']} embedded, {e['tiles_reused']} reused from cache)",
             f"{e['tiles_skipped']} skipped ({e['tiles_skipped_nodata']} without valid pixels, "
             f"{e['tiles_skipped_invalid']} over {cfg.tiling.max_invalid_fraction:.0%} invalid)"]
    if t.get("tiles_outside_regions"):
        parts.append(f"{t['tiles_outside_regions']} outside every region (in no histogram)")
    if t.get("cells_clipped"):
        parts.append(f"{t['cells_clipped']} grid cells outside the regions not tiled")
    k = f"k={report.clustering['k']}"
    if report.clustering.get("model"):
        k += f" (the clusters of {report.clustering['model']['file']})"
    restarts = report.clustering.get("restarts")
    if restarts:  # how far the map depends on k-means' initialisation (a warning line follows when little)
        k += f" ({restarts['restarts']} restarts, agreement ARI {restarts['mean']:.2f})"
    return "; ".join([*parts, k, f"{report.seconds:.1f} s"])


def train_summary(cfg: PipelineConfig, r: dict[str, Any]) -> list[str]:
    """What ``train`` made, in rounded figures: the labelled tiles per class, the models and the scores, each
    score saying what it is measured against."""
    counts = ", ".join(f"{c} {n:,}" for c, n in r["class_counts"].items())
    lines = [f"{cfg.name}: top model on {r['labelled_tiles']:,} labelled tiles of {len(r['classes'])} classes "
             f"({counts}): {r['top_model']}"]
    near = r.get("neighbours_macro_f1") or {}
    if near:
        lines.append(f"  neighbours {'on' if r['neighbours'] else 'off'} (blocked {r['neighbours_folds']}-fold "
                     f"macro F1 against the training labels: alone {near['alone']:.3f}, with neighbours "
                     f"{near['neighbours']:.3f})")
    if "fine_tuned" in r:
        lines.append(f"  fine tuned: {r['fine_tuned']} (best epoch {r['best_epoch']})")
    if "macro_f1" in r:
        scores = ", ".join(f"{m} {f:.3f}" for m, f in r["macro_f1"].items())
        lines.append(f"  blocked {r['folds']}-fold macro F1 {r['scored_against']}: {scores}")
        lines += [f"  {name}: {r[name]}" for name in ("evaluation", "confusion", "confusion_png", "cluster_quality")]
    return lines


@app.command()
def run(
    config: Path = CONFIG,
    refit: bool = typer.Option(False, help="Re-run k-means, keeping the ids and names of matching clusters."),
    wait: float = WAIT,
    force: bool = typer.Option(False, help="Run even when nothing changed since the last successful run."),
    executor: str = typer.Option(DEFAULT_EXECUTOR, help=f"{' or '.join(EXECUTORS)}: where embedding and "
                                                       "assignment run (dask: on a Dask cluster)."),
    scheduler: str = typer.Option(None, help="Dask scheduler address (tcp://HOST:PORT); default a LocalCluster."),
    workers: int = typer.Option(None, help="Workers of the LocalCluster (default: one per core)."),
) -> None:
    """Run every stage: tile, embed, cluster, export. Exit 0 done, 3 nothing to do, 4 example scene not
    fetched, 2 bad input, 1 failure."""
    from .reprocess import EXIT_NOT_FETCHED, EXIT_NOTHING_TO_DO, pipeline_lock, up_to_date
    from .scenes import missing_examples

    check_executor(executor, scheduler)  # before anything is created
    cfg = _config(config)
    inputs = [r.path for r in cfg.rasters] + [r.path for r in cfg.regions if r.path is not None]
    if missing := missing_examples(inputs):  # a shipped example on a fresh clone: say what to fetch
        scenes = ", ".join(s.advice() for s in missing)
        typer.echo(f"{cfg.name}: not run: its inputs are example scenes not fetched yet: {scenes}; `make data` "
                   "fetches them when online", err=True)
        sys.exit(EXIT_NOT_FETCHED)
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
def init(
    rasters: list[str] = typer.Argument(..., help="Raster files, or quoted globs such as 'chips/*.tif'.",
                                        show_default=False),
    regions: Path = typer.Option(None, help="Polygons to count per region (default: each raster's extent is one)."),
    output: Path = typer.Option(None, "--output", "-o", help="The pipeline to write (default: pipelines/<the first "
                                                            "raster's name>.yaml)."),
    force: bool = typer.Option(False, help="Replace an existing file."),
) -> None:
    """Write a commented pipeline from the rasters themselves (CRS, ground pixel size, tile size, bands,
    scaling), then check it as validate --no-weights does."""
    from .new_pipeline import init_pipeline

    for line in init_pipeline(rasters, regions, output, force).lines():
        typer.echo(line)


@app.command()
def tile(config: Path = CONFIG, wait: float = WAIT) -> None:
    """Check inputs and build the tile grid and region shares."""
    from .pipeline import stage_tile

    typer.echo(stage_tile(_config(config), wait=wait))


@app.command()
def embed(config: Path = CONFIG, wait: float = WAIT) -> None:
    """Embed tiles with the CNN (reusing the cache)."""
    from .pipeline import stage_embed

    typer.echo(stage_embed(_config(config), wait=wait))


@app.command()
def cluster(config: Path = CONFIG, refit: bool = typer.Option(False, help="Re-run k-means."),
            wait: float = WAIT) -> None:
    """Cluster the embeddings (or assign them to the saved centroids)."""
    from .pipeline import stage_cluster

    typer.echo(stage_cluster(_config(config), refit=refit, wait=wait))


@app.command()
def export(config: Path = CONFIG, wait: float = WAIT) -> None:
    """Write the GeoPackage, styles and pictures from the latest artifacts and labels."""
    from .pipeline import stage_export

    for name, path in stage_export(_config(config), wait=wait).items():
        typer.echo(f"{name}: {path}")


@app.command()
def validate(config: Path = CONFIG,
             weights: bool = typer.Option(True, "--weights/--no-weights",
                                          help="Load the backbone with its weights and check the layer "
                                               "(--no-weights: inputs and tiles only, without torch).")) -> None:
    """Check inputs (readable, CRS, bands, overlap with regions, tile counts) without running the CNN."""
    from .validate import validate as check

    for line in check(_config(config), weights).lines():
        typer.echo(line)


@app.command()
def train(config: Path = CONFIG, wait: float = WAIT) -> None:
    """Train the top model on the embeddings (then fine tune, when asked) and write the blocked evaluation."""
    from .pipeline import train as train_models

    cfg = _config(config)
    for line in train_summary(cfg, train_models(cfg, wait)):
        typer.echo(line)


@app.command()
def predict(
    config: Path = CONFIG,
    model: str = typer.Option(DEFAULT_PREDICT_MODEL, help="auto (fine_tuned when trained, else top_model), "
                                                          "top_model, fine_tuned, or a model file "
                                                          "(settlements model export) whose network to use."),
    wait: float = WAIT,
) -> None:
    """Predict every tile's class; write <name>_supervised.gpkg, <name>_predicted.tif, map and histograms."""
    from .pipeline import predict as predict_tiles

    chosen = check_predict_model(model)
    for name, path in predict_tiles(_config(config), chosen, wait).items():
        typer.echo(f"{name}: {path}")


@app.command("labels-template")
def labels_template(
    config: Path = CONFIG, force: bool = typer.Option(False, help="Overwrite an existing file."), wait: float = WAIT,
) -> None:
    """Write the labels YAML template (cluster ids with their sizes) for the analyst to fill in."""
    from .pipeline import labels_template as write_template

    typer.echo(f"wrote {write_template(_config(config), force, wait)}")


@labels_app.command("template")
def labels_template_alias(config: Path = CONFIG, force: bool = typer.Option(False), wait: float = WAIT) -> None:
    """Same as `settlements labels-template`."""
    labels_template(config, force, wait)


cache_app = typer.Typer(no_args_is_help=True, help="The embedding cache under the work folder.")
app.add_typer(cache_app, name="cache")


@cache_app.command("prune")
def cache_prune(
    config: Path = CONFIG,
    dry_run: bool = typer.Option(False, help="Only report what would be removed."),
    wait: float = WAIT,
) -> None:
    """Remove cache shards the current config does not use (old rasters, settings, backbones)."""
    from .pipeline import prune_cache

    cfg = _config(config)
    report = prune_cache(cfg, dry_run, wait)
    gone, freed = ("would be removed", "would free") if dry_run else ("removed", "freed")
    typer.echo(f"{cfg.name}: {len(report.removed)} shard(s) {gone}, {len(report.kept)} kept; "
               f"{freed} {report.freed_bytes} bytes ({report.freed_bytes / 2**20:.1f} MiB)"
               + ("; nothing was removed (--dry-run)" if dry_run else ""))


@labels_app.command("pull")
def labels_pull(
    gpkg: Path = typer.Argument(..., help="The pipeline's GeoPackage, e.g. outputs/olinda/olinda.gpkg",
                                show_default=False),
    config: Path = typer.Option(None, help="The pipeline YAML (default: the one that wrote the GeoPackage, "
                                           "when it is on this machine and still matches)."),
    wait: float = WAIT,
) -> None:
    """Read names and colours edited in the GeoPackage's `clusters` table (e.g. in QGIS) into the
    labels YAML, then regenerate every output and style."""
    from .pipeline import pull_labels

    changes, outputs = pull_labels(gpkg, config, wait)
    typer.echo("\n".join(changes) if changes else f"{gpkg}: no edits in the clusters table")
    for name, path in outputs.items():
        typer.echo(f"  {name}: {path}")


@app.command()
def similar(
    config: Path = CONFIG,
    examples: str = typer.Option(..., help="Tiles like which: a vector file (e.g. the run's GeoPackage, whose "
                                           "'examples' layer you drew in QGIS) or tile ids (12,45,78).",
                                 show_default=False),
    layer: str = typer.Option(None, help="The layer of the examples' file (default: 'examples', or its only layer)."),
    negatives: str = typer.Option(None, help="Tiles unlike the examples (file or tile ids): a logistic regression "
                                             "of examples against them scores the tiles."),
    negatives_layer: str = typer.Option(None, help="The layer of the negatives' file (default: 'negatives', or its "
                                                   "only layer)."),
    top: int = typer.Option(None, help=f"The N likest tiles match (default {DEFAULT_SIMILAR_TOP})."),
    threshold: float = typer.Option(None, help="Every tile scoring at least D matches (cosine; with negatives, "
                                               "a probability)."),
    name: str = typer.Option(None, help="The result layer is similar_NAME (default: the examples' layer name)."),
    index: str = typer.Option(DEFAULT_SIMILAR_INDEX, help=f"exact (every tile scored), ivf (a cached FAISS index) or "
                                                          f"auto (exact up to {EXACT_MAX_TILES:,} tiles)."),
    nprobe: int = typer.Option(DEFAULT_NPROBE, help="IVF lists searched per query (more: slower, nearer exact)."),
    context: float = typer.Option(SIMILAR_CONTEXT, help="Weight of a tile's neighbours in its score (0: the tile "
                                                        "alone)."),
    wait: float = WAIT,
) -> None:
    """Rank every tile by likeness to example tiles; write layers similar_NAME and similar_NAME_regions
    into the run's GeoPackage."""
    from .pipeline import similar as find_similar

    opts = check_similar_options(top, threshold, index, nprobe, name, context)
    cfg = _config(config)
    r = find_similar(cfg, examples, layer, negatives, negatives_layer, opts, wait)
    how = "exact, every tile scored" if r.exact else "IVF index"
    lowest = "" if r.cutoff is None else f"; lowest matching score {r.cutoff:.3f}"
    typer.echo(f"{cfg.name}: {r.matches} tile(s) like {r.examples} example(s)"
               + (f" and unlike {r.negatives} negative(s)" if r.negatives else "")
               + f" ({r.method}, {how}{lowest}); {r.seconds:.1f} s")
    typer.echo(f"  layers {r.layer}, {r.regions_layer}: {r.gpkg}")


@app.command("export-embeddings")
def export_embeddings(
    config: Path = CONFIG,
    fmt: str = typer.Option("geoparquet", "--format", help="geoparquet (vectors in the file) or npy (a .npy of "
                                                              "the vectors beside a GeoParquet table)."),
    output: Path = typer.Option(None, help="The .parquet file (geoparquet), or the .npy of the vectors (npy; the "
                                           "table of their rows goes beside it as <stem>_table.parquet). Default: "
                                           "OUTPUT_DIR/<name>_embeddings.parquet or .npy. Only files this command "
                                           "wrote are ever replaced."),
    wait: float = WAIT,
) -> None:
    """Every kept tile's embedding with its cell polygon, tile id, raster, cluster and label, as GeoParquet."""
    from .pipeline import export_embeddings as export

    fmt = check_export_format(fmt)
    for kind, path in export(_config(config), fmt, output, wait).items():
        typer.echo(f"{kind}: {path}")


@app.command()
def data(
    dest: Path = typer.Option(Path("data"), help="Folder of the scene folders (the pipelines' ../data)."),
    shared: Path = typer.Option(Path("../shared/data"), help="Scene folders to link instead, when there."),
) -> None:
    """Link or fetch the shipped pipelines' example scenes (pinned by commit or version and SHA-256): one
    line per scene saying what it found, linked, fetched, or could not get and why."""
    from .scenes import SCENES, provide

    for scene in SCENES:
        typer.echo(provide(scene, dest, shared if shared.is_dir() else None))


model_app = typer.Typer(no_args_is_help=True, help="Portable models: one pipeline's embeddings settings, named "
                                                   "clusters and networks, for another pipeline to use.")
app.add_typer(model_app, name="model")


@model_app.command("export")
def model_export(
    config: Path = CONFIG,
    output: Path = typer.Option(None, "--output", "-o", help="The model file (default: OUTPUT_DIR/<name>_model.npz). "
                                                             "Only a model file is ever replaced."),
    wait: float = WAIT,
) -> None:
    """Write the pipeline's model: what made its embeddings, its named clusters, its top model and fine-tuned
    network (when trained), as plain arrays and JSON."""
    from .pipeline import export_model

    r = export_model(_config(config), output, wait)
    nets = "; ".join(f"{n.replace('_', ' ')} ({', '.join(r['classes'][n])})" for n in r["networks"]) or \
        "no top model or fine-tuned network (not trained)"
    typer.echo(f"{r['model']}: k={r['k']} clusters ({r['named']} named); {nets}; SHA-256 {r['sha256']}")


@model_app.command("show")
def model_show(model: Path = typer.Argument(..., help="A model file.", show_default=False)) -> None:
    """Say what a model file holds (read as data: nothing in it runs)."""
    from .transfer import load_model, summary

    for line in summary(load_model(model)):
        typer.echo(line)


@app.command()
def compare(
    configs: list[Path] = typer.Argument(..., help="Two pipeline YAMLs or more, each run.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The GeoPackage to write (its figure goes beside it, "
                                                            "<stem>_shares.png).", show_default=False),
    wait: float = WAIT,
) -> None:
    """Every pipeline's regions in one GeoPackage (with a `pipeline` field) and their label shares side by side;
    pipelines must share one legend (one model file gives them one)."""
    from .pipeline import compare as compare_pipelines

    r = compare_pipelines([_config(c) for c in configs], output, wait)
    typer.echo(f"{r['gpkg']}: {r['regions']} regions of {', '.join(r['pipelines'])}")
    typer.echo(f"  figure: {r['figure']}")


def _interrupted(signum: int) -> int:
    name = signal.Signals(signum).name
    typer.echo(f"error: interrupted by {name}; the outputs are those of the last completed run", err=True)
    return 128 + signum


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run_app() -> int:
    """The command's exit code: 0, 2 (bad input), 3 (nothing to do), 128 + signal; tracebacks for bugs."""
    try:  # recent typer raises the errors of its own copy of click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # older typer raises click's own
        from click import exceptions as click_exceptions  # type: ignore[no-redef]
    try:
        rv = app(args=verbosity_first(sys.argv[1:]), standalone_mode=False)
    except Interrupted as exc:
        return _interrupted(exc.signum)
    except KeyboardInterrupt:  # a SIGINT that came before the handler was installed
        return _interrupted(signal.SIGINT)
    except SettlementsError as exc:
        if received():  # an error caused by the interruption (e.g. a worker that got the signal too)
            return _interrupted(received() or signal.SIGINT)
        typer.echo("error: " + _one_line(str(exc)), err=True)  # one line, whatever the message
        return 2
    except Exception as exc:
        if received():
            return _interrupted(received() or signal.SIGINT)
        if isinstance(exc, click_exceptions.NoArgsIsHelpError):  # `settlements` alone: the help
            exc.show()
            return 2
        if isinstance(exc, click_exceptions.ClickException):  # a bad option value, an unknown command
            typer.echo("error: " + _one_line(exc.format_message()), err=True)
            return 2 if isinstance(exc, click_exceptions.UsageError) else int(exc.exit_code)
        if isinstance(exc, typer.Abort):  # end of input at a prompt
            return _interrupted(signal.SIGINT)
        raise
    return rv if isinstance(rv, int) else 0  # typer returns 130 for a KeyboardInterrupt it caught


def main() -> None:
    # GDAL prints its own "ERROR 1: ..." lines to stderr; the failures that matter become one RasterError line
    os.environ.setdefault("CPL_LOG", os.devnull)
    with handle_signals():
        code = _run_app()  # returns once the traceback (and the frames it holds) is gone
        if not code and received():  # the signal's raise was swallowed somewhere, and nothing checked since
            code = _interrupted(received() or signal.SIGINT)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
