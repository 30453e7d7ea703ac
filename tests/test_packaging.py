"""What a downstream packager gets: a self-contained sdist (its test suite runs from it), wheels that ship exactly the
notebooks and configs git tracks (and refuse to build without them), and provenance that never records the commit
of a repository the source tree merely sits in.

Everything is built from copies in ``tmp_path`` with setuptools' PEP 517 backend in a subprocess (no network, no
build isolation), never in the checkout.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the wheel's sources; the sdist's are these plus what the MANIFEST.in grafts
WHEEL_SOURCES = ("cirlab", "notebooks", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
SDIST_SOURCES = WHEEL_SOURCES + ("tests", "bench", "docs", "mk", "tools", "reports/benchmarks", "Makefile",
                                 "environment.yml", "requirements-lavis.txt")
IGNORE = shutil.ignore_patterns("__pycache__", "*.py[cod]", "_resources", ".ipynb_checkpoints", "runs", "build",
                                "*.egg-info", ".pytest_cache")
GIT = ["git", "-c", "user.name=cirlab tests", "-c", "user.email=tests@example.invalid", "-c", "commit.gpgsign=false",
       "-c", "init.defaultBranch=main"]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _copy(names, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in names:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=IGNORE)
        elif path.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / name)
    return dest


def _build(kind: str, src: Path, dist: Path) -> subprocess.CompletedProcess:
    """``build_sdist`` / ``build_wheel`` of setuptools' backend, run in ``src`` as pip or build would (no isolation)."""
    code = f"import sys, setuptools.build_meta as backend; print(backend.build_{kind}(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)


def _git(*args: str, cwd: Path) -> None:
    subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_the_sdist_carries_the_test_suite_its_helpers_and_what_the_readme_links(tmp_path):
    src = _copy(SDIST_SOURCES, tmp_path / "src")
    for junk in (src / "tests" / "__pycache__" / "conftest.cpython-311-pytest-8.pyc",
                 src / "bench" / "__pycache__" / "_common.cpython-311.pyc", src / "tests" / "stray.pyc"):
        junk.parent.mkdir(exist_ok=True)
        junk.write_bytes(b"\0")
    result = _build("sdist", src, tmp_path / "dist")
    assert result.returncode == 0, result.stderr[-3000:]
    with tarfile.open(next((tmp_path / "dist").glob("cirlab-*.tar.gz"))) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("tests/conftest.py", "tests/stub_models.py", "tests/naive_metrics.py", "tests/fixtures_data.py",
                   "tests/bench_scripts.py", "tests/fixtures/lavis/lavis_fixtures.json", "bench/_common.py",
                   "docs/architecture.md", "Makefile", "README.md", "LICENSE", "setup.py",
                   "reports/benchmarks/metrics.md"):
        assert needed in names, f"{needed} is not in the sdist"
    # every file of the folders the tests and the README need, nothing compiled
    for folder in ("tests", "bench", "docs", "notebooks", "configs"):
        for path in (src / folder).rglob("*"):
            relative = path.relative_to(src).as_posix()
            if path.is_file() and "__pycache__" not in relative and not relative.endswith(".pyc"):
                assert relative in names, f"{relative} is not in the sdist"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]


def test_code_version_ignores_a_repository_the_source_tree_only_sits_in(tmp_path):
    """An unpacked sdist inside a packaging repository: git answers with that repository's commit, which is not
    cirlab's."""
    from cirlab import __version__
    from cirlab.core.provenance import code_version

    if shutil.which("git") is None:
        assert code_version(tmp_path) == "unknown (git not available)"
        return
    outer = tmp_path / "packaging"
    outer.mkdir()
    _git("init", "-q", cwd=outer)
    _git("commit", "-q", "--allow-empty", "-m", "debian packaging", cwd=outer)
    root = outer / "cirlab-0.1.0"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "cirlab"\n')
    assert code_version(root) == f"cirlab {__version__} (not a git checkout)"
    # the same tree as a checkout of its own records its own commit
    _git("init", "-q", cwd=root)
    _git("add", "-A", cwd=root)
    _git("commit", "-q", "-m", "cirlab", cwd=root)
    own = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert code_version(root) == own


@pytest.mark.parametrize("broken", ["no notebooks folder", "no configs"])
def test_a_wheel_without_notebooks_or_configs_is_refused_in_one_line(tmp_path, broken):
    src = _copy(WHEEL_SOURCES, tmp_path / "src")
    if broken == "no notebooks folder":
        shutil.rmtree(src / "notebooks")
        folder = "notebooks/"
    else:
        for config in (src / "configs").glob("*.yaml"):
            config.unlink()
        folder = "configs/"
    result = _build("wheel", src, tmp_path / "dist")
    assert result.returncode != 0, "a wheel was built without " + folder
    last = result.stderr.strip().splitlines()[-1]
    assert folder in last and "missing" in last and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "dist").glob("*.whl"))


@needs_git
def test_untracked_notebooks_and_configs_are_left_out_of_wheel_and_sdist_with_a_warning(tmp_path):
    src = _copy(WHEEL_SOURCES, tmp_path / "src")
    _git("init", "-q", cwd=src)
    _git("add", "-A", cwd=src)  # git ls-files lists what is added: no commit needed
    (src / "notebooks" / "Untitled.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, '
                                                      '"nbformat_minor": 5}\n')
    (src / "configs" / "my_local_experiment.yaml").write_text("model: amc\n")
    stray = ("notebooks/Untitled.ipynb", "configs/my_local_experiment.yaml")

    wheel = _build("wheel", src, tmp_path / "dist")
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("cirlab-*.whl"))).namelist())
    for path in stray:
        assert f"cirlab/_resources/{path}" not in names
        assert f"{path} is not tracked by git" in wheel.stderr
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert f"cirlab/_resources/notebooks/{nb.name}" in names
    assert any(n.startswith("cirlab/_resources/configs/") for n in names)

    sdist = _build("sdist", src, tmp_path / "dist")
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    with tarfile.open(next((tmp_path / "dist").glob("cirlab-*.tar.gz"))) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        listing = next(n for n in tar.getnames() if n.endswith("/cirlab.egg-info/SOURCES.txt"))
        listed = tar.extractfile(listing).read().decode().splitlines()
    for path in stray:
        assert path not in names and path not in listed
        assert f"{path} is not tracked by git" in sdist.stderr
    assert {f"notebooks/{nb.name}" for nb in (ROOT / "notebooks").glob("*.ipynb")} <= names
