"""The locks in requirements/ against pyproject.toml and this environment.

Every install path (make, the container, CI) installs a lock with `--require-hashes`, then the
project with `--no-deps`. A dependency added to pyproject.toml without `make lock` would be
missing from every install; a pin without hashes would be refused; torch in a lock would
override the build (CPU or CUDA) the install chose.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = {"serve": ROOT / "requirements/serve.txt", "dev": ROOT / "requirements/dev.txt"}
# What each lock must cover: the serving install, and everything `make install` adds.
EXTRAS = PYPROJECT["optional-dependencies"]
DECLARED = {
    "serve": PYPROJECT["dependencies"],
    "dev": [*PYPROJECT["dependencies"], *EXTRAS["train"], *EXTRAS["dev"], *EXTRAS["bench"]],
}


def entries(lock: Path) -> dict[str, tuple[Requirement, int]]:
    """Each pinned package in a pip-compile lock: its requirement line and its number of hashes."""
    found: dict[str, tuple[Requirement, int]] = {}
    current = ""
    for line in lock.read_text().splitlines():
        stripped = line.strip()
        if line and not line[0].isspace() and not line.startswith(("#", "-")):
            requirement = Requirement(line.rstrip(" \\"))
            current = canonicalize_name(requirement.name)
            found[current] = (requirement, 0)
        elif stripped.startswith("--hash=sha256:") and current:
            requirement, hashes = found[current]
            found[current] = (requirement, hashes + 1)
    return found


def pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", requirement
    return specifier.version


@pytest.mark.parametrize("lock", LOCKS)
def test_every_declared_dependency_is_locked_within_its_range(lock: str) -> None:
    """Fails when pyproject.toml gained or moved a dependency and `make lock` was not run."""
    locked = entries(LOCKS[lock])
    for declared in map(Requirement, DECLARED[lock]):
        name = canonicalize_name(declared.name)
        if name == "torch" or (declared.marker and not declared.marker.evaluate()):
            continue
        assert name in locked, f"{declared} is not in {LOCKS[lock].name}: run make lock"
        version = pinned_version(locked[name][0])
        assert declared.specifier.contains(version, prereleases=True), (declared, version)


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_has_hashes_and_torch_stays_out(lock: str) -> None:
    """Fails when a lock would be refused by --require-hashes, or would replace torch's build."""
    locked = entries(LOCKS[lock])
    assert "torch" not in locked
    assert all(hashes > 0 for _, hashes in locked.values()), [
        name for name, (_, hashes) in locked.items() if hashes == 0
    ]


def test_the_serving_lock_agrees_with_the_development_lock() -> None:
    """Fails when the container would run other versions than the ones CI tested."""
    serve, dev = entries(LOCKS["serve"]), entries(LOCKS["dev"])
    differing = {
        name: (str(serve[name][0]), str(dev[name][0]))
        for name in serve
        if pinned_version(serve[name][0]) != pinned_version(dev[name][0])
    }
    assert not differing


def test_this_environment_runs_the_locked_versions() -> None:
    """Fails when the tests ran on other versions than the lock pins (a drifted venv)."""
    drifted = {}
    for name, (requirement, _) in entries(LOCKS["dev"]).items():
        if requirement.marker and not requirement.marker.evaluate():
            continue
        installed = importlib.metadata.version(name)
        if installed != pinned_version(requirement):
            drifted[name] = (installed, pinned_version(requirement))
    assert not drifted
