"""cirlab in a batch job's environment: no home directory, a full disk under the cache."""
from __future__ import annotations

import errno
import logging
import pwd
from pathlib import Path

import pytest

from cirlab.core import paths
from cirlab.core.errors import ConfigError


@pytest.fixture
def no_home(monkeypatch):
    """A user id without a passwd entry and no HOME (a container run with --user, some batch setups)."""
    def unknown_user(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown_user)
    for var in ("CIRLAB_CACHE", "XDG_CACHE_HOME", "CIRLAB_RUNS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError):
        Path.home()  # the situation itself: pathlib's traceback, which cirlab showed


def test_cirlab_cache_works_without_a_home_directory(no_home, monkeypatch, tmp_path):
    """cache_dir() looked up the home directory before CIRLAB_CACHE: a traceback for every data-resolving command
    although the job had set CIRLAB_CACHE."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    assert paths.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CIRLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "cirlab"


def test_no_home_and_no_cirlab_cache_is_one_line_naming_the_variable(no_home):
    with pytest.raises(ConfigError, match=r"^no home directory \(HOME is not set and user id \d+ has no passwd "
                                          r"entry\): set CIRLAB_CACHE to a folder for cirlab's cache$"):
        paths.cache_dir()
    with pytest.raises(RuntimeError):  # what callers of Path.home() caught before still catches it
        paths.cache_dir()


def test_a_notebook_folder_without_a_home_directory_names_cirlab_runs(no_home, monkeypatch):
    """A notebook run from inside the installed package writes under ~/cirlab/runs: without a home directory that
    was pathlib's traceback."""
    from cirlab.workbench import recipes

    monkeypatch.setattr(recipes, "inside_package", lambda folder: True)
    with pytest.raises(ConfigError, match=r"no home directory .*: set CIRLAB_RUNS or pass output_dir$"):
        recipes.output_folder("", "train")


# ----------------------------------------------------------------------------------------- full disk, cache data


def _full_disk_after(monkeypatch, images: int) -> None:
    """PIL's save raises on a full disk as it does on a real one: an OSError without a file name."""
    from PIL import Image

    real, saved = Image.Image.save, []

    def save(self, *args, **kwargs):
        if len(saved) >= images:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_full_disk_while_generating_names_the_output_folder(tmp_path, monkeypatch):
    from cirlab.data.generators import synthetic

    _full_disk_after(monkeypatch, 3)
    out = tmp_path / "syn"
    with pytest.raises(OSError) as raised:
        synthetic.generate(out, size="tiny", layouts=["cirr"], image_size=32)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)


def test_a_full_cache_disk_says_which_folder_on_the_command_line(tmp_path, monkeypatch, caplog):
    """`cirlab train` on a full cache disk said `cannot write (No space left on device)` and no folder: with
    separate home, scratch and project quotas the user could not tell which one was full."""
    from cirlab.cli import main
    from cirlab.data.generators import synthetic

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError) as raised:
        synthetic.ensure(size="tiny", layouts=["cirr"], image_size=32)
    assert Path(raised.value.filename).parent == tmp_path / "cache" / "synthetic"
    out = tmp_path / "data"
    with caplog.at_level(logging.ERROR, logger="cirlab"):
        # the status is the CLI's own to choose (a full disk is worth a retry): failed, not which code
        assert main(["data", "synth", "--out", str(out), "--size", "tiny", "--layouts", "cirr",
                     "--image-size", "32"]) != 0
    assert f"{out}: cannot write (No space left on device)" in caplog.text
