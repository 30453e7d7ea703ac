"""Every notebook runs under papermill with the smoke parameters `cirlab report --smoke` passes, writes its files,
and leaks no secret; every notebook's parameters cell matches what the report passes; the .ipynb files are paired
with their py:percent sources by jupytext's own configuration and committed through nbstripout; with their
defaults the notebooks find what the report wrote from notebooks/ (where JupyterLab starts kernels) and from the
checkout's root, and write nothing into notebooks/."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from cirlab import report

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SECRET_ENV = "COMET_API_KEY"
SECRET = "cirlab-test-secret-7f3a9c1e"  # a fake tracking key: must never reach an executed notebook or a file

EXPECTED = {  # files each notebook writes into its output_dir, and keys of its metrics.json
    "train": (["metrics.json", "config.json", "config.yaml", "log.jsonl", "checkpoints/best.pt",
               "figures/training_curves.png", "figures/training_curves.svg", "figures/val_metrics.png"], ["val"]),
    "evaluate": (["metrics.json", "config.json", "figures/metrics_table.png", "figures/run_comparison.svg",
                  "figures/gallery_dress.png", "figures/failures_dress.png", "figures/per_category.png",
                  "topk/train/val_dress.topk.npz", "topk/untrained/val_toptee.topk.npz"], ["runs", "per_category"]),
    "router_explorer": (["metrics.json", "config.json", "figures/expert_heatmaps.png", "figures/gates_by_category.png",
                         "figures/gates_by_modification.png", "figures/entropy_utilisation.png",
                         "figures/path_space.png", "figures/query_view.svg"], ["queries", "layer_entropy"]),
    "rank_shift": (["metrics.json", "config.json", "figures/rank_shift.png", "figures/rank_shift.svg",
                    "figures/figure8_dress.png"], ["all", "dress", "shirt", "toptee"]),
    # DIME (ITM, precomp data) through the same train and router_explorer notebooks
    "train_dime": (["metrics.json", "config.json", "config.yaml", "checkpoints/best.pt", "figures/training_curves.png",
                    "figures/val_metrics.png"], ["val", "steps"]),
    "router_explorer_dime": (["metrics.json", "config.json", "figures/expert_heatmaps.png", "figures/cell_flows.png",
                              "figures/cell_flows.svg", "figures/path_matrices.png", "figures/gates_by_category.png",
                              "figures/path_space.png", "figures/entropy_utilisation.png", "figures/query_view.png"],
                             ["queries", "layer_entropy", "mean_share"]),
    # HREM (ITM) and CaLa (CIR) through the train and router_explorer notebooks
    "train_hrem": (["metrics.json", "config.json", "checkpoints/best.pt", "figures/val_metrics.png"], ["val"]),
    "router_explorer_hrem": (["metrics.json", "figures/relation_graph.png", "figures/word_region.png"],
                             ["queries", "caption_id", "block_means"]),
    "train_cala": (["metrics.json", "config.json", "checkpoints/best.pt", "topk/val.topk.npz",
                    "figures/val_metrics.png"], ["val"]),
    "router_explorer_cala": (["metrics.json", "figures/cala_bridges.png", "figures/bridge_words.png"],
                             ["queries", "bridge_words"]),
    "quickstart": (["metrics.json", "config.json", "figures/gallery.png", "figures/metrics.png",
                    "figures/query_gates.png", "figures/training_curves.png"], ["trained", "untrained"]),
}


def test_notebook_parameters_match_the_report():
    for name in report.ORDER:
        declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{report.notebook_of(name)}.ipynb"))
        for params in (report.REPORT_PARAMETERS[name], report.SMOKE_PARAMETERS[name]):
            assert set(params) <= set(declared), f"{name}: report passes unknown {set(params) - set(declared)}"
            for key, value in params.items():
                assert declared[key]["inferred_type_name"] == type(value).__name__, f"{name}.{key}"
                assert declared[key]["help"], f"{name}.{key} has no comment"
        assert "api_key" not in " ".join(declared).lower(), f"{name} takes a secret as a parameter"


def _cells(nb) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source.strip(), list(c.metadata.get("tags", []))) for c in nb.cells]


def test_notebooks_are_paired_with_their_py_twins_by_jupytext():
    jupytext = pytest.importorskip("jupytext")
    from jupytext.config import load_jupytext_configuration_file

    config = load_jupytext_configuration_file(str(NOTEBOOKS / "jupytext.toml"))
    # JupyterLab and `jupytext --sync` pair every notebook here
    assert config.formats in ("ipynb,py:percent", ["ipynb,py:percent"])
    assert not (NOTEBOOKS / "sync.py").exists()  # no hand-written sync script next to jupytext's own pairing
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(map(report.notebook_of, report.ORDER)) <= set(names)
    for name in names:
        py, ipynb = jupytext.read(NOTEBOOKS / f"{name}.py"), nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert _cells(py) == _cells(ipynb), f"{name}.ipynb and {name}.py differ: `make notebooks` pairs them"
        assert ipynb.metadata.get("kernelspec", {}).get("name") == "cirlab", name
        if py.metadata.get("kernelspec"):
            assert py.metadata["kernelspec"]["name"] == "cirlab", name
        code = [c for c in ipynb.cells if c.cell_type == "code"]
        assert "import" in code[0].source and "parameters" in code[1].metadata.get("tags", []), name
        assert "def " not in "".join(c.source for c in code), f"{name} defines functions (keep logic in cirlab)"


def test_notebooks_are_committed_without_outputs():
    """Outputs may exist in the working tree (JupyterLab saves them); git stores the notebooks through nbstripout,
    which `make setup` installs as this repository's filter, so what is committed is output-free."""
    from nbstripout import strip_output

    for path in NOTEBOOKS.glob("*.ipynb"):
        stripped = strip_output(nbformat.read(path, as_version=4), keep_output=False, keep_count=False,
                                keep_id=False)
        code = [c for c in stripped.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
    if not (ROOT / ".git").exists():
        pytest.skip("the git filter (.gitattributes, nbstripout) is checked in a git checkout only: no .git here "
                    "(an unpacked sdist)")
    assert "*.ipynb filter=nbstripout" in (ROOT / ".gitattributes").read_text()
    if subprocess.run(["git", "--version"], capture_output=True).returncode == 0:
        clean = subprocess.run(["git", "-C", str(ROOT), "config", "filter.nbstripout.clean"], capture_output=True,
                               text=True).stdout
        if not clean.strip():
            pytest.skip("nbstripout is not installed as this checkout's git filter yet (`make setup` installs it)")
        assert "nbstripout" in clean


def _kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    return "cirlab" if "cirlab" in specs else "python3"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run the smoke report once (every entry, dependency order: the five notebooks, then train and
    router_explorer again for DIME) with a fake secret in the environment."""
    import os

    out = tmp_path_factory.mktemp("reports")
    data = report.ensure_synthetic_data("tiny", root=out / "_data", stream=None)
    old = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = SECRET  # kernels inherit the environment
    try:
        for name in report.ORDER:
            params = report.notebook_parameters(name, out, data, smoke=True)
            report.run_notebook(name, params, out / name, kernel_name=_kernel(), html_export=(name == "rank_shift"))
    finally:
        os.environ.pop(SECRET_ENV) if old is None else os.environ.__setitem__(SECRET_ENV, old)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_notebook_writes_its_files(executed, name):
    folder = executed / name
    files, keys = EXPECTED[name]
    for rel in files:
        assert (folder / rel).is_file(), f"{name} did not write {rel}"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(keys) <= set(metrics), f"{name}: metrics.json keys {sorted(metrics)}"
    config = json.loads((folder / "config.json").read_text())
    for key, value in report.notebook_parameters(name, executed, "", smoke=True).items():
        if key not in ("data_root",):
            assert config[key] == value, f"{name}: config.json {key}"
    nb = nbformat.read(folder / f"{name}.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)


@pytest.mark.slow
def test_every_figure_the_report_writes_has_a_caption(executed):
    # the index shows a caption under each figure: one without says nothing of what it shows (second_comparison had
    # none)
    missing = [(name, png.stem) for name in report.ORDER for png in sorted((executed / name / "figures").glob("*.png"))
               if not report.figure_caption(name, png.stem)]
    assert not missing


@pytest.mark.slow
def test_smoke_metrics_are_sane(executed):
    evaluate = json.loads((executed / "evaluate" / "metrics.json").read_text())
    for run in ("train", "untrained"):
        r10, r50 = evaluate["runs"][run]["avg_R@10"], evaluate["runs"][run]["avg_R@50"]
        assert 0.0 <= r10 <= r50 <= 100.0
    shift = json.loads((executed / "rank_shift" / "metrics.json").read_text())["all"]
    assert shift["improved_pct"] + shift["unchanged_pct"] + shift["worsened_pct"] == pytest.approx(100.0)
    # the ceiling is the 'before' ranking's recall at the pool size, by definition
    assert shift["ceiling_R@10"] == pytest.approx(shift["before_R@10"])
    assert (executed / "rank_shift" / "rank_shift.html").is_file()


@pytest.mark.slow
def test_dime_entries_train_an_itm_model_and_draw_its_flows(executed):
    val = json.loads((executed / "train_dime" / "metrics.json").read_text())["val"]
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert 0.0 <= val[key] <= 100.0, key
    assert val["i2t_R@1"] <= val["i2t_R@5"] <= val["i2t_R@10"] and val["t2i_R@1"] <= val["t2i_R@10"]
    assert val["rsum"] == pytest.approx(sum(val[k] for k in val if "_R@" in k))
    config = json.loads((executed / "train_dime" / "config.json").read_text())
    assert config["model_config"]["img_dim"] == 2048  # fitted to the synthetic precomp features
    routes = json.loads((executed / "router_explorer_dime" / "metrics.json").read_text())
    assert routes["queries"] == report.SMOKE_PARAMETERS["router_explorer_dime"]["n_queries"]
    assert set(routes["layer_entropy"]) == {"layer0", "layer1", "layer2"}  # no *_raw diagnostic layers
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in routes["layer_entropy"].values())
    # layer0/1 route 4 cells to 4 cells, layer2 the 4 cells to the output; shares per layer sum to one
    shares = routes["mean_share"]
    assert {k for k in shares if k.startswith("layer2/")} == {f"layer2/{c}->output" for c in
                                                             ("RIC", "GLGC", "IMRC", "CMRC")}
    for layer in ("layer0", "layer1", "layer2"):
        assert sum(v for k, v in shares.items() if k.startswith(layer + "/")) == pytest.approx(1.0, abs=1e-4)
    png = (executed / "router_explorer_dime" / "figures" / "cell_flows.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000


@pytest.mark.slow
def test_no_secret_in_any_written_file(executed):
    leaked = [p for p in executed.rglob("*") if p.is_file() and p.suffix in (".ipynb", ".json", ".html", ".yaml",
                                                                              ".svg", ".jsonl")
              and SECRET in p.read_text(errors="ignore")]
    assert not leaked, f"secret found in {leaked}"


def test_run_config_points_precomp_datasets_at_the_precomp_folder(tmp_path):
    import numpy as np

    from cirlab import workbench

    folder = tmp_path / "precomp" / "f30k_precomp"
    folder.mkdir(parents=True)
    np.save(folder / "train_ims.npy", np.zeros((2, 3, 40), dtype=np.float32))
    cfg = workbench.run_config("dime", "tiny", "f30k", tmp_path, tmp_path / "run", max_steps=5)
    assert cfg["dataset"]["root"] == str(tmp_path / "precomp") and cfg["dataset"]["val_split"] == "dev"
    assert cfg["eval"]["splits"] == ["dev"] and cfg["model_overrides"] == {"img_dim": 40}  # from the .npy header
    # CIR datasets are unchanged: <data_root>/<dataset> when present, the validation split as given
    (tmp_path / "fashioniq").mkdir()
    cir = workbench.run_config("amc", "tiny", "fashioniq", tmp_path, tmp_path / "run")
    assert cir["dataset"]["root"] == str(tmp_path / "fashioniq") and cir["dataset"]["val_split"] == "val"
    assert cir["model_overrides"] == {}
    with pytest.raises(ValueError, match="not a precomp ITM dataset"):
        workbench.evaluate_itm_run(None, "fashioniq", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["notebooks", "root"])
def test_notebooks_find_the_reports_output_with_their_defaults(executed, tmp_path, where):
    """JupyterLab starts kernels in notebooks/; a user runs papermill from the root. With no parameters the
    notebooks open the report's runs (`make demo` wrote them; here the smoke report) and write runs/<notebook>."""
    project = tmp_path / "checkout"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for nb in NOTEBOOKS.glob("*.ipynb"):
        (project / "notebooks" / nb.name).write_bytes(nb.read_bytes())
    (project / "reports").symlink_to(executed, target_is_directory=True)
    cwd = project / "notebooks" if where == "notebooks" else project
    name = "router_explorer" if where == "notebooks" else "evaluate"
    before = sorted(p.name for p in (project / "notebooks").iterdir())
    env_keep = {k: os.environ.pop(k) for k in ("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS") if k in os.environ}
    try:
        papermill.execute_notebook(str(project / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                                   parameters={"n_queries": 12} if name == "router_explorer" else {"k": 10},
                                   kernel_name=_kernel(), cwd=str(cwd), progress_bar=False,
                                   kernel_manager_class=report._kernel_manager_class())
    finally:
        os.environ.update(env_keep)
    out = project / "runs" / name
    assert (out / "metrics.json").is_file() and (out / "figures").is_dir()
    config = json.loads((out / "config.json").read_text())
    run = config["run_dir"] if name == "router_explorer" else config["run_dirs"][0]
    assert Path(run) == project / "reports" / "train" and Path(run).resolve() == (executed / "train").resolve()
    assert sorted(p.name for p in (project / "notebooks").iterdir()) == before  # nothing written into notebooks/
    if name == "router_explorer":  # under papermill the widget stays off: no widget view among the outputs
        nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
        assert any("live explorer appears here" in o.get("text", "") for o in outputs)


def test_missing_runs_and_data_name_absolute_paths_and_the_fixing_command(tmp_path, monkeypatch):
    from cirlab import workbench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIRLAB_REPORTS", str(tmp_path / "reports"))
    with pytest.raises(FileNotFoundError) as err:
        workbench.find_run("", "train")
    assert str(tmp_path / "reports" / "train") in str(err.value) and "cirlab report --only train" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        workbench.find_data("fashioniq", "mydata")
    assert str(tmp_path / "mydata") in str(err.value) and f"cirlab data synth --out {tmp_path / 'mydata'}" in str(
        err.value)
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    out = workbench.output_folder("", "train")
    assert out.is_absolute() and out.name == "train" and out.parent.name == "runs"


def test_the_default_run_of_another_dataset_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """evaluate / router_explorer with dataset="shoes" and no run named took the report's Fashion-IQ run, read the
    Shoes data, and failed at the untrained baseline advising dataset='fashioniq'."""
    import yaml

    from cirlab import workbench
    from cirlab.core.errors import ModelMismatchError

    run = tmp_path / "reports" / "train"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "amc", "dataset": {"name": "fashioniq"}}))
    monkeypatch.setenv("CIRLAB_REPORTS", str(tmp_path / "reports"))
    with pytest.raises(ModelMismatchError, match=r"dataset='shoes': the default run .*train was trained on "
                                                 r"'fashioniq'; train one on 'shoes' first"):
        workbench.find_run("", dataset="shoes")
    assert workbench.find_run("", dataset="FashionIQ") == run  # the same dataset, spelt another way
    assert workbench.find_run(run, dataset="shoes") == run  # a run named by the user is the user's choice


# ---------------------------------------------------------------------------------------- HREM, CaLa, DIME vs HREM
def _train_tiny(model: str, dataset: str, data, out, settings=()):
    from cirlab import workbench

    return workbench.train_run(model, "tiny", dataset, data, out, max_steps=2, batch_size=8,
                               settings=["train.eval_every=0", *settings])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return report.ensure_synthetic_data("tiny", root=tmp_path_factory.mktemp("tinydata"), stream=None)


def test_itm_topk_is_the_t2i_ranking_of_the_itm_metrics(tiny_data, tmp_path):
    from cirlab import analysis, workbench

    _train_tiny("hrem", "f30k", tiny_data, tmp_path / "hrem")
    model = workbench.load_run(tmp_path / "hrem")
    reference = workbench.evaluate_itm_run(model, "f30k", tiny_data)
    metrics, topks = workbench.evaluate_run(model, "f30k", tiny_data, k=5, topk_dir=tmp_path / "topk")
    assert metrics == pytest.approx(reference)  # one score matrix, the engine's metrics
    t2i = workbench.load_topk_files(tmp_path / "topk")
    assert (tmp_path / "topk" / "dev_t2i.topk.npz").is_file() and t2i.meta["direction"] == "t2i"
    split = workbench.itm_splits("f30k", tiny_data)
    assert len(t2i) == len(split.captions) and t2i.k == min(5, split.num_images)
    assert list(t2i.target_ids[:6]) == ["0", "0", "0", "0", "0", "1"]  # five captions per image
    assert analysis.known_recall(t2i.target_rank, [1, 5])["R@1"] == pytest.approx(reference["t2i_R@1"])
    assert analysis.known_recall(t2i.target_rank, [1, 5])["R@5"] == pytest.approx(reference["t2i_R@5"])
    hit = t2i.target_rank == 1
    assert (t2i.gallery_ids[hit, 0] == t2i.target_ids[hit]).all()
    assert set(t2i.category) <= {"full", "color", "shape", "layout", "relation"}  # the synthetic caption types


def test_train_run_replaces_only_the_run_it_finished(tiny_data, tmp_path):
    """A notebook re-run regenerates its own run; a `cirlab train` run (or one trained into since) is refused."""
    from cirlab import workbench
    from cirlab.engine.train import RunFolderError, recipe_wrote

    out = tmp_path / "run"
    _train_tiny("hrem", "f30k", tiny_data, out)
    assert recipe_wrote(out)
    _train_tiny("hrem", "f30k", tiny_data, out)  # a re-run of the notebook: its own run, replaced
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes() + b"\0")  # trained into since (cirlab train --resume): not the notebook's
    assert not recipe_wrote(out)
    before = last.read_bytes()
    with pytest.raises(RunFolderError, match=r"output_dir .* did not finish .*resume=\"auto\".*overwrite=True"):
        _train_tiny("hrem", "f30k", tiny_data, out)
    assert last.read_bytes() == before  # refused before anything was touched
    (out / "recipe_run.json").unlink()  # a cirlab train run: no mark at all
    with pytest.raises(RunFolderError):
        _train_tiny("hrem", "f30k", tiny_data, out)
    workbench.train_run("hrem", "tiny", "f30k", tiny_data, out, overwrite=True, max_steps=2, batch_size=8,
                        settings=["train.eval_every=0"])
    assert recipe_wrote(out) and last.read_bytes() != before


def test_a_list_parameter_given_one_value_is_a_list_of_one(tiny_data, tmp_path):
    """`papermill -p runs PATH` / `-p settings train.x=1` pass a string; it must not become one entry per
    character."""
    from cirlab import workbench

    assert workbench.as_list("/a/run", "runs") == ["/a/run"] and workbench.as_list("", "runs") == []
    assert workbench.as_list(["a", "b"], "runs") == ["a", "b"]
    with pytest.raises(ValueError, match=r"runs: expected a list \(papermill: -y 'runs: \[a, b\]'\), got int 3"):
        workbench.as_list(3, "runs")
    config = workbench.run_config("amc", "tiny", "fashioniq", tiny_data, tmp_path, settings="train.lr=0.125")
    assert config["train"]["lr"] == 0.125


def test_run_and_data_lookups_name_what_is_wrong(tiny_data, tmp_path, caplog):
    """A misspelt checkpoint is an error listing the run's checkpoints (was: silently last.pt); the folder above
    a run names the runs in it; a misspelt dataset is refused (was: the synthetic data of no dataset)."""
    from cirlab import workbench

    _train_tiny("amc", "fashioniq", tiny_data, tmp_path / "runs" / "amc")
    with pytest.raises(FileNotFoundError, match=r"checkpoint='bestt': .*\(did you mean 'best'\?\); this run has: "
                                                r"best, last"):
        workbench.load_run(tmp_path / "runs" / "amc", checkpoint="bestt")
    assert workbench.load_run(tmp_path / "runs" / "amc", checkpoint="last").model_name == "amc"
    (tmp_path / "runs" / "amc" / "checkpoints" / "best.pt").unlink()  # stopped before its first evaluation
    with caplog.at_level("WARNING"):
        assert workbench.load_run(tmp_path / "runs" / "amc").model_name == "amc"
    assert "has no best.pt (stopped before its first evaluation?): loading last.pt" in caplog.text
    for call in (workbench.find_run, workbench.load_run):
        with pytest.raises(FileNotFoundError, match=r"it holds the runs amc: name one of them"):
            call(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"train it first .*cirlab train CONFIG --output-dir"):
        workbench.load_run(tmp_path / "nothing")
    with pytest.raises(workbench.recipes.ParameterError, match=r"dataset: unknown dataset 'fashoniq' \(did you "
                                                               r"mean 'fashioniq'\?\)"):
        workbench.find_data("fashoniq", tiny_data)


def test_a_model_of_the_wrong_kind_or_a_device_typo_is_one_line(tiny_data):
    """An ITM model handed to a CIR evaluation (and back), a CIR split to evaluate_itm, AMC to CaLa's or HREM's view,
    a misspelt device: each failed as torch's "'DIME' object has no attribute ...", or its list of device types."""
    import cirlab
    from cirlab import workbench
    from cirlab.core.errors import CirlabError
    from cirlab.data import load_cir, load_precomp

    from cirlab.models.amc import AMCEnsemble

    amc, dime = cirlab.create_model("amc", "tiny"), cirlab.create_model("dime", "tiny", img_dim=2048)
    hrem = cirlab.create_model("hrem", "tiny", img_dim=2048)
    fiq = load_cir("fashioniq", tiny_data / "fashioniq", "val", category="dress")
    cases = [
        (lambda: workbench.evaluate_run(amc, "f30k", tiny_data), r"evaluate_run: amc is a composed image retrieval "
                                                                  r"model and cannot read 'f30k'; its datasets: "),
        (lambda: workbench.evaluate_run(dime, "fashioniq", tiny_data), r"dime is an image-text matching model"),
        (lambda: cirlab.evaluate_cir(dime, fiq), r"evaluate_cir needs a composed-retrieval model .* got 'dime' "
                                                 r"\(task itm\): evaluate_itm scores"),
        (lambda: cirlab.evaluate_itm(dime, fiq), r"evaluate_itm needs a precomp split .* got a CIRSplit"),
        (lambda: cirlab.evaluate_itm(amc, load_precomp(tiny_data / "precomp", "f30k", "dev")),
         r"evaluate_itm needs an image-text matching model"),
        (lambda: workbench.cala_trace(amc, "fashioniq", tiny_data), r"cala_trace needs a cala model, got 'amc'"),
        (lambda: workbench.hrem_relation(dime, "f30k", tiny_data), r"hrem_relation needs a hrem model, got 'dime'"),
        (lambda: workbench.hrem_relation(hrem, "f30k", tiny_data, slot=7),
         r"slot 7 is not a caption slot: every image has 5 captions \(0..4\)"),
        (lambda: workbench.hrem_relation(hrem, "f30k", tiny_data, caption=2.0), r"caption must be a whole number"),
        (lambda: workbench.collect_routes(cirlab.create_model("cala", "tiny"), "fashioniq", tiny_data, n=2),
         r"collect_routes needs a router model \(amc, dime, or one of your own emitting through cirlab\.core\.tracing\.emit\); got 'cala' \(task cir\): CaLa's HCA/TAC attention: "
         r"cirlab.workbench.cala_trace"),
        (lambda: workbench.evaluate_run("amc", "fashioniq", tiny_data), r"evaluate_run needs a cirlab model"),
        (lambda: workbench.evaluate_run(amc, "fashioniq", tiny_data, device="gpu"),
         r"device: must be auto, cpu, cuda or cuda:N .*got 'gpu'"),
        (lambda: cirlab.evaluate_cir(amc, fiq, protocol="shoes"), r"protocol='shoes', but the splits are fashioniq"),
        (lambda: cirlab.evaluate_cir(amc, "val"), r"evaluate_cir: 'val' is a str, not a CIR split"),
        (lambda: cirlab.evaluate_cir(amc, fiq, k=0), r"k must be a whole number >= 1"),
        (lambda: workbench.explorer_for(cirlab.create_model("cala", "tiny"), None, {}, "fashioniq", tiny_data),
         r"explorer_for: cala has no live explorer .*viz\.plot_cala_bridges"),
        (lambda: workbench.explorer_for(hrem, None, {}, "f30k", tiny_data), r"hrem has no live explorer"),
        # the re-ranker's stages have no router: stage I said "router" and stage II failed in torch (encode_query)
        (lambda: workbench.explorer_kind(cirlab.create_model("blip_rerank_stage1", "tiny")),
         r"^the router explorer needs a router model \(amc, dime, or one of your own emitting through cirlab\.core\.tracing\.emit\); got 'blip_rerank_stage1' \(task cir\): it has "
         r"no router"),
        (lambda: workbench.collect_routes(cirlab.create_model("blip_rerank_stage2", "tiny"), "fashioniq", tiny_data),
         r"^collect_routes needs a router model \(amc, dime, or one of your own emitting through cirlab\.core\.tracing\.emit\); got 'blip_rerank_stage2' \(task rerank\)"),
        # an ensemble's members emit under the same layer names ("'layer1' emitted twice under one set_batch")
        (lambda: workbench.collect_routes(AMCEnsemble([amc, amc]), "fashioniq", tiny_data),
         r"got 'amc_ensemble' \(task cir\): an ensemble: trace one of its members \(model.members\[0\]\)"),
        # a split's name where the loaded split goes: "'str' object has no attribute 'triplets'" from inside
        (lambda: workbench.gallery_rows(None, "val"), r"gallery_rows: split must be a loaded CIR split .*got 'val'"),
        (lambda: workbench.widgets.make_query_fn(amc, {"dress": fiq}),
         r"make_query_fn: split must be a loaded CIR split \(workbench.cir_splits\(dataset, data_root, 'val'\)"
         r"\[category\]\), got \{'dress': CIRSplit"),
        (lambda: workbench.widgets.make_pair_fn(dime, "val"), r"make_pair_fn: split must be a loaded precomp split"),
        (lambda: workbench.widgets.make_pair_fn(dime, fiq), r"make_pair_fn: split must be a loaded precomp split"),
        (lambda: workbench.itm_topk(dime, "f30k", tiny_data, k=2.5), r"k \(the top-K lists' length\) must be a whole"),
        (lambda: cirlab.evaluate_cir(cirlab.create_model("blip_rerank_stage2", "tiny"), fiq),
         r"got 'blip_rerank_stage2' \(task rerank\): a stage-II re-ranker is evaluated over stage I's top-K"),
    ]
    for call, message in cases:
        with pytest.raises(CirlabError, match=message):
            call()
    with pytest.raises(TypeError, match=r"trace_routes needs the model itself .* got 'amc'"):
        with cirlab.trace_routes("amc"):
            pass


def test_trace_routes_says_when_it_recorded_nothing(caplog):
    """A trace block on a model whose forward has no router (CaLa, HREM, the re-ranker) gave an empty frame without a
    word; a router model's block that records says nothing."""
    import logging

    import torch

    import cirlab

    hrem = cirlab.create_model("hrem", "tiny", img_dim=2048)
    dime = cirlab.create_model("dime", "tiny", img_dim=2048).eval()
    with caplog.at_level(logging.WARNING, logger="cirlab"):
        with cirlab.trace_routes(dime) as trace:
            dime.score(dime.encode_image(torch.rand(1, 36, 2048)), dime.encode_text(["a dog on the grass"]))
        assert not trace.to_frame().empty and not caplog.records
        with cirlab.trace_routes(hrem) as trace:
            hrem.eval().score(hrem.encode_image(torch.rand(1, 36, 2048)), hrem.encode_text(["a dog"]))
    assert trace.to_frame().empty
    assert [r.getMessage() for r in caplog.records] == [
        "trace_routes recorded nothing from model hrem: router models emit while traced (AMC's gates in "
        "encode_query, DIME's paths in score; a model of your own through cirlab.core.tracing.emit); HREM's "
        "relation graph: cirlab.workbench.hrem_relation (or cirlab.models.hrem.relation_frames)"]


def test_gallery_lookups_checkpoints_and_rankings_name_what_is_wrong(tiny_data, tmp_path):
    """gallery_rows took bare KeyErrors (an id of another category, n=-1) and not cir_splits' dict; worst_queries(-1)
    gave all but one; load_run looked for last.pt.pt and refused a checkpoint file; find_data fell back to the
    synthetic data for a run folder that does not exist; ranking_pair compared two datasets' rankings; metrics.json
    held a bare NaN."""
    import json

    from cirlab import workbench
    from cirlab.core.errors import CirlabError
    from cirlab.core.topk import save_topk

    run = tmp_path / "amc"
    _train_tiny("amc", "fashioniq", tiny_data, run)
    model = workbench.load_run(run, checkpoint="last.pt")
    assert workbench.load_run(run / "checkpoints" / "best.pt").model_name == "amc"
    _, topks = workbench.evaluate_run(model, "fashioniq", tiny_data, k=5, topk_dir=tmp_path / "topk")
    splits = workbench.cir_splits("fashioniq", tiny_data, "val")
    dress = topks["dress"]
    rows = workbench.gallery_rows(dress, splits, n=2)  # the dict of every category's split
    assert [r["query_id"] for r in rows] == list(dress.query_ids[:2])
    assert workbench.gallery_rows(dress, splits["dress"], query_ids=dress.query_ids[1])[0]["query_id"] == \
        dress.query_ids[1]  # one id, not its letters
    shirt_id = topks["shirt"].query_ids[0]
    for call, message in (
            (lambda: workbench.gallery_rows(dress, splits["dress"], query_ids=[shirt_id]),
             rf"query '{shirt_id}' is not in the top-K file"),
            (lambda: workbench.gallery_rows(topks["shirt"], splits["dress"], query_ids=[shirt_id]),
             rf"query '{shirt_id}' is not in the split"),
            (lambda: workbench.gallery_rows(dress, splits, n=-1), r"n must be a whole number >= 1"),
            (lambda: workbench.worst_queries(dress, n=-1), r"n must be a whole number >= 1"),
            (lambda: workbench.find_data("fashioniq", run_dir=tmp_path / "nope"), r"run_dir .*nope does not exist"),
            (lambda: workbench.find_data("fashioniq", size="smal"), r"size: unknown synthetic size 'smal'")):
        with pytest.raises(CirlabError, match=message):
            call()
    assert workbench.find_data("fashioniq", None, run_dir=run) == workbench.find_data("fashioniq", "", run_dir=run)
    dress.meta["dataset"] = "fashioniq"
    save_topk(tmp_path / "a.topk.npz", dress)
    dress.meta["dataset"] = "shoes"
    save_topk(tmp_path / "b.topk.npz", dress)
    with pytest.raises(CirlabError, match=r"before ranks dataset 'fashioniq' and after ranks dataset 'shoes'"):
        workbench.ranking_pair(tmp_path / "a.topk.npz", tmp_path / "b.topk.npz")
    assert workbench.ranking_pair(None, None) is None
    assert workbench.load_run(run / "checkpoints").model_name == "amc"  # the checkpoints folder itself
    with pytest.raises(CirlabError, match=r"checkpoint is a checkpoint's name in the run .* got None"):
        workbench.load_run(run, checkpoint=None)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("model: [amc\n")
    with pytest.raises(CirlabError, match=r"broken/config.yaml: not valid YAML \("):
        workbench.stored_config(tmp_path / "broken")
    with pytest.raises(CirlabError, match=r'compare="untrained" builds a fresh copy .* pass run_dir= too'):
        workbench.explorer_for(model, None, {}, "fashioniq", tiny_data, compare="untrained")
    workbench.write_outputs(tmp_path / "out", {"R@1": float("nan"), "R@5": 2.0}, {})
    assert json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=pytest.fail) == {
        "R@1": None, "R@5": 2.0}  # strict JSON: null, not NaN


def test_counts_are_checked_and_spread_over_the_categories_exactly(tiny_data, tmp_path):
    """evaluate's k and router_explorer's n_queries: a number below 1 is an error naming it (k=-5 was reported as
    "too big"; n=-3 traced one query per category); n=7 over Fashion-IQ's three categories traces 3 + 2 + 2 (an
    even split traced 6)."""
    from cirlab import workbench

    _train_tiny("amc", "fashioniq", tiny_data, tmp_path / "amc")
    model = workbench.load_run(tmp_path / "amc")
    for bad in (-5, 0, 2.5):
        with pytest.raises(ValueError, match=r"k \(the top-K lists' length\) must be a whole number >= 1"):
            workbench.evaluate_run(model, "fashioniq", tiny_data, k=bad)
    with pytest.raises(ValueError, match=r"n \(router_explorer's n_queries\) must be a whole number >= 1, got -3"):
        workbench.collect_routes(model, "fashioniq", tiny_data, n=-3)
    routes, texts = workbench.collect_routes(model, "fashioniq", tiny_data, n=7)
    per_category = routes.drop_duplicates("query_id")["category"].value_counts().sort_index()
    assert len(texts) == 7 and sorted(per_category.tolist()) == [2, 2, 3]


def test_rank_shift_second_comparison_is_checked_before_training(tmp_path, monkeypatch):
    """rank_shift's `before` / `after`: both or neither (both with rerank=False), each read up front, errors naming
    the parameter."""
    import numpy as np

    from cirlab import workbench
    from cirlab.core.topk import TopK, save_topk

    save_topk(tmp_path / "a.topk.npz", TopK(np.arange(3), np.zeros((3, 1), dtype=np.int64),
                                            np.zeros((3, 1), dtype=np.float32), np.array([1, 2, 3])))
    assert workbench.ranking_pair("", "") is None
    with pytest.raises(ValueError, match="rerank=False and before/after are empty"):
        workbench.ranking_pair("", "", rerank=False)
    with pytest.raises(ValueError, match="after is set but before is empty"):
        workbench.ranking_pair("", str(tmp_path / "a.topk.npz"))
    with pytest.raises(ValueError, match="before is set but after is empty"):
        workbench.ranking_pair(str(tmp_path), "", rerank=False)
    with pytest.raises(FileNotFoundError, match=r"^after='nowhere': no top-K file at .*nowhere"):
        monkeypatch.chdir(tmp_path)
        workbench.ranking_pair("a.topk.npz", "nowhere")
    first, second = workbench.ranking_pair("a.topk.npz", str(tmp_path))  # a file, or a folder of them
    assert list(first.target_rank) == list(second.target_rank) == [1, 2, 3]


def _papermill(name: str, out, **parameters):
    return papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                                      kernel_name=_kernel(), progress_bar=False, cwd=str(Path(out).parent),
                                      kernel_manager_class=report._kernel_manager_class())


def test_a_bad_parameter_is_one_line_in_the_notebook_not_a_traceback(tmp_path, tiny_data):
    """A cirlab error in a notebook cell is shown as one line naming the parameter (IPython's
    _render_traceback_ hook), as the command line shows it; papermill reports that line."""
    from cirlab import workbench

    with pytest.raises(papermill.PapermillExecutionError) as err:
        _papermill("rank_shift", tmp_path / "rs.ipynb", data_root=str(tiny_data), before=str(tmp_path))
    assert err.value.ename == "ParameterError" and "before is set but after is empty" in err.value.evalue
    assert len(err.value.traceback) == 1 and "File " not in err.value.traceback[0]
    with pytest.raises(workbench.recipes.ParameterError, match=r"unknown field 'max_step' \(did you mean "
                                                                r"'max_steps'\?\)"):
        workbench.train_run("amc", "tiny", "fashioniq", tiny_data, tmp_path / "run", max_step=5)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hrem", "cala"])
def test_train_and_explorer_entries_of_hrem_and_cala(tiny_data, tmp_path, model):
    """The report's train_<model> and router_explorer_<model> entries (smoke parameters) on the tiny data."""
    for name in (f"train_{model}", f"router_explorer_{model}"):
        params = report.notebook_parameters(name, tmp_path, tiny_data, smoke=True)
        report.run_notebook(name, params, tmp_path / name, kernel_name=_kernel(), html_export=False)
        files, keys = EXPECTED[name]
        for rel in files:
            assert (tmp_path / name / rel).is_file(), f"{name} did not write {rel}"
        assert set(keys) <= set(json.loads((tmp_path / name / "metrics.json").read_text()))
    explorer = json.loads((tmp_path / f"router_explorer_{model}" / "metrics.json").read_text())
    if model == "hrem":
        assert set(explorer["block_means"]["relevance"]) == {"i2i", "i2t", "t2i", "t2t"}
        assert explorer["block_means"]["relevance"]["i2i"] > 0  # every image is relevant to itself (exp(0) = 1)
        # the connection's block means are its threshold by construction, and the mask is not drawn: left out
        assert not {"connection", "mask"} & set(explorer["block_means"])
    else:
        assert explorer["bridge_words"] and not {"[CLS]", "[SEP]"} & set(explorer["bridge_words"])


@pytest.mark.slow
def test_evaluate_shows_the_one_category_a_fashioniq_run_was_trained_on(tiny_data, tmp_path):
    """AMC's paper protocol trains one model per Fashion-IQ category (configs/amc_fashioniq.yaml: category dress):
    the notebook loaded every category on disk and failed with KeyError: 'shirt' at its gallery cell."""
    _train_tiny("amc", "fashioniq", tiny_data, tmp_path / "amc_dress", settings=["dataset.category=dress"])
    _papermill("evaluate", tmp_path / "evaluate.ipynb", runs=[str(tmp_path / "amc_dress")], dataset="fashioniq",
               data_root=str(tiny_data), output_dir=str(tmp_path / "ev"), k=10, include_untrained=False)
    figures = {p.stem for p in (tmp_path / "ev" / "figures").glob("*.png")}
    assert {"gallery_dress", "failures_dress"} <= figures and not {"gallery_shirt", "gallery_toptee"} & figures
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_category"]) == {"dress"}


@pytest.mark.slow
def test_evaluate_and_rank_shift_compare_dime_and_hrem_t2i_ranks(tiny_data, tmp_path):
    for model in ("dime", "hrem"):  # random tiny BERTs: seconds each
        _train_tiny(model, "f30k", tiny_data, tmp_path / model)
    _papermill("evaluate", tmp_path / "evaluate.ipynb", runs=[str(tmp_path / "dime"), str(tmp_path / "hrem")],
               dataset="f30k", data_root=str(tiny_data), output_dir=str(tmp_path / "ev"), k=10,
               include_untrained=False)
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(ev["runs"]) == {"dime", "hrem"} and "t2i_R@1" in ev["runs"]["hrem"]
    assert set(ev["per_category"]) <= {"full", "color", "shape", "layout", "relation"}
    _papermill("rank_shift", tmp_path / "rank_shift.ipynb", rerank=False, before=str(tmp_path / "ev/topk/dime"),
               after=str(tmp_path / "ev/topk/hrem"), label_before="DIME", label_after="HREM", pool_k=10,
               output_dir=str(tmp_path / "rs"))
    rs = json.loads((tmp_path / "rs" / "metrics.json").read_text())
    rows = {r["category"]: r for r in rs["second_comparison"]}
    split_captions = len((tiny_data / "precomp" / "f30k_precomp" / "dev_caps.txt").read_text().splitlines())
    assert rows["all"]["queries"] == split_captions and "runs" not in rs  # nothing re-ranked
    assert rows["all"]["before_R@1"] == pytest.approx(ev["runs"]["dime"]["t2i_R@1"])
    assert rows["all"]["after_R@1"] == pytest.approx(ev["runs"]["hrem"]["t2i_R@1"])
    assert (tmp_path / "rs" / "figures" / "second_comparison.png").is_file()
    assert not (tmp_path / "rs" / "figures" / "rank_shift.png").exists()


def test_untrained_copy_reads_the_data_where_it_is_now_and_refuses_another_dataset(tiny_data, tmp_path):
    """The stored config's dataset section won over ``dataset`` / ``data_root``: a moved data folder failed at its
    old path, and another dataset's name was ignored without a word."""
    import shutil

    from cirlab import workbench
    from cirlab.core.errors import ModelMismatchError

    moved = tmp_path / "data"
    shutil.copytree(tiny_data, moved)
    run = tmp_path / "runs" / "amc"
    _train_tiny("amc", "fashioniq", moved, run)
    trained = workbench.load_run(run)
    shutil.move(moved, tmp_path / "data_now")
    base = workbench.untrained_copy(run, "fashioniq", tmp_path / "data_now")
    words = [[m.vocab.words for m in model.modules() if hasattr(m, "vocab")] for model in (base, trained)]
    assert words[0] == words[1] and len(words[0][0]) > 4  # the same vocabulary, built from the data's new place
    with pytest.raises(ModelMismatchError, match=r"was trained on 'fashioniq', not 'cirr'; pass dataset='fashioniq'"):
        workbench.untrained_copy(run, "cirr", tmp_path / "data_now")

    # neither draws from the caller's random streams (load_run's model was built with random weights, then
    # overwritten by the checkpoint's: a load_run cell changed every later random number of the notebook)
    import numpy as np
    import torch

    torch.manual_seed(0), np.random.seed(0)
    expected = torch.rand(3), np.random.rand()
    for call in (lambda: workbench.load_run(run), lambda: workbench.untrained_copy(run, "fashioniq", tiny_data)):
        torch.manual_seed(0), np.random.seed(0)
        call()
        assert (torch.equal(torch.rand(3), expected[0]), np.random.rand()) == (True, expected[1])
    again = workbench.untrained_copy(run, "fashioniq", tmp_path / "data_now").state_dict()
    assert all(torch.equal(again[k], v) for k, v in base.state_dict().items() if torch.is_tensor(v))  # seed=0


def test_evaluate_run_evaluates_a_run_as_cirlab_eval_does(tiny_data, tmp_path, capsys):
    """A run trained on one category was evaluated on all three: the notebook's avg was not the run's."""
    from cirlab import workbench
    from cirlab.cli import main

    run = tmp_path / "amc"
    _train_tiny("amc", "fashioniq", tiny_data, run, ["dataset.category=dress"])
    assert main(["eval", str(run), "--split", "val", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    cli = json.loads(printed[printed.index("{"):])["splits"]["val"]
    model = workbench.load_run(run)
    metrics, topks = workbench.evaluate_run(model, "fashioniq", tiny_data, "val")
    assert set(topks) == {"dress"} and metrics == pytest.approx(cli)
    base = workbench.untrained_copy(run, "fashioniq", tiny_data)
    assert set(workbench.evaluate_run(base, "fashioniq", tiny_data, "val")[1]) == {"dress"}  # the same baseline
    _, every = workbench.evaluate_run(model, "fashioniq", tiny_data, "val", from_run=False)
    assert set(every) == {"dress", "shirt", "toptee"}
    # trained again (here on shirts), it is no longer that run's model: the defaults again
    import cirlab
    from cirlab.data import load_cir

    shirts = load_cir("fashioniq", tiny_data / "fashioniq", "train", category="shirt")
    cirlab.fit(model, shirts.triplet_dataset(model.image_transform(True)),
               cirlab.TrainConfig(max_steps=1, batch_size=4, ema_decay=None), output_dir=tmp_path / "again")
    assert set(workbench.evaluate_run(model, "fashioniq", tiny_data, "val")[1]) == {"dress", "shirt", "toptee"}


def test_a_run_path_is_read_the_same_way_by_every_run_reader(tiny_data, tmp_path, monkeypatch):
    """find_run read reports/train from notebooks/ against the checkout, load_run and stored_config from the working
    folder only; a folder that is not there was a "killed" run and an empty config."""
    from cirlab import analysis, workbench
    from cirlab.core.errors import MissingPathError
    from cirlab.workbench import recipes

    checkout = tmp_path / "checkout"
    _train_tiny("amc", "fashioniq", tiny_data, checkout / "runs" / "amc")
    (checkout / "notebooks").mkdir()
    monkeypatch.setattr(recipes, "project_root", lambda: checkout)
    monkeypatch.chdir(checkout / "notebooks")
    assert workbench.find_run("runs/amc") == checkout / "runs" / "amc"
    assert workbench.load_run("runs/amc").model_name == "amc"
    assert workbench.stored_config("runs/amc")["dataset"]["name"] == "fashioniq"
    # the baseline is marked with the same run (its settings were the dataset's defaults: all three categories)
    base = workbench.untrained_copy("runs/amc", "fashioniq", tiny_data)
    assert getattr(base, recipes.RUN_ATTRIBUTE) == str(checkout / "runs" / "amc")
    best = checkout / "runs" / "amc" / "checkpoints" / "best.pt"  # load_run takes it: find_data too
    assert workbench.find_data("fashioniq", run_dir=best) == workbench.find_data("fashioniq", run_dir="runs/amc")
    for call in (lambda: workbench.stored_config("runs/nope"), lambda: analysis.run_state("runs/nope")):
        with pytest.raises(MissingPathError, match=r"no run folder at .*runs/nope"):
            call()


def test_a_config_json_no_notebook_wrote_is_never_written_over(tmp_path):
    """A notebook pointed at a folder holding the user's config.json (or a transformers model folder) wrote its
    parameters over it at the end; now the output folder is refused when it is resolved, before any work."""
    from cirlab import workbench

    theirs = tmp_path / "model"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(workbench.recipes.ParameterError, match=r"output_dir: .*config\.json is not a config\.json a "
                                                               r"cirlab notebook wrote .*choose another output_dir"):
        workbench.output_folder(theirs, "evaluate")
    with pytest.raises(workbench.recipes.ParameterError, match=r"not a config\.json a cirlab notebook wrote"):
        workbench.write_outputs(theirs, {"a": 1}, {"k": 5})
    assert (theirs / "config.json").read_text() == '{"model_type": "blip"}' and not (theirs / "metrics.json").exists()
    ours = tmp_path / "ours"
    workbench.write_outputs(ours, {"a": 1}, {"k": 5})  # no output_dir given: the folder is recorded
    assert workbench.output_folder(ours, "evaluate") == ours.resolve()
    workbench.write_outputs(ours, {"b": 2}, {"k": 6})  # a notebook's own config.json is replaced, metrics merged
    assert json.loads((ours / "config.json").read_text()) == {"k": 6, "output_dir": str(ours)}
    assert json.loads((ours / "metrics.json").read_text()) == {"a": 1, "b": 2}


def test_an_unreadable_metrics_json_is_named_not_a_json_traceback(tmp_path):
    from cirlab import workbench

    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(workbench.recipes.ParameterError, match=r"metrics\.json: not readable as JSON .*move it"):
        workbench.write_outputs(tmp_path, {"a": 1}, {"k": 5})
    assert (tmp_path / "metrics.json").read_text() == "{not json" and not (tmp_path / "config.json").exists()


def test_the_explorers_one_query_search_scores_as_the_batched_evaluation(tiny_data, tmp_path):
    """The router explorer encodes one query at a time, the evaluation in batches: the same query must get the same
    candidates, scores and target rank (AMC's original text pooling floored a short text's vector at 0 when a longer
    text shared its batch: 0.863 against 0.867 in the demo)."""
    import numpy as np

    from cirlab import workbench
    from cirlab.workbench.recipes import cir_splits

    _train_tiny("amc", "fashioniq", tiny_data, tmp_path / "amc")
    model = workbench.load_run(tmp_path / "amc")
    _, topks = workbench.evaluate_run(model, "fashioniq", tiny_data, "val", k=5)
    query_fn = workbench.query_fn_for(model, "fashioniq", tiny_data, "val")
    texts = {t.query_id: t.text for sp in cir_splits("fashioniq", tiny_data, "val").values()
             for t in sp.triplets}
    checked = 0
    for topk in topks.values():
        for i, qid in enumerate(list(topk.query_ids)[:6]):
            answer = query_fn(qid, texts[qid])
            assert answer["candidate_ids"] == list(topk.gallery_ids[i]), qid
            np.testing.assert_allclose(answer["scores"], np.asarray(topk.scores[i], dtype=float), atol=1e-5)
            assert answer["target_rank"] == int(topk.target_rank[i]), qid
            checked += 1
    assert checked >= 6


def test_hrem_relation_says_why_it_changed_the_number_of_images(tiny_data, caplog):
    import cirlab
    from cirlab import workbench

    hrem = cirlab.create_model("hrem", "tiny", img_dim=2048)
    with caplog.at_level(logging.WARNING):
        graph = workbench.hrem_relation(hrem, "f30k", tiny_data, n_images=999)
    n = len(graph["texts"])  # one caption of each image in the batch
    assert f"hrem_relation: n_images=999: using {n} (the split has only {n} images)" in caplog.text


def test_the_tiny_presets_short_cpu_recipe_is_a_valid_set_of_overrides_for_each_model():
    """The notebooks start the tiny preset from workbench.cpu_recipe (opened as they are, the paper recipe trained
    nothing in a CPU notebook's few hundred steps); each recipe must be a run config every model accepts."""
    from cirlab.engine.runs import apply_overrides, parse_set, validate_config, with_defaults
    from cirlab.workbench import CPU_RECIPES, cpu_recipe

    datasets = {"amc": "fashioniq", "dime": "f30k", "hrem": "f30k", "cala": "cirr", "blip_rerank_stage1": "fashioniq",
                "blip_rerank_stage2": "fashioniq"}
    assert set(CPU_RECIPES) == set(datasets)
    for model, dataset in datasets.items():
        recipe = cpu_recipe(model, "tiny")
        assert recipe and cpu_recipe(model, "fashioniq") == [] and cpu_recipe(model, "lite") == []
        config = apply_overrides(with_defaults({"model": model, "preset": "tiny", "dataset": {"name": dataset}}),
                                 parse_set(recipe))
        validate_config(config, f"{model} recipe")


def test_a_returned_figure_is_drawn_in_a_users_own_notebook(tmp_path):
    """A figure from cirlab.viz, the last value of a cell, shows as an image in a notebook the user wrote without
    ``%matplotlib inline`` (it showed as ``<Figure size ...>`` text); a format the user chose stays theirs."""
    from nbclient import NotebookClient

    plot = 'from cirlab import viz\nviz.plot_metrics_bars({"a": {"R@1": 10.0, "R@5": 30.0}})'
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(plot),
        nbformat.v4.new_code_cell("%config InlineBackend.figure_formats = ['svg']\n%matplotlib inline\n" + plot)])
    NotebookClient(nb, kernel_name=_kernel(), timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    first, second = ([o for o in cell.outputs if o.output_type == "execute_result"] for cell in nb.cells)
    assert len(first) == 1 and "image/png" in first[0].data, first
    assert len(second) == 1 and "image/svg+xml" in second[0].data and "image/png" not in second[0].data, second
