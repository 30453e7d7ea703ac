"""A generated tree whose write was cut off: the loaders refuse it, and no generated file is ever left half-written.

A kill is imitated by a writer that writes part of its bytes and then raises KeyboardInterrupt (as Ctrl-C or a
stop signal taken as Ctrl-C does); every file the generator placed under its final name must then be whole.
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from cirlab.data.base import DataError, load_cir
from cirlab.data.generators import _owned, synthetic
from cirlab.data.precomp import load_precomp


def _cut_before_seal(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The generator stops after every file of ``layout`` is written, before the record that says so."""
    seal = _owned.seal

    def interrupted(folder: Path, generator: str) -> None:
        if folder.name == layout:
            raise KeyboardInterrupt
        seal(folder, generator)

    monkeypatch.setattr(_owned, "seal", interrupted)


def test_a_cut_off_tree_with_missing_images_is_refused_naming_the_generator(tmp_path, monkeypatch):
    _cut_before_seal(monkeypatch, "fashioniq")
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, size="tiny", layouts=["fashioniq"], image_size=16)
    root = tmp_path / "fashioniq"
    for image in sorted((root / "images").glob("dress_test_*.png"))[:3]:  # what a kill mid-way had not written
        image.unlink()
    for options in ({}, {"missing_images": "drop"}):  # "drop" trained on a truncated set without a word
        with pytest.raises(DataError, match=r"written by `cirlab data synth` and not finished.*run `cirlab data "
                                            r"synth` again") as err:
            load_cir("fashioniq", root, "test", category="dress", **options)
        assert err.value.file == str(root) and "partial download" not in str(err.value)


def test_a_cut_off_tree_is_refused_even_where_the_category_is_complete(tmp_path, monkeypatch):
    _cut_before_seal(monkeypatch, "fashioniq")
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, size="tiny", layouts=["fashioniq"], image_size=16)
    with pytest.raises(DataError, match="not finished"):
        load_cir("fashioniq", tmp_path, "val", category="dress")  # the folder holding fashioniq/ as well


def test_cut_off_cirr_and_precomp_trees_are_refused(tmp_path, monkeypatch):
    for layout in ("cirr", "precomp"):
        _cut_before_seal(monkeypatch, layout)
        with pytest.raises(KeyboardInterrupt):
            synthetic.generate(tmp_path / layout, size="tiny", layouts=[layout], image_size=16)
    with pytest.raises(DataError, match="cirlab data synth"):
        load_cir("cirr", tmp_path / "cirr", "val")
    with pytest.raises(DataError, match="cirlab data synth"):
        load_precomp(tmp_path / "precomp", "f30k", "dev", regions=None, dim=None)


def test_a_finished_tree_still_loads(tmp_path):
    synthetic.generate(tmp_path, size="tiny", layouts=["fashioniq", "precomp"], image_size=16)
    assert len(load_cir("fashioniq", tmp_path / "fashioniq", "val", category="dress")) > 0
    assert len(load_precomp(tmp_path / "precomp", "f30k", "dev", regions=None, dim=None).captions) > 0


class _Cut(KeyboardInterrupt):
    """The imitated kill."""


def _cut_text_writes(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """``Path.write_text`` writes the first half of the ``after``-th text, then the process is "killed"."""
    original, calls = Path.write_text, []

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        calls.append(self)
        if len(calls) == after:
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise _Cut
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _cut_image_writes(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """PIL writes the first half of the ``after``-th image's bytes, then the process is "killed"."""
    from PIL import Image

    original, calls = Image.Image.save, []

    def save(self: Any, fp: Any, format: str | None = None, **params: Any) -> None:
        calls.append(fp)
        if len(calls) != after:
            return original(self, fp, format, **params)
        buffer = io.BytesIO()
        original(self, buffer, format or Image.registered_extensions()[Path(fp).suffix.lower()], **params)
        Path(fp).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise _Cut

    monkeypatch.setattr(Image.Image, "save", save)


def _torn_files(root: Path) -> list[str]:
    """Files under their final names that are not whole: JSON that does not parse, images that do not decode."""
    from PIL import Image

    torn = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix in (".png", ".jpg"):
                with Image.open(path) as img:
                    img.load()
        except Exception as err:  # noqa: BLE001 - any failure to read is a torn file
            torn.append(f"{path.relative_to(root)}: {type(err).__name__}")
    return torn


@pytest.mark.parametrize("after", [1, 2, 5, 9])
def test_a_text_write_cut_off_leaves_no_torn_file(tmp_path, monkeypatch, after):
    _cut_text_writes(monkeypatch, after)
    with pytest.raises(_Cut):
        synthetic.generate(tmp_path, size="tiny", layouts=["shoes", "fashioniq"], image_size=16)
    monkeypatch.undo()
    assert _torn_files(tmp_path) == []
    assert list(tmp_path.rglob("*.tmp")) == []


@pytest.mark.parametrize("layout", ["fashioniq", "shoes"])
def test_an_image_write_cut_off_leaves_no_torn_image(tmp_path, monkeypatch, layout):
    _cut_image_writes(monkeypatch, 4)
    with pytest.raises(_Cut):
        synthetic.generate(tmp_path, size="tiny", layouts=[layout], image_size=16)
    monkeypatch.undo()
    assert _torn_files(tmp_path) == []
    assert list(tmp_path.rglob("*.tmp")) == []


def test_a_seal_cut_off_leaves_the_tree_unfinished(tmp_path, monkeypatch):
    """A torn marker read as no marker at all: the tree then passed as finished."""
    original = _owned.seal

    def seal(folder: Path, generator: str) -> None:
        _cut_text_writes(monkeypatch, 1)
        original(folder, generator)

    monkeypatch.setattr(_owned, "seal", seal)
    with pytest.raises(_Cut):
        synthetic.generate(tmp_path, size="tiny", layouts=["fashioniq"], image_size=16)
    monkeypatch.undo()
    assert _owned.unfinished(tmp_path / "fashioniq", (synthetic.MANIFEST,)) == synthetic.__name__


def test_the_same_seed_still_writes_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        synthetic.generate(tmp_path / name, size="tiny", seed=7, image_size=16)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_a_figure_write_cut_off_leaves_no_partial_file(tmp_path):
    from cirlab.workbench.viz import save_figure

    class Figure:
        """Writes half a PNG, then is "killed"."""

        def savefig(self, target: Any, **kwargs: Any) -> None:
            data = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
            if hasattr(target, "write"):
                target.write(data)
            else:
                Path(target).write_bytes(data)
            raise _Cut

    with pytest.raises(_Cut):
        save_figure(Figure(), tmp_path, "g", ("png",))
    assert sorted(os.listdir(tmp_path)) == []


def test_sigterm_during_synth_ends_as_ctrl_c_does(tmp_path, monkeypatch, caplog):
    """The lock is released and the command says so (exit 143), where the default action died without a word."""
    from cirlab.cli import main

    class Killed(Exception):
        """The default action, which would end pytest too."""

    def default(signum: int, frame: Any) -> None:
        raise Killed

    previous = signal.signal(signal.SIGTERM, default)
    try:
        render, calls = synthetic.sc.render, []

        def render_then_term(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return render(*args, **kwargs)

        monkeypatch.setattr(synthetic.sc, "render", render_then_term)
        out = tmp_path / "s"
        with caplog.at_level(logging.ERROR):
            status = main(["data", "synth", "--out", str(out), "--size", "tiny", "--image-size", "16"])
        assert status == 143
        assert "interrupted (SIGTERM)" in caplog.text
        assert [p.name for p in tmp_path.iterdir() if "lock" in p.name] == []
        assert signal.getsignal(signal.SIGTERM) is default  # given back after the command
        with pytest.raises(DataError, match="not finished"):
            load_cir("fashioniq", out, "val", category="dress")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_rerun_removes_the_temporaries_a_killed_build_left_beside_its_manifest(tmp_path):
    synthetic.generate(tmp_path, size="tiny", layouts=["shoes"], image_size=16)
    left = [tmp_path / f".{synthetic.MANIFEST}.0123456789ab.tmp", tmp_path / f".{_owned.MARKER}.ba9876543210.tmp"]
    for path in left:
        path.write_text("{")
    mine = tmp_path / ".notes.tmp"  # a user's file of the same pattern stays
    mine.write_text("keep")
    synthetic.generate(tmp_path, size="tiny", layouts=["shoes"], image_size=16)
    assert [p.exists() for p in left] == [False, False] and mine.read_text() == "keep"
