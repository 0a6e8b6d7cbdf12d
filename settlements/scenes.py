"""The example scenes of the shipped pipelines: where each file comes from, pinned, and how to get it.

``settlements data`` (``make data``) gives every scene folder of ``data/`` the first of: what is already
there; a link to ``../shared/data/<scene>`` (developers, CI); the files fetched from their public source,
a GitHub repository at a fixed commit (through pooch) or a Debian package of a fixed version (through
apt-get), each checked against its SHA-256 before the folder appears; or one line saying why not. A
pipeline whose inputs are such files, not fetched yet, is skipped by ``make reprocess`` with that advice
(``settlements run`` exit code 4), while any other missing input stays an error.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Where GitHub serves a file of a repository at a commit: ``{base}/{repo}/{commit}/{path}``.
GITHUB_RAW = "https://raw.githubusercontent.com"
#: Seconds pooch waits for a server before giving up on a file.
TIMEOUT = 60


@dataclass(frozen=True)
class SceneFile:
    """One file of a scene: its name in the scene folder, its path in the source, its SHA-256."""

    name: str
    member: str
    sha256: str


@dataclass(frozen=True)
class GitHub:
    """Files of a public repository at a commit (a full SHA: a branch or tag could move)."""

    repo: str
    commit: str

    def describe(self) -> str:
        return f"github.com/{self.repo} @ {self.commit[:8]}"

    def url(self, member: str, base: str = GITHUB_RAW) -> str:
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{member}"


@dataclass(frozen=True)
class Debian:
    """Files inside a Debian package of an exact version (what ``apt-get download`` brings)."""

    package: str
    version: str

    def describe(self) -> str:
        return f"Debian package {self.package} {self.version}"


Source = GitHub | Debian


@dataclass(frozen=True)
class Scene:
    """A folder of ``data/``: its files by source (none: only in ``../shared/data``)."""

    name: str
    used_by: str
    parts: tuple[tuple[Source, tuple[SceneFile, ...]], ...] = ()

    @property
    def files(self) -> tuple[SceneFile, ...]:
        return tuple(f for _, files in self.parts for f in files)

    def holds(self, path: Path) -> bool:
        """Whether ``path`` (a file or a glob) names files of this scene."""
        return path.parent.name == self.name and any(fnmatch.fnmatchcase(f.name, path.name) for f in self.files)

    def complete(self, folder: Path) -> bool:
        return folder.is_dir() and all((folder / f.name).is_file() for f in self.files)

    def advice(self) -> str:
        """What to fetch, in a few words: the scene and its sources."""
        sources = "; ".join(f"{len(files)} file(s) from {src.describe()}" for src, files in self.parts)
        return f"{self.name} ({sources})"


_QGIS_TRAINING = GitHub("qgis/QGIS-Training-Data", "fd26dd88e39b9aec550eea450cec18d02b1de3b5")
_WC = "exercise_data/more_analysis/admin_boundaries/Western_Cape_UTM33S"
_URBAN = "exercise_data/projected_data/urban_33S"
_CHIPS = "ramp-data/TRAIN/HOTOSM/2/chips"

#: Every scene folder of ``data/``, the SHA-256 of each file computed from ``../shared/data``.
SCENES: tuple[Scene, ...] = (
    Scene("olinda_brazil", "pipelines/olinda.yaml (make demo)", (
        (Debian("r-cran-stars", "0.6-0-4"), (
            SceneFile("L7_ETMs.tif", "usr/lib/R/site-library/stars/tif/L7_ETMs.tif",
                      "3b722bf4470144b6691bf720bac08f47c99464acff4dd258252891c06312678e"),)),
        (Debian("r-cran-sf", "1.0-9+dfsg-1+b1"), tuple(
            SceneFile(f"olinda1.{ext}", f"usr/lib/R/site-library/sf/shape/olinda1.{ext}", sha) for ext, sha in (
                ("dbf", "8b3a2a04f8db7eac2f15902ad480fe8bf798f18a1f00937c03fb392ee3e694ba"),
                ("prj", "5d3242bae5aae2dd4b0c12e91471163a18fd9100975bc1639fe01a8de7f228a2"),
                ("shp", "7e7ae4036a6d6e6c9c394548d3cf557cb4277a033b90c5261651cb43d8b9eb0b"),
                ("shx", "48dcf96ca735ab15a67387e7c6d843784c66d21dad5d9867acf366a71ce1320e")))),
    )),
    Scene("swellendam_za", "pipelines/swellendam.yaml", (
        (_QGIS_TRAINING, (
            SceneFile("3420B_2010_328_RGB_LATLNG.tif", "exercise_data/raster/3420B_2010_328_RGB_LATLNG.tif",
                      "627598852c44add8effe2c460df4dad2457b8eab6852ea604e8c789fa2c56f25"),
            *(SceneFile(f"Western_Cape_UTM33S.{ext}", f"{_WC}.{ext}", sha) for ext, sha in (
                ("cpg", "3ad3031f5503a4404af825262ee8232cc04d4ea6683d42c5dd0a2f2a27ac9824"),
                ("dbf", "0b4a7f63ebd8b4ba4275175cb2577e9a114595620d4b5e3ce74894423eb24c85"),
                ("prj", "3f836b7544d18c46be74920f5cbf76a6bb178f963e916f174e2823b18b3466da"),
                ("shp", "e9507bbc6673e19df467d64085ba9c7ed99e6281343cf160217e33083c3f9c0b"),
                ("shx", "8c0e2db5c888a622aa4ae0159321270bff976b11f6d085997dafd19a81a65600"))),
            *(SceneFile(f"urban_33S.{ext}", f"{_URBAN}.{ext}", sha) for ext, sha in (
                ("dbf", "6b76e064ec87560a0b2b8ddc1d8bf184dce7f66de72621dd1360b52b14aa757e"),
                ("prj", "db91d6a1b64e024c805b9face7da213882f2c9ccc5d81e51aadd2071dc039884"),
                ("qpj", "b878d21057549cfd3dbc06836c7a546c1fba4fb0dede2beb6f89f3cd16a757f0"),
                ("shp", "9ec118133f56c2b111e0b36aea66e0fa71fb1e87d89a4da54cb46e06de8833d9"),
                ("shx", "81ee600d9c0e5467b3e1e6f71fa14b47ab139bd41cfd8e401f0c84d1214b22d9"))),
        )),
    )),
    Scene("kampala_oam", "pipelines/kampala.yaml", (
        (GitHub("hotosm/fAIr-utilities", "61f15156c4d399be9068ea1fa3e9b85915345076"), tuple(
            SceneFile(f"OAM-{tile}-19.tif", f"{_CHIPS}/OAM-{tile}-19.tif", sha) for tile, sha in (
                ("309612-261632", "7a4940de3d23f23779aa56acea9cebfb44f3ae30659ee74f58193d81a64aaf74"),
                ("309612-261633", "38a32edb23c3f0ec3ca84b3c96b11da34f9b1d300435a3672947077d0b1e0cdf"),
                ("309613-261632", "00296d366068777bace1602a71676f5d86051aed48eb32f35a520c2e9fe779d8"),
                ("309613-261633", "7b81421aa19f17dfc84fdaa0abfdcece18558f29cf2afe56f7f549c95e806377"),
                ("309614-261632", "0e857909aa75d09b191022d1d892e2b84fdc666d583a8403e9643d3e011ac59d"),
                ("309614-261633", "18583dc8ae8c5ff2fd3e5eeef2692888dde3c81d1ed80009fdde75ca07b6f93e")))),
    )),
    Scene("bangalore_s2", "pipelines/bangalore.yaml", (
        (GitHub("DynaSlum/satsense", "b0fa650193995a30328f26a36ebab2437c0e37ef"), (
            SceneFile("section_2_sentinel.tif", "test/data/source/section_2_sentinel.tif",
                      "adb3e1a38db9fe88110666cea0ad796c46b549fbac034c0ddca3106b7d10e4bb"),)),
    )),
    Scene("boundaries", "pipelines/kampala.yaml (regions)", (
        (Debian("r-cran-spdata", "2.2.1-1"), (
            SceneFile("spData_world.gpkg", "usr/lib/R/site-library/spData/shapes/world.gpkg",
                      "7b59ba2d07262674e5f00bf9eac0088da38de2e7a5a1f960f7bdcdfe73d261ab"),)),
    )),
    Scene("amsterdam_s2", "tests and benchmarks"),
    Scene("pucallpa_landsat", "tests and benchmarks"),
    Scene("mumbai_train", "tests and make quality"),
)


def scene_of(path: Path) -> Scene | None:
    """The scene whose files ``path`` (a file or a glob) names, if any."""
    return next((s for s in SCENES if s.holds(path)), None)


def missing_examples(paths: Iterable[Path]) -> list[Scene]:
    """The scenes of the inputs that are not here, when every missing input is a scene's file; else ``[]``
    (a missing input of the user's own is the pipeline's error to report)."""
    missing = [p for p in paths if not (_matches(p) if _is_glob(p) else p.exists())]
    scenes = [scene_of(p) for p in missing]
    if not missing or None in scenes:
        return []
    return list(dict.fromkeys(s for s in scenes if s is not None))


def _is_glob(path: Path) -> bool:
    return any(ch in str(path) for ch in "*?[")


def _matches(pattern: Path) -> bool:
    return pattern.parent.is_dir() and any(pattern.parent.glob(pattern.name))


class FetchFailed(Exception):
    """Why a scene's files could not be got (one line); internal to :func:`provide`."""


def provide(scene: Scene, dest: Path, shared: Path | None, github: str = GITHUB_RAW) -> str:
    """Give ``dest/<scene>`` its files (present, linked from ``shared`` or fetched); one line on what happened.

    Fetched files are checked against their SHA-256 in a hidden folder beside the scene's, which takes
    its name only once every file is there: a failure leaves no scene folder, and the files already
    checked are kept for the next try.
    """
    folder = dest / scene.name
    if folder.exists() and (scene.complete(folder) or not scene.parts):
        return f"{scene.name}: present in {folder}"
    if shared is not None and (shared / scene.name).is_dir() and not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():  # a link to a folder that is gone
            folder.unlink()
        folder.symlink_to((shared / scene.name).resolve(), target_is_directory=True)
        return f"{scene.name}: linked from {shared / scene.name}"
    if not scene.parts:
        return f"{scene.name}: not here: only in ../shared/data (no public recipe; {scene.used_by} skip without it)"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return f"{scene.name}: could not get: {folder} is a link or file without every file of the scene; remove it"
    staging = dest / f".{scene.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        for source, files in scene.parts:
            todo = [f for f in files if not _verified(staging / f.name, f.sha256)]
            if todo and isinstance(source, GitHub):
                _fetch_github(source, todo, staging, github)
            elif todo and isinstance(source, Debian):
                _fetch_debian(source, todo, staging)
    except FetchFailed as exc:
        if not any(staging.iterdir()):  # nothing checked to keep for the next try
            staging.rmdir()
        return f"{scene.name}: could not get: {exc}; needed by {scene.used_by}"
    if folder.is_dir():  # a folder of the user's with some files: add the missing ones only
        for f in scene.files:
            if not (folder / f.name).exists():
                os.replace(staging / f.name, folder / f.name)
        shutil.rmtree(staging)
    else:
        os.replace(staging, folder)
    sources = ", ".join(src.describe() for src, _ in scene.parts)
    return f"{scene.name}: fetched {len(scene.files)} file(s) from {sources} (SHA-256 checked)"


def _verified(path: Path, sha256: str) -> bool:
    import pooch

    return path.is_file() and pooch.file_hash(str(path), alg="sha256") == sha256


def _fetch_github(source: GitHub, files: list[SceneFile], staging: Path, base: str) -> None:
    """Each file from its URL at the pinned commit, through pooch (which checks the SHA-256 and keeps
    nothing that fails it)."""
    import pooch
    import requests

    pooch.get_logger().setLevel(logging.WARNING)
    downloader = pooch.HTTPDownloader(timeout=TIMEOUT, progressbar=False)
    for f in files:
        url = source.url(f.member, base)
        try:
            pooch.retrieve(url, known_hash=f"sha256:{f.sha256}", fname=f.name, path=staging, downloader=downloader)
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "error"
            raise FetchFailed(f"{url}: HTTP {status}") from None
        except requests.exceptions.RequestException as exc:
            raise FetchFailed(f"{url}: no connection ({type(exc).__name__}; offline?)") from None
        except ValueError as exc:  # pooch: the downloaded file's hash is not the pinned one (it deleted it)
            if "hash" not in str(exc).lower():
                raise
            raise FetchFailed(f"{url}: SHA-256 differs from the pinned {f.sha256[:12]}... (the source "
                              "changed; nothing kept)") from None


def _fetch_debian(source: Debian, files: list[SceneFile], staging: Path) -> None:
    """``apt-get download`` of the pinned version, then each file out of the package, checked."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchFailed(f"{source.describe()} needs apt-get and dpkg-deb (Debian, Ubuntu); none here")
    with tempfile.TemporaryDirectory(prefix=".deb-", dir=staging.parent) as tmp:
        spec = f"{source.package}={source.version}"
        got = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True)
        if got.returncode != 0 and "Failed to fetch" not in got.stderr:  # package lists old or missing (not
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)  # offline): refresh once
            got = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            reason = (got.stderr.strip().splitlines() or ["no .deb written"])[-1].removeprefix("E: ")
            raise FetchFailed(f"apt-get download {spec}: {' '.join(reason.split())}")
        extract_deb(debs[0], files, staging)


def extract_deb(deb: Path, files: list[SceneFile], staging: Path) -> None:
    """Copy ``files`` out of the package ``deb`` into ``staging``, each checked against its SHA-256."""
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=staging.parent) as tmp:
        unpacked = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True)
        if unpacked.returncode != 0:
            raise FetchFailed(f"dpkg-deb -x {deb.name}: {unpacked.stderr.strip() or 'failed'}")
        for f in files:
            member = Path(tmp) / f.member
            if not member.is_file():
                raise FetchFailed(f"{deb.name} holds no {f.member}")
            if not _verified(member, f.sha256):
                raise FetchFailed(f"{deb.name}: {f.member}: SHA-256 differs from the pinned {f.sha256[:12]}... "
                                  "(nothing kept)")
            shutil.copyfile(member, staging / f.name)
