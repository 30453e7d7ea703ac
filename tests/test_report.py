"""`cirlab report`: parameters, overrides, ordering, the index page and failure handling."""
from __future__ import annotations

import argparse
import io
import json

import pytest

from cirlab import report


def test_parse_set_reads_yaml_values():
    assert report.parse_set(["max_steps=10", "train.device=cuda", "runs=[a, b]", "interactive=true", "resume="]) == {
        "max_steps": 10, "train.device": "cuda", "runs": ["a", "b"], "interactive": True, "resume": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        report.parse_set(["max_steps"])
    assert report.parse_set(["lr=2e-4"]) == {"lr": 2e-4}  # the same parser as cirlab train --set (YAML 1.1 fixed)


def test_parameters_fill_paths_and_apply_overrides(tmp_path):
    p = report.notebook_parameters("evaluate", tmp_path, "/data", overrides={"k": 7, "train.k": 99})
    assert p["runs"] == [f"{tmp_path}/train"] and p["data_root"] == "/data" and p["k"] == 7
    t = report.notebook_parameters("train", tmp_path, "/data", smoke=True, overrides={"train.max_steps": 5, "k": 1})
    assert t["max_steps"] == 5 and "k" not in t and t["output_dir"] == f"{tmp_path}/train"
    assert report.SMOKE_PARAMETERS["train"]["max_steps"] < report.REPORT_PARAMETERS["train"]["max_steps"]


def test_unknown_overrides_fail_early():
    with pytest.raises(ValueError, match="no such parameter"):
        report.check_overrides({"max_step": 3}, list(report.ORDER))
    with pytest.raises(ValueError, match="unknown notebook"):
        report.check_overrides({"trian.max_steps": 3}, list(report.ORDER))
    report.check_overrides({"rank_shift.pool_k": 3, "data_root": "/x"}, list(report.ORDER))


def test_plan_orders_by_dependency_and_adds_missing_prerequisites(tmp_path):
    assert report.plan() == ["train", "evaluate", "router_explorer", "rank_shift", "train_dime",
                             "router_explorer_dime", "quickstart"]
    assert report.plan(with_optional=False) == ["train", "evaluate", "router_explorer", "rank_shift", "quickstart"]
    assert report.plan("router_explorer_dime", tmp_path) == ["train_dime", "router_explorer_dime"]
    assert report.plan("rank_shift", tmp_path) == ["train", "evaluate", "rank_shift"]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text("{}")
    assert report.plan("rank_shift", tmp_path) == ["evaluate", "rank_shift"]
    assert report.plan("router_explorer", tmp_path) == ["router_explorer"]
    with pytest.raises(ValueError, match="unknown notebook"):
        report.plan("nope")


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


def test_index_links_files_tables_and_figures(tmp_path):
    folder = tmp_path / "evaluate"
    (folder / "figures").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"runs": {"train": {"avg_R@10": 12.5}}}))
    (folder / "evaluate.html").write_text("<html></html>")
    (folder / "figures" / "gallery.png").write_bytes(b"\x89PNG")
    page = report.write_index(tmp_path).read_text()
    assert "href='evaluate/evaluate.html'" in page and "src='evaluate/figures/gallery.png'" in page
    assert "runs/train/avg_R@10" in page and "12.500" in page
    assert "router_explorer" not in page  # absent notebooks are not linked


def test_register_cli_adds_report_command():
    parser = argparse.ArgumentParser(prog="cirlab")
    sub = parser.add_subparsers(dest="command")
    report.register_cli(sub)
    args = parser.parse_args(["report", "--only", "rank_shift", "--set", "pool_k=20", "--smoke", "--out", "x"])
    assert (args.only, args.set_, args.smoke, args.out, args.with_dime) == ("rank_shift", ["pool_k=20"], True, "x",
                                                                           True)
    assert not parser.parse_args(["report", "--no-dime"]).with_dime
    assert args.func is report._run_from_args
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--only", "nope"])


def test_failing_notebook_stops_the_report_with_its_error(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("pool_k: int = 1  # pool")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("import math"), params,
                nbformat.v4.new_code_cell("raise RuntimeError('broken cell ' + str(pool_k))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbs / "rank_shift.ipynb")
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {**report.REPORT_PARAMETERS, "rank_shift": {"pool_k": 3}})
    out = tmp_path / "reports"
    (out / "evaluate").mkdir(parents=True)
    (out / "evaluate" / "metrics.json").write_text("{}")  # prerequisite present: only rank_shift runs
    stream = io.StringIO()
    code = report.run_report(out, only="rank_shift", overrides={"data_root": str(tmp_path)}, kernel_name="python3",
                             notebook_dir=nbs, stream=stream)
    text = stream.getvalue()
    assert code == 1
    assert "[1/1] rank_shift: FAILED" in text and "RuntimeError: broken cell 3" in text
    assert (out / "rank_shift" / "rank_shift.ipynb").is_file() and (out / "index.html").is_file()
