"""The shape of the code: an import graph in layers, without cycles, and light commands that stay light.

The graph is read from the source with ``ast``: every import of a ``settlements`` module, at module
level or inside a function (a function-level import is still an edge: it can hide a cycle, not
break it). Imports under ``if TYPE_CHECKING:`` are left out: they never run. Every module sits on
one floor of :data:`LAYERS`, and imports only from its own floor or the floors below.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import scene, write_pipeline

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "settlements"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str]) -> dict[str, bool]:
    """The ``settlements`` modules ``path`` imports at run time, each with whether only inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.Try | ast.If)
                                             for n in ast.walk(s)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or node.lineno in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from .stages import tile`` imports the submodule; ``from .store import Commit`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # settlements.export.plots.x -> settlements.export.plots
                target = target.rpartition(".")[0]
            if target and target != name:
                found[target] = found.get(target, True) and id(node) not in top_level
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], bool]]:
    """Each module's imported modules, and for each edge whether it is only a function-level import."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lazy: dict[tuple[str, str], bool] = {}
    for path in files:
        for target, in_function in imports_of(path, modules).items():
            graph[module_name(path)].add(target)
            lazy[(module_name(path), target)] = in_function
    return graph, lazy


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_import_graph_has_no_cycle_even_through_function_level_imports() -> None:
    graph, lazy = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 100  # the graph was really read
    assert lazy[("settlements.stages.tile", "settlements.embedding.backbones")]  # function-level edges counted
    # importing a package runs its __init__ first, so a submodule importing its own package is no cycle
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    cycle = cycle_in(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    # the check finds one: the cycle the runner and the labels module once formed, through a function-level import
    assert cycle_in({**graph, "settlements.labels": graph["settlements.labels"] | {"settlements.pipeline"}})


def test_the_runner_and_the_stages_depend_one_way() -> None:
    graph, _ = import_graph()
    for module, targets in graph.items():
        if module not in ("settlements.pipeline", "settlements.cli"):
            assert "settlements.pipeline" not in targets, module  # only the command line starts the runner
        if module != "settlements.cli":
            assert "settlements.cli" not in targets, module
    # a stage uses no other stage but the tile stage's input checks (embed: the cache keys of the inputs)
    for stage in ("tile", "embed", "cluster", "export"):
        others = {t for t in graph[f"settlements.stages.{stage}"] if t.startswith("settlements.stages")}
        assert others <= {"settlements.stages.tile", "settlements.stages"}, (stage, others)


#: The floors of the house, lowest first: a module imports from its own floor or lower ones, never higher.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation: errors, settings, colours, output names", {
        "settlements", "settlements.errors", "settlements.interrupts", "settlements.progress", "settlements.config",
        "settlements.palette",
        "settlements.products", "settlements.export", "settlements.stages", "settlements.supervised",
        "settlements.embedding", "settlements.model_file"}),
    ("storage: the work folder, the commit, the lock", {"settlements.store", "settlements.reprocess"}),
    ("domain: inputs, tiles, embeddings, clusters, labels, numbers", {
        "settlements.tiling", "settlements.rasters", "settlements.regions", "settlements.scenes",
        "settlements.neighbours",
        "settlements.histograms", "settlements.clustering", "settlements.embedding.assemble",
        "settlements.embedding.backbones", "settlements.embedding.cache", "settlements.embedding.infer",
        "settlements.embedding.engines", "settlements.embedding.fidelity", "settlements.embedding.choice",
        "settlements.executors", "settlements.search", "settlements.export.previous", "settlements.labels",
        "settlements.identity", "settlements.changes", "settlements.supervised.evaluation",
        "settlements.supervised.reference", "settlements.supervised.raster_labels",
        "settlements.supervised.top_model", "settlements.supervised.finetune", "settlements.transfer"}),
    ("formats: GeoPackage, styles, COG, pictures, QGIS project", {
        "settlements.export.geopackage", "settlements.export.styles", "settlements.export.raster",
        "settlements.export.plots", "settlements.export.layers", "settlements.export.runs",
        "settlements.export.qgis_project", "settlements.export.qgis_render", "settlements.supervised.figures",
        "settlements.export.imagery"}),
    ("joined tables: tiles with their cells, regions, clusters; analysts' tiles and layers", {
        "settlements.tile_tables", "settlements.similar_examples", "settlements.supervised.training_labels"}),
    ("the one writer of a labelled-tile map", {"settlements.export.tile_map"}),
    ("products: the stages, training, prediction, similar, exports, validate", {
        "settlements.stages.tile", "settlements.stages.embed", "settlements.stages.cluster",
        "settlements.stages.export", "settlements.supervised.train", "settlements.supervised.predict",
        "settlements.similar", "settlements.export.embeddings", "settlements.validate", "settlements.new_pipeline",
        "settlements.model_export", "settlements.compare"}),
    ("the runner: one door for every command that writes", {"settlements.pipeline"}),
    ("the command line", {"settlements.cli"}),
]


def floor_of() -> dict[str, int]:
    return {m: i for i, (_, modules) in enumerate(LAYERS) for m in modules}


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges (importer, imported) that run from a lower floor to a higher one."""
    floor = floor_of()
    return sorted((m, t) for m, targets in graph.items() for t in targets if floor[t] > floor[m])


def test_the_import_graph_is_layered_no_import_runs_upward() -> None:
    graph, _ = import_graph()
    floor = floor_of()
    assert sum(len(modules) for _, modules in LAYERS) == len(floor), "a module on two floors"
    assert set(graph) == set(floor), f"modules without a floor: {sorted(set(graph) - set(floor))}; " \
                                     f"floors naming no module: {sorted(set(floor) - set(graph))}"
    assert upward_imports(graph) == []
    # the two arrows that once ran back up: the joined tile tables now live below both
    for module in ("settlements.export.embeddings", "settlements.similar"):
        assert not {t for t in graph[module] if t.startswith(("settlements.stages", "settlements.supervised"))}
    # the check finds one
    assert upward_imports({**graph, "settlements.tile_tables": graph["settlements.tile_tables"]
                           | {"settlements.stages.export"}}) == [("settlements.tile_tables",
                                                                  "settlements.stages.export")]


HEAVY = ("torch", "torchvision", "faiss", "matplotlib", "geopandas", "pandas", "numpy", "rasterio")


def command_imports(*args: str) -> tuple[int, set[str]]:
    """Run ``settlements ARGS`` in a fresh interpreter: its exit code and the heavy libraries it imported."""
    probe = ("import sys\nfrom settlements.cli import main\n"
             f"sys.argv = ['settlements', *{list(args)!r}]\n"
             "try:\n    main()\n    code = 0\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
             f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    code, heavy = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(code), set(ast.literal_eval(heavy))


def test_help_imports_no_heavy_library() -> None:
    assert command_imports("--help") == (0, set())
    assert command_imports("run", "--help") == (0, set())


def test_validate_without_weights_imports_no_torch_or_faiss(tmp_path: Path) -> None:
    scene("olinda_brazil", "L7_ETMs.tif")
    cfg = write_pipeline(tmp_path, "light", "olinda")
    code, heavy = command_imports("validate", "--no-weights", str(cfg))  # rasters and regions are read
    assert code == 0 and not heavy & {"torch", "torchvision", "faiss", "matplotlib"}, heavy
    code, heavy = command_imports("validate", str(cfg))  # the weights check is where torch comes in
    assert code == 0 and "torch" in heavy and "faiss" not in heavy
    # an unknown backbone is refused by the config itself, before torch could be asked
    bad = write_pipeline(tmp_path, "bad", "olinda", embedding={"backbone": "resnet_999"})
    code, heavy = command_imports("validate", "--no-weights", str(bad))
    assert code == 2 and not heavy & {"torch", "torchvision", "faiss", "matplotlib"}, heavy


@pytest.mark.slow
def test_an_unchanged_rerun_imports_no_heavy_library(olinda) -> None:
    """The nothing-to-do path of ``settlements run`` (what cron starts every night) stays light: not even
    numpy or pandas (about 50 MB and half a second in all; ``benchmarks/rerun.py`` measures it)."""
    assert command_imports("run", str(olinda.config_path)) == (3, set())
