"""``check_dataset`` lists every problem of a tree (not only the first), and ``cirlab data check`` reports them."""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_cirr, write_fashioniq, write_image, write_json, write_precomp, write_shoes

from cirlab.data import DataError, check_dataset, format_problems, load_cir, load_precomp
from cirlab.core.errors import EXIT_FOUND
from cirlab.data.cli import add_subcommands, build_parser, main


def _kinds(problems) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


@pytest.mark.parametrize("name,writer,stats", [
    ("fashioniq", write_fashioniq, {"splits": 9, "triplets": 36}),
    ("shoes", write_shoes, {"splits": 2, "triplets": 9, "images": 11}),
    ("cirr", write_cirr, {"splits": 3, "triplets": 10, "images": 30}),
])
def test_clean_trees_have_no_problems(tmp_path, name, writer, stats, capsys):
    writer(tmp_path / name)
    problems = check_dataset(name, tmp_path / name)
    assert problems == []
    assert {k: problems.stats[k] for k in stats} == stats
    assert main(["check", "--dataset", name, "--root", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: OK (") and f"{stats['splits']} splits" in out


def test_clean_precomp(tmp_path, capsys):
    write_precomp(tmp_path, name="f30k", splits=("train", "test"), dim=8)
    write_precomp(tmp_path, name="coco", splits=("testall",), dim=8)
    # dim 8 is not the BUTD 2048: the default check reports it, once per split
    problems = check_dataset("precomp", tmp_path)
    assert _kinds(problems) == {"bad_array": 3}
    write_precomp(tmp_path, name="f30k", splits=("train", "test"))
    write_precomp(tmp_path, name="coco", splits=("testall",))
    assert check_dataset("precomp", tmp_path) == []
    assert check_dataset("coco", tmp_path).stats == {"images": 4, "captions": 20, "splits": 1}
    assert main(["check", "--dataset", "f30k", "--root", str(tmp_path)]) == 0
    assert "f30k: OK (2 splits, 8 images, 40 captions)" in capsys.readouterr().out


def _break_fashioniq(root) -> None:
    (root / "images" / "dress_val_1.png").unlink()  # listed and used by 2 caption entries
    (root / "images" / "shirt_train_5.png").unlink()  # listed only
    (root / "captions" / "cap.toptee.val.json").write_text("[{]")
    path = root / "captions" / "cap.shirt.test.json"
    entries = json.loads(path.read_text())
    entries[0]["candidate"] = "B00UNKNOWN"
    entries[2]["captions"] = "one string"
    write_json(path, entries)
    write_json(root / "image_splits" / "split.dress.train.json", ["dress_train_0", "dress_train_0", 7])


def test_fashioniq_all_problems_listed(tmp_path, capsys):
    info = write_fashioniq(tmp_path / "fiq")
    _break_fashioniq(info["root"])
    problems = check_dataset("fashioniq", info["root"])
    # missing images are reported at their split-file listing (entries naming a listed image are not double counted);
    # split.dress.train.json keeps only dress_train_0 (a duplicate, a non-string), so the 4 caption entries of
    # cap.dress.train.json name 6 unlisted images; cap.shirt.test.json: 1 unknown candidate, 1 bad captions field
    assert _kinds(problems) == {"missing_image": 2, "malformed_json": 1, "unknown_name": 7, "bad_entry": 2,
                                "duplicate": 1}
    files = {p.file.rsplit("/", 1)[-1] for p in problems}
    assert {"split.dress.val.json", "split.shirt.train.json", "cap.toptee.val.json", "cap.shirt.test.json",
            "split.dress.train.json", "cap.dress.train.json"} <= files
    text = format_problems(problems)
    assert "unknown_name: 7 problems" in text and "malformed_json: 1 problem\n" in text
    assert text.endswith("13 problems in total (2 bad_entry, 1 duplicate, 1 malformed_json, 2 missing_image, "
                         "7 unknown_name)")
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"])]) == EXIT_FOUND
    out = capsys.readouterr().out
    assert "FAILED with 13 problems" in out
    assert out.count("\n  ") == 13  # every problem is listed, one line each
    assert "B00UNKNOWN" in out and "dress_val_1" in out
    # --json: the same result for a script, one strict JSON object on stdout, the same exit status
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"]), "--json",
                 "--max-per-kind", "1"]) == EXIT_FOUND
    found = json.loads(capsys.readouterr().out)
    assert (found["ok"], found["total"], found["listed_per_kind"]) == (False, 13, 1)
    assert found["counts"] == {"bad_entry": 2, "duplicate": 1, "malformed_json": 1, "missing_image": 2,
                               "unknown_name": 7}
    listed = found["problems"]  # at most one per kind and file: fewer than found
    assert len(listed) < 13 and {p["kind"] for p in listed} == set(found["counts"])
    assert all(set(p) == {"kind", "file", "entry", "message"} for p in listed)
    assert found["dataset"] == "fashioniq" and found["stats"] == problems.stats
    # loading fails fast on the first problem of the split it reads
    with pytest.raises(DataError, match=r"split\.dress\.val\.json \[#1\]"):
        load_cir("fashioniq", info["root"], "val", category="dress")


def test_format_problems_truncates_per_kind(tmp_path):
    info = write_fashioniq(tmp_path / "fiq")
    _break_fashioniq(info["root"])
    text = format_problems(check_dataset("fashioniq", info["root"]), max_per_kind=2)
    assert "unknown_name: 7 problems" in text and "  ... and 5 more" in text
    assert format_problems([]) == "no problems"


def test_shoes_all_problems_listed(tmp_path):
    info = write_shoes(tmp_path / "shoes")
    info["paths"][info["test"][0]].unlink()
    write_image(info["root"] / "attributedata" / "womens_pumps" / "0" / info["train"][2])
    entries = info["entries"] + [{"ImageName": "nowhere.jpg"}]
    write_json(info["root"] / "relative_captions_shoes.json", entries)
    problems = check_dataset("shoes", info["root"])
    # test image 0: missing from the eval list line 1 and as the reference of test entry #5
    assert _kinds(problems) == {"duplicate": 1, "missing_image": 2, "bad_entry": 1}


def test_cirr_all_problems_listed(tmp_path):
    info = write_cirr(tmp_path / "cirr_dataset")
    root = info["root"]
    (root / "dev" / "dev-0-1-img0.png").unlink()
    (root / "test1" / "test1-0-3-img0.png").unlink()
    (root / "cirr" / "captions" / "cap.rc2.train.json").write_text("not json")
    path = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    entries[2]["img_set"]["members"][4] = "dev-77-img0"
    entries[3]["pairid"] = "103"
    write_json(path, entries)
    problems = check_dataset("cirr", root)
    assert _kinds(problems) == {"missing_image": 2, "malformed_json": 1, "unknown_name": 1, "bad_entry": 1}
    assert {p.entry for p in problems if p.kind == "missing_image"} == {"dev-0-1-img0", "test1-0-3-img0"}


def test_cirr_img_set_must_hold_six_names_with_reference_and_target(tmp_path):
    # Recall_subset ranks the target among the five non-reference members: a set that lacks either image, or has
    # another size, would be scored over fewer candidates (or fail deep in the metric) without these checks
    info = write_cirr(tmp_path / "cirr_dataset", groups={"val": 3})
    path = info["root"] / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    entries[0]["img_set"]["members"] = entries[0]["img_set"]["members"][:5]  # reference at 0, target at 2 kept
    elsewhere = entries[5]["img_set"]["members"]  # group 2's images: in the split, not in groups 0 and 1

    def replace(entry, name, by):
        members = entry["img_set"]["members"]
        members[members.index(name)] = by

    replace(entries[1], entries[1]["target_hard"], elsewhere[0])
    replace(entries[2], entries[2]["img_set"]["members"][5], entries[2]["img_set"]["members"][4])  # one repeated
    replace(entries[3], entries[3]["reference"], elsewhere[1])
    entries[4]["target_hard"] = entries[4]["reference"]  # removed with the reference: a miss, warned
    write_json(path, entries)
    problems = check_dataset("cirr", info["root"])
    assert _kinds(problems) == {"bad_entry": 4}
    assert {p.entry for p in problems} == {f"pairid {e['pairid']}" for e in entries[:4]}
    text = "\n".join(p.message for p in problems)
    assert "has 5 members; CIRR sets have 6" in text and "more than once" in text
    assert f"the target_hard {entries[1]['target_hard']!r} is not among its img_set members" in text
    assert f"the reference {entries[3]['reference']!r} is not among its img_set members" in text
    assert [w.kind for w in problems.warnings] == ["target_is_reference"]
    split_path = info["root"] / "cirr" / "image_splits" / "split.rc2.val.json"
    paths = json.loads(split_path.read_text())
    names = list(paths)
    paths[names[1]] = paths[names[0]].replace("./", "")  # the same file under a second name
    write_json(split_path, paths)
    warned = [(w.kind, w.entry) for w in check_dataset("cirr", info["root"]).warnings]
    assert sorted(warned) == [("same_file", names[1]), ("target_is_reference", "pairid 104")]
    with pytest.raises(DataError, match=r"cap.rc2.val.json.*pairid 100.*has 5 members"):
        load_cir("cirr", info["root"], "val")
    # on train nothing reads the set: the same problem is a warning, and the entry trains
    train = write_cirr(tmp_path / "train_only", groups={"train": 1})
    path = train["root"] / "cirr" / "captions" / "cap.rc2.train.json"
    entries = json.loads(path.read_text())
    entries[0]["img_set"]["members"] = entries[0]["img_set"]["members"][:5]
    write_json(path, entries)
    problems = check_dataset("cirr", train["root"])
    assert list(problems) == [] and [w.kind for w in problems.warnings] == ["unusable_img_set"]
    assert len(load_cir("cirr", train["root"], "train").triplets) == 2


def test_precomp_all_problems_listed(tmp_path, capsys):
    write_precomp(tmp_path, name="f30k", splits=("train", "dev", "test"))
    folder = tmp_path / "f30k_precomp"
    (folder / "train_caps.txt").write_text("a\n" * 19)
    np.save(folder / "dev_ims.npy", np.zeros((4, 36, 100), np.float32))
    (folder / "test_caps.txt").unlink()
    problems = check_dataset("f30k", tmp_path)
    assert _kinds(problems) == {"count_mismatch": 1, "bad_array": 1, "missing_file": 1}
    assert main(["check", "--dataset", "f30k", "--root", str(tmp_path)]) == EXIT_FOUND
    assert "FAILED with 3 problems" in capsys.readouterr().out


def test_precomp_root_with_two_folders_of_one_set_says_which_it_reads_once(tmp_path, caplog):
    import shutil

    write_precomp(tmp_path, name="f30k", splits=("dev",))
    (tmp_path / "f30k").mkdir()
    shutil.copytree(tmp_path / "f30k_precomp", tmp_path / "f30k" / "precomp")
    assert load_precomp(tmp_path, "f30k", "dev").num_images == 4
    said = [r.getMessage() for r in caplog.records if "reading" in r.getMessage()]
    assert said == [f"{tmp_path} holds f30k_precomp and f30k/precomp: reading f30k_precomp"]


def test_precomp_finds_gpos_layout_as_f30k_and_coco_do(tmp_path):
    # GPO keeps each set in {f30k,coco}/precomp/: --dataset f30k found it, --dataset precomp said "no *_precomp folder"
    for name in ("f30k", "coco"):
        write_precomp(tmp_path / "staging", name=name, splits=("train", "dev"))
        (tmp_path / "gpo" / name).mkdir(parents=True)
        (tmp_path / "staging" / f"{name}_precomp").rename(tmp_path / "gpo" / name / "precomp")
    root = tmp_path / "gpo"
    assert check_dataset("precomp", root) == [] and check_dataset("f30k", root) == []
    problems = check_dataset("precomp", root)
    assert problems.stats["splits"] == 4  # two sets of two splits each
    assert check_dataset("precomp", root / "coco" / "precomp") == []  # the set folder itself
    with pytest.raises(ValueError, match=r"precomp set 'f30k' not found; sets in .*coco/precomp: coco"):
        load_precomp(root / "coco" / "precomp", "f30k", "dev")  # it read COCO's features as Flickr30K's
    problems = check_dataset("precomp", tmp_path / "staging")  # emptied: the message names both layouts
    assert [p.kind for p in problems] == ["missing_file"] and "or GPO's f30k/precomp/" in problems[0].message


def test_the_base_path_of_clip4cir_and_cala_is_a_data_root(tmp_path, monkeypatch):
    # their --data-path holds cirr_dataset/ and fashionIQ_dataset/: it was "no CIRR split found" / "no captions/"
    write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    write_fashioniq(tmp_path / "fashionIQ_dataset", categories=("dress",), splits=("val",))
    for name in ("cirr", "fashioniq"):
        assert check_dataset(name, tmp_path) == [], name
    assert len(load_cir("cirr", tmp_path, "val").triplets) == 2
    # the categories a run evaluates one by one are read in the same folder (it fell back to dress/shirt/toptee)
    from cirlab.engine.runs import load_cir_splits

    config = {"dataset": {"name": "fashioniq", "root": str(tmp_path), "category": None}}
    assert [s.category for s in load_cir_splits(config, "val")] == ["dress"]
    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path))  # and $CIRLAB_DATA may be that base path too
    assert len(load_cir("cirr", None, "val").triplets) == 2


def test_verify_images_finds_corrupt_files(tmp_path):
    info = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    assert check_dataset("cirr", info["root"], verify_images=True) == []
    (info["root"] / "dev" / "dev-0-2-img0.png").write_bytes(b"\x89PNG not really")
    problems = check_dataset("cirr", info["root"], verify_images=True)
    assert _kinds(problems) == {"unreadable_image": 1} and problems[0].file.endswith("dev-0-2-img0.png")
    # the default header check (no full decode) catches a garbage file too
    problems = check_dataset("cirr", info["root"])
    assert _kinds(problems) == {"unreadable_image": 1} and problems.stats["images_checked"] > 0


def test_missing_root_and_unknown_dataset(tmp_path, capsys):
    problems = check_dataset("shoes", tmp_path / "absent")
    assert _kinds(problems) == {"missing_file": 1}
    # a --root that is not there is input the command refuses (2, as every command), not a dataset's problem (3)
    assert main(["check", "--dataset", "cirr", "--root", str(tmp_path / "absent")]) == 2
    with pytest.raises(ValueError, match="unknown dataset"):
        check_dataset("imagenet", tmp_path)
    with pytest.raises(SystemExit):
        main(["check", "--dataset", "imagenet", "--root", str(tmp_path)])


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield action


def test_every_option_has_help():
    actions = [a for a in _all_actions(build_parser()) if not isinstance(a, argparse._HelpAction)]
    options = {s for a in actions for s in a.option_strings}
    assert {"--dataset", "--root", "--verify-images", "--max-per-kind"} <= options
    assert all(a.help for a in actions), [a.option_strings for a in actions if not a.help]


def test_plugin_subcommands_are_registered(monkeypatch):
    calls = []

    def register_cli(subparsers):
        calls.append("synth")
        p = subparsers.add_parser("synth", help="fake")
        p.set_defaults(func=lambda args: 7)

    monkeypatch.setitem(sys.modules, "cirlab.data.generators.synthetic",
                        types.SimpleNamespace(register_cli=register_cli))
    # an absent module: import raises, hook skipped
    monkeypatch.setitem(sys.modules, "cirlab.data.generators.emoji", None)
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    assert calls == ["synth"]
    assert main(["synth"]) == 7


def test_precomp_check_finds_the_synth_layout_and_names_what_is_missing(tmp_path):
    """`cirlab data synth --out DIR` writes DIR/precomp/f30k_precomp: checking DIR found nothing and printed a
    literal "{name}_precomp"; --dataset coco beside an f30k set said "no {split}_ims.npy"."""
    write_precomp(tmp_path / "precomp", name="f30k", splits=("train", "dev"))
    assert check_dataset("precomp", tmp_path) == [] and check_dataset("f30k", tmp_path) == []
    problems = check_dataset("coco", tmp_path)
    assert [p.kind for p in problems] == ["missing_file"]
    assert "no coco_precomp folder in" in problems[0].message and "(it holds f30k)" in problems[0].message
    empty = tmp_path / "empty"
    empty.mkdir()
    (message,) = [p.message for p in check_dataset("precomp", empty)]
    assert "no *_precomp folder in" in message and "{" not in message and "cirlab data synth" in message


@pytest.mark.parametrize("name,writer", [("fashioniq", write_fashioniq), ("cirr", write_cirr), ("shoes", write_shoes)])
def test_a_data_root_holding_several_layouts_is_checked_as_the_loaders_read_it(tmp_path, name, writer, capsys):
    # `cirlab data synth --out DIR` writes DIR/fashioniq, DIR/cirr, ...: the loaders take DIR, the check took DIR
    # itself and reported the layout's files missing
    writer(tmp_path / name)
    problems = check_dataset(name, tmp_path)
    assert problems == [] and problems.root == tmp_path / name
    assert check_dataset(name, tmp_path / name).root == tmp_path / name  # the dataset root itself, also CIRR's
    assert main(["check", "--dataset", name, "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f" in {tmp_path / name}")


def test_verify_images_must_be_a_bool(tmp_path):
    write_shoes(tmp_path / "shoes")
    with pytest.raises(ValueError, match=r"verify_images must be True or False, got 'no'"):
        check_dataset("shoes", tmp_path / "shoes", verify_images="no")


def test_a_junk_npy_file_is_named_not_a_pickle(tmp_path):
    # numpy reads a file without the NUMPY header as a pickle and advises allow_pickle=True, which is wrong advice
    write_precomp(tmp_path, name="f30k", splits=("train", "test", "dev"))
    folder = tmp_path / "f30k_precomp"
    (folder / "train_ims.npy").write_bytes(b"junk junk junk")
    (folder / "dev_ims.npy").write_bytes(b"")
    np.save(folder / "test_ims.npy", np.array([{"a": 1}], dtype=object))
    problems = {Path(p.file).name: p.message for p in check_dataset("f30k", tmp_path)}
    assert problems["train_ims.npy"] == r"not a .npy file (it does not start with numpy's \x93NUMPY header)"
    assert problems["dev_ims.npy"].endswith(": the file is empty")
    assert problems["test_ims.npy"] == "cannot memory-map the array (it holds Python objects, not numbers)"
    assert not any("allow_pickle" in m for m in problems.values())


def test_a_synthetic_tree_whose_write_was_interrupted_is_not_passed(tmp_path, monkeypatch):
    """Ctrl-C in `cirlab data synth` after some of a layout's files: the splits written were valid, so the check
    said OK for a tree with splits missing. A finished write (and the output root beside it) stays clean."""
    from cirlab.data.generators import _owned, synthetic

    synthetic.generate(tmp_path / "done", size="tiny", layouts=["fashioniq", "precomp"])
    assert check_dataset("fashioniq", tmp_path / "done") == []
    assert check_dataset("precomp", tmp_path / "done" / "precomp") == []
    seal = _owned.seal

    def interrupted(folder, generator):
        if folder.name == "fashioniq":
            raise KeyboardInterrupt  # after its files, before the record that says they are all there
        seal(folder, generator)

    monkeypatch.setattr(_owned, "seal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / "cut", size="tiny", layouts=["fashioniq"])
    problems = check_dataset("fashioniq", tmp_path / "cut")
    assert [p.kind for p in problems] == ["unfinished_write"]
    assert "written by `cirlab data synth` and not finished" in problems[0].message
    assert "run `cirlab data synth` again" in problems[0].message

    # an emoji build from before the file record: its manifest, written last, says the build finished
    from cirlab.data.generators import emoji

    tree = tmp_path / "emoji"
    write_fashioniq(tree)
    (tree / _owned.MARKER).write_text(json.dumps({"generator": emoji.__name__}))
    (tree / emoji.MANIFEST).write_text("{}")
    assert check_dataset("fashioniq", tree) == []
    (tree / emoji.MANIFEST).unlink()
    assert [p.kind for p in check_dataset("fashioniq", tree)] == ["unfinished_write"]


def test_the_data_fingerprint_digests_annotations_and_features_not_images(tmp_path, monkeypatch):
    from cirlab.data import fingerprint as F

    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "cap.json").write_text("[1]")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"png")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.json").write_text("{}")
    monkeypatch.setattr(F, "WHOLE_BELOW", 10)  # "large" files: size + first and last SAMPLE bytes
    monkeypatch.setattr(F, "SAMPLE", 4)
    (tmp_path / "feats.npy").write_bytes(b"0123456789abcdef")
    digests = F.folder_digests(tmp_path)
    assert set(digests) == {"captions/cap.json", "feats.npy"} and digests["feats.npy"].startswith("sampled:")
    (tmp_path / "feats.npy").write_bytes(b"0123456789abcdeX")  # the tail is read
    (tmp_path / "captions" / "cap.json").write_text("[2]")
    (tmp_path / "new.json").write_text("{}")  # added since: the old data is still all there
    now = F.folder_digests(tmp_path)
    assert F.differences({"files": digests}, {"files": now}) == ["captions/cap.json changed", "feats.npy changed"]
    (tmp_path / "feats.npy").unlink()
    assert F.differences({"files": digests}, {"files": F.folder_digests(tmp_path)})[-1] == "feats.npy is gone"
    assert F.summary([f"f{i}" for i in range(6)], limit=2) == "f0; f1; and 4 more"


def test_the_data_fingerprint_follows_linked_folders_and_survives_unreadable_files(tmp_path):
    from cirlab.data import fingerprint as F

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "cap.json").write_text("[1]")
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions").symlink_to(shared, target_is_directory=True)  # captions -> a shared copy
    (data / "loop").symlink_to(data, target_is_directory=True)  # a cycle is walked once
    (data / "gone.txt").symlink_to(tmp_path / "nothing.txt")  # a dangling link: a traceback before
    digests = F.folder_digests(data)
    assert set(digests) == {"captions/cap.json", "gone.txt"} and digests["gone.txt"].startswith("unreadable: ")


# ------------------------------------------------------------------------------------ users' own files (review h58)


def test_a_key_given_twice_in_a_json_object_is_a_duplicate_not_the_last_value(tmp_path, capsys):
    # Python's json keeps the last value: a split naming an image twice pointed at the second file without a word
    info = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    root, first = info["root"], info["names"]["val"][0]
    split = root / "cirr" / "image_splits" / "split.rc2.val.json"
    write_image(root / "dev" / "other.png")
    split.write_text(split.read_text().replace("{", f'{{\n "{first}": "./dev/other.png",', 1))
    problems = check_dataset("cirr", root, verify_images=True)
    assert [(p.kind, p.entry, p.message) for p in problems] == [
        ("duplicate", first, f"key {first!r} appears twice in split.rc2.val.json")]
    with pytest.raises(DataError, match=rf"split\.rc2\.val\.json \[{first}\]: key '{first}' appears twice") as err:
        load_cir("cirr", root, "val")
    assert err.value.kind == "duplicate"
    # a field inside a caption entry (and inside its img_set) is named with the entry it is in
    caps = root / "cirr" / "captions" / "cap.rc2.val.json"
    text = json.dumps(info["entries"]["val"], indent=1)
    text = text.replace('"caption": "make it look like 5', '"caption": "x", "caption": "make it look like 5')
    text = text.replace('"id": 0,', '"id": 0, "id": 1,', 1)
    caps.write_text(text)
    split.write_text(json.dumps({n: f"./dev/{n}.png" for n in info["names"]["val"]}))
    problems = check_dataset("cirr", root)
    assert sorted((p.kind, p.entry, p.message) for p in problems) == [
        ("duplicate", "#0 img_set", "key 'id' appears twice in cap.rc2.val.json"),
        ("duplicate", "#1", "key 'caption' appears twice in cap.rc2.val.json")]


def test_a_trailing_comma_is_named(tmp_path):
    info = write_fashioniq(tmp_path / "fiq", categories=("dress",), splits=("val",))
    path = info["root"] / "captions" / "cap.dress.val.json"
    path.write_text(path.read_text().rstrip().rstrip("]").rstrip() + ",\n]\n")
    problems = check_dataset("fashioniq", info["root"])
    assert [p.kind for p in problems] == ["malformed_json"]
    assert problems[0].message.endswith("(a trailing comma?)")
    path.write_text('[{"candidate": "a"]')  # another malformation: no guess
    assert "trailing" not in check_dataset("fashioniq", info["root"])[0].message


def test_a_windows_path_in_a_cirr_split_says_to_use_slashes(tmp_path):
    info = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    split = info["root"] / "cirr" / "image_splits" / "split.rc2.val.json"
    paths = json.loads(split.read_text())
    name = next(iter(paths))
    paths[name] = paths[name].replace("/", "\\")
    write_json(split, paths)
    problems = check_dataset("cirr", info["root"])
    assert [(p.kind, p.entry) for p in problems] == [("missing_image", name)]
    assert "use / in paths" in problems[0].message


def test_a_byte_order_mark_is_dropped_in_every_text_file(tmp_path):
    bom = b"\xef\xbb\xbf"

    def add_bom(path):
        path.write_bytes(bom + path.read_bytes())

    cirr = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    add_bom(cirr["root"] / "cirr" / "captions" / "cap.rc2.val.json")
    add_bom(cirr["root"] / "cirr" / "image_splits" / "split.rc2.val.json")
    assert list(check_dataset("cirr", cirr["root"])) == []
    assert load_cir("cirr", cirr["root"], "val").gallery_names[0] == cirr["names"]["val"][0]
    shoes = write_shoes(tmp_path / "shoes")
    add_bom(shoes["root"] / "train_im_names.txt")  # the first name would not be found with "\ufeff" in front
    assert list(check_dataset("shoes", shoes["root"])) == []
    write_precomp(tmp_path / "itm", splits=("test",))
    add_bom(tmp_path / "itm" / "f30k_precomp" / "test_caps.txt")
    assert list(check_dataset("f30k", tmp_path / "itm")) == []
    assert load_precomp(tmp_path / "itm", "f30k", "test").captions[0] == "image 0 caption 0 ."


def test_a_missing_key_is_named_with_the_entrys_keys_and_the_likely_rename(tmp_path):
    cirr = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    path = cirr["root"] / "cirr" / "captions" / "cap.rc2.val.json"
    entries = cirr["entries"]["val"]
    entries[0]["target"] = entries[0].pop("target_hard")
    entries[1]["img_set"]["names"] = entries[1]["img_set"].pop("members")
    write_json(path, entries)
    problems = check_dataset("cirr", cirr["root"])
    assert [(p.entry, p.message) for p in problems] == [
        ("pairid 100", "missing key 'target_hard' (this entry has: pairid, reference, target_soft, caption, img_set, "
                       "target; did you mean 'target' (the name Fashion-IQ uses)?)"),
        ("pairid 101", "'img_set': missing key 'members' (this entry has: id, reference_rank, target_rank, names)")]
    with pytest.raises(DataError, match=r"\[pairid 100\]: missing key 'target_hard' .*did you mean 'target' "):
        load_cir("cirr", cirr["root"], "val")
    fiq = write_fashioniq(tmp_path / "fiq", categories=("dress",), splits=("val",))
    path = fiq["root"] / "captions" / "cap.dress.val.json"
    entries = fiq["entries"]["dress", "val"]
    entries[2]["caption"] = entries[2].pop("captions")
    entries[0]["reference"] = entries[0].pop("candidate")  # CIRR's name, not alike: the layouts' table knows it
    write_json(path, entries)
    assert [(p.entry, p.message) for p in check_dataset("fashioniq", fiq["root"])] == [
        ("#0", "missing key 'candidate' (this entry has: target, captions, reference; did you mean 'reference' (the "
               "name CIRR uses)?)"),
        ("#2", "missing key 'captions' (this entry has: candidate, target, caption; did you mean 'caption' (the name "
               "CIRR uses)?)")]
    shoes = write_shoes(tmp_path / "shoes")
    entries = shoes["entries"]
    entries[0]["ReferenceImage"] = entries[0].pop("ReferenceImageName")
    write_json(shoes["root"] / "relative_captions_shoes.json", entries)
    assert [p.message for p in check_dataset("shoes", shoes["root"])] == [
        "missing key 'ReferenceImageName' (this entry has: ImageName, RelativeCaption, ReferenceImage; did you mean "
        "'ReferenceImage'?)"]


def test_data_check_takes_the_feature_size_a_run_config_gives(tmp_path, capsys):
    write_precomp(tmp_path, splits=("test",), dim=512, regions=6)
    problems = check_dataset("f30k", tmp_path)
    assert [p.kind for p in problems] == ["bad_array"]
    assert ("; for 6-region features set dataset.options.regions=6 (cirlab data check --regions 6); for "
            "512-dimensional features set dataset.options.dim=512 (cirlab data check --dim 512)") in problems[0].message
    assert list(check_dataset("f30k", tmp_path, options={"dim": 512, "regions": 6})) == []
    assert main(["check", "--dataset", "f30k", "--root", str(tmp_path), "--dim", "512", "--regions", "6"]) == 0
    assert main(["check", "--dataset", "precomp", "--root", str(tmp_path), "--dim", "512", "--regions", "6"]) == 0
    capsys.readouterr()
    assert main(["check", "--dataset", "f30k", "--root", str(tmp_path), "--dim", "512"]) == EXIT_FOUND
    assert "dataset.options.regions=6" in capsys.readouterr().out
    # a flag that changes nothing for a CIR layout is refused, not ignored
    write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    assert main(["check", "--dataset", "cirr", "--root", str(tmp_path / "cirr_dataset"), "--dim", "512"]) == 2
    with pytest.raises(Exception, match="dataset.options.*unknown field 'dimm'"):
        check_dataset("f30k", tmp_path, options={"dimm": 512})


def test_the_train_side_img_set_warning_says_the_query_is_trained(tmp_path):
    train = write_cirr(tmp_path / "cirr_dataset", groups={"train": 1})
    path = train["root"] / "cirr" / "captions" / "cap.rc2.train.json"
    entries = train["entries"]["train"]
    entries[0]["img_set"]["members"] = entries[0]["img_set"]["members"][1:]
    write_json(path, entries)
    warnings = check_dataset("cirr", train["root"]).warnings
    assert {w.kind for w in warnings} == {"unusable_img_set"}  # 5 members, without the reference
    assert all("the query is trained; only this img_set is unusable" in w.message for w in warnings)


def test_a_utf16_text_file_is_named_as_such(tmp_path):
    """Notepad's "Unicode" save of a caption or split file read "not UTF-8 text: invalid start byte" (precomp: once
    per line)."""
    from fixtures_data import write_precomp

    from cirlab.data.check import check_dataset

    root = write_precomp(tmp_path / "p", n_images=2)["root"]
    caps = root / "f30k_precomp" / "dev_caps.txt"
    caps.write_bytes(caps.read_text().encode("utf-16"))
    problems = [p for p in check_dataset("f30k", root) if p.kind == "bad_entry"]
    assert len(problems) == 1 and "UTF-16 text (as Windows Notepad's \"Unicode\" saves it): save it as UTF-8" in str(
        problems[0])


def test_an_image_declaring_too_many_pixels_is_a_problem_before_it_is_decoded(tmp_path, capsys):
    """A small PNG can declare a huge canvas (a decompression bomb): --verify-images decoded it and said OK."""
    from PIL import Image

    info = write_cirr(tmp_path / "cirr_dataset", groups={"val": 1})
    bomb = info["root"] / "dev" / "dev-0-2-img0.png"
    Image.new("1", (8000, 7000)).save(bomb)  # 56 Mpx in a few KB; 1 bit per pixel keeps the old decode cheap
    for full in (True, False):
        problems = check_dataset("cirr", info["root"], verify_images=full)
        assert _kinds(problems) == {"unreadable_image": 1} and problems[0].file.endswith("dev-0-2-img0.png")
        assert "8000 x 7000 pixels" in problems[0].message and "MAX_IMAGE_PIXELS" in problems[0].message
    assert main(["check", "--dataset", "cirr", "--root", str(info["root"]),
                 "--verify-images"]) == EXIT_FOUND
    assert "image too large" in capsys.readouterr().out


def test_max_per_kind_keeps_the_first_problems_and_counts_all(tmp_path, capsys):
    """Every problem was kept even when only the first few were listed: a 10 MB file of bad entries took 1.7 GB."""
    info = write_fashioniq(tmp_path / "fiq", categories=("dress",), splits=("val",))
    write_json(info["root"] / "captions" / "cap.dress.val.json", [0] * 50)
    full = check_dataset("fashioniq", info["root"])
    few = check_dataset("fashioniq", info["root"], max_per_kind=2)
    assert len(full) == 50 and len(few) == 2 and few == full[:2]
    assert few.counts() == {"bad_entry": 50} and few.total == 50
    assert format_problems(few, max_per_kind=2) == format_problems(full, max_per_kind=2)
    assert "bad_entry: 50 problems" in format_problems(few) and "  ... and 48 more" in format_problems(few)
    nothing_kept = check_dataset("fashioniq", info["root"], max_per_kind=0)
    assert len(nothing_kept) == 0 and nothing_kept and nothing_kept.total == 50  # still a failed check
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"]),
                 "--max-per-kind", "1"]) == EXIT_FOUND
    out = capsys.readouterr().out
    assert "FAILED with 50 problems" in out and "50 problems in total (50 bad_entry)" in out
    assert out.count("\n  ") == 2  # one problem listed, then "... and 49 more"
    with pytest.raises(ValueError, match="max_per_kind"):
        check_dataset("fashioniq", info["root"], max_per_kind=-1)


def test_check_lists_twenty_problems_per_kind_by_default_and_all_on_request(tmp_path, capsys):
    """Every problem was listed by default: a folder of 77,000 missing images printed 77,000 lines."""
    info = write_fashioniq(tmp_path / "fiq", categories=("dress",), splits=("val",))
    write_json(info["root"] / "captions" / "cap.dress.val.json", [0] * 50)
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"])]) == EXIT_FOUND
    out = capsys.readouterr().out
    assert out.count("\n  ") == 21 and "... and 30 more" in out and "--max-per-kind all" in out
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"]),
                 "--max-per-kind", "all"]) == EXIT_FOUND
    out = capsys.readouterr().out
    assert out.count("\n  ") == 50 and "more" not in out and "FAILED with 50 problems" in out


def test_problems_not_kept_are_counted_once_when_a_file_is_read_twice(tmp_path):
    # Shoes' caption file is parsed once per split: its problems are the same problems, kept or only counted
    info = write_shoes(tmp_path / "shoes")
    write_json(info["root"] / "relative_captions_shoes.json", info["entries"] + [7] * 30)
    full = check_dataset("shoes", info["root"])
    few = check_dataset("shoes", info["root"], max_per_kind=3)
    assert _kinds(full) == {"bad_entry": 30} and few.counts() == {"bad_entry": 30} and len(few) == 3


def test_json_nested_thousands_deep_is_malformed_json_naming_the_file(tmp_path, capsys):
    """A RecursionError traceback came out of `cirlab data check` and of loading."""
    info = write_fashioniq(tmp_path / "fiq", categories=("dress",), splits=("val",))
    path = info["root"] / "captions" / "cap.dress.val.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    problems = check_dataset("fashioniq", info["root"])
    assert [(p.kind, p.file) for p in problems] == [("malformed_json", str(path))]
    assert "nested too deeply" in problems[0].message
    assert main(["check", "--dataset", "fashioniq", "--root", str(info["root"])]) == EXIT_FOUND
    assert "nested too deeply" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: malformed JSON: nested too deeply"):
        load_cir("fashioniq", info["root"], "val", category="dress")


def test_all_zero_image_features_are_a_warning(tmp_path):
    """An export that wrote no features (rows of zeros) passed the check; DIME and HREM then gave finite metrics
    that came from tie order alone."""
    import numpy as np

    data = write_precomp(tmp_path, splits=("test",), dim=8, regions=2, n_images=6)
    path = data["root"] / "f30k_precomp" / "test_ims.npy"
    features = np.load(path)
    features[[1, 4]] = 0.0
    np.save(path, features)
    problems = check_dataset("f30k", tmp_path, options={"dim": 8, "regions": 2})
    assert list(problems) == [] and [w.kind for w in problems.warnings] == ["zero_features"]
    assert problems.warnings[0].entry == "image 1" and "all-zero features in 2 images (index 1, 4)" in \
        problems.warnings[0].message


def test_a_fashioniq_category_named_like_the_average_is_refused(tmp_path):
    """Category files named cap.avg.*.json: the category's recalls were written under the average's keys
    (avg_R@10) and lost without a word."""
    from cirlab.data import load_cir
    from cirlab.data.base import DataError

    tree = write_fashioniq(tmp_path, categories=("dress", "avg"))
    problems = check_dataset("fashioniq", tree["root"])
    assert [p.kind for p in problems] == ["bad_entry"] and "shares its metric keys with the average" in \
        problems[0].message
    with pytest.raises(DataError, match=r"a category named 'avg' shares its metric keys"):
        load_cir("fashioniq", tree["root"], "val")
    assert len(load_cir("fashioniq", tree["root"], "val", category="dress").triplets) > 0


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    """UTF-16 saved without a byte order mark: caption files loaded with a NUL beside every letter (data check said
    OK), JSON files were "malformed JSON: Expecting value"; neither said what the file was."""
    import json

    data = write_precomp(tmp_path / "p", splits=("test",), dim=8, regions=2, n_images=2)
    caps = data["root"] / "f30k_precomp" / "test_caps.txt"
    caps.write_bytes(caps.read_text(encoding="utf-8").rstrip("\n").encode("utf-16-le"))
    problems = check_dataset("f30k", data["root"], options={"dim": 8, "regions": 2})
    assert [p.message for p in problems] == ["UTF-16 text without a byte order mark (a NUL byte beside every "
                                             "letter): save it as UTF-8"]
    tree = write_fashioniq(tmp_path / "f", categories=("dress",))
    cap = tree["root"] / "captions" / "cap.dress.val.json"
    cap.write_bytes(json.dumps(json.loads(cap.read_text(encoding="utf-8"))).encode("utf-16-be"))
    messages = [p.message for p in check_dataset("fashioniq", tree["root"]) if p.file == str(cap)]
    assert messages == ["UTF-16 text without a byte order mark (a NUL byte beside every letter): save it as UTF-8"]


def test_a_shoes_name_list_in_utf16_without_a_byte_order_mark_is_named(tmp_path):
    """UTF-16 of Latin text is valid UTF-8 once read: a Shoes name list loaded names with a NUL beside every letter,
    and no problem was recorded."""
    tree = write_shoes(tmp_path)
    names = tree["root"] / "train_im_names.txt"
    names.write_bytes(names.read_text(encoding="utf-8").encode("utf-16-le"))
    problems = check_dataset("shoes", tree["root"])
    assert [(p.file, p.message) for p in problems if p.file == str(names)] == [
        (str(names), "UTF-16 text without a byte order mark (a NUL byte beside every letter): save it as UTF-8")]
