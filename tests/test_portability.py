"""Artifacts that travel: a run folder moved or received from a colleague is resumed and evaluated where it is, a
notebook does not score a run on other data than it recorded, and a report re-run (or copied, or cloned) writes
the same bytes and the same index."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import cirlab
from cirlab.cli import main
from cirlab.core.errors import MissingPathError
import stub_models  # noqa: F401 - registers stub_cir


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def stub_run(tmp_path_factory) -> Path:
    """A 2-step stub_cir run on a Fashion-IQ tree (its config.yaml records the absolute dataset.root)."""
    from fixtures_data import write_fashioniq

    tmp = tmp_path_factory.mktemp("stub_run")
    root = write_fashioniq(tmp / "data", categories=("dress",))["root"]
    config = {"model": "stub_cir", "preset": "tiny", "model_overrides": {"embed_dim": 12},
              "dataset": {"name": "fashioniq", "root": str(root), "category": "dress"},
              "train": {"max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False,
                        "selection_metric": "avg"},
              "eval": {"splits": ["val"], "k": 5, "batch_size": 8}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp / "c.yaml"), "--output-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_a_moved_run_folder_resumes_in_the_folder_its_config_yaml_lies_in(stub_run, tmp_path, caplog):
    """`cirlab train RUN/config.yaml --resume` of a moved run started a fresh run at the path config.yaml recorded."""
    moved = tmp_path / "moved"
    shutil.copytree(stub_run, moved)
    recorded = yaml.safe_load((moved / "config.yaml").read_text())["output_dir"]
    shutil.move(str(stub_run), str(tmp_path / "away"))  # the old path is gone, as after `mv repo moved`
    try:
        caplog.set_level(logging.INFO)
        assert main(["train", str(moved / "config.yaml"), "--resume"]) == 0
        assert not Path(recorded).exists()  # not re-created and trained from step 0
        assert f"resumed from {moved / 'checkpoints' / 'last.pt'}" in caplog.text
        said = [r.getMessage() for r in caplog.records if "not the output_dir it records" in r.getMessage()]
        assert len(said) == 1 and str(moved) in said[0] and recorded in said[0]
    finally:
        shutil.move(str(tmp_path / "away"), str(stub_run))


def _run_recording(tmp_path: Path, root: Path) -> Path:
    """A run folder whose config.yaml records ``root`` as its Fashion-IQ data."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "stub_cir",
                                                     "dataset": {"name": "fashioniq", "root": str(root)}}))
    return run


def test_find_data_refuses_a_recorded_root_that_is_gone_instead_of_other_synthetic_data(tmp_path, monkeypatch):
    from cirlab import workbench

    monkeypatch.delenv("CIRLAB_DATA", raising=False)
    gone = tmp_path / "colleague" / "fiq"
    run = _run_recording(tmp_path, gone)
    with pytest.raises(MissingPathError) as err:
        workbench.find_data("fashioniq", "", run_dir=run)
    message = str(err.value)
    assert str(gone) in message and str(run / "config.yaml") in message and "data_root=" in message
    assert "\n" not in message
    # an explicit data_root, then CIRLAB_DATA, still come before the run's recorded root
    here = tmp_path / "here"
    here.mkdir()
    assert workbench.find_data("fashioniq", str(here), run_dir=run) == here.resolve()
    monkeypatch.setenv("CIRLAB_DATA", str(here))
    assert workbench.find_data("fashioniq", "", run_dir=run) == here.resolve()


def test_find_data_makes_a_gone_synthetic_root_again_with_its_size_seed_and_image_size(tmp_path, monkeypatch,
                                                                                       caplog):
    from cirlab import workbench

    monkeypatch.delenv("CIRLAB_DATA", raising=False)
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    gone = tmp_path / "old_cache" / "synthetic" / "tiny-seed3-32px" / "fashioniq"
    run = _run_recording(tmp_path, gone)
    found = workbench.find_data("fashioniq", "", run_dir=run)  # was: the default-size set, without a word
    assert found == (tmp_path / "cache" / "synthetic" / "tiny-seed3-32px" / "fashioniq").resolve()
    assert found.is_dir() and str(gone) in caplog.text and "size tiny, seed 3, 32-px" in caplog.text


def test_find_data_reads_the_synthetic_set_a_shipped_config_recorded(tmp_path, monkeypatch, caplog):
    """A run of configs/amc_synthetic_tiny.yaml records root "" and dataset.synthetic {size: tiny, ...}: the
    notebooks read the default-size set for it (400 val queries per category, not the run's 80)."""
    import logging

    from cirlab import workbench

    monkeypatch.delenv("CIRLAB_DATA", raising=False)
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "amc", "dataset": {
        "name": "fashioniq", "root": "", "synthetic": {"size": "tiny", "seed": 2, "image_size": 32}}}))
    with caplog.at_level(logging.INFO, logger="cirlab"):
        found = workbench.find_data("fashioniq", "", run_dir=run)
    assert found == (tmp_path / "cache" / "synthetic" / "tiny-seed2-32px").resolve() and found.is_dir()
    assert "size tiny, seed 2, 32-px" in caplog.text


def test_eval_of_a_run_whose_recorded_root_is_gone_says_where_it_was_recorded(stub_run, tmp_path, monkeypatch,
                                                                               caplog, capsys):
    received = tmp_path / "received"
    shutil.copytree(stub_run, received)
    stored = yaml.safe_load((received / "config.yaml").read_text())
    data = Path(stored["dataset"]["root"])
    stored["dataset"]["root"] = str(tmp_path / "gone" / "fashioniq")  # the colleague's path, not on this machine
    (received / "config.yaml").write_text(yaml.safe_dump(stored))
    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path))  # a recorded root comes before it: it must not be advised
    assert main(["eval", str(received), "--split", "val"]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"recorded in {received / 'config.yaml'}" in errors[0] and "--root PATH" in errors[0]
    assert "given root" not in errors[0] and "CIRLAB_DATA" not in errors[0]
    capsys.readouterr()
    assert main(["eval", str(received), "--split", "val", "--root", str(data)]) == 0
    trained = json.loads((received / "metrics.json").read_text())["splits"]["val"]
    assert json.loads(capsys.readouterr().out)["splits"]["val"] == pytest.approx(trained)


def test_a_moved_reranker_names_its_config_yaml_and_the_flag_not_other_data(tmp_path, caplog, capsys):
    """Stage I and stage II moved together: no "trained on other data" warning, an error naming the fix."""
    from cirlab.data.generators import synthetic
    from cirlab.models import blip_interop as bi

    size = dataclasses.replace(synthetic.SIZES["tiny"], cirr=(16, 16, 8))
    root = Path(synthetic.generate(tmp_path / "data", size=size, layouts=["cirr"], image_size=32)
                ["layouts"]["cirr"]["root"])
    project = tmp_path / "project"
    project.mkdir()
    torch.manual_seed(0)
    blip = cirlab.create_model("blip_rerank_stage1", preset="tiny")
    torch.save({"model": {**bi.export_stage1(blip), "text_decoder.cls.bias": torch.zeros(3)}}, tmp_path / "base.pth")
    run1, run2 = project / "stage1", project / "stage2"

    def config(model: str, overrides: dict, eval_section: dict) -> str:
        path = tmp_path / f"{model}.yaml"
        path.write_text(yaml.safe_dump({
            "model": model, "preset": "tiny", "model_overrides": overrides,
            "dataset": {"name": "cirr", "root": str(root), "test_split": "test1"},
            "train": {"epochs": 1, "max_steps": 1, "batch_size": 8, "progress": "none", "tensorboard": False,
                      "selection": "val"},
            "eval": {"splits": ["val"], "batch_size": 16, **eval_section}}))
        return str(path)

    assert main(["train", config("blip_rerank_stage1", {"init_from": str(tmp_path / "base.pth")}, {"k": 30}),
                 "--output-dir", str(run1)]) == 0
    assert main(["train", config("blip_rerank_stage2", {"stage1_checkpoint": str(run1), "init_from": "stage1",
                                                        "rerank_k": 5}, {"stage1_topk": str(run1)}),
                 "--output-dir", str(run2)]) == 0
    moved = tmp_path / "moved"
    project.rename(moved)
    caplog.clear()
    assert main(["eval", str(moved / "stage2"), "--split", "val"]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"recorded in {moved / 'stage2' / 'config.yaml'}" in errors[0]
    assert "--set eval.stage1_topk=PATH" in errors[0] and "cirlab eval STAGE1_RUN" not in errors[0]
    assert "other data" not in caplog.text
    capsys.readouterr()
    caplog.clear()
    assert main(["eval", str(moved / "stage2"), "--split", "val", "--set", f"eval.stage1_topk={moved / 'stage1'}"]) == 0
    assert "other data" not in caplog.text  # the same files at the new path: the same data
    trained = json.loads((moved / "stage2" / "metrics.json").read_text())["splits"]["val"]
    assert json.loads(capsys.readouterr().out)["splits"]["val"] == pytest.approx(trained)


def test_the_same_figure_saved_twice_is_the_same_svg(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cirlab.workbench import viz

    fig, ax = plt.subplots()
    ax.imshow([[0.0, 1.0], [1.0, 0.0]])  # a clipped image: matplotlib names its clip paths with salted hashes
    ax.plot([0, 1], [1, 0])
    ax.set_title("recall")
    first = viz.save_figure(fig, tmp_path / "a", "fig", formats=("svg", "pdf"))
    second = viz.save_figure(fig, tmp_path / "b", "fig", formats=("svg", "pdf"))
    plt.close(fig)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert b"<dc:date>" not in first[0].read_bytes()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c",
                           "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout


def _write_notebook(path: Path, cells: list[str]) -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("out: str = ''  # output folder\nrepo: str = ''  # the checkout")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_report_rerun_into_a_committed_folder_records_the_clean_commit_and_a_stable_index(tmp_path, monkeypatch):
    """The report's own moved outputs are not "uncommitted changes" (its record, and code_version in its kernels);
    the index keeps the order the notebook saved its figures after the files get new times (a copy, a clone); the
    parameters cell papermill injects has the same id every run; a run trained in the notebook records the report's
    command for the entry."""
    pytest.importorskip("papermill")
    from cirlab import report
    from cirlab.workbench import recipes

    repo = tmp_path / "repo"
    out = repo / "reports"
    (out / "evaluate" / "figures").mkdir(parents=True)
    (out / "evaluate" / report.RECORD).write_text(json.dumps({"entry": "evaluate", "status": "ok"}))
    (out / "evaluate" / "figures" / "old.png").write_bytes(b"old")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "reports of run 1")
    saved = ("metrics_table", "gallery_dress", "failures_dress")  # the narrative order, not alphabetical
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _write_notebook(nbs / "evaluate.ipynb", [
        "import json, pathlib\nfrom cirlab.core.provenance import code_version\n"
        "p = pathlib.Path(out) / 'figures'\np.mkdir(parents=True, exist_ok=True)\n"
        f"for stem in {saved!r}:\n    (p / (stem + '.png')).write_bytes(b'png')\n"
        "(pathlib.Path(out) / 'code.json').write_text(json.dumps(code_version(pathlib.Path(repo))))",
        "from cirlab.core.provenance import start_entry\n"
        "(pathlib.Path(out) / 'command.json').write_text(json.dumps(start_entry(0, 'cpu', 'fp32')['command']))"])
    monkeypatch.setattr(recipes, "project_root", lambda: repo)
    monkeypatch.setattr(report, "ORDER", ("evaluate",))
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {"evaluate": {"out": "{out}/evaluate", "repo": str(repo)}})
    head = _git(repo, "rev-parse", "--short", "HEAD").strip()
    ids = []
    for _ in range(2):
        assert report.run_report(out, only="evaluate", overrides={"data_root": str(tmp_path)}, kernel_name="python3",
                                 notebook_dir=nbs, stream=io.StringIO(), command="cirlab report --smoke") == 0
        assert json.loads((out / "evaluate" / report.RECORD).read_text())["commit"] == head
        assert json.loads((out / "evaluate" / "code.json").read_text()) == head  # a run the notebook trains
        # and that run's command: the report's for the entry, not the kernel's argv (a temporary connection file)
        assert json.loads((out / "evaluate" / "command.json").read_text()) == \
            ["cirlab", "report", "--smoke", "--only", "evaluate"]
        nb = json.loads((out / "evaluate" / "evaluate.ipynb").read_text())
        ids.append([c.get("id") for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])])
    assert ids[0] == ids[1] == ["injected-parameters"]
    assert "+ uncommitted changes" in _git_commit_now(repo)  # the outputs did change: only the record ignores them
    for i, stem in enumerate(reversed(saved)):  # a checkout's times: the last saved is now the oldest
        os.utime(out / "evaluate" / "figures" / f"{stem}.png", ns=(10**9 * (100 + i),) * 2)
    page = report.write_index(out).read_text()
    shown = [page.index(f"<b>{stem}</b>") for stem in saved]
    assert shown == sorted(shown)


def _git_commit_now(repo: Path) -> str:
    from cirlab.core.provenance import code_version

    return code_version(repo)
