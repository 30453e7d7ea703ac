"""The router explorer as a user opens it: JupyterLab in a real headless Chromium.

A checkout after `make demo` (its notebooks and pyproject, with a smoke report's AMC run in reports/train) is
served by JupyterLab on a free local port; Chromium opens notebooks/router_explorer.ipynb as it is (its defaults),
runs all cells and must show the explorer widget without a widget or cell error; picking another query and then
editing the text must each change the figure. The server is stopped at the end.

Needs Debian's Chromium (`make browser`; `.ci/run` installs it) and Playwright (the dev extra, which drives that
binary: no browser download). Where Chromium cannot be installed the test skips, saying so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab_browser import (WIDGET, JupyterLab, cell_errors, chromium, chromium_path, explorer_image, run_explorer,
                         wait_for_new_image)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = chromium_path()

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (`make browser` installs Debian's "
                                                "chromium; .ci/run does so before the tests)"),
]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    project = tmp_path_factory.mktemp("browser") / "checkout"
    (project / "notebooks").mkdir(parents=True)
    for path in (ROOT / "notebooks").iterdir():
        if path.suffix in (".ipynb", ".py", ".toml"):
            shutil.copy(path, project / "notebooks" / path.name)
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k not in ("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS")}
    for entry in ("train", "train_dime"):  # make demo's AMC and DIME runs, on smoke-sized data
        result = subprocess.run([str(Path(sys.prefix) / "bin" / "cirlab"), "report", "--smoke", "--only", entry],
                                cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


def _with_parameter(notebook: Path, name: str, value: str, copy: Path) -> None:
    """``copy``: ``notebook`` with one line of its parameters cell changed, as a user edits it in JupyterLab."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    lines = cell.source.splitlines()
    [index] = [i for i, line in enumerate(lines) if line.startswith(f"{name}:") or line.startswith(f"{name} =")]
    lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    nbformat.write(nb, copy)


@pytest.mark.slow
def test_router_explorer_runs_in_jupyterlab_and_follows_the_widgets(checkout, monkeypatch):
    for var in ("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS"):
        monkeypatch.delenv(var, raising=False)  # the kernel inherits the server's environment
    t0 = time.time()
    with JupyterLab(checkout) as lab, chromium(CHROMIUM) as page:
        try:
            run_explorer(page, lab)
        except Exception:
            page.screenshot(path=str(checkout / "failure.png"), full_page=True)
            raise AssertionError(f"the explorer did not render; server log:\n{lab.server_log()[-3000:]}\n"
                                 f"page text:\n{page.inner_text('body')[-3000:]}")
        widget = page.inner_text(WIDGET)
        assert "Error displaying widget" not in widget and "Failed to load model" not in widget
        assert cell_errors(page) == []

        first = explorer_image(page)
        page.select_option(f"{WIDGET} .widget-dropdown select", index=2)  # another query
        second = wait_for_new_image(page, first)
        box = page.locator(f"{WIDGET} .widget-text input")
        box.fill(box.input_value() + " and make everything much larger")
        box.press("Enter")  # continuous_update=False: the model re-runs on Enter
        third = wait_for_new_image(page, second)
        assert len({first, second, third}) == 3
        assert not page.query_selector_all(f"{WIDGET} .widget-html .error, {WIDGET} span[style*='#b00']")
        if os.environ.get("CIRLAB_SCREENSHOTS"):  # tools/screenshots.py sets it
            page.locator(WIDGET).screenshot(path=os.environ["CIRLAB_SCREENSHOTS"])
    assert not (checkout / "notebooks" / "runs").exists()  # output went to runs/ of the checkout, not notebooks/
    config = json.loads((checkout / "runs" / "router_explorer" / "config.json").read_text())
    assert Path(config["run_dir"]) == checkout / "reports" / "train"  # make demo's run, found from notebooks/
    print(f"browser test: {time.time() - t0:.0f} s with the server")


@pytest.mark.slow
def test_dime_explorer_rescores_an_edited_caption_in_jupyterlab(checkout, monkeypatch):
    """The README's second explorer: ``dataset = "f30k"`` opens make demo's DIME run; choosing another image and then
    editing the caption must each re-score the pair and redraw its paths, with no widget or cell error."""
    for var in ("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS"):
        monkeypatch.delenv(var, raising=False)
    notebook = "notebooks/router_explorer_f30k.ipynb"
    _with_parameter(checkout / "notebooks" / "router_explorer.ipynb", "dataset", "f30k", checkout / notebook)
    with JupyterLab(checkout) as lab, chromium(CHROMIUM) as page:
        try:
            run_explorer(page, lab, notebook)
        except Exception:
            raise AssertionError(f"the DIME explorer did not render; server log:\n{lab.server_log()[-3000:]}\n"
                                 f"page text:\n{page.inner_text('body')[-3000:]}")
        assert cell_errors(page) == []
        first = explorer_image(page)
        image = page.locator(f"{WIDGET} .widget-dropdown select").nth(1)  # pair, then image
        assert image.is_enabled()  # the notebook gave the explorer a pair function: re-scoring is live
        image.select_option(index=1)
        second = wait_for_new_image(page, first)
        box = page.locator(f"{WIDGET} .widget-text input")
        box.fill("a small red square next to a big blue circle")
        box.press("Enter")
        third = wait_for_new_image(page, second)
        assert len({first, second, third}) == 3
        assert not page.query_selector_all(f"{WIDGET} .widget-html .error, {WIDGET} span[style*='#b00']")
    config = json.loads((checkout / "runs" / "router_explorer" / "config.json").read_text())
    assert Path(config["run_dir"]) == checkout / "reports" / "train_dime" and config["dataset"] == "f30k"
