"""`pip install cirlab` (a built wheel) can run `cirlab report`: the wheel ships the notebooks and the configs.

The wheel is built from a copy of the sources (nothing is written into the checkout) and installed into a clean
virtual environment whose only other packages are the dependencies, reached through a path file (not the
checkout's editable install); `cirlab report --smoke` then runs from a folder outside any checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("cirlab", "notebooks", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel") / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_resources", ".ipynb_checkpoints", "runs")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    dist = src.parent / "dist"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(dist.glob("cirlab-*.whl"))


def test_wheel_ships_every_notebook_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # the license its metadata declares
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert f"cirlab/_resources/notebooks/{nb.name}" in names
    for cfg in (ROOT / "configs").glob("*.yaml"):
        assert f"cirlab/_resources/configs/{cfg.name}" in names


def test_a_rebuild_in_the_same_tree_drops_a_deleted_config(wheel, tmp_path):
    """The copy step only added files to a build/ kept from the last build: a config deleted from configs/ was still
    shipped by the next wheel built in the same tree."""
    src = tmp_path / "src"
    shutil.copytree(wheel.parent.parent / "src", src)  # with the build/ the first build left (pip builds in-tree)
    assert (src / "build").is_dir()
    gone = sorted((src / "configs").glob("*.yaml"))[0]
    gone.unlink()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("cirlab-*.whl"))).namelist())
    assert f"cirlab/_resources/configs/{gone.name}" not in names
    assert all(f"cirlab/_resources/configs/{c.name}" in names for c in (src / "configs").glob("*.yaml"))


@pytest.mark.slow
def test_cirlab_report_smoke_runs_from_a_wheel_in_a_clean_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, papermill, ipykernel, ...) from this environment, as plain paths: its .pth files (the
    # checkout's editable install among them) are not processed, so cirlab comes from the wheel alone
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    work = tmp_path / "elsewhere"  # no checkout above it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS",
                                                                      "PYTHONPATH", "JUPYTER"))}
    # the dependencies' data files (nbconvert's HTML templates) live under this environment's share/jupyter, beside
    # the checkout's "cirlab" kernel (which would import the checkout): only the templates are passed on, as a
    # real `pip install cirlab[notebooks]` puts them under the new venv's, with no cirlab kernel
    shared = tmp_path / "jupyter"
    shared.mkdir()
    for name in ("nbconvert",):
        (shared / name).symlink_to(Path(sys.prefix) / "share" / "jupyter" / name)
    env["JUPYTER_PATH"] = str(shared)
    env["CIRLAB_CACHE"] = str(tmp_path / "cache")
    where = subprocess.run([str(python), "-c", "import cirlab, cirlab.workbench.report as r; "
                            "print(cirlab.__file__); print(r.default_notebook_dir())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    module, notebooks = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(notebooks).is_relative_to(venv), where.stdout
    # no "cirlab" kernel is installed: the report runs the notebook in the interpreter running it (this venv's)
    result = subprocess.run([str(venv / "bin" / "cirlab"), "report", "--smoke", "--only", "quickstart", "--out",
                             str(work / "reports")], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / "reports" / "quickstart" / "metrics.json").is_file()
    assert "quickstart: done" in result.stdout and (work / "reports" / "index.html").is_file()
    kernel = tmp_path / "cache" / "jupyter" / "kernels" / "cirlab-report-python" / "kernel.json"
    assert json.loads(kernel.read_text())["argv"][0] == str(venv / "bin" / "python")
    record = json.loads((work / "reports" / "quickstart" / "report.json").read_text())
    assert record["commit"].startswith("cirlab ") and "not a git checkout" in record["commit"]  # the version instead
