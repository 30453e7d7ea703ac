"""Fault injection (issue 18, "Nothing lost, nothing silent").

Every kind of bad input or fault below ends in one of two ways: a clear error (a one-line message naming the field
or file, exit status 2 -- 1 for ``cirlab data check``'s "problems found", 75 where the same command may succeed
later: a folder in use by another cirlab process, a full disk -- and no traceback), or, for faults the
tool has to absorb (Ctrl-C, a torn log line, a stale lock, an orphaned temporary file, a 600k-word caption), the
right result plus a line saying what was done. No kind may end in a traceback, in a silent (wrong or unexplained)
result, or with a file outside its own run folder changed: every case runs in a workspace holding somebody's own
data, which is hashed before and after.

Each kind is one entry of :data:`FAULTS`. The tests run them all; ``python bench/faults.py`` runs the same entries
and writes the table of ``reports/benchmarks/faults.md``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

import stub_models  # noqa: F401 - registers stub_cir / stub_itm
from fixtures_data import write_cirr, write_fashioniq, write_image, write_precomp

from cirlab.cli import EXIT_RETRY, main
from cirlab.core.errors import EXIT_FOUND

GROUPS = ("data loss", "silently wrong", "wrong cause", "traceback or late failure")
VERDICTS = ("clear", "traceback", "silent", "unclear message", "data lost")


# ============================================================================================================ harness


@dataclass
class Outcome:
    verdict: str  # one of VERDICTS
    detail: str = ""


@dataclass
class Call:
    """One in-process ``cirlab`` command: exit status (None when an exception escaped), log records, stdout."""

    code: int | None
    exc: BaseException | None
    log: list[tuple[int, str]]
    stdout: str

    @property
    def errors(self) -> list[str]:
        return [m for level, m in self.log if level >= logging.ERROR]

    @property
    def text(self) -> str:
        return "\n".join(m for _, m in self.log) + "\n" + self.stdout


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


@contextlib.contextmanager
def captured_logs() -> Iterator[_Capture]:
    root, handler = logging.getLogger(), _Capture()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def cli(*argv: Any) -> Call:
    """``cirlab ARGV`` in this process; an exception escaping ``main`` is a traceback the user would have seen."""
    out = io.StringIO()
    with captured_logs() as logs, contextlib.redirect_stdout(out):
        try:
            code, exc = main([str(a) for a in argv]), None
        except SystemExit as err:  # argparse: usage errors exit 2 with a usage line
            code, exc = (err.code if isinstance(err.code, int) else 2), None
        except BaseException as err:  # noqa: BLE001 - the point is to see it
            code, exc = None, err
    return Call(code, exc, logs.records, out.getvalue())


def expect_error(call: Call, pattern: str, code: int = 2, forbid: str | None = None) -> Outcome:
    """A clear error: no traceback, exit status ``code``, one ERROR line (or printed report) matching ``pattern``."""
    if call.exc is not None:
        return Outcome("traceback", f"{type(call.exc).__name__}: {call.exc}")
    if call.code == 0:
        return Outcome("silent", f"exit 0; expected an error matching {pattern!r}")
    shown = " | ".join(call.errors) or call.stdout.strip().replace("\n", " | ")
    if call.code != code:
        return Outcome("unclear message", f"exit {call.code} (expected {code}): {shown[:300]}")
    if any("\n" in e for e in call.errors):
        return Outcome("unclear message", f"multi-line error: {shown[:300]}")
    if not re.search(pattern, call.text):
        return Outcome("unclear message", f"message does not match {pattern!r}: {shown[:300]}")
    if forbid and re.search(forbid, call.text):
        return Outcome("unclear message", f"message mentions {forbid!r}: {shown[:300]}")
    return Outcome("clear", shown[:220])


def expect_ok(call: Call, pattern: str | None = None, code: int = 0) -> Outcome:
    """A fault the tool absorbs: exit ``code`` and, with ``pattern``, a line saying what it did."""
    if call.exc is not None:
        return Outcome("traceback", f"{type(call.exc).__name__}: {call.exc}")
    if call.code != code:
        return Outcome("silent" if call.code == 0 else "unclear message",
                       f"exit {call.code} (expected {code}): {' | '.join(call.errors)[:300]}")
    found = re.search(pattern, call.text) if pattern else None
    if pattern and not found:
        return Outcome("silent", f"nothing says {pattern!r}")
    said = [m for _, m in call.log if pattern and re.search(pattern, m)]
    return Outcome("clear", (said[0] if said else found.group(0).replace("\n", " | ") if found
                             else f"exit {call.code}")[:220])


def check(condition: bool, detail: str, verdict: str = "silent") -> Outcome | None:
    return None if condition else Outcome(verdict, detail)


def first_failure(*outcomes: Outcome | None) -> Outcome:
    """The first outcome that is not clear, else the first (the one describing the case)."""
    real = [o for o in outcomes if o is not None]
    return next((o for o in real if o.verdict != "clear"), real[0])


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


class Shared:
    """What every case may reuse: the tiny synthetic data, a finished run, an emoji tarball (built once)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.synth = self.root / "synth"
        self._run: Path | None = None

    def config(self, path: Path, *, train: dict | None = None, dataset: dict | None = None, top: dict | None = None,
               eval: dict | None = None) -> Path:
        """A stub_cir run config on the shared synthetic Fashion-IQ dress data (3 steps)."""
        config = {"model": "stub_cir", "preset": "tiny", "model_overrides": {"embed_dim": 12},
                  "dataset": {"name": "fashioniq", "category": "dress",
                              "synthetic": {"size": "tiny", "out": str(self.synth), "image_size": 32},
                              **(dataset or {})},
                  "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-2, "log_every": 1,
                            "progress": "none", "tensorboard": False, "selection_metric": "avg",
                            "checkpoint_every": 1, **(train or {})},
                  "eval": {"splits": ["val"], "k": 5, "batch_size": 16, **(eval or {})}, **(top or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def finished_run(self) -> Path:
        """A completed 3-step run folder (trained once, copied by the cases that need one)."""
        if self._run is None:
            run = self.root / "finished"
            call = cli("train", self.config(self.root / "base.yaml"), "--output-dir", run)
            assert call.code == 0 and call.exc is None, call.errors or call.exc
            self._run = run
        return self._run

    def tarball(self) -> Path:
        path = self.root / "emoji-datasource-google-16.0.0.tgz"
        if not path.is_file():
            from test_emoji import _images, fake_entries, write_tarball

            write_tarball(path, fake_entries(), _images(fake_entries()))
        return path


class Workspace:
    """One case's folder: ``user/`` holds somebody's own dataset and notes (hashed before and after)."""

    def __init__(self, root: Path, shared: Shared) -> None:
        self.root, self.shared = Path(root), shared
        self.user = self.root / "user"
        write_fashioniq(self.user / "fashioniq", categories=("dress",), splits=("val",), n_queries=2, n_extra=0)
        (self.user / "notes.txt").write_text("my own notes\n")
        self.allowed: list[Path] = []  # what this case may change (its run folder, a --force target)
        self.before = tree_hashes(self.root)

    def run_dir(self, name: str = "run", *, copy_finished: bool = False) -> Path:
        path = self.root / name
        self.allowed.append(path)
        if copy_finished:
            shutil.copytree(self.shared.finished_run(), path)
        return path

    def config(self, name: str = "run.yaml", **changes: Any) -> Path:
        path = self.root / "configs" / name
        self.allowed.append(path)
        return self.shared.config(path, **changes)

    def lost(self) -> list[str]:
        after = tree_hashes(self.root)
        allowed = [str(p.relative_to(self.root)) for p in self.allowed]

        def mine(name: str) -> bool:
            return any(name == a or name.startswith(a + os.sep) for a in allowed)

        return sorted(k for k in self.before if not mine(k) and after.get(k) != self.before[k])


@dataclass
class Fault:
    name: str
    group: str
    expected: str
    run: Callable[[Workspace], Outcome]
    absorbed: bool = False  # the tool must absorb it (right result + a line saying so), not refuse it


FAULTS: list[Fault] = []


def fault(group: str, expected: str, absorbed: bool = False) -> Callable:
    assert group in GROUPS

    def register(fn: Callable[[Workspace], Outcome]) -> Callable:
        FAULTS.append(Fault(fn.__name__.removeprefix("f_").replace("_", " "), group, expected, fn, absorbed))
        return fn

    return register


def run_fault(kind: Fault, workdir: Path, shared: Shared) -> Outcome:
    """Run one kind in a fresh workspace; a changed file outside the case's own folders is data loss."""
    ws = Workspace(workdir, shared)
    try:
        outcome = kind.run(ws)
    except Exception as err:  # noqa: BLE001 - an exception the case did not expect is a traceback
        outcome = Outcome("traceback", f"{type(err).__name__}: {err}")
    lost = ws.lost()
    if lost:
        outcome = Outcome("data lost", f"changed or deleted: {', '.join(lost[:5])}")
    return outcome


# ============================================================================================================ data loss


@fault("data loss", "refused, names the folder it would delete")
def f_synth_out_onto_a_dataset_folder(ws: Workspace) -> Outcome:
    return expect_error(cli("data", "synth", "--out", ws.user, "--size", "tiny", "--layouts", "fashioniq"),
                        r"refusing to write into .*user.*would delete .*fashioniq \(\d+ files")


@fault("wrong cause", "refused without suggesting --force, which would not help")
def f_synth_out_onto_a_file(ws: Workspace) -> Outcome:
    notes = ws.root / "notes.md"
    notes.write_text("mine")
    return expect_error(cli("data", "synth", "--out", notes, "--size", "tiny", "--layouts", "fashioniq"),
                        r"refusing to write into .*notes\.md: it is a file, not a folder", forbid="--force")


@fault("data loss", "refused")
def f_synth_out_onto_a_non_empty_folder(ws: Workspace) -> Outcome:
    (ws.root / "mine").mkdir()
    (ws.root / "mine" / "thesis.tex").write_text("\\section{}")
    ws.before = tree_hashes(ws.root)
    return expect_error(cli("data", "synth", "--out", ws.root / "mine", "--size", "tiny", "--layouts", "shoes"),
                        r"refusing to write into .*mine: it is not empty and was not created")


@fault("data loss", "its own earlier output is left as it is; --force regenerates it", absorbed=True)
def f_synth_rerun_into_its_own_folder(ws: Workspace) -> Outcome:
    out = ws.run_dir("synth")
    args = ("data", "synth", "--out", out, "--size", "tiny", "--layouts", "shoes", "--image-size", "16")
    first, second = cli(*args), cli(*args)
    kept = tree_hashes(out)
    third = cli(*args, "--force")
    return first_failure(expect_ok(first, r"shoes"), expect_ok(second, r"left as it is"),
                         expect_ok(third, r"synthetic shoes written"),
                         check(tree_hashes(out) == kept, "--force wrote other files", "not byte-identical"))


@fault("data loss", "the command leaves it as it is; the API's rewrite is refused, naming the user's files")
def f_synth_rerun_over_files_a_user_added(ws: Workspace) -> Outcome:
    from cirlab.data.generators import synthetic
    from cirlab.data.generators._owned import NotOwnedError

    out = ws.run_dir("synth")
    args = ("data", "synth", "--out", out, "--size", "tiny", "--layouts", "shoes", "--image-size", "16")
    first = cli(*args)
    (out / "shoes" / "my_analysis").mkdir()
    (out / "shoes" / "my_analysis" / "notes.txt").write_text("mine\n")
    (out / "shoes" / "attributedata" / "my_crop.png").write_bytes(b"png")
    kept = tree_hashes(out)
    second = cli(*args)
    try:
        synthetic.generate(out, size="tiny", layouts="shoes", image_size=16)
        api = Outcome("silent", "generate() rewrote the folder over the user's files")
    except NotOwnedError as err:
        api = check(bool(re.search(r"refusing to replace .*shoes: it holds files the generator did not write "
                                   r"\(attributedata/my_crop\.png, my_analysis\)", str(err))), str(err),
                    "unclear message")
    return first_failure(expect_ok(first, r"shoes"), expect_ok(second, r"left as it is"), api,
                         check(tree_hashes(out) == kept, "the user's files or the earlier output changed",
                               "data lost"))


@fault("data loss", "refused: a folder owned only by a manifest's file name vouches for none of its other files")
def f_synth_over_a_folder_with_only_its_manifest_names(ws: Workspace) -> Outcome:
    out = ws.run_dir("synth")
    (out / "shoes").mkdir(parents=True)
    (out / "synthetic.json").write_text("{}")  # the generator's file names, no ownership marker (an old build,
    (out / "shoes" / "synthetic_meta.json").write_text("{}")  # or anyone's folder)
    (out / "shoes" / "precious.txt").write_text("mine\n")
    kept = tree_hashes(out)
    call = cli("data", "synth", "--out", out, "--size", "tiny", "--layouts", "shoes", "--image-size", "16")
    return first_failure(expect_error(call, r"refusing to replace .*shoes: it holds files the generator did not "
                                            r"write \(precious\.txt\)"),
                         check(tree_hashes(out) == kept, "the user's file changed", "data lost"))


@fault("data loss", "refused, names the user's file inside its earlier build")
def f_emoji_rebuild_over_a_file_a_user_added(ws: Workspace) -> Outcome:
    out = ws.run_dir("emoji")
    first = cli("data", "emoji", "--tarball", ws.shared.tarball(), "--out", out)
    (out / "my_notes.txt").write_text("mine\n")
    kept = tree_hashes(out)
    second = cli("data", "emoji", "--tarball", ws.shared.tarball(), "--out", out, "--seed", "1")
    return first_failure(expect_ok(first, r"emoji dataset written"),
                         expect_error(second, r"refusing to replace .*emoji: it holds files the generator did not "
                                              r"write \(my_notes\.txt\)"),
                         check(tree_hashes(out) == kept, "the user's file or the earlier build changed", "data lost"))


@fault("data loss", "--force replaces a foreign folder and says so", absorbed=True)
def f_synth_force_onto_a_foreign_folder(ws: Workspace) -> Outcome:
    ws.allowed.append(ws.user)
    call = cli("data", "synth", "--out", ws.user, "--size", "tiny", "--layouts", "fashioniq", "--image-size", "16",
               "--force")
    return first_failure(expect_ok(call, r"--force: replacing .*fashioniq \(\d+ files"),
                         check((ws.user / "fashioniq" / "synthetic_meta.json").is_file(), "not replaced"),
                         check((ws.user / "notes.txt").is_file(), "a file outside the layouts went", "data lost"))


@fault("data loss", "refused, names the folder it would delete")
def f_emoji_out_onto_a_dataset_folder(ws: Workspace) -> Outcome:
    return expect_error(cli("data", "emoji", "--tarball", ws.shared.tarball(), "--out", ws.user / "fashioniq"),
                        r"refusing to write into .*fashioniq.*would delete")


@fault("data loss", "the second run is refused while the first holds the folder")
def f_two_runs_into_one_folder_at_once(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    holder = _hold_lock(run)
    try:
        call = cli("train", ws.config(), "--output-dir", run)
    finally:
        holder.kill()
        holder.wait()
    return first_failure(expect_error(call, rf"{re.escape(str(run))} is in use by another cirlab process \(pid "
                                            rf"{holder.pid}", code=EXIT_RETRY),
                         check(not (run / "config.yaml").exists(), "the refused run wrote into the folder"))


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (a live cirlab run), returned once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cirlab.core.io import folder_lock; "
                               "lock = folder_lock(sys.argv[1]); lock.__enter__(); print('locked', flush=True); "
                               "time.sleep(120)", str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@fault("data loss", "the second report is refused while the first writes the folder; nothing in it moves")
def f_two_reports_into_one_folder_at_once(ws: Workspace) -> Outcome:
    out = ws.root / "reports"
    (out / "rank_shift").mkdir(parents=True)
    (out / "rank_shift" / "metrics.json").write_text("{}")  # the first report's results of an earlier run
    (out / "rank_shift" / "report.json").write_text('{"status": "ok"}')
    holder = _hold_lock(out)
    try:
        before = {k: v for k, v in tree_hashes(out).items() if not k.endswith(".cirlab.lock")}
        call = cli("report", "--out", out, "--only", "rank_shift", "--set", f"data_root={ws.user}")
        after = {k: v for k, v in tree_hashes(out).items() if not k.endswith(".cirlab.lock")}
    finally:
        holder.kill()
        holder.wait()
    return first_failure(expect_error(call, rf"{re.escape(str(out.resolve()))} is in use by another cirlab process "
                                            rf"\(pid {holder.pid}", code=EXIT_RETRY),
                         check(after == before, "the refused report changed the folder"))


@fault("data loss", "a report refuses to replace a folder it did not write (--out runs over a training run)")
def f_report_out_over_a_training_run(ws: Workspace) -> Outcome:
    out = ws.root / "runs"
    (out / "train" / "checkpoints").mkdir(parents=True)
    (out / "train" / "checkpoints" / "best.pt").write_bytes(b"hours of training")
    before = tree_hashes(out)
    call = cli("report", "--out", out, "--only", "train", "--set", f"data_root={ws.user}")
    return first_failure(expect_error(call, rf"{re.escape(str(out.resolve() / 'train'))} exists and was not written "
                                            r"by cirlab report"),
                         check(tree_hashes(out) == before, "the refused report changed the folder"))


def _refused_leaving(folder: Path, pattern: str, *argv: Any) -> Outcome:
    """``cirlab ARGV`` refused with ``pattern``, ``folder`` (the user's files the command must not touch) unchanged."""
    before = tree_hashes(folder)
    call = cli(*argv)
    return first_failure(expect_error(call, pattern),
                         check(tree_hashes(folder) == before, f"the refused command changed {folder}"))


@fault("data loss", "a report refuses to write over an index.html it did not write")
def f_report_out_over_a_users_index_html(ws: Workspace) -> Outcome:
    out = ws.root / "site"
    out.mkdir()
    (out / "index.html").write_text("<html>my page</html>")
    return _refused_leaving(out, r"index\.html exists and was not written by cirlab report",
                            "report", "--out", out, "--only", "train", "--set", f"data_root={ws.user}")


@fault("data loss", "--resume with no last.pt refuses a finished run (it replaced best.pt and the metrics)")
def f_resume_a_finished_run_without_last_pt(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    (run / "checkpoints" / "last.pt").unlink()
    return _refused_leaving(run, r"--resume: .* but no checkpoints/last\.pt to continue from",
                            "train", ws.config(), "--output-dir", run, "--resume")


@fault("data loss", "--overwrite refuses run-like folders (checkpoints/, tb/) no run wrote (it deleted them)")
def f_overwrite_a_folder_of_the_users_checkpoints(ws: Workspace) -> Outcome:
    mine = ws.root / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "my_model.pt").write_bytes(b"weights")
    (mine / "tb").mkdir()
    return _refused_leaving(mine, r"holds checkpoints, tb but no run's config\.yaml or log\.jsonl",
                            "train", ws.config(), "--output-dir", mine, "--overwrite")


@fault("silently wrong", "refused: it qualifies --resume")
def f_allow_config_change_without_resume(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    call = cli("train", ws.config(), "--output-dir", run, "--allow-config-change")
    return first_failure(expect_error(call, r"--allow-config-change applies to a resume \(--resume or train\.resume"),
                         check(not run.exists(), f"{run} was created"))


@fault("traceback or late failure", "refused naming the field, before data or model")
def f_missing_vocab_file(ws: Workspace) -> Outcome:
    return _config_error(ws, r"model_overrides\.vocab_file: .*nope\.txt does not exist", "model=cala",
                         "model_overrides={}", f"model_overrides.vocab_file={ws.root / 'nope.txt'}")


@fault("traceback or late failure", "refused before evaluating (a KeyError after every split)")
def f_eval_split_twice(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("eval", run, "--split", "val", "--split", "val"), r"'val' listed more than once")


@fault("data loss", "the second waits for the first and reuses its data", absorbed=True)
def f_two_runs_generating_the_same_synthetic_data(ws: Workspace) -> Outcome:
    from cirlab.data.generators import synthetic

    out = ws.root / "synth"
    code = ("import sys; from cirlab.data.generators import synthetic; "
            "synthetic.ensure(sys.argv[1], size='tiny', layouts=['fashioniq', 'precomp'], image_size=24)")
    others = [subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    errors = [o.communicate(timeout=300)[1] for o in others]
    failed = [e.strip().splitlines()[-1] for o, e in zip(others, errors) if o.returncode != 0]
    if failed:
        return Outcome("traceback", failed[0])
    fresh = ws.root / "alone"
    synthetic.generate(fresh, size="tiny", layouts=["fashioniq", "precomp"], image_size=24)
    same = tree_hashes(out) == tree_hashes(fresh)
    return first_failure(Outcome("clear", "both processes finished; the tree equals one written alone"),
                         check(same, "the tree differs from one written by a single process"))


@fault("data loss", "a lock left by a killed run is taken over", absorbed=True)
def f_stale_lock_of_a_killed_run(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    run.mkdir()
    (run / ".cirlab.lock").write_text("pid 999999 on elsewhere since 2020-01-01 00:00:00\n")
    return expect_ok(cli("train", ws.config(), "--output-dir", run), r"stale lock of a finished process")


@fault("data loss", "refused; the earlier run is untouched")
def f_second_run_into_a_used_folder(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    before = tree_hashes(run)
    call = cli("train", ws.config(train={"seed": 1}), "--output-dir", run)
    return first_failure(expect_error(call, r"already holds a finished run \(config.yaml, log.jsonl, checkpoints.*"
                                            r"--resume.*--overwrite"),
                         check(tree_hashes(run) == before, "the earlier run's files changed", "data lost"))


@fault("data loss", "--overwrite replaces the run and says so", absorbed=True)
def f_overwrite_replaces_a_run(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    call = cli("train", ws.config(train={"seed": 1}), "--output-dir", run, "--overwrite")
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    return first_failure(expect_ok(call, r"overwrite: removed the previous run's"),
                         check(steps == [1, 2, 3], f"log steps {steps}: the old log was kept"))


@fault("data loss", "refused, --overwrite too; the user's own config.yaml is untouched")
def f_overwrite_over_a_hand_written_config(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    run.mkdir()
    mine = "# my experiment, kept next to its outputs\nmodel: stub_cir\ntrain: {lr: 0.001}\n"
    (run / "config.yaml").write_text(mine)
    call = cli("train", ws.config(), "--output-dir", run, "--overwrite")
    return first_failure(expect_error(call, r"config.yaml is not a config a cirlab run wrote .*move that file"),
                         check((run / "config.yaml").read_text() == mine, "the user's config.yaml changed",
                               "data lost"))


@fault("data loss", "refused before the previous run is removed")
def f_overwrite_with_a_wrong_dataset_root(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    before = tree_hashes(run)
    call = cli("train", ws.config(dataset={"root": str(ws.root / "no_such_data")}), "--output-dir", run,
               "--overwrite")
    return first_failure(expect_error(call, r"no_such_data: dataset root not found"),
                         check(tree_hashes(run) == before, "the previous run was removed", "data lost"))


def _resume_refused(ws: Workspace, pattern: str, **changes: Any) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    before = tree_hashes(run)
    call = cli("train", ws.config(**changes), "--output-dir", run, "--resume")
    return first_failure(expect_error(call, pattern),
                         check(tree_hashes(run) == before, "the stored run changed", "data lost"))


@fault("data loss", "refused, lists the difference")
def f_resume_with_another_batch_size(ws: Workspace) -> Outcome:
    return _resume_refused(ws, r"trained with other settings \(train\.batch_size: 8 -> 4\).*--allow-config-change",
                           train={"batch_size": 4, "max_steps": 5})


@fault("data loss", "refused, lists the difference")
def f_resume_with_another_seed(ws: Workspace) -> Outcome:
    return _resume_refused(ws, r"train\.seed: 0 -> 7", train={"seed": 7, "max_steps": 5})


@fault("data loss", "refused, lists the difference")
def f_resume_with_another_model(ws: Workspace) -> Outcome:
    return _resume_refused(ws, r"model_overrides\.embed_dim: 12 -> 16",
                           top={"model_overrides": {"embed_dim": 16}}, train={"max_steps": 5})


@fault("data loss", "continues, logging the differences", absorbed=True)
def f_resume_allow_config_change(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    call = cli("train", ws.config(train={"lr": 5e-3, "max_steps": 5}), "--output-dir", run, "--resume",
               "--allow-config-change")
    return expect_ok(call, r"train\.lr: 0\.01 -> 0\.005.*resuming anyway")


@fault("data loss", "refused")
def f_resume_and_overwrite_together(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("train", ws.config(), "--output-dir", run, "--resume", "--overwrite"),
                        r"--resume and --overwrite contradict")


# ============================================================================================================ silent


def _config_error(ws: Workspace, pattern: str, *sets: str, **changes: Any) -> Outcome:
    """A config mistake: refused before any data is read or any file is written."""
    run = ws.run_dir()
    call = cli("train", ws.config(**changes), "--output-dir", run, *[a for s in sets for a in ("--set", s)])
    return first_failure(expect_error(call, pattern),
                         check(not run.exists(), f"{run} was created before the config was checked"))


@fault("silently wrong", "refused, did you mean 'root'")
def f_misspelt_dataset_root(ws: Workspace) -> Outcome:
    return _config_error(ws, r"dataset: unknown field 'rooot' \(did you mean 'root'\?\)", f"dataset.rooot={ws.user}")


@fault("silently wrong", "refused, did you mean 'k'")
def f_unknown_eval_key(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval: unknown field 'kk' \(did you mean 'k'\?\)", "eval.kk=5")


@fault("silently wrong", "refused, did you mean 'pairs'")
def f_unknown_shoes_loader_option(ws: Workspace) -> Outcome:
    return _config_error(ws, r"dataset\.options \(shoes loader\): unknown field 'pair' \(did you mean 'pairs'\?\)",
                         "dataset.options.pair=amc", dataset={"name": "shoes", "category": None})


@fault("silently wrong", "refused: CIRR takes image_read only")
def f_unknown_cirr_loader_option(ws: Workspace) -> Outcome:
    return _config_error(ws, r"cirr loader\): unknown field 'protocol'; known: image_read",
                         "dataset.options.protocol=amc", dataset={"name": "cirr", "category": None,
                                                                  "test_split": "val"})


@fault("silently wrong", "refused, did you mean 'clip4cir'")
def f_bad_fashioniq_option_value(ws: Workspace) -> Outcome:
    return _config_error(ws, r"dataset\.options\.protocol: 'clip4cr' is not one of .*did you mean 'clip4cir'",
                         "dataset.options.protocol=clip4cr")


@fault("silently wrong", "refused, did you mean 'embed_dim'")
def f_unknown_model_override(ws: Workspace) -> Outcome:
    return _config_error(ws, r"model_overrides \(StubConfig\): unknown field 'embed_dimm' \(did you mean "
                             r"'embed_dim'\?\)", "model_overrides.embed_dimm=8")


@fault("traceback or late failure", "refused, names the field and the type it wants")
def f_mistyped_model_override(ws: Workspace) -> Outcome:
    return _config_error(ws, r"model_overrides: StubConfig\.embed_dim: expected int, got 'abc' \(str\)",
                         "model_overrides.embed_dim=abc")


@fault("silently wrong", "refused, did you mean 'size'")
def f_unknown_synthetic_key(ws: Workspace) -> Outcome:
    return _config_error(ws, r"dataset\.synthetic: unknown field 'sise' \(did you mean 'size'\?\)",
                         "dataset.synthetic.sise=small")


@fault("silently wrong", "refused, did you mean 'train'")
def f_misspelt_section_in_the_file(ws: Workspace) -> Outcome:
    path = ws.config()
    path.write_text(path.read_text().replace("\ntrain:", "\ntrian:"))
    return expect_error(cli("train", path, "--output-dir", ws.run_dir()), r"unknown name 'trian' \(did you mean "
                                                                           r"'train'\?\)")


@fault("silently wrong", "refused, did you mean 'train'")
def f_misspelt_section_in_set(ws: Workspace) -> Outcome:
    return _config_error(ws, r"--set trian\.lr: unknown section 'trian' \(did you mean 'train'\?\)", "trian.lr=1")


@fault("traceback or late failure", "refused in one line before any work (was: all memory, then MemoryError)")
def f_yaml_alias_bomb(ws: Workspace) -> Outcome:
    path = ws.config()  # nine levels of ten aliases: 481 bytes that expand to about 10**10 values
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path.write_text("\n".join(levels) + "\n" + path.read_text())
    return expect_error(cli("train", path, "--output-dir", ws.run_dir()),
                        r"run\.yaml: its anchors and aliases \(\*name\) expand it to 12,345,679,\d{3} values, more "
                        r"than the 100,000 a config may hold")


@fault("traceback or late failure", "refused in one line (was: a RecursionError traceback)")
def f_yaml_nested_too_deeply(ws: Workspace) -> Outcome:
    path = ws.config()
    path.write_text(path.read_text() + "deep: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return expect_error(cli("train", path, "--output-dir", ws.run_dir()),
                        r"run\.yaml: not valid YAML \(nested too deeply\)")


@fault("traceback or late failure", "refused in one line as not a run's config (was: a RecursionError traceback)")
def f_output_config_nested_too_deeply(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("deep: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return expect_error(cli("train", ws.config(), "--output-dir", run), r"config\.yaml is not a config a cirlab run "
                        r"wrote")


@fault("silently wrong", "refused, names both lines")
def f_duplicate_yaml_key(ws: Workspace) -> Outcome:
    path = ws.config()
    path.write_text(path.read_text().replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.5\n"))
    return expect_error(cli("train", path, "--output-dir", ws.run_dir()),
                        r"run\.yaml: line \d+: duplicate key 'lr' \(first at line \d+\)")


@fault("silently wrong", "trains on the synthetic data it was asked for, and says so", absorbed=True)
def f_empty_root_with_synthetic_opt_in(ws: Workspace) -> Outcome:
    return expect_ok(cli("train", ws.config(), "--output-dir", ws.run_dir()), r"this run uses the generated SYNTHETIC")


def _cirr_with_path(ws: Workspace, rel: str) -> Path:
    info = write_cirr(ws.root / "cirr_dataset", groups={"train": 1, "val": 1})
    path = info["root"] / "cirr" / "image_splits" / "split.rc2.val.json"
    data = json.loads(path.read_text())
    data[next(iter(data))] = rel
    path.write_text(json.dumps(data))
    ws.before = tree_hashes(ws.root)
    return info["root"]


def _outside_the_root(ws: Workspace, rel: str) -> Outcome:
    from cirlab.data import DataError, load_cir

    root = _cirr_with_path(ws, rel)
    call = cli("data", "check", "--dataset", "cirr", "--root", root)
    try:
        load_cir("cirr", root, "val")
        loaded = Outcome("silent", "load_cir accepted the path")
    except DataError as err:
        loaded = check("points outside the dataset root" in str(err), str(err), "unclear message")
    return first_failure(expect_error(call, r"image path .* points outside the dataset root", code=EXIT_FOUND),
                         loaded)


@fault("silently wrong", "data check and loading refuse it")
def f_cirr_path_escaping_the_root(ws: Workspace) -> Outcome:
    write_image(ws.root / "outside.png")
    return _outside_the_root(ws, "../outside.png")


@fault("silently wrong", "data check and loading refuse it")
def f_cirr_absolute_path(ws: Workspace) -> Outcome:
    return _outside_the_root(ws, str(write_image(ws.root / "elsewhere" / "x.png")))


def _data_check(root: Path, name: str, pattern: str, code: int = EXIT_FOUND) -> Outcome:
    return expect_error(cli("data", "check", "--dataset", name, "--root", root), pattern, code=code)


@fault("silently wrong", "data check fails naming the entry")
def f_check_empty_caption(ws: Workspace) -> Outcome:
    info = write_cirr(ws.root / "cirr_dataset", groups={"val": 1})
    path = info["root"] / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    entries[0]["caption"] = "  "
    path.write_text(json.dumps(entries))
    return _data_check(info["root"], "cirr", r"cap\.rc2\.val\.json \[pairid 100\]: 'caption' is empty")


def _fiq_with_image(ws: Workspace, data: bytes | None) -> Path:
    """A Fashion-IQ tree whose image dress_val_1.png holds ``data`` (None: a real PNG cut to 60% of its bytes)."""
    from PIL import Image

    info = write_fashioniq(ws.root / "fiq", categories=("dress",), splits=("val",))
    image = info["root"] / "images" / "dress_val_1.png"
    if data is None:
        noise = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(image)
        data = image.read_bytes()[: int(0.6 * image.stat().st_size)]
    image.write_bytes(data)
    return info["root"]


@fault("silently wrong", "data check fails by default (no --verify-images)")
def f_check_zero_byte_image(ws: Workspace) -> Outcome:
    return _data_check(_fiq_with_image(ws, b""), "fashioniq", r"dress_val_1\.png: cannot read image: the file is "
                                                              r"empty")


@fault("silently wrong", "data check fails by default (no --verify-images)")
def f_check_truncated_image(ws: Workspace) -> Outcome:
    return _data_check(_fiq_with_image(ws, None), "fashioniq", r"dress_val_1\.png: cannot read image: truncated PNG")


@fault("silently wrong", "data check fails by default (no --verify-images)")
def f_check_garbage_image(ws: Workspace) -> Outcome:
    return _data_check(_fiq_with_image(ws, os.urandom(300)), "fashioniq", r"dress_val_1\.png: cannot read image")


def _precomp_with(ws: Workspace, value: float) -> Path:
    info = write_precomp(ws.root / "data", splits=("dev",), n_images=3)
    feats = info["features"]["dev"].copy()
    feats[1, 2, 3] = value
    np.save(info["dir"] / "dev_ims.npy", feats)
    return info["root"]


@fault("silently wrong", "data check fails naming the image")
def f_check_nan_features(ws: Workspace) -> Outcome:
    return _data_check(_precomp_with(ws, float("nan")), "precomp", r"dev_ims\.npy \[image 1\]: NaN or infinite")


@fault("silently wrong", "data check fails naming the image")
def f_check_inf_features(ws: Workspace) -> Outcome:
    return _data_check(_precomp_with(ws, float("inf")), "precomp", r"dev_ims\.npy \[image 1\]: NaN or infinite")


@fault("silently wrong", "data check lists it as a warning", absorbed=True)
def f_check_target_equals_reference(ws: Workspace) -> Outcome:
    info = write_fashioniq(ws.root / "fiq", categories=("dress",), splits=("val",))
    path = info["root"] / "captions" / "cap.dress.val.json"
    entries = json.loads(path.read_text())
    entries[2]["target"] = entries[2]["candidate"]
    path.write_text(json.dumps(entries))
    return expect_ok(cli("data", "check", "--dataset", "fashioniq", "--root", info["root"]),
                     r"target_is_reference: 1 warning\n  .*cap\.dress\.val\.json \[#2\]")


@fault("silently wrong", "data check lists it as a warning", absorbed=True)
def f_check_empty_caption_file(ws: Workspace) -> Outcome:
    info = write_fashioniq(ws.root / "fiq", categories=("dress",), splits=("val",))
    (info["root"] / "captions" / "cap.dress.val.json").write_text("[]")
    return expect_ok(cli("data", "check", "--dataset", "fashioniq", "--root", info["root"]),
                     r"empty_split: 1 warning\n  .*cap\.dress\.val\.json: the caption file holds no entries")


@fault("silently wrong", "training refuses an evaluation split without queries, before the first step")
def f_train_on_empty_eval_split(ws: Workspace) -> Outcome:
    info = write_fashioniq(ws.root / "fiq", categories=("dress",), splits=("train", "val"), n_queries=8)
    (info["root"] / "captions" / "cap.dress.val.json").write_text("[]")
    run = ws.run_dir()
    call = cli("train", ws.config(dataset={"root": str(info["root"]), "synthetic": None}), "--output-dir", run)
    return first_failure(expect_error(call, r"evaluation split 'val' has no queries"),
                         check(not (run / "checkpoints").exists(), "a step was taken"))


def _train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@fault("silently wrong", "the resumed run's log holds each step once", absorbed=True)
def f_log_duplicates_after_resume(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    with (run / "log.jsonl").open("a") as fh:  # steps logged after the last checkpoint, then a kill
        for step in (4, 5):
            fh.write(json.dumps({"kind": "train", "epoch": 0, "step": step, "loss": 9.0, "lr": 0.01}) + "\n")
    call = cli("train", ws.config(train={"max_steps": 6}), "--output-dir", run, "--resume")
    steps = [r["step"] for r in _train_log(run) if r["kind"] == "train"]
    return first_failure(expect_ok(call, r"record\(s\) after the resumed step 3 removed"),
                         check(steps == [1, 2, 3, 4, 5, 6], f"log steps {steps}"))


@fault("silently wrong", "the torn line is dropped; the log stays readable", absorbed=True)
def f_torn_last_log_line(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    with (run / "log.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "epoch": 0, "st')
    call = cli("train", ws.config(train={"max_steps": 4}), "--output-dir", run, "--resume")
    from cirlab.workbench.analysis import read_log

    frame = read_log(run)
    return first_failure(expect_ok(call, r"the last line is torn"),
                         check(list(frame[frame["kind"] == "train"]["step"]) == [1, 2, 3, 4], "log steps"))


# ======================================================================================================= wrong cause


def _eval_file(ws: Workspace, path: Path, pattern: str, forbid: str | None = r"--trust-pickle|trust_pickle") -> Outcome:
    return expect_error(cli("eval", path, "--dataset", "fashioniq", "--root", ws.user / "fashioniq"), pattern,
                        forbid=forbid)


@fault("wrong cause", "named as random bytes; no --trust-pickle advice")
def f_checkpoint_random_bytes(ws: Workspace) -> Outcome:
    (ws.root / "m.pt").write_bytes(bytes(range(7, 250)) * 8)
    return _eval_file(ws, ws.root / "m.pt", r"m\.pt \(\d+ bytes\) is not a PyTorch checkpoint")


@fault("wrong cause", "named as a text file; no --trust-pickle advice")
def f_checkpoint_text_file(ws: Workspace) -> Outcome:
    (ws.root / "m.pt").write_text("epoch 3 loss 0.25\n" * 20)
    return _eval_file(ws, ws.root / "m.pt", r"is a text file, not a checkpoint")


@fault("wrong cause", "named as an HTML page; no --trust-pickle advice")
def f_checkpoint_html_page(ws: Workspace) -> Outcome:
    (ws.root / "m.pt").write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    return _eval_file(ws, ws.root / "m.pt", r"is an HTML page")


@fault("wrong cause", "named as a Git-LFS pointer; no --trust-pickle advice")
def f_checkpoint_git_lfs_pointer(ws: Workspace) -> Outcome:
    (ws.root / "m.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 +
                                  "\nsize 1234567\n")
    return _eval_file(ws, ws.root / "m.pt", r"is a Git LFS pointer.*git lfs pull")


@fault("wrong cause", "named as truncated; no --trust-pickle advice")
def f_checkpoint_truncated(ws: Workspace) -> Outcome:
    data = (ws.shared.finished_run() / "checkpoints" / "best.pt").read_bytes()
    (ws.root / "m.pt").write_bytes(data[: len(data) // 2])
    return _eval_file(ws, ws.root / "m.pt", r"m\.pt is corrupt or truncated")


@fault("wrong cause", "refused, --trust-pickle suggested (a real pickled global)")
def f_checkpoint_pickled_module(ws: Workspace) -> Outcome:
    torch.save(torch.nn.Linear(2, 2), ws.root / "m.pt")
    return _eval_file(ws, ws.root / "m.pt", r"pickled Python objects \(e\.g\. torch\.nn\.modules\.linear\.Linear\)"
                                            r".*--trust-pickle", forbid=None)


@fault("wrong cause", "refused naming train.epochs, before any data is read")
def f_zero_epochs(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.epochs: must be >= 1 \(0 would train nothing", "train.epochs=0")


@fault("wrong cause", "refused naming train.max_steps, before any data is read")
def f_zero_max_steps(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.max_steps: must be >= 1", "train.max_steps=0")


@fault("wrong cause", "says the run folder is missing")
def f_eval_a_run_that_does_not_exist(ws: Workspace) -> Outcome:
    return expect_error(cli("eval", ws.root / "runs" / "does_not_exist"),
                        r"does_not_exist: no such run folder or checkpoint file")


@fault("wrong cause", "says a run folder is not one")
def f_eval_a_folder_that_is_not_a_run(ws: Workspace) -> Outcome:
    return expect_error(cli("eval", ws.user), r"user is not a run folder \(no checkpoints/\)")


@fault("wrong cause", "says which checkpoint is missing and what to try")
def f_eval_a_run_without_best_pt(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    (run / "checkpoints" / "best.pt").unlink()
    return expect_error(cli("eval", run), r"has no checkpoints/best\.pt .*try --checkpoint last\.pt")


@fault("wrong cause", "names the config entries that name the split or category")
def f_unknown_split_or_category_name(ws: Workspace) -> Outcome:
    split = cli("train", ws.config(), "--output-dir", ws.run_dir(), "--set", "dataset.val_split=vall")
    category = cli("train", ws.config(), "--output-dir", ws.run_dir("run2"), "--set", "dataset.category=dres")
    name = cli("train", ws.config(), "--output-dir", ws.run_dir("run3"), "--set", "name=123")
    return first_failure(expect_error(split, r"dataset\.val_split=vall: dataset\.val_split: fashioniq has no split "
                                                r"'vall' \(did you mean 'val'\?\)"),
                         expect_error(category, r"dataset\.category=dres: unknown Fashion-IQ category 'dres'"),
                         expect_error(name, r"--set name=123: name: expected a string"))


@fault("wrong cause", "says the model cannot read that dataset, before any data (it named internal functions)")
def f_eval_a_cir_run_on_itm_data(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("eval", run, "--dataset", "f30k"),
                        r"cirlab eval --dataset f30k: stub_cir is a composed image retrieval model and cannot read "
                        r"'f30k'", forbid="evaluate_itm")


@fault("wrong cause", "says what the file is, as cirlab eval does (it quoted torch's weights_only advice)")
def f_convert_a_text_file(ws: Workspace) -> Outcome:
    notes = ws.root / "notes.md"
    notes.write_text("# my notes\n")
    return expect_error(cli("convert", notes, ws.root / "out.pt"), r"notes\.md \(\d+ bytes\) is a text file, not a "
                        r"checkpoint", forbid="weights_only")


@fault("silently wrong", "evaluates, saying the run did not finish", absorbed=True)
def f_eval_a_run_that_was_stopped(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    (run / "train_summary.json").unlink()  # what a run stopped by Ctrl-C (or still training) lacks
    return expect_ok(cli("eval", run), r"the run did not finish \(no train_summary\.json")


@fault("wrong cause", "names the root, CIRLAB_DATA and `cirlab data synth`")
def f_missing_data_root(ws: Workspace) -> Outcome:
    with environ(CIRLAB_DATA=str(ws.root / "nothing_here")):
        call = cli("train", ws.config(dataset={"synthetic": None}), "--output-dir", ws.run_dir())
    return expect_error(call, r"dataset root not found .*CIRLAB_DATA.*cirlab data synth")


# ============================================================================================================ late


@fault("traceback or late failure", "refused before any file is written")
def f_eval_batch_size_zero(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.batch_size: expected an integer >= 1, got 0", "eval.batch_size=0")


@fault("traceback or late failure", "refused before any file is written")
def f_eval_k_zero(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.k: expected an integer >= 1, got 0", "eval.k=0")


@fault("traceback or late failure", "refused before any file is written")
def f_eval_shard_size_zero(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.shard_size: expected an integer >= 1", "eval.shard_size=0")


@fault("traceback or late failure", "refused: a list is expected")
def f_eval_splits_as_a_string(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.splits: expected a list of split names", "eval.splits=val")


@fault("traceback or late failure", "refused, did you mean 'fashioniq'")
def f_misspelt_eval_protocol(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.protocol: 'fashioniqq' is not a protocol .*did you mean 'fashioniq'",
                         "eval.protocol=fashioniqq")


@fault("traceback or late failure", "refused, did you mean 'fashioniq'")
def f_misspelt_dataset_name(ws: Workspace) -> Outcome:
    return _config_error(ws, r"dataset\.name: unknown dataset 'fashoniq' \(did you mean 'fashioniq'\?\)",
                         "dataset.name=fashoniq")


@fault("traceback or late failure", "refused naming train.lr")
def f_lr_not_a_number(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.lr: expected a number, got 'abc'", "train.lr=abc")


@fault("traceback or late failure", "refused naming train.lr")
def f_negative_lr(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.lr: must be >= 0, got -1", "train.lr=-1")


@fault("traceback or late failure", "refused naming train.lr")
def f_nan_lr(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.lr: must be a finite number, got nan", "train.lr=.nan")


@fault("traceback or late failure", "refused naming train.batch_size")
def f_zero_batch_size(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.batch_size: must be >= 1, got 0", "train.batch_size=0")


@fault("traceback or late failure", "refused naming train.ema_decay")
def f_ema_decay_above_one(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.ema_decay: must be between 0 and 1", "train.ema_decay=2")


@fault("traceback or late failure", "refused, did you mean 'cosine'")
def f_misspelt_schedule(ws: Workspace) -> Outcome:
    return _config_error(ws, r"train\.schedule: expected one of .* \(did you mean 'cosine'\?\), got 'cosin'",
                         "train.schedule=cosin")


@fault("traceback or late failure", "refused naming the bad YAML")
def f_set_value_not_yaml(ws: Workspace) -> Outcome:
    return _config_error(ws, r"--set 'dataset.category=\[dress': value: not valid YAML", "dataset.category=[dress")


@fault("traceback or late failure", "refused: the config is a folder")
def f_config_path_is_a_folder(ws: Workspace) -> Outcome:
    return expect_error(cli("train", ws.root), r"is a folder; pass a run config YAML file")


@fault("traceback or late failure", "refused, did you mean 'cuda'")
def f_device_gpu(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    return first_failure(expect_error(cli("train", ws.config(), "--output-dir", run, "--device", "gpu"),
                                      r"--device: must be auto, cpu, cuda or cuda:N \(did you mean 'cuda'\?\)"),
                         check(not run.exists(), "the run folder was created"))


@fault("traceback or late failure", "refused before any data is read")
def f_device_cuda_without_a_gpu(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        call = cli("train", ws.config(), "--output-dir", run, "--device", "cuda")
    return first_failure(expect_error(call, r"--device: 'cuda' asked for, but no CUDA GPU is visible"),
                         check(not run.exists(), "the run folder was created"))


@fault("traceback or late failure", "refused before the model is loaded")
def f_eval_device_cuda_without_a_gpu(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        call = cli("eval", run, "--device", "cuda:1")
    return expect_error(call, r"--device: 'cuda:1' asked for, but no CUDA GPU is visible")


@fault("traceback or late failure", "refused naming the model config field")
def f_bad_model_override_value(ws: Workspace) -> Outcome:
    return _config_error(ws, r"model_overrides: AMCConfig\.backbone: expected one of .*, got 'vgg'", "model=amc",
                         "model_overrides={}", "model_overrides.backbone=vgg")


@fault("traceback or late failure", "refused naming both models")
def f_checkpoint_of_another_model(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    data = write_precomp(ws.root / "data", splits=("dev",), n_images=2)["root"]  # eval reads the data first
    return expect_error(cli("eval", run / "checkpoints" / "best.pt", "--model", "stub_itm", "--dataset", "f30k",
                            "--root", data, "--split", "dev"),
                        r"best\.pt holds weights of model 'stub_cir', not 'stub_itm'")


@fault("traceback or late failure", "refused: the weights do not fit")
def f_bare_weights_of_another_model(ws: Workspace) -> Outcome:
    state = torch.load(ws.shared.finished_run() / "checkpoints" / "best.pt", weights_only=True)["model"]
    torch.save(state, ws.root / "weights.pt")
    data = write_precomp(ws.root / "data", splits=("dev",), n_images=2)["root"]
    return expect_error(cli("eval", ws.root / "weights.pt", "--model", "stub_itm", "--preset", "tiny",
                            "--dataset", "f30k", "--root", data), r"weights\.pt does not fit model 'stub_itm'")


@fault("traceback or late failure", "refused naming the tensor")
def f_nan_weights(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    path = run / "checkpoints" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["image.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    return expect_error(cli("eval", run), r"best\.pt holds NaN or infinite weights \(1 tensor: image\.weight\)")


@fault("traceback or late failure", "stops at the step, naming it")
def f_nan_in_training_data(ws: Workspace) -> Outcome:
    info = write_precomp(ws.root / "data", n_images=8, regions=4, dim=12)
    feats = info["features"]["train"].copy()
    feats[:] = float("nan")
    np.save(info["dir"] / "train_ims.npy", feats)
    config = ws.config(top={"model": "stub_itm", "model_overrides": {}},
                       dataset={"name": "f30k", "root": str(info["root"]), "synthetic": None, "category": None,
                                "val_split": "dev", "options": {"regions": 4, "dim": 12}},
                       train={"selection": "last"}, eval={"splits": ["dev"]})
    return expect_error(cli("train", config, "--output-dir", ws.run_dir()),
                        r"non-finite loss in epoch 1, step 1: .*cirlab data check")


def _interrupt_at(step: int, signum: int) -> Any:
    from cirlab.engine.train import Trainer

    original = Trainer.after_step

    def after_step(self: Trainer, record: dict, log: Any) -> None:
        original(self, record, log)
        if record["step"] == step:
            os.kill(os.getpid(), signum)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(Trainer, "after_step", after_step))
    # not ignored, as in a terminal's foreground job (a test run started in the background of a non-interactive
    # shell inherits Ctrl-C ignored, and training then rightly leaves it alone)
    previous = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    stack.callback(signal.signal, signum, previous)
    return stack


def _interrupted_then_resumed(ws: Workspace, signum: int) -> Outcome:
    run = ws.run_dir()
    config = ws.config(train={"checkpoint_every": 0, "max_steps": 4})
    with _interrupt_at(2, signum):
        first = cli("train", config, "--output-dir", run)
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]
    second = cli("train", config, "--output-dir", run, "--resume")
    steps = [r["step"] for r in _train_log(run) if r["kind"] == "train"]
    name = signal.Signals(signum).name
    return first_failure(
        expect_error(first, rf"{name}: training stopped in epoch 1, step 2; saved .*last\.pt\. Resume with the same "
                            r"command plus --resume", code=128 + signum),
        check(saved == 2, f"last.pt holds step {saved}, not 2"),
        expect_ok(second, r"resumed from .* in epoch 1, step 2"),
        check(steps == [1, 2, 3, 4], f"log steps {steps}"))


@fault("traceback or late failure", "last.pt written, resume hint, exit 130; the resume continues", absorbed=True)
def f_ctrl_c_mid_epoch(ws: Workspace) -> Outcome:
    return _interrupted_then_resumed(ws, signal.SIGINT)


@fault("traceback or late failure", "last.pt written, resume hint, exit 143; the resume continues", absorbed=True)
def f_sigterm_mid_epoch(ws: Workspace) -> Outcome:
    return _interrupted_then_resumed(ws, signal.SIGTERM)


@fault("traceback or late failure", "removed on the next start, and said so", absorbed=True)
def f_orphaned_temporary_checkpoint(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    orphan = run / "checkpoints" / ".last.pt.x1y2z3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    call = cli("train", ws.config(train={"max_steps": 4}), "--output-dir", run, "--resume")
    return first_failure(expect_ok(call, r"removed .*\.last\.pt\.x1y2z3\.tmp, left by a process stopped"),
                         check(not orphan.exists(), "the orphan is still there"))


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@fault("traceback or late failure", "clear message; the previous checkpoint is kept byte for byte")
def f_disk_full_writing_a_checkpoint(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    last = run / "checkpoints" / "last.pt"
    good = last.read_bytes()
    with mock.patch.object(torch, "save", _no_space):
        call = cli("train", ws.config(train={"max_steps": 5}), "--output-dir", run, "--resume")
    leftovers = sorted(p.name for p in last.parent.iterdir())
    return first_failure(expect_error(call, r"cannot write checkpoint .*last\.pt \(OSError: .*No space left on "
                                            r"device.*MiB free.*\); the previous last\.pt is kept unchanged",
                                      code=EXIT_RETRY),
                         check(last.read_bytes() == good, "last.pt changed", "data lost"),
                         check(leftovers == ["best.pt", "last.pt"], f"left behind: {leftovers}"))


@fault("traceback or late failure", "clear message naming the run folder and the kept checkpoint")
def f_disk_full_writing_the_log(ws: Workspace) -> Outcome:
    from cirlab.engine.train import _RunLog

    run = ws.run_dir(copy_finished=True)
    with mock.patch.object(_RunLog, "write", _no_space):
        call = cli("train", ws.config(train={"max_steps": 5}), "--output-dir", run, "--resume")
    return expect_error(call, r"cannot write to the run folder .*No space left on device.*the last complete "
                              r"checkpoint is kept", code=EXIT_RETRY)


@fault("traceback or late failure", "written with the user's umask (0644 under umask 022), not 0600", absorbed=True)
def f_checkpoint_permissions(ws: Workspace) -> Outcome:
    run = ws.run_dir()
    old = os.umask(0o022)
    try:
        call = cli("train", ws.config(), "--output-dir", run)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (run / "checkpoints").iterdir()}
    return first_failure(Outcome("clear", f"checkpoint modes under umask 022: {modes}"), expect_ok(call),
                         check(set(modes.values()) == {"0o644"}, f"modes {modes}"))


@fault("traceback or late failure", "AMC cuts it to 128 words and logs that; seconds, not minutes", absorbed=True)
def f_amc_600k_word_caption(ws: Workspace) -> Outcome:
    import cirlab

    model = cirlab.create_model("amc", "tiny").eval()
    with captured_logs() as logs, torch.no_grad():
        start = time.perf_counter()
        model.encode_query(torch.zeros(1, 3, 64, 64), ["red " * 600_000])
        seconds = time.perf_counter() - start
    said = [m for _, m in logs.records if " were cut to 128 words" in m]
    return first_failure(check(bool(said), "no log line about the cut"),
                         check(seconds < 30, f"{seconds:.1f} s for one query", "unclear message"),
                         Outcome("clear", f"{said[0] if said else ''} ({seconds:.1f} s)"))


@fault("traceback or late failure", "DIME cuts it before tokenising and logs that", absorbed=True)
def f_dime_600k_word_caption(ws: Workspace) -> Outcome:
    import cirlab

    model = cirlab.create_model("dime", "tiny")
    with captured_logs() as logs:
        start = time.perf_counter()
        ids, _ = model.tokenize(["a red circle", "red " * 600_000])
        seconds = time.perf_counter() - start
    same, _ = model.tokenize(["red " * 64])
    said = [m for _, m in logs.records if " were cut to " in m]
    return first_failure(check(bool(said), "no log line about the cut"),
                         check(torch.equal(ids[1], same[0]), "the cut changed the token ids", "unclear message"),
                         Outcome("clear", f"{said[0] if said else ''} ({seconds:.2f} s)"))


@fault("traceback or late failure", "refused naming eval.k")
def f_eval_flag_k_zero(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("eval", run, "--k", "0"), r"eval\.k: expected an integer >= 1, got 0")


@fault("traceback or late failure", "refused naming the file")
def f_eval_config_file_missing(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("eval", run, "--config", ws.root / "nope.yaml"), r"--config .*nope\.yaml: file not found")


@fault("traceback or late failure", "refused naming the file")
def f_eval_config_file_binary(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    binary = ws.root / "model.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))  # was a UnicodeDecodeError traceback
    return expect_error(cli("eval", run, "--config", binary), r"--config .*model\.yaml: cannot read the config")


@fault("traceback or late failure", "refused naming the missing source, whatever the model")
def f_convert_source_missing(ws: Workspace) -> Outcome:
    """--model cala said the folder was in the wrong format, a re-ranker "checkpoint not found", LAVIS its own."""
    calls = [cli("convert", ws.root / "released" / "cala_cirr", ws.root / "out.pt", *flags)
             for flags in (["--model", "cala", "--preset", "tiny"], ["--model", "blip_rerank_stage1"],
                           ["--from", "lavis", "--model", "cala"])]
    return first_failure(*(expect_error(call, r"cirlab convert: .*released/cala_cirr: no such file or folder$")
                           for call in calls))


@fault("traceback or late failure", "refused: the config is a folder")
def f_eval_config_path_is_a_folder(ws: Workspace) -> Outcome:
    run = ws.run_dir(copy_finished=True)
    return expect_error(cli("eval", run, "--config", ws.root), r"--config .* is a folder; pass a run config YAML file")


@fault("traceback or late failure", "refused, says how to get the tarball")
def f_emoji_without_npm(ws: Workspace) -> Outcome:
    from cirlab.data.generators import emoji

    with environ(CIRLAB_CACHE=str(ws.root / "cache")), mock.patch.object(emoji.shutil, "which", lambda name: None):
        call = cli("data", "emoji", "--out", ws.root / "emoji")
    ws.allowed.append(ws.root / "cache")
    return expect_error(call, r"npm was not found and no tarball was given.*--tarball")


@fault("traceback or late failure", "refused naming the flag, did you mean")
def f_eval_split_and_category_flag_typos(ws: Workspace) -> Outcome:
    """They were blamed on eval.splits=['vall'] / dataset.category, entries the user never wrote."""
    run = ws.run_dir(copy_finished=True)
    return first_failure(expect_error(cli("eval", run, "--split", "vall"),
                                      r"^--split vall: unknown Fashion-IQ split 'vall' \(did you mean 'val'\?\)"),
                         expect_error(cli("eval", run, "--category", "dres"),
                                      r"^--category dres: unknown Fashion-IQ category 'dres' \(did you mean "
                                      r"'dress'\?\)"))


@fault("traceback or late failure", "refused, did you mean the shipped config")
def f_shipped_config_name_misspelt(ws: Workspace) -> Outcome:
    """A wheel user names a shipped config (there is no configs/ folder outside a checkout)."""
    run = ws.run_dir()
    return first_failure(expect_error(cli("train", "amc_synthetic_tinyy", "--output-dir", run),
                                      r"amc_synthetic_tinyy: file not found, nor a config cirlab ships \(did you "
                                      r"mean 'amc_synthetic_tiny'\?\)"),
                         check(not run.exists(), f"{run} was created"))


@fault("data loss", "an edited notebook copy is kept, and said; the missing ones are copied", absorbed=True)
def f_notebooks_over_an_edited_copy(ws: Workspace) -> Outcome:
    out = ws.root / "my-notebooks"
    ws.allowed.append(out)
    first = cli("notebooks", out)
    edited = out / "quickstart.ipynb"
    edited.write_text("my edits")
    (out / "train.ipynb").unlink()
    again = cli("notebooks", out)
    return first_failure(check(first.code == 0, f"the first copy failed: {first.log}"),
                         expect_ok(again, r"copied 1 notebook to .*: train\.ipynb; kept your copies of "
                                          r"quickstart\.ipynb"),
                         check(edited.read_text() == "my edits", "the edited notebook was replaced"),
                         check((out / "train.ipynb").is_file(), "the missing notebook was not copied"))


@fault("traceback or late failure", "refused: says where the loader's protocol is set")
def f_loader_protocol_as_eval_protocol(ws: Workspace) -> Outcome:
    return _config_error(ws, r"eval\.protocol: 'clip4cir' is a protocol of the fashioniq loader .*dataset\.options\."
                             r"protocol=clip4cir", "eval.protocol=clip4cir")


@fault("traceback or late failure", "refused naming the extra to install")
def f_report_without_the_notebooks_extra(ws: Workspace) -> Outcome:
    import importlib.util

    real = importlib.util.find_spec
    with mock.patch.object(importlib.util, "find_spec", lambda name, *a: None if name == "papermill" else
                           real(name, *a)):
        call = cli("report", "--smoke", "--only", "train", "--out", ws.root / "reports")
    return first_failure(expect_error(call, r"needs cirlab's notebooks extra \(papermill is not installed\): pip "
                                            r"install -e '.*\[notebooks\]'"),
                         check(not (ws.root / "reports").exists(), "the report folder was made first"))


# ============================================================================================================ tests


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("faults_shared"))


@pytest.mark.parametrize("kind", FAULTS, ids=[f.name.replace(" ", "_") for f in FAULTS])
def test_fault_is_clear(kind: Fault, shared: Shared, tmp_path: Path) -> None:
    outcome = run_fault(kind, tmp_path, shared)
    assert outcome.verdict == "clear", f"{kind.name}: {outcome.verdict}: {outcome.detail}"


def test_every_group_is_covered() -> None:
    assert {f.group for f in FAULTS} == set(GROUPS)
    assert len({f.name for f in FAULTS}) == len(FAULTS)


def test_repair_log_keeps_damage_in_the_middle(tmp_path: Path) -> None:
    """Only a torn *final* line is dropped; a bad line in the middle is left for the reader to report."""
    from cirlab.engine.train import repair_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n{"st')
    assert repair_log(log, last_step=2) == 2
    assert log.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'
    log.write_text('{"step": 1}\nnot json\n')  # a complete (newline-ended) bad line is not torn: kept
    assert repair_log(log, last_step=2) == 0 and log.read_text() == '{"step": 1}\nnot json\n'


def test_folder_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    from cirlab.core.io import LOCK_NAME, folder_lock

    with folder_lock(tmp_path) as lock:
        with folder_lock(tmp_path):
            assert lock.is_file()
        assert lock.is_file()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_says_since_when_in_utc_whatever_the_holders_zone(tmp_path: Path, monkeypatch) -> None:
    """The holder's local time without a zone made a lock taken 10 s ago by a process under TZ=America/St_Johns
    read 3.5 hours old at a UTC shell (and the file's note invites judging staleness by it)."""
    import datetime as dt
    import re
    import time

    from cirlab.core.io import folder_lock, lock_holder_of

    monkeypatch.setenv("TZ", "America/St_Johns")
    time.tzset()
    try:
        with folder_lock(tmp_path) as lock:
            line = lock_holder_of(lock)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    since = re.search(r" since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", line)
    assert since, line
    taken = dt.datetime.strptime(since.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - taken).total_seconds()) < 60


def test_a_lock_path_that_is_no_lock_file_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    """A downloaded run or report folder holding `.cirlab.lock` as a symbolic link to a user's file: the lock opened
    it through the link and truncated the target to its pid line, even when the command then refused to run. A
    hard link and a file of other text are refused the same way; a stale pid line is still taken over."""
    import os

    from cirlab.core.io import LOCK_NAME, NotALockFileError, folder_lock, lock_holder

    thesis = tmp_path / "thesis.tex"
    thesis.write_text("important line 1\nimportant line 2\n")
    for kind in ("symlink", "hardlink", "foreign", "binary", "fifo"):
        folder = tmp_path / kind
        folder.mkdir()
        lock = folder / LOCK_NAME
        if kind == "symlink":
            lock.symlink_to(thesis)
        elif kind == "hardlink":
            os.link(thesis, lock)
        elif kind == "foreign":
            lock.write_text("my notes\n")
        elif kind == "binary":  # not UTF-8: a UnicodeDecodeError traceback
            lock.write_bytes(b"\xff\xfe\x00garbage")
        else:  # a FIFO: opening it to read blocked `cirlab eval` forever
            os.mkfifo(lock)
        with pytest.raises(NotALockFileError, match=rf"^{lock} (is a symbolic link|is a hard link to another file|is "
                                                     r"not a lock file cirlab wrote \(it holds other text\)|is not a "
                                                     r"plain file)"):
            with folder_lock(folder):
                pass
        assert lock_holder(folder) is None  # nobody holds it; the probe follows no link and opens no FIFO
    assert thesis.read_text() == "important line 1\nimportant line 2\n"
    assert (tmp_path / "foreign" / LOCK_NAME).read_text() == "my notes\n"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    with folder_lock(stale) as lock:  # a dead process's line: taken over
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")


def test_folder_lock_holds_against_another_thread(tmp_path: Path) -> None:
    import threading

    from cirlab.core.io import FolderLockedError, folder_lock

    outcome: dict[str, object] = {}

    def other(wait: float) -> None:
        try:
            with folder_lock(tmp_path, wait=wait):
                outcome["entered"] = time.monotonic()
        except FolderLockedError as err:
            outcome["refused"] = str(err)

    with folder_lock(tmp_path):
        refused = threading.Thread(target=other, args=(0.0,))
        refused.start()
        refused.join(timeout=30)
        assert "in use by another cirlab process" in str(outcome.pop("refused")) and not outcome
        waiting = threading.Thread(target=other, args=(30.0,))
        waiting.start()
        time.sleep(0.6)
        assert "entered" not in outcome  # waits while this thread holds the folder
        released = time.monotonic()
    waiting.join(timeout=30)
    assert float(outcome["entered"]) >= released


def test_a_lock_released_after_its_folder_was_moved_leaves_the_new_holders_lock(tmp_path: Path) -> None:
    """A holds L; L is renamed away (a report moving an entry aside); B locks the new L; when A leaves its block it
    removed L's lock file by path (B's), and C got in beside B."""
    import threading

    from cirlab.core.io import LOCK_NAME, FolderLockedError, folder_lock

    folder, events, outcome = tmp_path / "L", {n: threading.Event() for n in ("b_holds", "a_left")}, {}

    def b() -> None:
        with folder_lock(folder):
            events["b_holds"].set()
            events["a_left"].wait(30)

    def c() -> None:  # another thread meets the lock as another process would
        try:
            with folder_lock(folder):
                outcome["c"] = "entered"
        except FolderLockedError:
            outcome["c"] = "refused"

    with folder_lock(folder):
        (tmp_path / "L").rename(tmp_path / "L.moved")
        thread = threading.Thread(target=b)
        thread.start()
        assert events["b_holds"].wait(30)
    assert (folder / LOCK_NAME).is_file()  # B's lock file is still there after A left
    third = threading.Thread(target=c)
    third.start()
    third.join(30)
    events["a_left"].set()
    thread.join(30)
    assert outcome["c"] == "refused"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_trust_pickle_is_suggested_only_for_refused_globals(tmp_path: Path) -> None:
    from cirlab.core.checkpoint import CheckpointError, load_checkpoint

    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="Python pickle that is not a PyTorch checkpoint") as err:
        load_checkpoint(tmp_path / "plain.pkl")
    assert not re.search(r"--trust-pickle|trust_pickle=", str(err.value))
