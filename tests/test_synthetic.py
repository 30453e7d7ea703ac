"""The synthetic generator: determinism, the real layouts read back by the real loaders, and learnability (an oracle
that knows the attributes finds every target; text-only and image-only rankers cannot)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cirlab.data.generators import _scenes as sc
from cirlab.data.generators import synthetic
from cirlab.data.base import load_cir
from cirlab.data.precomp import load_precomp
from lock_holder import held_by_another_thread

KINDS = set(sc.KINDS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    synthetic.generate(out, seed=0, size="tiny", image_size=32)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes_and_other_seed_differs(tiny, tmp_path):
    synthetic.generate(tmp_path / "b", seed=0, size="tiny", image_size=32)
    first, second = _files(tiny), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    synthetic.generate(tmp_path / "c", seed=1, size="tiny", image_size=32, layouts=["cirr"])
    other = _files(tmp_path / "c" / "cirr")
    same_names = [k for k in other if other[k] == first.get(f"cirr/{k}")]
    assert not any(k.endswith((".json", ".png")) and "captions" in k for k in same_names)
    assert len(same_names) < len(other) / 10


def test_fashioniq_layout_reads_back(tiny):
    root = tiny / "fashioniq"
    for cat in synthetic.CATEGORY_SPECS:
        for split in ("train", "val", "test"):
            loaded = load_cir("fashioniq", root, split, category=cat)
            assert len(loaded.triplets) == synthetic.FIQ_GROUP.queries and loaded.has_targets  # tiny = one group
            for t in loaded.triplets:
                assert len(t.captions) == 2 and t.captions[0] != t.captions[1]
                assert t.extras["modification"] in KINDS
                assert t.ref_name != t.target_name
            names = json.loads((root / "image_splits" / f"split.{cat}.{split}.json").read_text())
            assert sorted(names) == sorted(loaded.gallery_names)  # AMC gallery = every written image
    item = load_cir("fashioniq", root, "val", category="dress").triplet_dataset(transform=np.asarray)[0]
    assert item["ref_image"].shape == (32, 32, 3) and item["modification"] in KINDS


def test_cirr_layout_reads_back(tiny):
    root = tiny / "cirr"
    val = load_cir("cirr", root, "val")
    assert len(val.triplets) == 40 and val.has_targets
    for t in val.triplets:
        members = t.extras["members"]
        assert len(members) == 6 and t.ref_name in members and t.target_name in members
        assert t.extras["modification"] in KINDS
    test1 = load_cir("cirr", root, "test1")
    assert len(test1.triplets) == 40 and all(t.target_name is None for t in test1.triplets)
    assert all(len(t.extras["members"]) == 6 for t in test1.triplets)
    raw = json.loads((root / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert not any("target_hard" in e or "target_soft" in e for e in raw)
    train_paths = json.loads((root / "cirr" / "image_splits" / "split.rc2.train.json").read_text())
    assert all(p.startswith("./train/0/") for p in train_paths.values())


def test_shoes_layout_reads_back(tiny):
    root = tiny / "shoes"
    for split in ("train", "test"):
        loaded = load_cir("shoes", root, split)
        assert len(loaded.triplets) == synthetic.SHOES_GROUP.queries  # tiny = one group
        assert all(t.extras["modification"] in KINDS for t in loaded.triplets)
        assert all(loaded.image_path(t.ref_name).suffix == ".jpg" for t in loaded.triplets)
    train = set((root / "train_im_names.txt").read_text().split())
    test = set((root / "eval_im_names.txt").read_text().split())
    assert train and test and not train & test


def test_precomp_layout_and_features_carry_attributes(tiny):
    meta = json.loads((tiny / "precomp" / synthetic.META).read_text())
    featurizer = synthetic.RegionFeaturizer(0, 2048)
    colors = list(sc.COLORS)
    proto = np.stack([featurizer.protos[("color", c)] for c in colors])
    for split, n in zip(("train", "dev", "test"), (20, 10, 10)):
        loaded = load_precomp(tiny / "precomp", "f30k", split)
        assert loaded.images.shape == (n, 36, 2048) and loaded.images.dtype == np.float32
        assert len(loaded.captions) == 5 * n
        for i, items in enumerate(meta["scenes"][split]):
            scene = sc.scene_from_json(items)
            feats = np.asarray(loaded.images[i])
            assert feats.min() >= 0.0
            norms = np.linalg.norm(feats, axis=1)
            objects = np.argsort(-norms)[: len(scene)]
            assert (norms > 22).sum() == len(scene)  # one strong region per object, the rest background
            decoded = sorted(colors[int(np.argmax(proto @ feats[j]))] for j in objects)
            assert decoded == sorted(o.color for o in scene)
            caps = loaded.captions[5 * i: 5 * i + 5]
            assert meta["caption_type"][split][5 * i: 5 * i + 5] == list(sc.CAPTION_TYPES)
            _check_typed_captions(scene, dict(zip(sc.CAPTION_TYPES, caps)))
    assert meta["caption_types"] == list(sc.CAPTION_TYPES) == ["full", "color", "shape", "layout", "relation"]


def _words(cap: str) -> set[str]:
    return set(cap.replace(" .", "").replace(" ,", "").split())


def _check_typed_captions(scene: sc.Scene, caps: dict[str, str]) -> None:
    """Each caption type says what its type promises about the scene, and nothing from the other types."""
    import re

    n = sc._NUMBERS
    colors, shapes, sizes = set(sc.COLORS), set(sc.SHAPES), set(sc.SIZES)
    for o in scene:  # full: every attribute of every object
        assert f"a {o.size} {o.color} {o.shape} {sc.at_phrases(o.cell)[0]}" in caps["full"]
    counts = {c: sum(o.color == c for o in scene) for c in {o.color for o in scene}}
    for c, k in counts.items():  # color: the colours with their counts, no shape, size or cell
        assert f"{n[k]} {c} object" in caps["color"]
    assert not _words(caps["color"]) & (shapes | sizes) and " at the " not in caps["color"]
    assert caps["shape"].startswith(f"{n[len(scene)]} shapes :")  # shape: count and shapes only
    for s in {o.shape for o in scene}:
        assert f"{n[sum(o.shape == s for o in scene)]} {s}" in caps["shape"]
    assert not _words(caps["shape"]) & (colors | sizes)
    assert caps["layout"].count(" object ") == len(scene)  # layout: cells and sizes, no colour or shape
    for o in scene:
        assert f"a {o.size} object {sc.at_phrases(o.cell)[0]}" in caps["layout"]
    assert not _words(caps["layout"]) & (colors | shapes)
    rel = caps["relation"]  # relation: relative positions of objects named by colour and shape; no size, no cell
    assert not _words(rel) & sizes and " at the " not in rel and " in the " not in rel
    pairs = re.findall(r"the (\w+) (\w+) is ((?:above|below|left of|right of)(?: and (?:left of|right of))?) "
                       r"the (\w+) (\w+)", rel)
    assert len(pairs) == len(scene) - 1
    for ca, sa, relation, cb, sb in pairs:  # some pair of objects so named stands in that relation
        assert any(sc._relation(a, b) == relation for a in scene for b in scene
                   if (a.color, a.shape, b.color, b.shape) == (ca, sa, cb, sb))
    assert {f"{o.color} {o.shape}" for o in scene} <= {f"{c} {s}" for c, s, *_ in pairs} | \
        {f"{c} {s}" for *_, c, s in pairs}
    assert len(set(caps.values())) == 5


@pytest.mark.parametrize("layout,split,category", [("fashioniq", "val", "dress"), ("fashioniq", "train", "shirt"),
                                                   ("cirr", "val", None), ("shoes", "test", None)])
def test_oracle_solves_it_and_single_modalities_cannot(tiny, layout, split, category):
    root = tiny / layout
    loaded = load_cir(layout, root, split, category=category)
    res = synthetic.audit_split(loaded, synthetic.load_meta(root))
    assert res["queries"] == len(loaded.triplets) > 0
    assert res["oracle_R@1"] == 100.0
    # best possible R@1 of any ranker that sees only the text / only the reference, even fitted to this split
    assert res["text_only_best_R@1"] <= 25.0
    assert res["image_only_best_R@1"] <= 20.0
    # and how many gallery images each modality alone leaves possible
    assert res["text_consistent_mean"] >= 4.0 and res["image_consistent_mean"] >= 5.0
    assert res["text_only_R@1"] <= 25.0 and res["image_only_R@1"] <= 20.0


def test_consistency_checks_match_a_brute_force_search():
    spec = sc.SceneSpec(("circle", "square"), ("red", "blue"), min_objects=1, max_objects=3)
    rng = np.random.default_rng(3)
    scenes = {sc.random_scene(rng, spec, int(rng.integers(1, 4))) for _ in range(40)}
    for ref in sorted(scenes)[:8]:
        brute = {sc.scene_key(sc.apply_edit(e, ref, spec)) for e in sc.all_edits(ref, spec)}
        assert sc.one_edit_neighbours(ref, spec) == brute
        for edit in list(sc.all_edits(ref, spec))[::9]:
            result = sc.apply_edit(edit, ref, spec)
            assert sc.consistent_with_text(edit, result, spec)
            for g in scenes:  # a scene is consistent iff some scene in the pool (or elsewhere) maps to it
                if any(sc.apply_edit(edit, r, spec) == g for r in scenes):
                    assert sc.consistent_with_text(edit, g, spec)


def test_every_text_means_one_edit():
    spec = synthetic.CIRR_SPEC
    rng = np.random.default_rng(0)
    seen: dict[str, sc.Edit] = {}
    for _ in range(20):
        scene = sc.random_scene(rng, spec, 4)
        for edit in sc.all_edits(scene, spec):
            for text in sc.templates(edit):
                assert seen.setdefault(text, edit) == edit, text


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown layout"):
        synthetic.generate("/nonexistent-never-written", layouts=["coco"])
    with pytest.raises(ValueError, match=r"unknown synthetic size 'tinyy' \(did you mean 'tiny'\?\); known: tiny,"):
        synthetic.resolve_size("tinyy")
    with pytest.raises(ValueError, match="unknown synthetic size"):
        synthetic.generate("/nonexistent-never-written", size="huge")


def test_one_layout_given_as_a_string_is_that_layout(tmp_path):
    """layouts="cirr" was read letter by letter ("unknown layout(s) ['c', 'i', ...]")."""
    manifest = synthetic.generate(tmp_path / "a", size="tiny", layouts="shoes", image_size=24)
    assert list(manifest["layouts"]) == ["shoes"]
    root = synthetic.ensure(tmp_path / "b", size="tiny", layouts="shoes", image_size=24)
    stamp = (root / synthetic.MANIFEST).stat().st_mtime_ns
    assert synthetic.ensure(tmp_path / "b", size="tiny", layouts="shoes", image_size=24) == root
    assert (root / synthetic.MANIFEST).stat().st_mtime_ns == stamp  # found written, not written again


def test_cli_writes_and_summarises(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    p = synthetic.register_cli(sub)
    assert all(a.help for a in p._actions if a.dest != "help")
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--size", "tiny", "--layouts", "shoes",
                              "--image-size", "24", "--seed", "2"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    n = synthetic.SHOES_GROUP.queries
    assert (f"shoes {2 * n} queries/{2 * n + 2 * n // synthetic.SHOES_GROUP.edits} images" in line
            and str(tmp_path) in line)
    manifest = json.loads((tmp_path / synthetic.MANIFEST).read_text())
    assert manifest["seed"] == 2 and list(manifest["layouts"]) == ["shoes"]
    assert len(load_cir("shoes", tmp_path / "shoes", "test").triplets) == n


def test_ensure_generates_once(tmp_path):
    root = synthetic.ensure(tmp_path / "s", size="tiny", layouts=["shoes"], image_size=24)
    stamp = (root / synthetic.MANIFEST).stat().st_mtime_ns
    assert synthetic.ensure(tmp_path / "s", size="tiny", layouts=["shoes"], image_size=24) == root
    assert (root / synthetic.MANIFEST).stat().st_mtime_ns == stamp


def test_ensure_waits_for_a_second_process_writing_the_same_data(tmp_path):
    """Two runs needing the same data at once (parallel bench seeds) used to write one tree together and crash each
    other. Now the second waits on the lock next to the folder, then finds the data written and reuses it."""
    import subprocess
    import sys
    import time

    from cirlab.core.io import file_lock

    out = tmp_path / "s"
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO); "
            "from cirlab.data.generators import synthetic; "
            "synthetic.ensure(sys.argv[1], size='tiny', layouts=['shoes'], image_size=24); print('done', flush=True)")
    with file_lock(tmp_path / ".s.cirlab.lock"):  # this process is "the first run", mid-write
        other = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        time.sleep(3)
        assert other.poll() is None  # waiting, neither writing nor failing
        root = synthetic.ensure(out, size="tiny", layouts=["shoes"], image_size=24)  # the first run's write
        stamp = (root / synthetic.MANIFEST).stat().st_mtime_ns
    stdout, stderr = other.communicate(timeout=120)
    assert other.returncode == 0 and stdout.strip() == "done", stderr
    assert "waiting up to" in stderr
    assert (root / synthetic.MANIFEST).stat().st_mtime_ns == stamp  # found written, not written again
    assert not (tmp_path / ".s.cirlab.lock").exists()  # released and removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_ensure_rebuilds_its_interrupted_cache_without_blaming_force(tmp_path, monkeypatch, caplog):
    """An interrupted build of cirlab's own cache is rebuilt by the next run; the log said "--force: replacing",
    a flag nobody passed. A warning stays for what the generator did not write (tested in test_faults)."""
    from cirlab.data.generators import _owned

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    seal = _owned.seal

    def interrupted(folder, generator):
        raise KeyboardInterrupt

    monkeypatch.setattr(_owned, "seal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure(size="tiny", layouts=["fashioniq"])
    monkeypatch.setattr(_owned, "seal", seal)
    with caplog.at_level("INFO"):
        root = synthetic.ensure(size="tiny", layouts=["fashioniq"])
    assert (root / synthetic.MANIFEST).is_file() and "--force" not in caplog.text


def test_a_rerun_with_other_settings_is_refused_without_force(tmp_path, capsys, caplog):
    """`data synth --seed 3` into a folder written with seed 0 replaced the data without a word, and runs trained on
    it then evaluated on other data. Other settings are refused, naming the folder, both settings and --force; the
    same settings again leave the folder as it is; --force replaces and says so."""
    from cirlab.cli import main

    out = tmp_path / "syn"
    args = ["data", "synth", "--out", str(out), "--size", "tiny", "--layouts", "shoes", "--image-size", "16"]
    assert main(args) == 0
    before = _files(out)
    refused = {"--seed 3": "seed 3, size tiny, 16-px images", "--image-size 24": "seed 0, size tiny, 24-px images",
               "--size small": "seed 0, size small, 16-px images"}
    for change, asked in refused.items():
        caplog.clear()
        assert main(args + change.split()) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == [f"cirlab data synth: refusing to write into {out}: it holds synthetic data written with "
                          f"seed 0, size tiny, 16-px images, not {asked} as asked, and runs trained on it would then "
                          "read other data. Choose another --out, or pass --force (Python: force=True) to replace it"]
        assert _files(out) == before  # nothing deleted or rewritten
    assert main(args + ["--layouts", "cirr", "--seed", "3"]) == 2  # another layout too: the manifest is the folder's
    assert _files(out) == before
    stamp = (out / synthetic.MANIFEST).stat()
    capsys.readouterr()
    # the same settings: left as it is, not deleted and written again under a run reading it (nor re-stamped)
    assert main(args) == 0 and _files(out) == before
    again = (out / synthetic.MANIFEST).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert "already holds shoes written with these settings" in capsys.readouterr().out
    caplog.clear()
    assert main(args + ["--seed", "3", "--force"]) == 0
    assert json.loads((out / synthetic.MANIFEST).read_text())["seed"] == 3
    assert any("replacing the synthetic data of seed 0, size tiny, 16-px images in" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    with pytest.raises(synthetic.OtherSettingsError, match=r"written with seed 3, .* not seed 0, .* as asked"):
        synthetic.generate(out, seed=0, size="tiny", layouts="shoes", image_size=16)  # the API refuses alike
    capsys.readouterr()


def test_a_custom_size_is_recorded_and_compared_by_its_counts(tmp_path):
    import dataclasses

    out = tmp_path / "syn"
    small_shoes = dataclasses.replace(synthetic.SIZES["tiny"], shoes=(40, 40))
    synthetic.generate(out, size=small_shoes, layouts="shoes", image_size=16)
    synthetic.generate(out, size=small_shoes, layouts="shoes", image_size=16)  # the same counts: allowed
    with pytest.raises(synthetic.OtherSettingsError, match=r"size custom \(.*shoes=\[40, 40\].*\), 16-px images, "
                                                           r"not seed 0, size custom \(.*shoes=\[60, 60\]"):
        synthetic.generate(out, size=dataclasses.replace(small_shoes, shoes=(60, 60)), layouts="shoes",
                           image_size=16)


def test_ensure_refuses_a_named_folder_of_other_settings_and_keeps_one_cache_folder_per_settings(tmp_path,
                                                                                               monkeypatch):
    out = synthetic.ensure(tmp_path / "named", size="tiny", layouts="shoes", image_size=16)
    before = _files(out)
    with pytest.raises(synthetic.OtherSettingsError,
                       match=rf"^synthetic data: refusing to write into {out}: it holds synthetic data written with "
                             r"seed 0, size tiny, 16-px images, not seed 3, size tiny, 16-px images as asked, .* Name "
                             r"another folder \(dataset\.synthetic\.out\), or replace it with `cirlab data synth "
                             rf"--out {out} --seed 3 --size tiny --image-size 16 --force`$"):
        synthetic.ensure(out, seed=3, size="tiny", layouts="shoes", image_size=16)
    assert _files(out) == before
    assert synthetic.ensure(out, size="tiny", layouts="shoes", image_size=16) == out  # the same settings: reused
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))  # the cache: one folder per settings, none refused
    first = synthetic.ensure(seed=0, size="tiny", layouts="shoes", image_size=16)
    second = synthetic.ensure(seed=3, size="tiny", layouts="shoes", image_size=16)
    assert first != second and [synthetic.recorded_settings(p)["seed"] for p in (first, second)] == [0, 3]


def test_data_synth_into_the_current_empty_folder_writes_there(tmp_path, monkeypatch):
    """`--out .`: the lock file's name was built from the empty relative name and landed inside the folder, which
    then was not empty and was refused as someone else's."""
    from cirlab.cli import main

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["data", "synth", "--out", ".", "--size", "tiny", "--layouts", "shoes", "--image-size", "16"]) == 0
    assert (tmp_path / "here" / synthetic.MANIFEST).is_file()
    assert not [p.name for p in (tmp_path / "here").iterdir() if "lock" in p.name]


def test_data_synth_into_a_folder_another_process_is_writing_is_refused_in_one_line(tmp_path, caplog):
    """Two `cirlab data synth` into one --out deleted and rewrote each other's files: a tree of two seeds (manifest
    of one) that still loaded and trained, and a traceback from the loser. The write now holds the folder's lock;
    a second writer is refused at once, naming the holder, and the first one's tree is left alone."""
    from cirlab.cli import EXIT_RETRY, main
    from cirlab.core.io import file_lock

    out = tmp_path / "syn"
    args = ["data", "synth", "--out", str(out), "--size", "tiny", "--layouts", "shoes", "--image-size", "16"]
    assert main(args) == 0
    before = _files(out)
    with held_by_another_thread(lambda: file_lock(tmp_path / ".syn.cirlab.lock")):  # another data synth
        caplog.clear()
        assert main(args + ["--seed", "3", "--force"]) == EXIT_RETRY  # the same command may succeed later
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"cirlab data synth: {out} is being written by another cirlab "
                                                     f"process (pid {os.getpid()} on "), errors
    assert "\n" not in errors[0] and "Traceback" not in caplog.text
    assert _files(out) == before  # nothing deleted or rewritten
    assert main(args) == 0  # free again: the lock went with its holder


def test_data_synth_under_a_read_only_parent_locks_in_the_cache(tmp_path, monkeypatch, caplog):
    """`--out X` where X's parent cannot be written (a read-only mount holding a writable data folder): the lock file
    beside X could not be created and nothing was generated. The lock now goes to the cache's locks/ folder, named
    by X's absolute path, and another writer there is still refused."""
    from cirlab.cli import EXIT_RETRY, main
    from cirlab.core import io

    ro, cache = tmp_path / "mount", tmp_path / "cache"
    (ro / "data").mkdir(parents=True)
    monkeypatch.setenv("CIRLAB_CACHE", str(cache))
    access = os.access
    # root passes every permission check, so the read-only parent is told through os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == ro else access(path, mode))
    lock = io.generated_lock_file(ro / "data")
    assert lock.parent == cache / "locks" and lock == io.generated_lock_file(str(ro / "sub" / ".." / "data"))
    args = ["data", "synth", "--out", str(ro / "data"), "--size", "tiny", "--layouts", "shoes", "--image-size", "16"]
    with held_by_another_thread(lambda: io.generated_folder_lock(ro / "data", wait=0)):
        caplog.clear()
        assert main(args) == EXIT_RETRY
    assert "is being written by another cirlab process" in caplog.text
    assert main(args) == 0 and (ro / "data" / synthetic.MANIFEST).is_file()
    assert sorted(p.name for p in ro.iterdir()) == ["data"]  # nothing written beside it


def test_ensure_with_a_synth_size_finds_its_data_written(tmp_path, monkeypatch):
    """ensure(size=SynthSize) compared the object with the manifest's "custom" and deleted and rewrote the folder
    on every call; without out_root the folder was named by the dataclass repr."""
    import dataclasses

    size = dataclasses.replace(synthetic.SIZES["tiny"], shoes=(40, 40))
    root = synthetic.ensure(tmp_path / "s", size=size, layouts="shoes", image_size=16)
    stamp = (root / "shoes" / synthetic.META).stat()
    assert synthetic.ensure(tmp_path / "s", size=size, layouts="shoes", image_size=16) == root
    again = (root / "shoes" / synthetic.META).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)  # found written, not rewritten
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    cached = synthetic.ensure(size=size, layouts="shoes", image_size=16)
    assert cached.parent == tmp_path / "cache" / "synthetic"
    assert cached.name.startswith("custom-") and cached.name.endswith("-seed0-16px") and "(" not in cached.name
    assert synthetic.recorded_settings(cached)["spec"]["shoes"] == [40, 40]
    # a SynthSize equal to a preset is that preset: its data, folder and manifest (it was "custom", refused there)
    tiny = synthetic.ensure(tmp_path / "t", size="tiny", layouts="shoes", image_size=16)
    assert synthetic.ensure(tmp_path / "t", size=synthetic.SIZES["tiny"], layouts="shoes", image_size=16) == tiny
    assert synthetic.ensure(size=dataclasses.replace(synthetic.SIZES["tiny"]), layouts="shoes",
                            image_size=16).name == "tiny-seed0-16px"


def test_data_synth_into_a_folder_of_a_255_byte_name_writes_there(tmp_path, monkeypatch, caplog):
    """85 CJK characters make a legal 255-byte folder name, but the lock beside it (".<name>.cirlab.lock") did not
    fit and data synth ended in an OSError traceback; a path too long for any file system is one line."""
    from cirlab.cli import main

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / ("数" * 85)
    args = ["data", "synth", "--size", "tiny", "--layouts", "shoes", "--image-size", "16", "--out"]
    assert main(args + [str(out)]) == 0 and (out / synthetic.MANIFEST).is_file()
    caplog.clear()
    assert main(args + [str(tmp_path / ("数" * 86))]) == 2
    assert "file name too long (a name may take 255 bytes" in caplog.text and "Traceback" not in caplog.text


def test_ensure_writes_only_the_layouts_a_set_lacks(tmp_path, monkeypatch):
    """The report asks for the precomp layout, a training for Fashion-IQ's: the second ensure deleted and rewrote
    every layout, under a process reading them. Now the layouts already there stay (same files, same inodes), and
    the tree is byte-identical to one written at once."""
    import hashlib

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    out = synthetic.ensure(None, size="tiny", layouts=("precomp",))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "precomp").rglob("*") if p.is_file()}
    assert synthetic.ensure(None, size="tiny") == out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "precomp").rglob("*") if p.is_file()} == before
    whole = synthetic.generate(tmp_path / "whole", size="tiny", seed=0, image_size=64)

    def tree(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}

    assert tree(out) == tree(tmp_path / "whole") and set(whole["layouts"]) == set(synthetic.LAYOUTS)


def test_the_module_docstring_example_runs(tmp_path, monkeypatch):
    """``help(synthetic)`` showed ``info["fashioniq"]["root"]``: a KeyError (the roots are under "layouts")."""
    doc = synthetic.__doc__
    block = doc[doc.index("::\n") + 3:doc.index("\n\nor ``cirlab data synth")]
    code = "\n".join(line.removeprefix("    ") for line in block.splitlines())
    assert 'size="default"' in code and "load_cir" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(code.replace('size="default"', 'size="tiny"'), scope)  # the example as shown, at the test size
    assert len(scope["split"]) > 0 and (tmp_path / "data" / "synthetic" / "fashioniq").is_dir()


def test_a_rerun_writes_again_a_layout_that_lost_a_file_and_leaves_the_others(tmp_path, capsys, caplog):
    """`data synth` again over a set with a deleted caption file said "already holds ... left as it is", and a run
    on a damaged cache set failed on the missing file: the layout is written again, the whole ones are kept."""
    from cirlab.cli import main

    out = tmp_path / "syn"
    args = ["data", "synth", "--out", str(out), "--size", "tiny", "--layouts", "shoes", "cirr", "--image-size", "16"]
    assert main(args) == 0
    before = _files(out)
    shoes_marker = (out / "shoes" / ".cirlab-generated.json").stat()
    lost = next((out / "cirr").rglob("cap.rc2.val.json"))
    lost.unlink()
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "already holds shoes written with these settings" in said and "wrote cirr " in said
    assert "lacks 1 of the files cirlab's synthetic generator wrote there (cirr/captions/cap.rc2.val.json)" in \
        caplog.text
    assert _files(out) == before  # the same bytes again
    kept = (out / "shoes" / ".cirlab-generated.json").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (shoes_marker.st_ino, shoes_marker.st_mtime_ns)  # shoes untouched
    # ensure() (a run's dataset.synthetic) repairs it too
    next(p for p in (out / "shoes").rglob("*") if p.suffix in (".png", ".jpg")).unlink()
    synthetic.ensure(out, size="tiny", layouts=["shoes"], image_size=16)
    assert _files(out) == before


def test_a_rerun_writes_again_a_layout_whose_folder_was_removed(tmp_path, caplog):
    """`rm -rf` of a layout (the likeliest loss) was still "already held": its marker could not be read, which
    counted as an old build with nothing to check; a run on the cache then failed on a missing folder."""
    out = tmp_path / "syn"
    synthetic.ensure(out, size="tiny", layouts=["shoes", "cirr"], image_size=16)
    before = _files(out)
    import shutil

    shutil.rmtree(out / "cirr")
    synthetic.ensure(out, size="tiny", layouts=["cirr"], image_size=16)
    assert _files(out) == before
    assert caplog.text.count("cirr lacks its folder: it is written again") == 1  # said once, not per check
