"""`make data`'s recipes: every example scene pinned to the real files, fetched and checked as pinned.

The fetching runs for real against a local HTTP server on 127.0.0.1 that serves copies of the real files
from ../shared/data laid out as GitHub serves them ({repo}/{commit}/{path}); the Debian path unpacks a
package built here from the real files with dpkg-deb.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from settlements.scenes import SCENES, Debian, FetchFailed, GitHub, Scene, SceneFile, extract_deb, missing_examples
from settlements.scenes import provide as provide_scene

from .conftest import ROOT, run_cli, scene

BY_NAME = {s.name: s for s in SCENES}


def shared_scene(name: str) -> Path:
    """The real files of a scene (data/<scene>: a link into ../shared/data, or fetched by `make data`)."""
    return scene(name).resolve()


def test_every_shipped_pipeline_input_has_a_recipe() -> None:
    """Each raster and region file the pipelines in pipelines/ read is a file of a scene with a source."""
    for config in sorted((ROOT / "pipelines").glob("*.yaml")):
        if config.name.endswith(".labels.yaml"):
            continue
        data = yaml.safe_load(config.read_text())
        regions = data["regions"] if isinstance(data["regions"], list) else [data["regions"]]
        paths = [r["path"] for r in data["rasters"]] + [r["path"] for r in regions if "path" in r]
        for path in paths:
            scene = next((s for s in SCENES if s.holds(Path(path))), None)
            assert scene is not None and scene.parts, (config.name, path)


def test_recipes_pin_the_real_files() -> None:
    """The SHA-256 of each recipe file is that of the real file (../shared/data); GitHub commits are full SHAs."""
    import pooch

    for example in SCENES:
        for source, files in example.parts:
            if isinstance(source, GitHub):
                assert re.fullmatch(r"[0-9a-f]{40}", source.commit), source
            for f in files:
                assert pooch.file_hash(str(shared_scene(example.name) / f.name)) == f.sha256, (example.name, f.name)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture
def github(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local server laid out as raw.githubusercontent.com: its base URL and the folder it serves."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def serve(root: Path, scene: Scene, swap: dict[str, str] | None = None, leave_out: str | None = None,
          only: str | None = None) -> None:
    """Copy the scene's real files under ``root`` where GitHub serves them; ``swap``: serve another real
    file of the scene under a name; ``leave_out``: a file not served; ``only``: the one file served."""
    for source, files in scene.parts:
        assert isinstance(source, GitHub)
        for f in files:
            if f.name == leave_out or only not in (None, f.name):
                continue
            target = root / source.repo / source.commit / f.member
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_scene(scene.name) / (swap or {}).get(f.name, f.name), target)


def test_a_scene_is_fetched_from_its_pinned_source_and_checked(github, tmp_path: Path) -> None:
    base, root = github
    kampala = BY_NAME["kampala_oam"]
    serve(root, kampala)
    dest = tmp_path / "data"
    line = provide_scene(kampala, dest, None, base)
    assert line == "kampala_oam: fetched 6 file(s) from github.com/hotosm/fAIr-utilities @ 61f15156 (SHA-256 checked)"
    for f in kampala.files:
        assert (dest / "kampala_oam" / f.name).read_bytes() == (shared_scene("kampala_oam") / f.name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["kampala_oam"]  # no staging folder left
    assert provide_scene(kampala, dest, None, base) == f"kampala_oam: present in {dest / 'kampala_oam'}"


def test_a_file_that_is_not_the_pinned_one_is_refused_and_nothing_appears(github, tmp_path: Path) -> None:
    base, root = github
    swellendam = BY_NAME["swellendam_za"]
    serve(root, swellendam, swap={"urban_33S.shx": "Western_Cape_UTM33S.shx"})  # a real file, the wrong one
    dest = tmp_path / "data"
    line = provide_scene(swellendam, dest, None, base)
    assert line.startswith("swellendam_za: could not get: " + base)
    assert "urban_33S.shx: SHA-256 differs from the pinned 81ee600d9c0e..." in line
    assert line.endswith("(the source changed; nothing kept); needed by pipelines/swellendam.yaml")
    assert not (dest / "swellendam_za").exists()
    staged = dest / ".swellendam_za.partial"
    assert "urban_33S.shx" not in {p.name for p in staged.iterdir()}  # pooch kept nothing of the wrong file
    shutil.rmtree(root)  # the source is right again, and serves only what is missing: the next try completes
    serve(root, swellendam, only="urban_33S.shx")
    assert provide_scene(swellendam, dest, None, base).startswith("swellendam_za: fetched 11 file(s)")
    assert not staged.exists()


def test_a_file_the_server_does_not_have_is_named_with_its_status(github, tmp_path: Path) -> None:
    base, root = github
    bangalore = BY_NAME["bangalore_s2"]
    serve(root, bangalore, leave_out="section_2_sentinel.tif")
    line = provide_scene(bangalore, tmp_path / "data", None, base)
    url = f"{base}/DynaSlum/satsense/b0fa650193995a30328f26a36ebab2437c0e37ef/test/data/source/section_2_sentinel.tif"
    assert line == f"bangalore_s2: could not get: {url}: HTTP 404; needed by pipelines/bangalore.yaml"
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # no folder, no staging


def test_offline_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = provide_scene(BY_NAME["kampala_oam"], tmp_path / "data", None, f"http://127.0.0.1:{port}")
    assert re.fullmatch(r"kampala_oam: could not get: http://127\.0\.0\.1:\d+/hotosm/fAIr-utilities/61f15156\S+"
                        r"OAM-309612-261632-19\.tif: no connection \(ConnectionError; offline\?\); needed by "
                        r"pipelines/kampala\.yaml", line), line


def test_shared_scenes_are_linked_and_scenes_without_a_recipe_said_so(tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # a folder of scene folders, as ../shared/data is
    shared.mkdir()
    (shared / "bangalore_s2").symlink_to(shared_scene("bangalore_s2"))
    dest = tmp_path / "data"
    linked = provide_scene(BY_NAME["bangalore_s2"], dest, shared)
    assert linked == f"bangalore_s2: linked from {shared / 'bangalore_s2'}"
    assert (dest / "bangalore_s2").is_symlink() and (dest / "bangalore_s2" / "section_2_sentinel.tif").is_file()
    line = provide_scene(BY_NAME["mumbai_train"], dest, None)
    assert line == ("mumbai_train: not here: only in ../shared/data (no public recipe; tests and make quality skip "
                    "without it)")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian, Ubuntu)")
def test_files_come_out_of_a_debian_package_checked(tmp_path: Path) -> None:
    """The same unpacking as for the pinned packages, on a package built here from the real Olinda files."""
    olinda = BY_NAME["olinda_brazil"]
    files = list(olinda.files)
    tree = tmp_path / "pkg"
    for f in files:
        (tree / f.member).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_scene("olinda_brazil") / f.name, tree / f.member)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text("Package: olinda-test\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: tests <t@example.org>\nDescription: real files\n")
    deb = tmp_path / "olinda-test_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    staging = tmp_path / "staging"
    staging.mkdir()
    extract_deb(deb, files, staging)
    assert sorted(p.name for p in staging.iterdir()) == sorted(f.name for f in files)
    wrong = [SceneFile("L7_ETMs.tif", files[0].member, files[1].sha256)]
    with pytest.raises(FetchFailed, match=r"olinda-test_1_all\.deb: usr/lib/R/site-library/stars/tif/L7_ETMs\.tif: "
                                          r"SHA-256 differs from the pinned 8b3a2a04f8db"):
        extract_deb(deb, wrong, tmp_path / "staging2")
    with pytest.raises(FetchFailed, match=r"holds no usr/lib/nothing"):
        extract_deb(deb, [SceneFile("x", "usr/lib/nothing", files[0].sha256)], staging)
    assert Debian("r-cran-stars", "0.6-0-4").describe() == "Debian package r-cran-stars 0.6-0-4"


def test_only_example_inputs_count_as_not_fetched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    chips = data / "kampala_oam" / "OAM-*-19.tif"
    world = data / "boundaries" / "spData_world.gpkg"
    mine = tmp_path / "mine" / "scene.tif"
    assert missing_examples([chips, world]) == [BY_NAME["kampala_oam"], BY_NAME["boundaries"]]
    assert missing_examples([chips, mine]) == []  # the user's own input is missing too: that one is an error
    assert missing_examples([data / "kampala_oam" / "other.tif"]) == []  # not a file of the scene
    world.parent.mkdir(parents=True)
    world.write_bytes(b"")
    assert missing_examples([world]) == []


def test_run_skips_a_shipped_example_with_what_to_fetch_but_fails_on_a_missing_input_of_ones_own(
        tmp_path: Path, monkeypatch, capsys) -> None:
    def pipeline(name: str, raster: Path) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "rasters": [{"path": str(raster), "bands": [1, 2, 3]}],
            "regions": {"path": str(tmp_path / "data" / "boundaries" / "spData_world.gpkg")},
            "output": {"dir": str(tmp_path / "out" / name), "work_dir": str(tmp_path / "work" / name)}}))
        return path

    example = pipeline("kampala", tmp_path / "data" / "kampala_oam" / "OAM-*-19.tif")
    code, out, err = run_cli(monkeypatch, capsys, "run", str(example))
    assert code == 4 and not out and err.count("\n") == 1, (code, out, err)
    assert err == ("kampala: not run: its inputs are example scenes not fetched yet: kampala_oam (6 file(s) from "
                   "github.com/hotosm/fAIr-utilities @ 61f15156), boundaries (1 file(s) from Debian package "
                   "r-cran-spdata 2.2.1-1); `make data` fetches them when online\n")
    own = pipeline("mine", tmp_path / "mine" / "scene.tif")
    code, out, err = run_cli(monkeypatch, capsys, "run", str(own))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "scene.tif" in err, (code, err)
    assert not (tmp_path / "out").exists()
