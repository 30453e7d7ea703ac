"""`make setup` on a machine where an earlier setup went wrong: the venv is checked, not only found (mk/venv.sh), and
the Makefile's stamp names the checkout and the extras it was installed for. A Ctrl-C in the first seconds of setup
left bin/python without pip, and every later make setup / test / demo failed with "No module named pip"; a moved
checkout kept running the old folder's code; a changed EXTRAS installed nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_SH = ROOT / "mk" / "venv.sh"
MARK = ".made-by-make-setup"

pytestmark = pytest.mark.skipif(not shutil.which("make") or os.name != "posix", reason="make and sh are POSIX tools")


def _venv_sh(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(VENV_SH), *map(str, args)], capture_output=True, text=True, timeout=300)


def _made_without_pip(venv: Path, ours: bool) -> None:
    """A venv as an interrupted setup leaves it: bin/python, no pip (made quickly: no ensurepip)."""
    venv.mkdir()
    if ours:
        (venv / MARK).touch()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)


def test_a_half_made_venv_of_make_setup_is_made_again_with_pip(tmp_path):
    venv = tmp_path / "venv"
    _made_without_pip(venv, ours=True)
    done = _venv_sh(venv, sys.executable)
    assert done.returncode == 0, done.stderr
    assert "making" in done.stderr and "pip is missing or half installed" in done.stderr
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and (venv / MARK).is_file()  # still marked: a later repair may remove it again
    assert _venv_sh(venv, sys.executable).stderr == ""  # usable now: left as it is


def test_a_folder_make_setup_did_not_make_is_never_removed_and_the_user_is_told_what_to_do(tmp_path):
    venv = tmp_path / "mine"
    _made_without_pip(venv, ours=False)
    (venv / "notes.txt").write_text("mine")
    done = _venv_sh(venv, sys.executable)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert f"{venv} cannot be used: its pip is missing" in done.stderr and f"rm -rf '{venv}'" in done.stderr
    assert (venv / "notes.txt").read_text() == "mine"


def test_a_venv_set_up_for_another_checkout_is_made_again(tmp_path):
    venv, stamp = tmp_path / "venv", tmp_path / "venv" / ".cirlab-installed"
    _made_without_pip(venv, ours=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip"], check=True, capture_output=True, timeout=300)
    stamp.write_text("/somewhere/else|notebooks,lite,dev\n")
    assert _venv_sh(venv, sys.executable, tmp_path, stamp).stderr == (
        "making " + str(venv) + " again: it was set up for /somewhere/else (a moved or copied checkout)\n")
    assert not stamp.exists()  # so the install runs in full


def test_a_python_older_than_3_10_is_refused_before_anything_is_made(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\nexit 1\n")  # fails the version check as an old interpreter does
    old.chmod(0o755)
    done = _venv_sh(tmp_path / "venv", old)
    assert done.returncode == 1 and "cirlab needs Python 3.10 or newer" in done.stderr
    assert not (tmp_path / "venv").exists()


def _make_n(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_the_stamp_names_the_checkout_and_the_extras_and_another_value_installs_again(tmp_path):
    venv = tmp_path / "venv"
    stamp = venv / ".cirlab-installed"
    venv.mkdir()
    stamp.write_text(f"{ROOT}|notebooks,lite,dev\n")
    shutil.copystat(ROOT / "pyproject.toml", stamp)
    os.utime(stamp)  # newer than pyproject.toml: up to date
    assert "pip install" not in _make_n("setup", f"VENV={venv}").stdout
    assert "pip install" in _make_n("setup", f"VENV={venv}", "EXTRAS=notebooks,lite,dev,faiss").stdout
    stamp.write_text("/moved/away|notebooks,lite,dev\n")
    os.utime(stamp)
    assert "pip install" in _make_n("setup", f"VENV={venv}").stdout
    spaced = _make_n("setup", f"VENV={tmp_path}/my venv")
    assert spaced.returncode == 2 and "VENV must not contain spaces" in spaced.stderr
