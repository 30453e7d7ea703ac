"""`cirlab report`: parameters, overrides, ordering, the index page and failure handling."""
from __future__ import annotations

import argparse
import io
import json
import re
import logging
import os
import shutil
from pathlib import Path

import pytest

from cirlab import report, workbench
from cirlab.core.errors import EXIT_FOUND
from lock_holder import held_by_another_thread


def test_report_set_reads_yaml_values():
    from cirlab.engine.runs import parse_set_flat  # cirlab report --set reads as cirlab train --set

    assert parse_set_flat(["max_steps=10", "train.device=cuda", "runs=[a, b]", "interactive=true", "resume="]) == {
        "max_steps": 10, "train.device": "cuda", "runs": ["a", "b"], "interactive": True, "resume": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set_flat(["max_steps"])
    assert parse_set_flat(["lr=2e-4"]) == {"lr": 2e-4}  # the same parser as cirlab train --set (YAML 1.1 fixed)


def test_parameters_fill_paths_and_apply_overrides(tmp_path):
    p = report.notebook_parameters("evaluate", tmp_path, "/data", overrides={"k": 7, "train.k": 99})
    assert p["runs"] == [f"{tmp_path}/train"] and p["data_root"] == "/data" and p["k"] == 7
    t = report.notebook_parameters("train", tmp_path, "/data", smoke=True, overrides={"train.max_steps": 5, "k": 1})
    assert t["max_steps"] == 5 and "k" not in t and t["output_dir"] == f"{tmp_path}/train"
    assert report.SMOKE_PARAMETERS["train"]["max_steps"] == 2 and report.REPORT_PARAMETERS["train"]["max_steps"] == 0
    # the full report trains whole epochs: no max_steps cap (which would warn) on the demo's training entries
    assert all(report.REPORT_PARAMETERS[n]["max_steps"] == 0 for n in ("train", "train_dime", "quickstart"))


def test_unknown_overrides_fail_early():
    with pytest.raises(ValueError, match="no such parameter"):
        report.check_overrides({"max_step": 3}, list(report.ORDER))
    with pytest.raises(ValueError, match="unknown notebook"):
        report.check_overrides({"trian.max_steps": 3}, list(report.ORDER))
    report.check_overrides({"rank_shift.pool_k": 3, "data_root": "/x"}, list(report.ORDER))


def _documented_settings() -> str:
    """The ``--set settings=[...]`` value ``cirlab report --help`` shows."""
    parser = argparse.ArgumentParser(prog="cirlab")
    sub = parser.add_subparsers()
    report.register_cli(sub)
    return re.search(r"--set '(settings=\[[^']*\])'", sub.choices["report"].format_help()).group(1)


def test_set_settings_passes_cirlab_train_overrides_to_the_notebooks_that_train(tmp_path):
    from cirlab.engine.runs import parse_set_flat

    # the help's example was refused: "--set settings: no such parameter" (the notebooks that train declare it)
    overrides = parse_set_flat([_documented_settings()])
    assert overrides == {"settings": ["train.lr=1e-3", "train.epochs=2"]}
    report.check_overrides(overrides, ["train"])
    report.check_override_types(overrides, list(report.ORDER))
    given = {n: report.notebook_parameters(n, tmp_path, "/data", overrides=overrides).get("settings")
             for n in report.plan()}
    assert {n for n, v in given.items() if v is not None} == {"train", "rank_shift", "train_dime", "train_hrem",
                                                              "train_cala", "quickstart"}
    assert given["train"] == given["quickstart"] == ["train.lr=1e-3", "train.epochs=2"]
    # one value without brackets is a list of one (the notebooks add it to their recipe's list), for one entry only
    one = {"train_dime.settings": "train.lr=1e-3"}
    assert report.notebook_parameters("train_dime", tmp_path, "/data", overrides=one)["settings"] == ["train.lr=1e-3"]
    assert "settings" not in report.notebook_parameters("train", tmp_path, "/data", overrides=one)
    with pytest.raises(ValueError, match="--set settings: no such parameter"):  # no selected notebook trains
        report.check_overrides(overrides, ["evaluate", "router_explorer"])
    # rank_shift's stage II has its own list (the notebook declares it; the report did not pass it)
    two = {"rank_shift.stage2_settings": "train.lr=1e-4"}
    report.check_overrides(two, ["rank_shift"])
    assert report.notebook_parameters("rank_shift", tmp_path, "/data", overrides=two)["stage2_settings"] == [
        "train.lr=1e-4"]
    with pytest.raises(ValueError, match=r"--set rank_shift\.stage2_settings: trian\.lr: unknown section"):
        report.check_overrides({"rank_shift.stage2_settings": ["trian.lr=1"]}, ["rank_shift"])
    for bad, said in ((["trian.lr=1"], r"--set settings: trian\.lr: unknown section 'trian' \(did you mean 'train'"),
                      ("train.lr", r"--set settings: 'train\.lr': expected KEY=VALUE"),
                      (["model.lr=1"], r"--set settings: model\.lr: 'model' is not a section"),
                      (["train=3"], r"--set settings: train: expected a mapping, got 3"),
                      ([{"train.lr": 1}], r"--set settings: .* expected a KEY=VALUE string"),
                      (5, r"--set settings=5: expected a list of cirlab train --set overrides")):
        with pytest.raises(ValueError, match=said):
            report.check_overrides({"settings": bad}, ["train"])


def test_the_helps_settings_example_reaches_the_train_notebook(tmp_path, monkeypatch):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _write_notebook(nbs / "train.ipynb", "out: str = ''  # output folder\nsettings: list = []  # run-config overrides",
                    ["import json, pathlib\npathlib.Path(out).mkdir(parents=True, exist_ok=True)\n"
                     "(pathlib.Path(out) / 'settings.json').write_text(json.dumps(settings))"])
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {**report.REPORT_PARAMETERS, "train": {"out": "{out}/train"}})
    out = tmp_path / "rep"
    code = report.main(["--out", str(out), "--only", "train", "--kernel", "python3", "--notebooks", str(nbs),
                        "--set", f"data_root={tmp_path}", "--set", _documented_settings()])
    assert code == 0
    assert json.loads((out / "train" / "settings.json").read_text()) == ["train.lr=1e-3", "train.epochs=2"]


def test_plan_orders_by_dependency_and_adds_missing_prerequisites(tmp_path):
    assert report.plan() == ["train", "evaluate", "router_explorer", "rank_shift", "train_dime",
                             "router_explorer_dime", "train_hrem", "router_explorer_hrem", "train_cala",
                             "router_explorer_cala", "quickstart"]
    assert report.plan(skip=["dime"]) == ["train", "evaluate", "router_explorer", "rank_shift", "train_hrem",
                                          "router_explorer_hrem", "train_cala", "router_explorer_cala", "quickstart"]
    assert report.plan(skip=["hrem", "cala"]) == ["train", "evaluate", "router_explorer", "rank_shift", "train_dime",
                                                  "router_explorer_dime", "quickstart"]
    with pytest.raises(ValueError, match="cannot skip amc; skippable: dime, hrem, cala"):
        report.plan(skip=["amc"])
    assert report.plan("router_explorer_dime", tmp_path) == ["train_dime", "router_explorer_dime"]
    assert report.plan("router_explorer_hrem", tmp_path) == ["train_hrem", "router_explorer_hrem"]
    assert report.plan("router_explorer_cala", tmp_path) == ["train_cala", "router_explorer_cala"]
    assert report.plan("rank_shift", tmp_path) == ["train", "evaluate", "rank_shift"]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text("{}")
    assert report.plan("rank_shift", tmp_path) == ["evaluate", "rank_shift"]
    assert report.plan("router_explorer", tmp_path) == ["router_explorer"]
    with pytest.raises(ValueError, match="unknown notebook"):
        report.plan("nope")


def test_only_repeated_runs_every_named_notebook_and_refuses_a_skip_beside_it(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text("{}")
    assert report.plan(["router_explorer", "router_explorer_dime"], tmp_path) == [
        "router_explorer", "train_dime", "router_explorer_dime"]
    parser = argparse.ArgumentParser(prog="cirlab")
    report.register_cli(parser.add_subparsers())
    args = parser.parse_args(["report", "--only", "rank_shift", "--only", "router_explorer"])
    assert args.only == ["rank_shift", "router_explorer"]  # a plain option kept only the last one, without a word
    assert report.plan(args.only, tmp_path) == ["evaluate", "router_explorer", "rank_shift"]
    with pytest.raises(ValueError, match="--only and --no-dime cannot be combined"):
        report.plan(["train_dime"], tmp_path, skip=["dime"])
    with pytest.raises(ValueError, match="unknown notebook 'nope'"):
        report.plan(["train", "nope"], tmp_path)


def test_a_refused_report_option_is_the_clis_one_error_line(tmp_path, caplog, capsys):
    from cirlab import cli

    with caplog.at_level(logging.ERROR):
        code = cli.main(["report", "--out", str(tmp_path / "r"), "--only", "train_dime", "--no-dime"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["--only and --no-dime cannot be combined: --only names every notebook that runs"]
    assert capsys.readouterr().err == ""  # not a second style ("cirlab report: ...") printed beside the log
    assert not (tmp_path / "r").exists()


def test_dime_entries_run_the_train_and_router_notebooks_with_itm_parameters(tmp_path):
    assert report.notebook_of("train_dime") == "train" and report.notebook_of("rank_shift") == "rank_shift"
    t = report.notebook_parameters("train_dime", tmp_path, "/data")
    assert (t["model"], t["dataset"], t["output_dir"]) == ("dime", "f30k", f"{tmp_path}/train_dime")
    r = report.notebook_parameters("router_explorer_dime", tmp_path, "/data", smoke=True)
    assert r["run_dir"] == f"{tmp_path}/train_dime" and r["n_queries"] < report.REPORT_PARAMETERS[
        "router_explorer_dime"]["n_queries"]
    # a --set for the DIME entry does not touch the AMC one
    over = {"train_dime.max_steps": 3}
    assert report.notebook_parameters("train", tmp_path, "/data", overrides=over)["max_steps"] != 3
    assert report.notebook_parameters("train_dime", tmp_path, "/data", overrides=over)["max_steps"] == 3
    assert report.ORDER.index("train_dime") < report.ORDER.index("router_explorer_dime")


def test_hrem_and_cala_entries_and_their_captions(tmp_path):
    h = report.notebook_parameters("train_hrem", tmp_path, "/data", itm_data_root="/itm")
    assert (h["model"], h["dataset"], h["data_root"], report.notebook_of("train_hrem")) == ("hrem", "f30k", "/itm",
                                                                                          "train")
    c = report.notebook_parameters("train_cala", tmp_path, "/data")
    assert (c["model"], c["dataset"], c["data_root"]) == ("cala", "cirr", "/data")
    # the short CPU recipe is the notebook's own default (short_recipe), not a report parameter
    assert "settings" not in c and "model_overrides.image_size=32" in workbench.cpu_recipe("cala", c["preset"])
    for model in ("hrem", "cala"):
        r = report.notebook_parameters(f"router_explorer_{model}", tmp_path, "/data", itm_data_root="/itm")
        assert r["run_dir"] == f"{tmp_path}/train_{model}" and not r["interactive"]
        assert report.DEPENDS[f"router_explorer_{model}"] == (f"train_{model}",)
    assert report.uses_itm_data(["train_hrem"]) and not report.uses_itm_data(["train_cala"])
    for name, stem in (("router_explorer_hrem", "relation_graph"), ("router_explorer_hrem", "word_region"),
                       ("router_explorer_cala", "cala_bridges"), ("router_explorer_cala", "bridge_words"),
                       ("train_cala", "val_metrics"), ("train_hrem", "val_metrics")):
        assert report.figure_caption(name, stem), (name, stem)
    assert "not a trained CaLa" in report.figure_caption("train_cala", "training_curves")


def test_index_links_files_tables_and_figures(tmp_path):
    folder = tmp_path / "evaluate"
    (folder / "figures").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"runs": {"train": {"avg_R@10": 12.5}}}))
    (folder / "evaluate.html").write_text("<html></html>")
    (folder / "figures" / "gallery_dress.png").write_bytes(b"\x89PNG")
    page = report.write_index(tmp_path).read_text()
    assert "href='evaluate/evaluate.html'" in page and "src='evaluate/figures/gallery_dress.png'" in page
    assert "runs/train/avg_R@10" in page and ">12.50<" in page
    assert "router_explorer" not in page  # absent notebooks are not linked
    assert "qualitative retrieval figures" in page  # the caption of gallery_*


def test_index_has_contents_run_records_integers_and_each_metric_once(tmp_path):
    folder = tmp_path / "train"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "training_curves.png").write_bytes(b"\x89PNG")
    val = {"avg": 70.41666, "avg_R@10": 49.8}
    (folder / "metrics.json").write_text(json.dumps({"steps": 240, "epochs": 3, "val": val, "splits": {"val": val},
                                                     "selection": {"best_epoch": 3}}))
    (folder / report.RECORD).write_text(json.dumps({
        "status": "ok", "started": "2026-01-02T03:04:05+00:00", "finished": "2026-01-02T03:05:05+00:00",
        "duration_s": 60.0, "commit": "abc1234", "command": "cirlab report --only train",
        "parameters": {"max_steps": 0, "settings": ["train.lr=1e-3"]}}))
    page = report.write_index(tmp_path).read_text()
    assert "<nav><h2>Contents</h2>" in page and "<a href='#train'>train</a>" in page
    assert "finished 2026-01-02 03:05 UTC after 60.0 s" in page and "abc1234" in page
    assert "cirlab report --only train" in page
    assert "train.lr=1e-3" in page  # parameters
    assert ">240<" in page and ">3<" in page and "3.000" not in page  # integers stay integers
    assert ">70.42<" in page and page.count(">70.42<") == 1  # splits/val/avg repeats val/avg: shown once
    assert "splits/val/avg" not in page and "val/avg" in page
    assert "A training diagnostic; no paper figure" in page


class _Tags:
    """Every start tag of an HTML page with its attributes, as a browser's tokenizer reads them."""

    def __init__(self, page: str) -> None:
        from html.parser import HTMLParser

        self.tags: list[tuple[str, dict[str, str | None]]] = []
        parser = HTMLParser()
        parser.handle_starttag = lambda tag, attrs: self.tags.append((tag, dict(attrs)))  # type: ignore[method-assign]
        parser.feed(page)
        parser.close()


def test_index_keeps_names_and_record_fields_from_files_out_of_the_markup(tmp_path):
    """A figure's file name (from a dataset's category name) went raw into src='...' and href='...', so a quote
    closed the attribute and added an onerror handler; the record's duration_s and error went in raw as well."""
    from urllib.parse import unquote

    evil = "gallery_x' onerror='alert(1)<b>"
    folder = tmp_path / "evaluate"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / f"{evil}.png").write_bytes(b"\x89PNG")
    (folder / report.RECORD).write_text(json.dumps({
        "status": "ok", "started": "2026-01-02T03:04:05+00:00", "finished": "2026-01-02T03:05:05+00:00",
        "duration_s": "<script>alert('duration_s')</script>", "commit": "<i>x</i>", "command": "cirlab report '",
        "parameters": {"k": "<script>"}}))
    failed = tmp_path / report.FAILED_DIR / "evaluate"
    failed.mkdir(parents=True)
    (failed / report.RECORD).write_text(json.dumps({"status": "failed", "started": "2026-01-03T00:00:00+00:00",
                                                    "error": "<img src=x onerror=alert(2)>"}))
    page = report.write_index(tmp_path).read_text()
    tags = _Tags(page).tags
    assert not [t for t in tags if t[0] in ("script", "i") or any(a.startswith("on") for a in t[1])]
    assert [t for t, _ in tags].count("img") == 1 and [t for t, _ in tags].count("b") == 2  # the caption's, a label
    img = next(attrs for tag, attrs in tags if tag == "img")
    assert unquote(img["src"]) == f"evaluate/figures/{evil}.png" and img["alt"].startswith(evil + ": ")
    hrefs = [attrs["href"] for tag, attrs in tags if tag == "a"]
    assert f"evaluate/figures/{evil}.svg" in [unquote(h) for h in hrefs]
    assert "after ? s" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<code>cirlab report --only evaluate</code>" in page  # an unparsable command: the entry alone


def test_index_of_a_folder_with_a_record_that_is_no_object(tmp_path):
    """A report folder from elsewhere: a record that is no object, or fields of other types, raised tracebacks."""
    for name, record in (("train", "[1, 2]"), ("evaluate", json.dumps({
            "started": 5, "finished": [1], "duration_s": 12, "commit": ["<i>x</i>"], "command": 5,
            "parameters": ["p"]}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / report.RECORD).write_text(record)
    page = report.write_index(tmp_path).read_text()
    assert "<section id='train'>" in page and "finished ? after 12.0 s" in page
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "<code>cirlab report --only evaluate</code>" in page


def _png(path, width: int, height: int) -> None:
    """A PNG signature and IHDR chunk of the given size: all the index reads of a figure."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + width.to_bytes(4, "big")
                     + height.to_bytes(4, "big") + bytes(5))


def test_index_groups_entries_by_paper_explains_its_terms_and_gives_wide_figures_the_width(tmp_path):
    """The reviewer's complaints: entries in run order (the quickstart last), abbreviations never expanded, wide
    figures shrunk to a grid cell, and a 70-row metrics table pushing the figures down."""
    assert sorted(n for _, names in report.GROUPS for n in names) == sorted(report.ORDER)  # every entry has a group
    for name, metrics in (("quickstart", {"trained": {"avg_R@10": 41.75}}),
                          ("train_dime", {"val": {"rsum": 387.2, "i2t_R@1": 40.0}}),
                          ("rank_shift", {f"m{i:02d}": i for i in range(30)})):
        (tmp_path / name / "figures").mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / name / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {}}))
    _png(tmp_path / "train_dime" / "figures" / "cell_flows.png", 1248, 456)
    _png(tmp_path / "train_dime" / "figures" / "val_metrics.png", 504, 384)
    (tmp_path / "train_dime" / "figures" / "broken.png").write_bytes(b"\x89PNG")
    page = report.write_index(tmp_path).read_text()
    order = [page.index(f"<section id='{n}'>") for n in ("quickstart", "rank_shift", "train_dime")]
    assert order == sorted(order) and "<h3>Start here</h3>" in page and "Flickr30K" in page
    assert "HREM" not in page.split("</nav>")[0]  # a group without entries is not listed
    terms = page[page.index("Terms used on this page"):page.index("</dl>")]
    assert "<dt>rsum</dt>" in terms and "<dt>i2t, t2i</dt>" in terms and "<dt>avg</dt>" in terms
    assert "<dt>NIN" not in terms and "<dt>Rsubset" not in terms  # only the terms the page uses
    assert report._glossary_html("WARNING: PRICE of ELECTRIC") == ""  # whole words: a failed cell's log is no AMC
    assert "<figure class='wide'><a href='train_dime/figures/cell_flows.svg'>" in page
    assert "<figure><a href='train_dime/figures/val_metrics.svg'>" in page
    assert "<figure><a href='train_dime/figures/broken.svg'>" in page  # an unreadable header: the grid cell
    assert "<details open><summary>metrics (1 number)</summary>" in page
    assert "<details><summary>metrics (30 numbers)</summary>" in page  # long: folded
    assert "benchmarks/" not in page  # no such folder beside this index
    (tmp_path / "benchmarks").mkdir()
    assert "<a href='benchmarks/'>benchmarks/</a>" in report.write_index(tmp_path).read_text()


def test_regenerate_command_keeps_the_runs_settings_and_selects_the_entry(tmp_path):
    ran = "cirlab report --no-dime --set 'settings=[train.lr=1e-3]' --only train --jobs 1 --out /tmp/r --only=evaluate"
    assert report.regenerate_command(ran, "evaluate") == (
        "cirlab report --set 'settings=[train.lr=1e-3]' --out /tmp/r --only evaluate")
    assert report.regenerate_command(None, "train") == "cirlab report --only train"
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / report.RECORD).write_text(json.dumps({"status": "ok", "command": "cirlab report --smoke --set k=10"}))
    assert "<code>cirlab report --smoke --set k=10 --only train</code>" in report.write_index(tmp_path).read_text()


def test_index_shows_figures_in_the_order_the_notebook_saved_them(tmp_path):
    figures = tmp_path / "evaluate" / "figures"
    figures.mkdir(parents=True)
    for i, stem in enumerate(("metrics_table", "gallery_dress", "failures_dress", "per_category")):
        (figures / f"{stem}.png").write_bytes(b"\x89PNG")
        os.utime(figures / f"{stem}.png", ns=(10**9 * (100 + i), 10**9 * (100 + i)))
    (tmp_path / "evaluate" / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {}}))
    page = report.write_index(tmp_path).read_text()
    shown = [page.index(f"<b>{stem}</b>") for stem in ("metrics_table", "gallery_dress", "failures_dress",
                                                       "per_category")]
    assert shown == sorted(shown)  # alphabetical put failures before galleries and the table after them


def test_index_names_the_selection_metric_and_drops_the_selected_splits_repeat(tmp_path):
    folder = tmp_path / "train_dime"
    folder.mkdir()
    cala = tmp_path / "train_cala"
    cala.mkdir()
    (cala / "metrics.json").write_text(json.dumps({"protocol": "cirr", "val": {"avg": 10.58, "R@5": 0.96}}))
    (cala / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {}}))
    dev, test = {"rsum": 387.2, "i2t_R@1": 40.0}, {"rsum": 387.2, "i2t_R@1": 38.0}  # test's rsum equal by chance
    (folder / "metrics.json").write_text(json.dumps({
        "val": dev, "splits": {"dev": dev, "test": test},
        "selection": {"best_score": 212.8, "metric": "i2t_R@1+i2t_R@5", "split": "dev", "mode": "dev"}}))
    (folder / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {}}))
    page = report.write_index(tmp_path).read_text()
    assert "selection/best_score (i2t_R@1+i2t_R@5 on dev)</th><td class='num'>212.80<" in page
    assert "splits/dev/" not in page and "val/rsum" in page  # the selected split is val/, shown once
    assert "splits/test/rsum</th><td class='num'>387.20<" in page  # another split's equal number stays
    assert "val/avg = (R@5 + Rsubset@1) / 2</th><td class='num'>10.58<" in page  # CIRR's avg, by its formula


def test_index_shows_every_metric_tables_of_records_included(tmp_path):
    # rank_shift writes 70-odd numbers and its second comparison as a list of per-category records: the page cut
    # the first at 60 rows and dropped the second
    from cirlab import analysis

    folder = tmp_path / "rank_shift"
    folder.mkdir()
    many = {f"m{i:02d}": i + 0.5 for i in range(70)}
    records = [{"category": "all", "before_R@1": 12.5, "queries": 8}, {"category": "dress", "before_R@1": 25.0}]
    words = [{"word": "purple", "bridge": 0.25, "count": 1}, {"bridge": 0.5}]  # CaLa's bridge words; one unnamed
    summary = analysis.rank_shift_summary([3, 1, 2], [1, 1, 4], k=3)
    (folder / "metrics.json").write_text(json.dumps({**many, "second_comparison": records, "all": summary,
                                                     "bridge_words": words}))
    page = report.write_index(tmp_path).read_text()
    assert all(f">m{i:02d}<" in page for i in range(70)) and "<summary>" in page  # the rest folded, not cut
    assert ">second_comparison/all/before_R@1<" in page and ">second_comparison/dress/before_R@1<" in page
    assert ">second_comparison/all/queries</th><td class='num'>8<" in page
    assert ">all/queries</th><td class='num'>3<" in page  # a count is an int, not 3.00
    assert ">bridge_words/purple/bridge<" in page and ">bridge_words/1/bridge<" in page


def test_a_dependency_that_ran_later_marks_the_entry_stale(tmp_path):
    for name, started, finished in (("train", "2026-01-03T00:00:00", "2026-01-03T00:01:00"),
                                    ("evaluate", "2026-01-02T00:00:00", "2026-01-02T00:01:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / report.RECORD).write_text(json.dumps({"status": "ok", "started": started,
                                                                   "finished": finished}))
    state = report.entry_state(tmp_path, "evaluate")
    assert state["stale"] == {"train": "2026-01-03T00:01:00"} and not report.entry_state(tmp_path, "train")["stale"]
    page = report.write_index(tmp_path).read_text()
    assert "badge stale" in page and "cirlab report --only evaluate" in page


def test_register_cli_adds_report_command():
    parser = argparse.ArgumentParser(prog="cirlab")
    sub = parser.add_subparsers(dest="command")
    report.register_cli(sub)
    args = parser.parse_args(["report", "--only", "rank_shift", "--set", "pool_k=20", "--smoke", "--out", "x"])
    assert (args.only, args.set_, args.smoke, args.out, args.skip) == (["rank_shift"], ["pool_k=20"], True, "x", None)
    assert parser.parse_args(["report", "--no-dime", "--no-cala"]).skip == ["dime", "cala"]
    text = sub.choices["report"].format_help()
    for said in ("never replaced", "report.json", "--set 'settings=[", "relative to the current directory",
                 "train_hrem", "--no-hrem", "--no-cala"):
        assert said in text, said
    assert parser.parse_args(["report", "--jobs", "3"]).jobs == 3
    assert args.jobs == (2 if report.allocated_cpus()[0] >= 2 else 1)  # "auto": the CPUs this job may use
    for cpus, jobs in ((4, 2), (1, 1)):  # both branches, whatever this machine (or its cpuset) has
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(report, "allocated_cpus", lambda: (cpus, False))
            assert parser.parse_args(["report"]).jobs == jobs
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["report", "--jobs", bad])
    assert args.func is report._run_from_args
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--only", "nope"])


def test_failing_notebook_stops_the_report_with_its_error(tmp_path, monkeypatch):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _write_notebook(nbs / "rank_shift.ipynb", "pool_k: int = 1  # pool",
                    ["import math", "raise RuntimeError('broken cell ' + str(pool_k))"], params_at=1)
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {**report.REPORT_PARAMETERS, "rank_shift": {"pool_k": 3}})
    out = tmp_path / "reports"
    (out / "evaluate").mkdir(parents=True)
    (out / "evaluate" / "metrics.json").write_text("{}")  # prerequisite present: only rank_shift runs
    stream = io.StringIO()
    code = report.run_report(out, only="rank_shift", overrides={"data_root": str(tmp_path)}, kernel_name="python3",
                             notebook_dir=nbs, stream=stream)
    text = stream.getvalue()
    assert code == EXIT_FOUND
    assert "[1/1] rank_shift: FAILED" in text and "RuntimeError: broken cell 3" in text
    failed = out / report.FAILED_DIR / "rank_shift"
    assert (failed / "rank_shift.ipynb").is_file() and (out / "index.html").is_file()
    assert not (out / "rank_shift").exists()  # nothing half-written where the results belong
    assert "cell 1/2: import math" in text  # per-cell progress, the parameters cells not counted
    assert text.count("cell 2/2: raise RuntimeError") == 1


def _write_notebook(path, params: str, cells: list[str], params_at: int = 0) -> None:
    """A stand-in notebook: code ``cells`` with a ``parameters`` cell holding ``params`` at ``params_at``."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    tagged = nbformat.v4.new_code_cell(params)
    tagged.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.cells.insert(params_at, tagged)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _notebook(path, body: str) -> None:
    _write_notebook(path, "fail: bool = False  # make the notebook fail\nout: str = ''  # output folder",
                    ["import json, pathlib, sys", body], params_at=1)


def test_the_kernels_get_the_thread_policy_and_the_caller_keeps_its_environment(tmp_path, monkeypatch):
    """run_report sets the thread policy for its kernels; a Python session that called it gets its environment
    back (else its own training afterwards would run on the report's share of the cores)."""
    from cirlab.core.threads import CHILD_ENV, ENV, thread_env

    assert set(thread_env(3)) | set(thread_env(None)) <= set(CHILD_ENV)  # run_report puts back all it sets

    for key in (ENV, "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(ENV, "1")  # the policy the kernels must see, whatever this machine's size
    keys = (ENV, "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JUPYTER_PATH")
    before = {key: os.environ.get(key) for key in keys}
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "evaluate.ipynb", "import os\np = pathlib.Path(out)\np.mkdir(parents=True, exist_ok=True)\n"
                                      "(p / 'env.json').write_text(json.dumps(dict(os.environ)))")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(nbs / "evaluate.ipynb", as_version=4)
    nb.metadata["kernelspec"]["name"] = "no-such-kernel"  # the report then runs it in this Python's kernel
    nbformat.write(nb, nbs / "evaluate.ipynb")
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))  # where that kernel's spec is written
    monkeypatch.setattr(report, "ORDER", ("evaluate",))
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {"evaluate": {"fail": False, "out": "{out}/evaluate"}})
    out = tmp_path / "reports"
    code = report.run_report(out, only="evaluate", overrides={"data_root": str(tmp_path)}, notebook_dir=nbs,
                             stream=io.StringIO())
    assert code == 0
    seen = json.loads((out / "evaluate" / "env.json").read_text())
    assert seen["OMP_WAIT_POLICY"] == "passive" and seen["OMP_NUM_THREADS"] == "1"
    assert seen["JUPYTER_PATH"].split(os.pathsep)[0] == str(tmp_path / "cache" / "jupyter")
    assert {key: os.environ.get(key) for key in keys} == before


def test_failed_only_run_keeps_the_previous_report_and_marks_it(tmp_path, monkeypatch):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "evaluate.ipynb", "import time\n"
              "sys.stderr.write('train: step 1/2 loss 0.5\\rtrain: step 2/2 loss 0.4\\n')\n"
              "p = pathlib.Path(out)\n(p / 'figures').mkdir(parents=True, exist_ok=True)\n"
              "(p / 'figures' / 'gallery_dress.png').write_bytes(b'new' if fail else b'old')\n"
              "if fail: raise ValueError('broken on purpose')\n"
              "(p / 'metrics.json').write_text(json.dumps({'runs': {'train': {'avg_R@10': 11.0}}}))")
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {**report.REPORT_PARAMETERS,
                                                      "evaluate": {"fail": False, "out": "{out}/evaluate"}})
    out = tmp_path / "reports"
    (out / "train").mkdir(parents=True)
    (out / "train" / "metrics.json").write_text("{}")  # prerequisite present: only evaluate runs
    run = dict(only="evaluate", kernel_name="python3", notebook_dir=nbs, command="cirlab report --only evaluate")
    stream = io.StringIO()
    assert report.run_report(out, overrides={"data_root": str(tmp_path)}, stream=stream, **run) == 0
    assert stream.getvalue().count("| train: step 2/2 loss 0.4") == 1  # kernel stderr, last state of the line, once
    good = {p.relative_to(out / "evaluate"): p.read_bytes() for p in (out / "evaluate").rglob("*") if p.is_file()}
    assert json.loads((out / "evaluate" / report.RECORD).read_text())["status"] == "ok"

    failing = io.StringIO()
    code = report.run_report(out, overrides={"data_root": str(tmp_path), "fail": True}, stream=failing, **run)
    assert code == EXIT_FOUND
    # the failed cell numbered as the progress lines number it ("cell 2/2"), with the executed notebook's In [n]
    assert "evaluate: cell 2/2: " in failing.getvalue()
    assert re.search(r"evaluate: cell 2/2 \(In \[\d+\] of evaluate\.ipynb\) failed: ValueError: broken on purpose",
                     failing.getvalue()), failing.getvalue()
    now = {p.relative_to(out / "evaluate"): p.read_bytes() for p in (out / "evaluate").rglob("*") if p.is_file()}
    assert now == good  # the previous results, byte for byte: figures, metrics.json, executed notebook
    assert (out / report.FAILED_DIR / "evaluate" / "figures" / "gallery_dress.png").read_bytes() == b"new"
    assert not list(out.glob(".*.previous"))
    page = (out / "index.html").read_text()
    assert "badge failed" in page and "The last run failed" in page and "broken on purpose" in page
    assert "previous successful run" in page and f"{report.FAILED_DIR}/evaluate/evaluate.html" in page

    assert report.run_report(out, overrides={"data_root": str(tmp_path)}, stream=io.StringIO(), **run) == 0
    assert not (out / report.FAILED_DIR).exists()  # a good run clears the mark, and the emptied _failed/ with it
    assert "badge failed" not in (out / "index.html").read_text()


def test_an_interrupted_run_is_repaired_by_the_next(tmp_path):
    out = tmp_path
    (out / ".evaluate.previous").mkdir()
    (out / ".evaluate.previous" / "metrics.json").write_text('{"old": 1}')
    (out / "evaluate").mkdir()
    (out / "evaluate" / "half.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):  # no notebook: the run fails at once, after the repair
        report.run_entry("evaluate", {}, out, kernel_name="python3", notebook_dir=tmp_path / "none")
    assert json.loads((out / "evaluate" / "metrics.json").read_text()) == {"old": 1}
    assert (out / report.FAILED_DIR / "evaluate" / report.RECORD).is_file()


def test_a_run_killed_while_deleting_the_previous_results_keeps_its_own(tmp_path):
    """A kill (power cut, OOM) in the tidy-up of a finished entry left its complete results beside a half-deleted
    ``.evaluate.previous``; the next report put that back as the last good results and moved the complete ones to
    _failed/ (a failing next run then deleted them)."""
    out = tmp_path
    old, new = out / ".evaluate.previous", out / "evaluate"
    for folder, started in ((old, "2026-12-01T10:00:00+00:00"), (new, "2026-12-02T10:00:00+00:00")):
        folder.mkdir()
        (folder / report.RECORD).write_text(json.dumps({"status": "ok", "started": started}))
    (new / "metrics.json").write_text('{"new": 1}')  # the old folder's metrics.json was already deleted
    with pytest.raises(FileNotFoundError):  # no notebook: the run fails at once, after the repair
        report.run_entry("evaluate", {}, out, kernel_name="python3", notebook_dir=tmp_path / "none")
    assert json.loads((new / "metrics.json").read_text()) == {"new": 1}  # the finished run's results stay
    assert not old.exists() and not list(out.glob(".*.discard"))


def test_finished_entries_delete_their_previous_results_renamed_first(tmp_path, monkeypatch):
    """The previous folder is renamed before it is deleted, so no half-deleted folder ever carries its name."""
    out = tmp_path
    (out / "evaluate").mkdir()
    (out / "evaluate" / report.RECORD).write_text(json.dumps({"status": "ok", "started": "2026-12-01T10:00:00"}))
    deleted = []
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (  # the folders that are there to delete
        Path(path).exists() and deleted.append(Path(path).name), real(path, *a, **k)))
    monkeypatch.setattr(report, "run_notebook", lambda name, params, folder, *a, **k: folder.mkdir(parents=True))
    report.run_entry("evaluate", {}, out, kernel_name="python3")
    assert ".evaluate.previous" not in deleted and ".evaluate.previous.discard" in deleted
    assert sorted(p.name for p in out.iterdir()) == ["evaluate"]


def test_the_index_page_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A report that stopped while writing index.html (killed, a full disk) left a truncated page."""
    (tmp_path / "index.html").write_text("the last whole page")
    real = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        report.write_index(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "index.html").read_text() == "the last whole page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temporary left


def _parallel_setup(tmp_path, monkeypatch, bodies: dict[str, str]):
    """Three entries (train -> evaluate, and quickstart beside them), each writing its start and end time. The
    entries run in child processes, which see the real DEPENDS and SOURCE (entry = notebook for these three)."""
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    stamp = ("import time\nt0 = time.time()\n{body}\n"
             "pathlib.Path(out).mkdir(parents=True, exist_ok=True)\n"
             "(pathlib.Path(out) / 'metrics.json').write_text(json.dumps({{'t0': t0, 't1': time.time()}}))")
    for name, body in bodies.items():
        _notebook(nbs / f"{name}.ipynb", stamp.format(body=body))
    monkeypatch.setattr(report, "ORDER", tuple(bodies))
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {n: {"fail": False, "out": f"{{out}}/{n}"} for n in bodies})
    return nbs


def test_jobs_run_independent_notebooks_side_by_side_and_keep_dependencies(tmp_path, monkeypatch):
    nbs = _parallel_setup(tmp_path, monkeypatch, {"train": "time.sleep(4)", "evaluate": "",
                                                  "quickstart": "time.sleep(4)"})
    out, stream = tmp_path / "reports", io.StringIO()
    assert report.run_report(out, overrides={"data_root": str(tmp_path)}, kernel_name="python3", notebook_dir=nbs,
                             stream=stream, jobs=2) == 0
    t = {n: json.loads((out / n / "metrics.json").read_text()) for n in ("train", "evaluate", "quickstart")}
    assert t["train"]["t0"] < t["quickstart"]["t1"] and t["quickstart"]["t0"] < t["train"]["t1"]  # overlapped
    assert t["evaluate"]["t0"] > t["train"]["t1"]  # started after its prerequisite ended
    text = stream.getvalue()
    assert "report: 3 notebook(s)" in text and all(f"{n}: done in" in text for n in t)
    assert all(json.loads((out / n / report.RECORD).read_text())["status"] == "ok" for n in t)


def test_a_smoke_entry_is_marked_in_its_record_and_the_index(tmp_path, monkeypatch):
    """A --smoke check beside a full report's entries looked like results in index.html ("ok" like the rest); only
    the command line on the entry's page said --smoke. In-process (--jobs 1) and in entry processes alike."""
    nbs = _parallel_setup(tmp_path, monkeypatch, {"train": "", "quickstart": ""})
    monkeypatch.setattr(report, "SMOKE_PARAMETERS", report.REPORT_PARAMETERS)
    out, run = tmp_path / "reports", dict(overrides={"data_root": str(tmp_path)}, kernel_name="python3",
                                          notebook_dir=nbs, stream=io.StringIO())
    assert report.run_report(out, only="train", smoke=True, jobs=1, **run) == 0
    assert report.run_report(out, smoke=True, jobs=2, **run) == 0
    assert all(json.loads((out / n / report.RECORD).read_text()).get("smoke") is True for n in ("train", "quickstart"))
    assert report.run_report(out, only="quickstart", **run) == 0  # a full run replaces the smoke one
    assert "smoke" not in json.loads((out / "quickstart" / report.RECORD).read_text())
    page = (out / "index.html").read_text()
    train, quickstart = (page.split(f"<section id='{n}'>")[1].split("</section>")[0] for n in ("train", "quickstart"))
    assert "badge smoke" in train and "Smoke run" in train
    assert "badge smoke" not in quickstart and "Smoke run" not in quickstart
    contents = page.split("</nav>")[0]
    assert contents.count("badge smoke") == 1 and re.search(r"href='#train'>train</a> <span class='badge ok'>ok"
                                                             r"</span> <span class='badge smoke'>smoke", contents)


def test_jobs_an_entry_process_that_dies_is_one_failure_and_its_previous_results_come_back(tmp_path, monkeypatch,
                                                                                         request):
    """An entry process killed outright (the out-of-memory killer's SIGKILL, here from its own kernel) cannot put
    its folder back, send a result or remove its kernel's connection file and sockets: the report does all three
    for it, in one line, and goes on."""
    import shutil
    import tempfile

    nbs = _parallel_setup(tmp_path, monkeypatch, {"train": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                                                  "quickstart": ""})
    scratch = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))  # short: the kernels' sockets fit in it
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))  # a failed assert below kept it
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out, stream = tmp_path / "reports", io.StringIO()
    (out / "train").mkdir(parents=True)
    (out / "train" / "keep.txt").write_text("previous")
    (out / "train" / report.RECORD).write_text('{"status": "ok", "started": "2000-01-01T00:00:00"}')
    code = report.run_report(out, overrides={"data_root": str(tmp_path)}, kernel_name="python3", notebook_dir=nbs,
                             stream=stream, jobs=2)
    text = stream.getvalue()
    assert code == EXIT_FOUND and "Traceback" not in text
    assert "train: FAILED" in text and "its process ended without a result (killed by SIGKILL" in text
    assert (out / "train" / "keep.txt").read_text() == "previous" and not (out / ".train.previous").exists()
    failed = json.loads((out / report.FAILED_DIR / "train" / report.RECORD).read_text())
    assert failed["status"] == "failed" and "SIGKILL" in failed["error"]
    assert (out / "quickstart" / "metrics.json").is_file()  # the entry beside it finished
    assert "badge failed" in (out / "index.html").read_text()
    left = sorted(p.name for p in scratch.iterdir())
    assert left == [], left  # the killed entry's kernel folder (kernel.json with its key, five sockets) was left


def test_jobs_from_a_script_without_a_main_guard_says_what_to_change(tmp_path):
    """Entry processes import the script that started them: an unguarded run_report(jobs=2) there ran a second
    report, which blamed a locked folder."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nfrom cirlab import report\n"
                      "report.ORDER = ('train', 'quickstart')\n"
                      "report.REPORT_PARAMETERS = {n: {'fail': False, 'out': '{out}/' + n} for n in report.ORDER}\n"
                      f"sys.exit(report.run_report({str(tmp_path / 'reports')!r}, kernel_name='python3', jobs=2, "
                      f"notebook_dir={str(tmp_path)!r}, overrides={{'data_root': {str(tmp_path)!r}}}))\n")
    for name in ("train", "quickstart"):
        _notebook(tmp_path / f"{name}.ipynb", "pass")
    previous = tmp_path / "reports" / "train"  # results of an earlier report, which the dead entry never touched
    previous.mkdir(parents=True)
    (previous / "keep.txt").write_text("previous")
    (previous / report.RECORD).write_text('{"status": "ok", "started": "2000-01-01T00:00:00"}')
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == EXIT_FOUND, run.stderr
    assert "put the call under `if __name__ == \"__main__\":`" in run.stderr and "in use by" not in run.stderr
    assert "Traceback" not in run.stderr
    assert "train: FAILED" in run.stdout and "ended without a result (exit code 1)" in run.stdout
    assert (previous / "keep.txt").read_text() == "previous"  # left in place, not moved to _failed
    assert json.loads((previous / report.RECORD).read_text())["status"] == "ok"
    assert json.loads((tmp_path / "reports" / report.FAILED_DIR / "train" / report.RECORD).read_text())["status"] \
        == "failed"


def test_jobs_a_failure_starts_nothing_new_and_keeps_what_ran(tmp_path, monkeypatch):
    nbs = _parallel_setup(tmp_path, monkeypatch, {"train": "raise ValueError('broken train')", "evaluate": "",
                                                  "quickstart": "time.sleep(3)"})
    out, stream = tmp_path / "reports", io.StringIO()
    code = report.run_report(out, overrides={"data_root": str(tmp_path)}, kernel_name="python3", notebook_dir=nbs,
                             stream=stream, jobs=2)
    assert code == EXIT_FOUND
    text = stream.getvalue()
    assert "train: FAILED" in text and "broken train" in text
    assert (out / "quickstart" / "metrics.json").is_file()  # the one running beside it finished
    assert not (out / "evaluate").exists() and "evaluate: running" not in text  # its prerequisite failed
    assert "badge failed" in (out / "index.html").read_text()
    with pytest.raises(ValueError, match="jobs"):
        report.run_report(out, jobs=0, stream=None)


_SIGTERM_SCRIPT = """
import faulthandler
import signal
import sys
from cirlab import cli, report

faulthandler.register(signal.SIGUSR2, all_threads=True)  # the test asks for the stacks of a report that hangs
# Ctrl-C as a terminal's foreground job gets it: a test run started in the background of a non-interactive shell
# passes SIGINT down ignored, and the report then (rightly) leaves an ignored Ctrl-C alone
signal.signal(signal.SIGINT, signal.default_int_handler)
# SIGHUP likewise: under nohup (a CI job, `nohup make test`) it comes ignored, and the report leaves it ignored
signal.signal(signal.SIGHUP, signal.SIG_DFL)

if __name__ == "__main__":
    names = ("train", "evaluate", "quickstart")
    report.ORDER = names
    report.REPORT_PARAMETERS = {n: {"fail": False, "out": "{out}/" + n} for n in names}
    sys.exit(cli.main(["report", "--out", sys.argv[1], "--notebooks", sys.argv[2], "--kernel", "python3",
                       "--set", "data_root=" + sys.argv[3], "--jobs", sys.argv[4]]))
"""


@pytest.mark.parametrize("jobs, how", [(1, "SIGTERM"), (1, "Ctrl-C"), (2, "SIGTERM"), (2, "Ctrl-C"), (1, "SIGHUP"),
                                       (2, "SIGHUP")])
def test_kill_or_ctrl_c_stops_kernels_puts_results_back_and_leaves_no_files(tmp_path, request, jobs, how):
    """`kill` (SIGTERM to the report), a closed terminal (SIGHUP: it ended the report at once, its lock and an
    entry's previous results left aside) or Ctrl-C (SIGINT to its process group, kernels included) of a running
    report: exit 128 + the signal with one line, no traceback; every kernel stopped, its IPC sockets and connection
    file removed; the running entries' previous results put back."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    for name in ("train", "evaluate", "quickstart"):
        _notebook(nbs / f"{name}.ipynb", "import time\npathlib.Path(out).mkdir(parents=True, exist_ok=True)\n"
                                         "time.sleep(120)")
    out = tmp_path / "reports"
    (out / "train").mkdir(parents=True)
    (out / "train" / "keep.txt").write_text("previous")
    (out / "train" / report.RECORD).write_text("{}")  # a previous report's entry
    # a TMPDIR short enough for the kernels' sockets to live in it (pytest's tmp_path is not), so that what they
    # leave behind can be counted; report.ipc_prefix would move them to /tmp otherwise
    scratch = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    assert report.ipc_prefix(str(scratch)).startswith(str(scratch))
    script = tmp_path / "run_report.py"
    script.write_text(_SIGTERM_SCRIPT)
    log = tmp_path / "stdout.txt"
    env = {**os.environ, "TMPDIR": str(scratch), "JUPYTER_RUNTIME_DIR": str(scratch / "runtime")}
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(nbs), str(tmp_path), str(jobs)],
                                stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group, as a terminal's job
    started = ("train: cell 2/2",) if jobs == 1 else ("train: cell 2/2", "quickstart: cell 2/2")
    deadline = time.time() + 120
    while time.time() < deadline and not all(s in log.read_text() for s in started):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(1.0)  # inside the sleeping cell
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack, then stop it and its kernels
        proc.send_signal(signal.SIGUSR2)
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the report did not stop within 90 s of {how}\nits output:\n{log.read_text()}\n"
                    f"its stderr and stacks:\n{err}")
    text = log.read_text()
    killed = how != "Ctrl-C"
    assert proc.returncode == (128 + getattr(signal, how) if killed else 130), (text, err)
    assert (f"terminated ({how})" if killed else "interrupted") in err
    assert "Traceback" not in err + text and "Kernel died" not in err + text
    assert f"train: stopped by {how}" in text and f"report: stopped by {how}" in text  # Ctrl-C said nothing more
    if jobs == 1:  # what the user is left with: the results in place and this run's partial output
        assert f"{out / 'train'} keeps its previous results; this run's partial output: " \
               f"{out / report.FAILED_DIR / 'train'}" in text
    assert (out / "index.html").is_file()  # written again, the entry marked failed (after Ctrl-C it was not)
    assert (out / "train" / "keep.txt").read_text() == "previous"  # the previous results, put back
    assert (out / report.FAILED_DIR / "train" / report.RECORD).is_file()
    assert not (out / "quickstart").exists() and not list(out.glob(".*.previous"))
    leftovers = [p.name for p in scratch.rglob("*") if p.name.startswith("cirlab-kernel-") or p.suffix == ".json"]
    assert leftovers == []  # IPC sockets and kernel connection files removed
    assert not scratch.stat().st_mode & 0o1000  # the sticky bit jupyter_client sets on a connection file's folder
    if os.path.isdir("/proc"):  # no kernel left running: their command lines name a connection file in scratch
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                alive += [cmdline.parent.name] if str(scratch) in cmdline.read_text() else []
            except OSError:
                pass
        assert alive == []


def test_kernel_sockets_fit_a_unix_socket_path_under_a_long_tmpdir(tmp_path):
    """zmq refuses IPC paths over 107 bytes ("File name too long"): a long TMPDIR moves the sockets to /tmp."""
    long_dir = str(tmp_path / ("x" * 90))
    prefix = report.ipc_prefix(long_dir)
    import zmq

    assert len(prefix) + len("-65535") <= zmq.IPC_PATH_MAX_LEN
    assert prefix.startswith("/tmp/cirlab-kernel-") and prefix != report.ipc_prefix(long_dir)  # unique per kernel
    assert report.ipc_prefix("/tmp").startswith("/tmp/cirlab-kernel-")


def test_an_entry_folder_a_live_training_holds_is_not_moved_aside(tmp_path, monkeypatch):
    """A user's `cirlab train --output-dir reports/train` running while a report starts: the report moved the live
    run aside, the training wrote into the notebook's new folder, and the report's clean-up deleted the run.
    The folder's lock is taken for the rename: one line naming the holder, nothing moved."""
    from cirlab.core.io import FolderLockedError, folder_lock

    out = tmp_path / "reports"
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / report.RECORD).write_text("{}")  # the demo's entry, which the user continued
    (out / "train" / "checkpoints" / "last.pt").write_bytes(b"live")
    monkeypatch.setattr(report, "run_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    monkeypatch.setattr(report, "ensure_synthetic_data", lambda *a, **k: pytest.fail("data built before the check"))
    with held_by_another_thread(lambda: folder_lock(out / "train")):  # the user's training
        with pytest.raises(FolderLockedError, match=r"reports[/\\]train is in use by another cirlab process"):
            report.run_entry("train", {}, out, notebook_dir=tmp_path / "none")
        # the whole report finds it before the data and any entry (it stopped midway, at that entry's turn)
        with pytest.raises(FolderLockedError, match=r"--out .*reports: entry train: .*in use by another cirlab"):
            report.run_report(out, only="train", stream=io.StringIO())
    assert (out / "train" / "checkpoints" / "last.pt").read_bytes() == b"live"
    assert not (out / ".train.previous").exists()


def test_a_second_report_names_the_running_one_not_its_entry_being_written(tmp_path, monkeypatch):
    """While a first report writes an entry for the first time (no report.json yet), a second report into the same
    --out said the entry was not written by cirlab report and to move it away."""
    from cirlab.core.io import FolderLockedError, folder_lock

    out = tmp_path / "reports"
    (out / "train").mkdir(parents=True)
    (out / "train" / "log.jsonl").write_text("")  # the first report's notebook, training
    with held_by_another_thread(lambda: folder_lock(out)):  # the first report
        with pytest.raises(FolderLockedError, match="is in use by another cirlab process"):
            report.run_report(out, only="train", stream=io.StringIO())


def test_a_folder_no_report_wrote_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """`--out runs` must not move a training run at runs/train aside and delete it."""
    out = tmp_path / "runs"
    (out / "train").mkdir(parents=True)
    (out / "train" / "best.pt").write_bytes(b"weights")
    monkeypatch.setattr(report, "ensure_synthetic_data", lambda *a, **k: pytest.fail("data built before the check"))
    with pytest.raises(ValueError, match=r"runs[/\\]train exists and was not written by cirlab report"):
        report.run_report(out, only="train", stream=io.StringIO())
    with pytest.raises(ValueError, match="not written by cirlab report"):
        report.run_entry("train", {}, out, notebook_dir=tmp_path / "none")
    assert (out / "train" / "best.pt").read_bytes() == b"weights" and not list(out.glob(".*"))
    (out / "train" / report.RECORD).write_text("{}")  # a report's own entry is replaced as before
    assert report.foreign_entry_folder(out, "train") is None
    (out / "evaluate").mkdir()  # an empty folder holds nothing to lose
    assert report.foreign_entry_folder(out, "evaluate") is None
    parser = argparse.ArgumentParser()
    report.register_cli(parser.add_subparsers())
    args = parser.parse_args(["report", "--only", "rank_shift", "--out", str(out)])
    (out / "evaluate" / "notes.txt").write_text("mine")
    (out / "rank_shift").mkdir()
    (out / "rank_shift" / "a.png").write_bytes(b"x")
    with pytest.raises(report.ReportFolderError, match=r"evaluate, .*rank_shift exist and were not written"):
        args.func(args)  # a CirlabError: `cirlab` logs it as one line (tests/test_faults.py runs the command)
    mine = tmp_path / "site"  # the user's own index.html was silently replaced by the report's page
    mine.mkdir()
    (mine / "index.html").write_text("<html>my page</html>")
    with pytest.raises(report.ReportFolderError, match=r"index\.html exists and was not written by cirlab report"):
        report.run_report(mine, only="train", stream=io.StringIO())
    assert (mine / "index.html").read_text() == "<html>my page</html>"
    report.write_index(mine / "own")  # a report's own index is its to replace
    report.check_entry_folders(mine / "own", ["train"])


def test_set_values_are_checked_against_the_notebooks_declared_types_before_any_work(tmp_path, caplog):
    # `--set k=abc` ran the train prerequisite and then failed in the evaluate notebook's cell 5
    with pytest.raises(ValueError, match=r"--set k='abc': evaluate's parameter k is an int \(k: int = 50\), not str"):
        report.check_override_types({"k": "abc"}, ["train", "evaluate"])
    with pytest.raises(ValueError, match=r"--set evaluate\.include_untrained=1: .* is a bool .*not int"):
        report.check_override_types({"evaluate.include_untrained": 1}, ["evaluate"])
    with pytest.raises(ValueError, match=r"--set train\.epochs=2\.5: train's parameter epochs is an int"):
        report.check_override_types({"train.epochs": 2.5}, ["train"])
    # a list parameter takes one string (as_list), a str parameter a number; another entry's key is not checked
    report.check_override_types({"runs": "/a/run", "query_id": 5, "train_dime.epochs": "x"}, ["evaluate",
                                                                                               "router_explorer"])
    for table in (report.REPORT_PARAMETERS, report.SMOKE_PARAMETERS):  # the report's own values fit the notebooks
        for name, params in table.items():
            report.check_override_types({f"{name}.{k}": v for k, v in params.items()}, [name])
    with caplog.at_level(logging.ERROR):
        assert report.main(["--out", str(tmp_path / "r"), "--only", "evaluate", "--set", "k=abc"]) == 2
    assert "evaluate's parameter k is an int" in caplog.text
    assert not (tmp_path / "r").exists()  # refused before the folder, the data or the train prerequisite


def test_a_missing_notebook_is_named_before_any_notebook_runs(tmp_path, capsys, caplog):
    with caplog.at_level(logging.ERROR):
        assert report.main(["--out", str(tmp_path / "r"), "--notebooks", str(tmp_path / "none")]) == 2
    # a folder that is not there is said to be missing (it suggested `jupytext --sync` on a path in it)
    assert f"--notebooks {tmp_path / 'none'}: no such folder" in caplog.text
    (tmp_path / "empty").mkdir()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert report.main(["--out", str(tmp_path / "r"), "--notebooks", str(tmp_path / "empty")]) == 2
    assert f"notebook not found: {tmp_path / 'empty' / 'train.ipynb'}" in caplog.text
    assert "running notebook" not in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_a_stopped_notebooks_abandoned_cell_task_is_not_reported_when_collected_later(capsys):
    """Ctrl-C unwinds nbclient's event loop and leaves its cell task behind; the kernel stopped, the task ends with
    DeadKernelError and is only freed by the garbage collector, possibly after the stop's quiet loggers were put
    back (an entry process's exit, under --jobs 2): asyncio's traceback for it must not reach the terminal. Any
    other task's lost exception still does."""
    import asyncio
    import gc
    import logging

    from nbclient.exceptions import DeadKernelError

    class NotebookClient:  # the name asyncio's report shows for nbclient's coroutine
        async def async_execute_cell(self):
            raise DeadKernelError("Kernel died")

    async def someone_elses():
        raise RuntimeError("a real bug")

    def abandon(coro) -> None:
        loop = asyncio.new_event_loop()
        loop.create_task(coro)
        loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody asks for its exception
        loop.close()

    asyncio_log = logging.getLogger("asyncio")
    handler = logging.StreamHandler()  # what the terminal shows of asyncio's logger
    asyncio_log.addHandler(handler)
    level = asyncio_log.level
    try:
        report._quiet_dead_kernel_logs()  # a stop
        asyncio_log.setLevel(level)  # ... and the block's end, which puts the levels back
        abandon(NotebookClient().async_execute_cell())
        gc.collect()
        assert "never retrieved" not in capsys.readouterr().err
        abandon(someone_elses())
        gc.collect()
        err = capsys.readouterr().err
        assert "Task exception was never retrieved" in err and "a real bug" in err
    finally:
        asyncio_log.removeHandler(handler)
        logging.getLogger("papermill").setLevel(logging.NOTSET)


def test_an_unknown_kernel_is_one_line_before_any_work(tmp_path, monkeypatch):
    from cirlab.core.errors import ConfigError

    monkeypatch.setattr(report, "ensure_synthetic_data", lambda *a, **k: pytest.fail("data built before the check"))
    with pytest.raises(ConfigError, match=r"--kernel pythn3: no Jupyter kernel .*did you mean 'python3'.*installed: "):
        report.run_report(tmp_path / "r", only="evaluate", kernel_name="pythn3", stream=io.StringIO())
    assert not (tmp_path / "r").exists()


def test_a_missing_data_root_is_refused_before_any_kernel_starts(tmp_path, monkeypatch, caplog, capsys):
    # it started the train notebook, which failed in its second cell (exit 1, the error on stdout, rep/_failed)
    monkeypatch.setattr(report, "ensure_synthetic_data", lambda *a, **k: pytest.fail("data built before the check"))
    monkeypatch.setattr(report, "run_entry", lambda *a, **k: pytest.fail("a notebook started before the check"))
    missing = tmp_path / "nope"
    with caplog.at_level(logging.ERROR):
        code = report.main(["--only", "train", "--smoke", "--out", str(tmp_path / "rep"), "--set",
                            f"data_root={missing}"])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"--set data_root={missing}: {missing} does not exist: point it at your data, or write the synthetic set "
        f"there with `cirlab data synth --out {missing}`"]
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "rep").exists()


def test_set_paths_are_made_absolute_and_must_exist_unless_a_prerequisite_writes_them(tmp_path, monkeypatch):
    from cirlab.core.errors import MissingPathError

    monkeypatch.chdir(tmp_path)  # the kernels run in <out>/<entry>/: a relative path meant another folder there
    (tmp_path / "data").mkdir()
    out, names = tmp_path / "rep", report.plan()
    given = {"data_root": "data", "evaluate.runs": ["rep/train"], "rank_shift.before": "rep/evaluate/topk/untrained",
             "router_explorer.compare": "untrained", "train.resume": "auto", "k": 5}
    assert report.resolve_input_paths(given, names, out) == {
        **given, "data_root": str(tmp_path / "data"), "evaluate.runs": [str(out / "train")],
        "rank_shift.before": str(out / "evaluate" / "topk" / "untrained")}
    for bad, missing in (({"train.data_root": "rep/train"}, out / "train"),  # no entry writes data
                         ({"evaluate.runs": ["rep/train", "rep/train_dime"]}, out / "train_dime"),  # not waited for
                         ({"train.resume": "old/last.pt"}, tmp_path / "old" / "last.pt"),
                         ({"router_explorer.run_dir": "rep/trian"}, out / "trian")):
        with pytest.raises(MissingPathError, match=re.escape(f"{missing} does not exist")):
            report.resolve_input_paths(bad, names, out)
    # only the entries that run are checked: a path for one that does not is not read
    assert report.resolve_input_paths({"train.resume": "old/last.pt"}, ["evaluate"], out)


def test_a_failed_notebook_is_also_an_error_line_on_stderr(tmp_path, monkeypatch, caplog):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "evaluate.ipynb", "if fail: raise ValueError('broken on purpose')")
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {**report.REPORT_PARAMETERS,
                                                      "evaluate": {"fail": True, "out": "{out}/evaluate"}})
    out = tmp_path / "reports"
    (out / "train").mkdir(parents=True)
    (out / "train" / "metrics.json").write_text("{}")  # prerequisite present: only evaluate runs
    stream = io.StringIO()
    with caplog.at_level(logging.ERROR):
        code = report.run_report(out, only="evaluate", overrides={"data_root": str(tmp_path)}, kernel_name="python3",
                                 notebook_dir=nbs, stream=stream)
    assert code == EXIT_FOUND and "[1/1] evaluate: FAILED" in stream.getvalue()  # the progress (stdout) says it
    # ... and so does the log (stderr), in one line: with stdout sent to a file the terminal showed nothing
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and re.fullmatch(r"evaluate: cell 2/2 \(In \[\d+\] of evaluate\.ipynb\) failed: "
                                             r"ValueError: broken on purpose", errors[0]), errors


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # json itself runs out of stack
    # json decodes this, but near its own limit the index's flattening and printing then ran out of stack:
    # anything deeper than report files nest is refused
    '{"a": ' * 150 + "1" + "}" * 150,
])
def test_index_of_a_folder_with_json_nested_too_deeply(tmp_path, text):
    """A report folder from elsewhere: deep JSON in a run record or metrics.json raised RecursionError."""
    for name in ("train", "evaluate"):
        (tmp_path / name).mkdir()
    (tmp_path / "train" / report.RECORD).write_text(text)
    (tmp_path / "evaluate" / report.RECORD).write_text('{"status": "ok", "parameters": {"p": ' + text + "}}")
    (tmp_path / "evaluate" / "metrics.json").write_text(text)
    page = report.write_index(tmp_path).read_text()
    assert "<section id='train'>" in page and "no run record" in page
    assert "metrics unreadable: metrics.json: nested too deeply" in page


def test_index_of_a_folder_with_a_metrics_file_that_is_no_utf8(tmp_path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "metrics.json").write_bytes(b'{"R@1": \xff}')
    page = report.write_index(tmp_path).read_text()
    assert "metrics unreadable: &#x27;utf-8&#x27; codec can&#x27;t decode byte 0xff" in page


def test_jobs_auto_counts_the_cpus_allocated_to_this_process(monkeypatch):
    """--jobs auto read the node's core count: a batch job given 1 CPU of a 64-core node ran two notebooks on it."""
    monkeypatch.setattr(report, "allocated_cpus", lambda: (1, True))
    assert report._jobs("auto") == 1
    monkeypatch.setattr(report, "allocated_cpus", lambda: (8, True))
    assert report._jobs("auto") == 2 and report._jobs("3") == 3


def test_the_index_and_the_notebook_pages_serve_screen_readers_and_zoom(tmp_path):
    """Figures' alt text was their file name (a screen reader's only name for the link), the page had no language,
    no viewport and a 520 px minimum column (sideways scrolling at 200 % zoom), table rows had no headers, and every
    notebook page was titled "Notebook"."""
    import html

    import nbformat

    figures = tmp_path / "evaluate" / "figures"
    figures.mkdir(parents=True)
    (figures / "per_category.png").write_bytes(b"\x89PNG")
    (tmp_path / "evaluate" / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {"k": 10}}))
    page = report.write_index(tmp_path).read_text()
    assert page.startswith("<!doctype html><html lang='en'>") and "name='viewport'" in page
    assert "minmax(min(520px,100%),1fr)" in page
    caption = report.figure_caption("evaluate", "per_category")
    assert caption and f"alt='per_category: {html.escape(caption, quote=True)}'" in page
    assert "<th scope='row'>k</th>" in page and "<th scope='col'>parameter</th>" in page
    notebook = tmp_path / "train_dime.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# DIME")]), notebook)
    assert "<title>train_dime</title>" in report.export_html(notebook).read_text(encoding="utf-8")


def test_notebook_pages_give_each_figure_an_alt_text_naming_its_section(tmp_path):
    """nbconvert wrote "No description has been provided for this image" on every figure of the notebook pages."""
    import base64

    import nbformat

    v4 = nbformat.v4

    def figure(i: int, **more: str):
        png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes([i])).decode()
        return v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>", **more})

    # a widget view with a PNG fallback and no saved widget state is drawn as its image: it broke a count of images
    widget = figure(9, **{"application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2,
                                                                        "version_minor": 0}})
    table = figure(8, **{"text/html": "<table></table>"})  # drawn as the table: no image on the page
    cells = [v4.new_code_cell("fig", outputs=[figure(1)]), v4.new_markdown_cell("# Title\n## Retrieval galleries"),
             v4.new_code_cell("x", outputs=[figure(2), table, widget, figure(3)]), v4.new_markdown_cell("text only"),
             v4.new_code_cell("y", outputs=[figure(4)])]
    notebook = tmp_path / "evaluate.ipynb"
    nbformat.write(v4.new_notebook(cells=cells), notebook)
    page = report.export_html(notebook).read_text(encoding="utf-8")
    alts = re.findall(r'<img alt="([^"]*)"', page) or re.findall(r'alt="([^"]*)"', page)
    assert alts == ["figure 1 of the notebook"] + [
        f"figure {i} in section \u201cRetrieval galleries\u201d of the notebook" for i in (1, 2, 3, 4)]
    assert "No description has been provided" not in page


def test_a_progress_line_is_written_once_under_verbose_logging(caplog):
    """`cirlab -v report > log 2>&1` had every progress line twice (stdout and a DEBUG record of it)."""
    import io

    out = io.StringIO()
    with caplog.at_level(logging.DEBUG, logger="cirlab.workbench.report"):
        report._say(out, "[1/1] train: cell 1/6")
        report._say(None, "[1/1] quiet caller")
    assert out.getvalue() == "[1/1] train: cell 1/6\n"
    assert [r.getMessage() for r in caplog.records] == ["[1/1] quiet caller"]


def test_an_entry_that_mixes_data_with_its_prerequisite_or_its_previous_run_says_so(tmp_path):
    """`--only evaluate` after a `--smoke` train scored the 2-step smoke model on the full data and the index showed
    both "ok"; a `--smoke --only train` replaced a full train entry without a word."""
    out = tmp_path / "reports"
    for name, data in (("train", "/cache/synthetic/tiny-seed0-64px"), ("evaluate", "/cache/synthetic/tiny-seed0-64px")):
        (out / name).mkdir(parents=True)
        (out / name / report.RECORD).write_text(json.dumps({"status": "ok", "parameters": {"data_root": data}}))
    full = {"data_root": "/cache/synthetic/default-seed0-64px"}
    assert report._other_data_notes(out, "rank_shift", {"data_root": "/cache/synthetic/tiny-seed0-64px"}) == []
    notes = report._other_data_notes(out, "evaluate", full)
    assert notes[0].startswith(f"NOTE: it reads {out / 'train'}, which ran on other data (/cache/synthetic/tiny-seed0")
    assert notes[1] == ("NOTE: it replaces results made on other data (/cache/synthetic/tiny-seed0-64px; this run: "
                        "/cache/synthetic/default-seed0-64px)")
    assert report._other_data_notes(out, "router_explorer_dime", full) == []  # no record of its own or train_dime's
