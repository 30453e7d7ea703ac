"""JupyterLab in a real headless Chromium, for tests/test_browser.py and tools/screenshots.py.

:class:`JupyterLab` starts ``jupyter lab`` on a free local port (its own config, data and runtime folders, a token,
the app exposed to the page so that a test can run commands) and stops it; :func:`chromium` launches Debian's
``/usr/bin/chromium`` through Playwright (no browser download) with the flags this machine needs;
:func:`run_explorer` opens ``notebooks/router_explorer.ipynb``, runs every cell and waits for the widget.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDGET = ".jp-OutputArea-output .widget-vbox"  # the explorer's VBox once the widget manager rendered it


def chromium_path() -> str | None:
    """Debian's Chromium (``make browser`` / ``.ci/run`` install it), or any chromium on PATH; None if absent."""
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class JupyterLab(contextlib.AbstractContextManager):
    """``jupyter lab`` serving ``root`` on 127.0.0.1 (a free port); ``url(path)`` opens a document."""

    def __init__(self, root: Path, token: str = "cirlab-test") -> None:
        self.root, self.token, self.port = Path(root), token, free_port()
        self.home = Path(tempfile.mkdtemp(prefix="cirlab-lab-"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "JupyterLab":
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(self.home / "config"), JUPYTER_DATA_DIR=str(self.home / "data"),
                   JUPYTER_RUNTIME_DIR=str(self.home / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(self.home / "ws"))
        for plugin, values in (("docmanager-extension/plugin", '{"autosave": false}'),
                               ("apputils-extension/notification", '{"fetchNews": "false"}')):
            path = self.home / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(values)
        command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
                   f"--ServerApp.root_dir={self.root}", f"--IdentityProvider.token={self.token}",
                   "--ServerApp.port_retries=0", "--LabApp.expose_app_in_browser=True",
                   f"--LabApp.user_settings_dir={self.home / 'settings'}",
                   "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly"]  # nothing looks for extensions or news online
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")  # CI and this project's machines run as root
        self.log = open(self.home / "server.log", "w")
        self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.server_log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status?token={self.token}", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within 90 s: {self.server_log()[-2000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{path}?token={self.token}&reset"

    def server_log(self) -> str:
        self.log.flush()
        return (self.home / "server.log").read_text(errors="replace")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the server shuts its kernels down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def chromium(executable: str, width: int = 1500, height: int = 1100) -> Iterator[Any]:
    """A Playwright page in headless Chromium (Debian's binary: Playwright's own browser download is not used)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def run_explorer(page: Any, lab: JupyterLab, notebook: str = "notebooks/router_explorer.ipynb",
                 timeout_s: float = 240) -> None:
    """Open the notebook, wait for its kernel, run every cell and wait until the explorer widget is on the page."""
    page.goto(lab.url(notebook))
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                           timeout=120_000)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(f"{WIDGET} img", timeout=timeout_s * 1000)
    page.wait_for_function(_ALL_RAN, timeout=timeout_s * 1000)


# every code cell has run (an execution count) and the kernel is idle
_ALL_RAN = """() => { const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel.sessionContext.session.kernel; const cells = panel.content.model.cells;
  for (let i = 0; i < cells.length; i++) { const c = cells.get(i);
    if (c.type === 'code' && !c.executionCount) return false; }
  return kernel.status === 'idle'; }"""


def cell_errors(page: Any) -> list[str]:
    """``ename: evalue`` of every error output in the open notebook's model (rendered or not: Lab windows cells)."""
    return page.evaluate("""() => { const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
      const errors = [];
      for (let i = 0; i < cells.length; i++) { const c = cells.get(i); if (c.type !== 'code') continue;
        for (let j = 0; j < c.outputs.length; j++) { const o = c.outputs.get(j).toJSON();
          if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue); } }
      return errors; }""")


def explorer_image(page: Any) -> str:
    """The ``src`` of the figure the explorer shows now (a data URL: it changes when the figure does)."""
    return page.eval_on_selector(f"{WIDGET} img", "img => img.src")


def wait_for_new_image(page: Any, before: str, timeout_s: float = 120) -> str:
    page.wait_for_function(f"(before) => {{ const img = document.querySelector('{WIDGET} img');"
                           " return img && img.src !== before; }", arg=before, timeout=timeout_s * 1000)
    return explorer_image(page)
