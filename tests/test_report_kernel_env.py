"""`cirlab report`'s kernels leave the user's folders alone: the connection file goes in a folder of the report's own
(not straight into $TMPDIR, whose mode jupyter_client changed), IPython keeps no history of the notebooks' cells,
Ctrl-C kills the kernels (a shut-down kernel printed a ZMQError traceback), a read-only cache or a missing home
folder does not stop the report."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from cirlab import report

pytest.importorskip("jupyter_client")
# the folders below the home folder the report's kernels would use, and where they go in one cirlab makes
HOME_FOLDERS = {"JUPYTER_DATA_DIR": "jupyter/data", "JUPYTER_CONFIG_DIR": "jupyter/config",
                "JUPYTER_RUNTIME_DIR": "jupyter/runtime", "IPYTHONDIR": "ipython", "MPLCONFIGDIR": "matplotlib"}


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch):
    """$TMPDIR a fresh folder without the sticky bit (tempfile reads it again)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    folder.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return folder


@pytest.fixture
def no_home(monkeypatch):
    """os.path.expanduser("~") as it is without HOME and without a passwd entry for the user id: unexpanded."""
    real = os.path.expanduser
    monkeypatch.setattr(os.path, "expanduser", lambda path: path if str(path) == "~" else real(path))
    for var in HOME_FOLDERS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.skipif(os.name != "posix", reason="the IPC kernel manager is POSIX only")
def test_the_kernel_keeps_its_files_in_a_folder_of_its_own_and_no_history(own_tmpdir):
    km = report._kernel_manager_class()(kernel_name="python3")
    folder = Path(km.connection_file).parent
    assert folder.parent == own_tmpdir and folder.name.startswith("cirlab-kernel-")

    async def start_and_stop() -> list[str]:
        await km.start_kernel()
        try:
            return list(km.provisioner.process.args)  # the command it was started with
        finally:
            await km.shutdown_kernel(now=True)

    assert "--HistoryManager.enabled=False" in asyncio.run(start_and_stop())
    assert not folder.exists()  # removed with the kernel's connection file and sockets
    assert stat.S_IMODE(own_tmpdir.stat().st_mode) == 0o755  # no sticky bit set on the user's folder
    assert list(own_tmpdir.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="the IPC kernel manager is POSIX only")
def test_a_dead_kernels_clean_up_removes_its_folder(own_tmpdir):
    """nbclient only calls cleanup_resources for a kernel that died (one a stop killed)."""
    km = report._kernel_manager_class()(kernel_name="python3")
    folder = Path(km.connection_file).parent
    assert folder.is_dir() and folder.parent == own_tmpdir
    asyncio.run(km.cleanup_resources())
    assert list(own_tmpdir.iterdir()) == []


def test_only_ipykernel_gets_ipythons_options():
    assert report.is_ipykernel(["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    assert not report.is_ipykernel(["xpython", "-f", "{connection_file}"])


class _Process:
    def __init__(self) -> None:
        self.killed = False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True


class _Manager:
    def __init__(self) -> None:
        self.provisioner = type("Provisioner", (), {"process": _Process()})()


def test_ctrl_c_kills_the_kernels_as_sigterm_does(monkeypatch):
    """A kernel left running got jupyter_client's shutdown request mid-cell and printed a ZMQError traceback."""
    km = _Manager()
    monkeypatch.setattr(report, "_KERNELS", {km})
    papermill_level = logging.getLogger("papermill").level
    try:
        with pytest.raises(KeyboardInterrupt):
            report._on_sigint(signal.SIGINT, None)
    finally:
        report._INTERRUPTED.clear()
        logging.getLogger("papermill").setLevel(papermill_level)
    assert km.provisioner.process.killed


def test_after_a_stopped_report_the_next_kernel_of_the_process_is_not_killed(monkeypatch):
    """The stop's flags outlived the report: a notebook session's next run_notebook (or a report in a thread) had its
    kernel killed as it started, and a Ctrl-C that never happened reported."""
    monkeypatch.setattr(report, "_KERNELS", set())
    papermill_level = logging.getLogger("papermill").level
    try:
        # the handler called as Ctrl-C calls it (a test run under nohup has SIGINT ignored, which the block keeps)
        with pytest.raises(KeyboardInterrupt), report._SigtermAsInterrupt():
            report._on_sigint(signal.SIGINT, None)
    finally:
        logging.getLogger("papermill").setLevel(papermill_level)
    assert not report._INTERRUPTED.is_set() and not report._TERMINATING.is_set()


def test_a_cache_that_cannot_be_written_gets_a_temporary_kernel_spec(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder would be")  # unwritable, for root too
    monkeypatch.setenv("CIRLAB_CACHE", str(blocked))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    folder = report._environ_restored(check_temporary_kernel_spec)()  # as run_report: removed after it
    assert not folder.exists()


def check_temporary_kernel_spec() -> Path:
    assert report.this_python_kernel() == report.THIS_PYTHON_KERNEL
    folder = Path(os.environ["JUPYTER_PATH"].split(os.pathsep)[0])
    spec = json.loads((folder / "kernels" / report.THIS_PYTHON_KERNEL / "kernel.json").read_text())
    assert spec["argv"][:3] == [report.sys.executable, "-m", "ipykernel_launcher"]
    report.this_python_kernel()  # an entry process: finds it on JUPYTER_PATH, makes no second one
    assert os.environ["JUPYTER_PATH"] == str(folder)
    return folder


def test_no_home_folder_points_jupyter_ipython_and_matplotlib_at_the_cache(tmp_path, monkeypatch, no_home):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))  # the user's own choice stays
    report._environ_restored(check_home_env)(tmp_path / "cache" / "report-home", kept={"MPLCONFIGDIR"})
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")
    assert not {"JUPYTER_DATA_DIR", "IPYTHONDIR"} & set(os.environ)  # put back after the report


def check_home_env(base: Path, kept: set[str]) -> None:
    report.kernel_home_env()
    for var, below in HOME_FOLDERS.items():
        if var not in kept:
            assert os.environ[var] == str(base / below)


def test_no_home_and_no_writable_cache_use_a_temporary_folder(tmp_path, monkeypatch, no_home, own_tmpdir):
    blocked = tmp_path / "cache"
    blocked.write_text("")
    monkeypatch.setenv("CIRLAB_CACHE", str(blocked))
    seen: list[str] = []
    report._environ_restored(lambda: (report.kernel_home_env(), seen.append(os.environ["JUPYTER_DATA_DIR"])))()
    assert Path(seen[0]).parent.parent.name.startswith("cirlab-report-home-")
    assert list(own_tmpdir.iterdir()) == []  # removed after the report


def test_a_writable_home_keeps_its_jupyter_folders_and_ipython_moves(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    for var in HOME_FOLDERS:
        monkeypatch.delenv(var, raising=False)
    report._environ_restored(lambda: (report.kernel_home_env(), check_only_ipython(tmp_path)))()


def check_only_ipython(tmp_path: Path) -> None:
    assert os.environ["IPYTHONDIR"] == str(tmp_path / "cache" / "report-home" / "ipython")
    assert not {"JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "MPLCONFIGDIR"} & set(os.environ)


def test_a_report_without_home_or_writable_cache_runs_and_leaves_tmpdir_as_it_was(tmp_path, monkeypatch, no_home,
                                                                               own_tmpdir):
    """End to end, a stand-in notebook in a kernel spec that is not installed (the report's own kernel then)."""
    nbformat = pytest.importorskip("nbformat")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("out = ''  # output folder")
    params.metadata["tags"] = ["parameters"]
    body = ("import json, os, pathlib\np = pathlib.Path(out)\np.mkdir(parents=True, exist_ok=True)\n"
            "seen = {'history': get_ipython().history_manager.enabled, 'env': dict(os.environ)}\n"
            "(p / 'seen.json').write_text(json.dumps(seen))")
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "no-such-kernel", "display_name": "x", "language": "python"}
    nbformat.write(nb, nbs / "evaluate.ipynb")
    blocked = tmp_path / "cache"
    blocked.write_text("")
    monkeypatch.setenv("CIRLAB_CACHE", str(blocked))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    monkeypatch.setattr(report, "ORDER", ("evaluate",))
    monkeypatch.setattr(report, "REPORT_PARAMETERS", {"evaluate": {"out": "{out}/evaluate"}})
    out = tmp_path / "reports"
    code = report.run_report(out, only="evaluate", overrides={"data_root": str(tmp_path)}, notebook_dir=nbs,
                             stream=io.StringIO())
    assert code == 0
    seen = json.loads((out / "evaluate" / "seen.json").read_text())
    assert seen["history"] is False
    assert all(seen["env"][var].startswith(str(own_tmpdir)) for var in HOME_FOLDERS)
    assert stat.S_IMODE(own_tmpdir.stat().st_mode) == 0o755
    assert list(own_tmpdir.iterdir()) == []  # the kernel's and the report's temporary folders are gone
    assert not set(HOME_FOLDERS) & set(os.environ)
