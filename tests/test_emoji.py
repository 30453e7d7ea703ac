"""The emoji builder on a small fake npm tarball in the exact emoji-datasource layout (no network)."""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.data.generators import emoji
from cirlab.data import base
from cirlab.data.base import DataError, load_cir

TONE_KEYS = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def _entry(name: str, unified: str, **extra) -> dict:
    return {"name": name, "unified": unified, "image": f"{unified.lower()}.png", "short_name": name.lower(),
            "short_names": [name.lower().replace(" ", "_")], "category": "Test", "subcategory": "test",
            "has_img_google": True, **extra}


def _variation(unified: str) -> dict:
    return {"unified": unified, "image": f"{unified.lower()}.png", "has_img_google": True}


def fake_entries() -> list[dict]:
    thumbs = _entry("THUMBS UP SIGN", "1F44D",
                    skin_variations={k: _variation(f"1F44D-{k}") for k in TONE_KEYS})
    handshake = _entry("HANDSHAKE", "1F91D", skin_variations={
        "1F3FB": _variation("1F91D-1F3FB"), "1F3FB-1F3FF": _variation("1FAF1-1F3FB-200D-1FAF2-1F3FF")})
    return [
        thumbs, handshake,
        _entry("MAN COOK", "1F468-200D-1F373"), _entry("WOMAN COOK", "1F469-200D-1F373"),
        _entry("MEN WITH BUNNY EARS", "1F46F-200D-2642-FE0F"), _entry("WOMEN WITH BUNNY EARS", "1F46F-200D-2640-FE0F"),
        _entry("HEAVY BLACK HEART", "2764-FE0F"), _entry("BLUE HEART", "1F499"), _entry("GREEN HEART", "1F49A"),
        _entry("RED APPLE", "1F34E"), _entry("GREEN APPLE", "1F34F"),
        _entry("BLACK CAT", "1F408-200D-2B1B"),  # a colour word with no partner: no triplet
        _entry("NO GOOGLE IMAGE HEART", "1FFFF", has_img_google=False),  # not drawn by Google: not used
    ]


def _images(entries: list[dict]) -> dict[str, bytes]:
    out = {}
    for k, name in enumerate(sorted({e["image"] for e in entries if e["has_img_google"]} |
                                    {v["image"] for e in entries for v in (e.get("skin_variations") or {}).values()})):
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent background, as the real PNGs
        img.paste((10 * k % 250, 80, 200, 255), (16, 16, 48, 48))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def write_tarball(path: Path, entries: list[dict], images: dict[str, bytes], drop: str | None = None) -> Path:
    files = {"package/emoji.json": json.dumps(entries).encode(), "package/LICENSE": b"The MIT License (MIT)\n",
             "package/package.json": b'{"name": "emoji-datasource-google", "version": "16.0.0"}'}
    files.update({f"package/img/google/64/{name}": data for name, data in images.items() if name != drop})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def tarball(tmp_path) -> Path:
    entries = fake_entries()
    return write_tarball(tmp_path / "emoji-datasource-google-16.0.0.tgz", entries, _images(entries))


def test_triplets_follow_the_metadata():
    got = {(t.category, t.ref, t.target, t.kind, t.args) for t in emoji.collect_triplets(fake_entries(), seed=0)}
    skin = {t for t in got if t[0] == "skin_tone"}
    tones = dict(zip(TONE_KEYS, ("light", "medium-light", "medium", "medium-dark", "dark")))
    for key, tone in tones.items():  # base -> every variant, named by its tone
        assert ("skin_tone", "1f44d.png", f"1f44d-{key.lower()}.png", "tone", (tone,)) in skin
    # every one-tone variant is also reached from another tone of the same emoji
    second = [t for t in skin if t[1] != "1f44d.png" and t[2].startswith("1f44d-")]
    assert len(second) == 5 and all(t[1] != t[2] for t in second)
    assert sum(t[3] == "default_tone" for t in skin) == 2  # one way back per emoji
    assert ("skin_tone", "1f91d.png", "1faf1-1f3fb-200d-1faf2-1f3ff.png", "tones", ("light", "dark")) in skin
    assert len(skin) == 5 + 5 + 1 + 2 + 1
    gender = {(t[1], t[2], t[3]) for t in got if t[0] == "gender"}
    assert gender == {("1f468-200d-1f373.png", "1f469-200d-1f373.png", "to_woman"),
                      ("1f469-200d-1f373.png", "1f468-200d-1f373.png", "to_man"),
                      ("1f46f-200d-2642-fe0f.png", "1f46f-200d-2640-fe0f.png", "to_women"),
                      ("1f46f-200d-2640-fe0f.png", "1f46f-200d-2642-fe0f.png", "to_men")}
    color = {(t[1], t[2], t[4]) for t in got if t[0] == "color"}
    assert ("2764-fe0f.png", "1f499.png", ("red", "blue")) in color  # HEAVY BLACK HEART is the red heart
    assert ("1f34f.png", "1f34e.png", ("green", "red")) in color
    assert len(color) == 3 * 2 + 2
    assert not any("1f408" in t[1] or "1ffff" in t[1] for t in got)


def test_build_round_trips_through_the_fashioniq_loader(tarball, tmp_path):
    root = emoji.build(tmp_path / "out", tarball=tarball, seed=0)
    manifest = json.loads((root / emoji.MANIFEST).read_text())
    assert manifest["triplets"] == {"skin_tone": 14, "gender": 4, "color": 8}
    assert "Apache" in (root / "NOTICE").read_text() and "MIT" in (root / "NOTICE").read_text()
    assert (root / "LICENSE.emoji-datasource").read_text().startswith("The MIT License")
    split_of_image: dict[str, str] = {}
    total = {}
    for cat in emoji.CATEGORIES:
        for split in emoji.SPLITS:
            loaded = load_cir("fashioniq", root, split, category=cat)
            total[cat] = total.get(cat, 0) + len(loaded.triplets)
            for t in loaded.triplets:
                assert t.extras["modification"] == cat and len(t.captions) == 2 and t.captions[0] != t.captions[1]
                for name in (t.ref_name, t.target_name):
                    assert split_of_image.setdefault(name, split) == split  # a family never spans two splits
                    pixels = np.asarray(Image.open(loaded.image_path(name)))
                    assert pixels.shape == (64, 64, 3) and tuple(pixels[0, 0]) == (255, 255, 255)
    assert total == manifest["triplets"]
    assert len({s for s in split_of_image.values()}) >= 2


def test_build_is_cached_and_deterministic(tarball, tmp_path):
    root = emoji.build(tmp_path / "a", tarball=tarball)
    stamp = (root / emoji.MANIFEST).stat().st_mtime_ns
    assert emoji.build(tmp_path / "a", tarball=tarball) == root
    assert (root / emoji.MANIFEST).stat().st_mtime_ns == stamp
    other = emoji.build(tmp_path / "b", tarball=tarball)
    for path in sorted(root.rglob("*.json")):
        assert path.read_bytes() == (other / path.relative_to(root)).read_bytes()
    # a --tarball naming nothing is refused even when the cached build makes it unneeded (it exited 0 silently)
    with pytest.raises(DataError, match=r"nope\.tgz: tarball not found"):
        emoji.build(tmp_path / "a", tarball=tmp_path / "nope.tgz")


def test_a_folder_built_with_other_settings_is_refused_without_force(tarball, tmp_path):
    """``--seed 1`` into a folder built with seed 0 replaced it without a word; runs trained on it read other
    splits from then on (as ``data synth`` refuses)."""
    root = emoji.build(tmp_path / "e", tarball=tarball, seed=0)
    before = (root / "captions").iterdir().__next__().read_bytes()
    with pytest.raises(emoji.OtherSettingsError, match=r"e: it holds the emoji dataset built with seed 0 \(google "
                       r"16\.0\.0\), not seed 1 \(google 16\.0\.0\) as asked.*pass --force"):
        emoji.build(root, tarball=tarball, seed=1)
    assert next((root / "captions").iterdir()).read_bytes() == before
    assert json.loads((emoji.build(root, tarball=tarball, seed=1, force=True) / emoji.MANIFEST).read_text())["seed"] == 1


def test_default_root_is_under_cirlab_cache(tarball, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    root = emoji.build(tarball=tarball)
    assert root == tmp_path / "cache" / "emoji" / "google-16.0.0-seed0"
    assert (root / emoji.MANIFEST).is_file()


def test_missing_png_is_a_clear_error_before_writing(tmp_path):
    entries = fake_entries()
    bad = write_tarball(tmp_path / "bad.tgz", entries, _images(entries), drop="1f499.png")
    with pytest.raises(DataError, match=r"1f499\.png") as err:
        emoji.build(tmp_path / "out", tarball=bad)
    assert "bad.tgz" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_not_a_package_tarball(tmp_path):
    with tarfile.open(tmp_path / "x.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("something/else.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="package/emoji.json"):
        emoji.build(tmp_path / "out", tarball=tmp_path / "x.tgz")
    (tmp_path / "junk.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="junk.tgz"):
        emoji.build(tmp_path / "out", tarball=tmp_path / "junk.tgz")


def test_no_tarball_and_no_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm was not found"):
        emoji.build(tmp_path / "out")


def test_cli(tarball, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    p = emoji.register_cli(parser.add_subparsers(dest="cmd"))
    assert all(a.help for a in p._actions if a.dest != "help")
    args = parser.parse_args(["emoji", "--tarball", str(tarball), "--out", str(tmp_path / "e")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "skin_tone 14, gender 4, color 8" in out and str(tmp_path / "e") in out


def test_a_second_build_of_the_same_folder_waits_and_reuses_it(tarball, tmp_path):
    """Two runs that build the same emoji folder at once used to share one ``.partial`` folder; the second now waits
    on the lock next to the folder and finds the first one's build."""
    import subprocess
    import sys
    import time

    from cirlab.core.io import file_lock

    out = tmp_path / "e"
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO); "
            "from cirlab.data.generators import emoji; emoji.build(sys.argv[1], tarball=sys.argv[2]); "
            "print('done', flush=True)")
    with file_lock(tmp_path / ".e.cirlab.lock"):
        other = subprocess.Popen([sys.executable, "-c", code, str(out), str(tarball)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        time.sleep(3)
        assert other.poll() is None and not out.exists()  # waiting, writing nothing
        root = emoji.build(out, tarball=tarball)
        stamp = (root / emoji.MANIFEST).stat().st_mtime_ns
    stdout, stderr = other.communicate(timeout=120)
    assert other.returncode == 0 and stdout.strip() == "done", stderr
    assert "waiting up to" in stderr and "by another process" in stderr
    assert (root / emoji.MANIFEST).stat().st_mtime_ns == stamp
    assert not (tmp_path / ".e.cirlab.lock").exists()


@pytest.mark.parametrize("bad", ["../../escaped.png", "/ABS/escaped.png", "sub/1f44d.png", "1f44d.png.exe", ".png"])
@pytest.mark.parametrize("where", ["image", "skin_variations"])
def test_image_names_that_are_not_plain_code_point_file_names_are_refused_before_writing(tmp_path, bad, where):
    """emoji.json's image names were joined into the output path, so '../' or an absolute name wrote a PNG anywhere
    (the tarball only had to hold a member under that name)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    name = bad.replace("/ABS", str(victim)) if bad.startswith("/ABS") else bad
    entries = fake_entries()
    if where == "image":
        entries[2]["image"] = name  # MAN COOK: used by a gender triplet
    else:
        entries[0]["skin_variations"]["1F3FB"]["image"] = name
    images = _images(entries)
    evil = write_tarball(tmp_path / "evil.tgz", entries, images)
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(DataError) as err:
        emoji.build(out, tarball=evil)
    message = str(err.value)
    assert "evil.tgz" in message and "\n" not in message and err.value.kind == "bad_entry"
    assert ("#2 1F468-200D-1F373 image" if where == "image" else "#0 1F44D skin_variations['1F3FB'].image") in message
    assert not out.exists() and not (out.parent / "out.partial").exists()
    assert not list(victim.iterdir()) and not list(tmp_path.rglob("escaped.png"))


def test_a_skin_variation_that_is_not_an_object_is_a_one_line_error(tmp_path):
    entries = fake_entries()
    entries[0]["skin_variations"]["1F3FC"] = "1f44d-1f3fc.png"
    bad = write_tarball(tmp_path / "bad.tgz", entries, _images(fake_entries()))
    with pytest.raises(DataError, match=r"bad\.tgz!package/emoji\.json \[#0 1F44D skin_variations\['1F3FC'\]\]"):
        emoji.build(tmp_path / "out", tarball=bad)
    assert not (tmp_path / "out").exists()


def test_an_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    entries = fake_entries()
    tarball = write_tarball(tmp_path / "big.tgz", entries, _images(entries))
    monkeypatch.setattr(emoji, "MAX_IMAGE_BYTES", 16)  # the fake PNGs are a few hundred bytes
    with pytest.raises(DataError, match=r"big\.tgz!package/img/google/64/.*\.png: member is \d+ bytes, more than "
                                        r"the 16 bytes"):
        emoji.build(tmp_path / "out", tarball=tarball)
    assert not (tmp_path / "out").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` grey pixels, with no pixel data (Image.open reads only the header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_png_above_the_pixel_limit_is_refused_before_writing(tmp_path, monkeypatch):
    """The rule cirlab.data.base.load_image applies (MAX_IMAGE_PIXELS), lowered under the fake 64 x 64 PNGs."""
    entries = fake_entries()
    tarball = write_tarball(tmp_path / "huge.tgz", entries, _images(entries))
    monkeypatch.setattr(base, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"^\S*huge\.tgz!package/img/google/64/[0-9a-f-]+\.png: image too large: "
                                        r"64 x 64 pixels \(0\.0 Mpx\) is above"):
        emoji.build(tmp_path / "out", tarball=tarball)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*partial*"))


def test_a_png_declaring_pillows_bomb_size_is_a_one_line_error(tmp_path):
    entries = fake_entries()
    images = {**_images(entries), "1f499.png": _png_header(20000, 20000)}  # 400 Mpx: Pillow itself refuses it
    tarball = write_tarball(tmp_path / "bomb.tgz", entries, images)
    with pytest.raises(DataError, match=r"bomb\.tgz!package/img/google/64/1f499\.png: image too large: Image size "
                                        r"\(400000000 pixels\)") as err:
        emoji.build(tmp_path / "out", tarball=tarball)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_an_emoji_json_nested_too_deeply_is_a_one_line_error(tmp_path):
    """emoji.json of "[[[..." thousands deep ended in a RecursionError traceback."""
    path = tmp_path / "deep.tgz"
    with tarfile.open(path, "w:gz") as tar:
        data = b"[" * 100_000 + b"]" * 100_000
        info = tarfile.TarInfo("package/emoji.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"emoji\.json.*malformed JSON: nested too deeply"):
        emoji.build(tmp_path / "out", tarball=path)
