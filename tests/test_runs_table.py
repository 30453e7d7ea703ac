"""A folder of runs listed without code: which finished, which stopped and how, which were killed, which is still
running (``analysis.runs_table``), and ``compare_runs`` over a sweep's folders that are not all finished."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

import cirlab
from cirlab import analysis
from cirlab.core.errors import MissingPathError
from cirlab.core.io import folder_lock

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "amc_synthetic_tiny.yaml"


def _run(folder: Path, *, end: dict | None = None, metrics: bool = False, summary: bool = False,
         steps: int = 3) -> Path:
    """A run folder as the trainer leaves it: a start in provenance.json (with how it ended, where it did), log
    records up to ``steps``, and the summary / metrics files of a run that got that far."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: amc\npreset: tiny\ndataset: {name: fashioniq}\n")
    start = {"started": "2026-12-07T00:00:00+00:00", "from_step": 0, **(end or {})}
    (folder / "provenance.json").write_text(json.dumps({"starts": [start]}))
    records = [{"kind": "train", "step": s, "loss": 1.0} for s in range(1, steps + 1)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')  # torn
    (folder / "checkpoints").mkdir()
    if summary or metrics:
        (folder / "train_summary.json").write_text(json.dumps({"best_score": 40.0, "selection_metric": "avg",
                                                                "steps": steps}))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps({
            "model": "amc", "selection": {"metric": "avg", "best_score": 41.0}, "steps": steps,
            "splits": {"val": {"avg": 41.0, "R@10": 20.0}, "test": {"avg": 39.5}}}))
    return folder


def test_runs_table_tells_every_ending_from_the_folder_alone(tmp_path):
    root = tmp_path / "sweep"
    _run(root / "done", end={"ended": "2026-12-07T00:10:00+00:00", "status": "finished"}, metrics=True)
    _run(root / "lr" / "big", end={"ended": "2026-12-07T00:01:00+00:00", "status": "failed",
                                   "message": "non-finite loss in epoch 1, step 2"}, steps=1)
    _run(root / "term", end={"status": "stopped (SIGTERM)", "message": "SIGTERM: training stopped"}, steps=7)
    _run(root / "owed", end={"status": "error", "message": "RuntimeError: CUDA out of memory"}, summary=True)
    _run(root / "nine", steps=5)  # kill -9: no end recorded
    (root / "notes").mkdir()  # no run
    (root / "notes" / "config.yaml").write_text("model: amc\n")
    live = _run(root / "live", steps=2)
    with folder_lock(live):
        table = analysis.runs_table(root).set_index("run")
    assert list(table.index) == ["done", "live", "lr/big", "nine", "owed", "term"]
    assert table["state"].to_dict() == {"done": "finished", "live": "running", "lr/big": "failed", "nine": "killed",
                                        "owed": "error", "term": "stopped (SIGTERM)"}
    assert table["step"].to_dict() == {"done": 3, "live": 2, "lr/big": 1, "nine": 5, "owed": 3, "term": 7}
    assert table.loc["done", "test avg"] == 39.5 and table.loc["done", "val avg"] == 41.0
    assert table.loc["done", "best val"] == 41.0 and table.loc["owed", "best val"] == 40.0
    assert table.loc["lr/big", "message"].startswith("non-finite loss")
    assert table.loc["done", "model"] == "amc" and table.loc["done", "dataset"] == "fashioniq"
    assert analysis.run_state(live)["state"] == "killed"  # its lock released: the process is gone
    with pytest.raises(MissingPathError, match="runs folder not found"):
        analysis.runs_table(tmp_path / "nowhere")


def test_compare_runs_leaves_out_unfinished_runs_when_asked(tmp_path, caplog):
    """Over a glob of a sweep's folders, compare_runs stopped at the first run without metrics.json."""
    done = _run(tmp_path / "done", end={"status": "finished"}, metrics=True)
    stopped = _run(tmp_path / "stopped", end={"status": "stopped (SIGTERM)"})
    with pytest.raises(MissingPathError, match="metrics file not found"):
        analysis.compare_runs([done, stopped])
    with caplog.at_level(logging.WARNING):
        table = analysis.compare_runs([done, stopped], unfinished="skip")
    assert list(table.columns) == ["done"] and table.loc["splits/test/avg", "done"] == 39.5
    assert "stopped is not finished (stopped (SIGTERM)): left out" in caplog.text


def test_a_real_run_is_listed_as_finished_with_its_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    config = cirlab.load_config(CONFIG, ["train.max_steps=2", "eval.splits=[val]"])
    result = cirlab.run_experiment(config, output_dir=tmp_path / "runs" / "a")
    row = analysis.runs_table(tmp_path / "runs").iloc[0]
    assert (row["run"], row["model"], row["preset"], row["state"], row["step"]) == ("a", "amc", "tiny", "finished", 2)
    assert row["val avg"] == result["splits"]["val"]["avg"] and row["ended"]


def test_cirlab_runs_lists_a_folder_of_runs(tmp_path, capsys):
    from cirlab.cli import main

    _run(tmp_path / "done", end={"status": "finished"}, metrics=True)
    _run(tmp_path / "bad", end={"status": "failed", "message": "non-finite loss in epoch 1, step 2: loss=nan"})
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:7] == ["run", "model", "preset", "dataset", "state", "step", "metric"]
    assert out[1].split()[:5] == ["bad", "amc", "tiny", "fashioniq", "failed"]
    assert out[2].split()[:5] == ["done", "amc", "tiny", "fashioniq", "finished"] and "39.5" in out[2]
    assert out[3] == "bad: non-finite loss in epoch 1, step 2: loss=nan"  # whole, not cut to a column
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["state"], r["test avg"]) for r in rows] == [("bad", "failed", None),
                                                                     ("done", "finished", 39.5)]
    assert main(["runs", str(tmp_path / "nowhere")]) == 2


def test_cirlab_runs_says_what_each_run_takes_on_disk_and_what_only_a_resume_reads(tmp_path, capsys):
    """A semester of runs kept every run's whole training state (model, optimizer, averaged weights) in last.pt,
    which only --resume reads: up to 75-97 % of a run's disk, and nothing showed it. Epoch checkpoints, kept on
    purpose for cirlab eval --checkpoint, are in the size, not in what may go."""
    from cirlab.cli import main

    done = _run(tmp_path / "done", end={"status": "finished"}, metrics=True)
    (done / "checkpoints" / "best.pt").write_bytes(b"b" * 2_000_000)
    (done / "checkpoints" / "last.pt").write_bytes(b"l" * 5_000_000)
    (done / "checkpoints" / "epoch_1.pt").write_bytes(b"e" * 5_000_000)
    (done / "checkpoints" / "link.pt").symlink_to(done / "checkpoints" / "last.pt")  # counted once, where it lies
    live = _run(tmp_path / "live", steps=2)
    (live / "checkpoints" / "last.pt").write_bytes(b"l" * 1000)
    files = sum(p.stat().st_size for p in done.rglob("*") if p.is_file() and not p.is_symlink())
    table = analysis.runs_table(tmp_path).set_index("run")
    assert table.loc["done", "size"] == files and table.loc["done", "resume state"] == 5_000_000
    assert table.loc["live", "resume state"] == 1000
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "12.0 MB" in out.splitlines()[1 + ["done", "live"].index("done")] and "5.0 MB" in out
    # only the finished run's: a killed or stopped run's last.pt is what its resume continues from
    assert "1 finished run(s) keep 5.0 MB in checkpoints/last.pt, the training state only --resume reads" in out
    # checkpoints/ linked to a bigger disk: neither walked nor counted (its part was once larger than the whole)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-disk"
    (done / "checkpoints").rename(elsewhere)
    (done / "checkpoints").symlink_to(elsewhere)
    assert analysis.disk_use(done) == {"size": files - 12_000_000, "resume state": 0}


def test_a_stopped_run_shows_the_best_score_its_log_recorded_and_no_metric_is_made_up(tmp_path):
    """A run stopped by SIGINT had 23 evaluations in its log and showed no best val; a cirlab.fit run without
    model selection showed the metric "avg"."""
    stopped = _run(tmp_path / "stopped", end={"status": "stopped (SIGINT)"}, steps=30)
    (stopped / "config.yaml").write_text("model: amc\npreset: tiny\ndataset: {name: fashioniq}\n"
                                         "train: {selection_metric: avg}\n")
    evals = [{"kind": "eval", "step": 10, "best": True, "selection_score": 31.5},
             {"kind": "eval", "step": 20, "best": True, "selection_score": 40.25},
             {"kind": "eval", "step": 30, "best": False, "selection_score": 38.0}]
    with (stopped / "log.jsonl").open("a") as log:
        log.write("\n" + "".join(json.dumps(r) + "\n" for r in evals))
    fit = _run(tmp_path / "fit", end={"status": "finished"}, metrics=True)
    metrics = json.loads((fit / "metrics.json").read_text())
    metrics["selection"] = {"metric": None, "best_score": None}
    (fit / "metrics.json").write_text(json.dumps(metrics))
    (fit / "train_summary.json").write_text(json.dumps({"steps": 3}))
    table = analysis.runs_table(tmp_path).set_index("run")
    assert table.loc["stopped", "best val"] == 40.25 and table.loc["stopped", "metric"] == "avg"
    assert table[["metric", "best val"]].loc["fit"].isna().all()


def test_a_summed_selection_metric_is_summed_for_the_final_splits(tmp_path):
    run = _run(tmp_path / "cala", end={"status": "finished"}, metrics=True)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["selection"]["metric"] = "R@10+avg"
    (run / "metrics.json").write_text(json.dumps(metrics))
    row = analysis.runs_table(tmp_path).iloc[0]
    assert row["metric"] == "R@10+avg" and row["val R@10+avg"] == 61.0 and "test R@10+avg" not in row


def test_a_resume_that_stopped_or_was_killed_is_not_its_earlier_starts_finish(tmp_path):
    """A finished run resumed (more epochs) and then stopped kept the first start's metrics.json: it was listed as
    finished, its stop message dropped, and compare_runs(unfinished="skip") compared the stale metrics."""
    import datetime as dt

    run = _run(tmp_path / "b", end={"status": "finished"}, metrics=True)
    starts = json.loads((run / "provenance.json").read_text())["starts"]
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)).isoformat(timespec="seconds")
    resumed = {"started": later, "from_step": 3, "status": "stopped (SIGTERM)", "message": "SIGTERM: stopped"}
    (run / "provenance.json").write_text(json.dumps({"starts": [*starts, resumed]}))
    assert analysis.run_state(run)["state"] == "stopped (SIGTERM)"
    assert analysis.run_state(run)["message"] == "SIGTERM: stopped"
    assert list(analysis.compare_runs([run], unfinished="skip").columns) == []
    killed = {"started": later, "from_step": 3}  # kill -9 of the resume: no end, metrics.json short of its log
    (run / "provenance.json").write_text(json.dumps({"starts": [*starts, killed]}))
    with (run / "log.jsonl").open("a") as log:
        log.write("".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in (4, 5)))
    assert analysis.run_state(run)["state"] == "killed"


def test_the_state_comes_from_the_contents_not_from_file_times(tmp_path):
    """File times are another clock: a finished run written while this machine's clock ran ahead of the file
    server's, or unpacked from ``tar --mtime=@0``, was listed as killed (its metrics.json "older" than its start);
    a killed resume copied with ``cp -r`` (new times on old metrics) was listed as finished."""
    import os

    future = "2099-01-01T00:00:00+00:00"
    done = _run(tmp_path / "done", metrics=True)
    (done / "provenance.json").write_text(json.dumps({"starts": [{"started": future, "status": "finished"}]}))
    os.utime(done / "metrics.json", (0, 0))
    assert analysis.run_state(done)["state"] == "finished"
    fit = _run(tmp_path / "fit", metrics=True)  # no end recorded (cirlab.fit, or an older cirlab): the contents
    (fit / "provenance.json").write_text(json.dumps({"starts": [{"started": future}]}))
    os.utime(fit / "metrics.json", (0, 0))
    assert analysis.run_state(fit)["state"] == "finished"
    os.utime(fit / "train_summary.json", (0, 0))
    (fit / "metrics.json").unlink()  # trained, the final evaluation owed
    assert analysis.run_state(fit)["state"] == "trained"

    killed = _run(tmp_path / "killed", metrics=True, steps=6)
    for name in ("metrics.json", "train_summary.json"):  # the first start's 3 steps; the resume logged 6
        (killed / name).write_text((killed / name).read_text().replace('"steps": 6', '"steps": 3'))
    (killed / "provenance.json").write_text(json.dumps({"starts": [
        {"started": "2026-12-07T00:00:00+00:00", "status": "finished"}, {"started": "2026-12-07T00:01:00+00:00"}]}))
    copy = Path(shutil.copytree(killed, tmp_path / "copy", copy_function=shutil.copy))  # new file times
    assert analysis.run_state(killed)["state"] == analysis.run_state(copy)["state"] == "killed"

    early = _run(tmp_path / "early", metrics=True)  # a resume killed before its first log record: files unchanged
    (early / "provenance.json").write_text(json.dumps({"starts": [
        {"started": "2026-12-07T00:00:00+00:00", "from_step": 0, "status": "finished"},
        {"started": "2026-12-07T00:01:00+00:00", "from_step": 3}]}))
    assert analysis.run_state(early)["state"] == "killed"


def test_results_table_is_a_paper_table_with_provenance_and_a_seed_summary(tmp_path, monkeypatch):
    """compare_runs gave one row per metric, bookkeeping rows among them, R@1, R@10, R@5 in alphabetical order, every
    split, and no seed, config or commit: a paper table took 32 lines of one's own."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        config = cirlab.load_config(CONFIG, ["train.max_steps=2", "eval.splits=[val]", f"train.seed={seed}",
                                             "dataset.category=null"])
        cirlab.run_experiment(config, output_dir=runs / f"amc_s{seed}")
    table = analysis.results_table(runs, split="val")
    assert list(table["run"]) == ["amc_s0", "amc_s1", "amc_s2"] and list(table["seed"]) == [0, 1, 2]
    assert list(table.columns[:6]) == ["run", "model", "dataset", "seed", "config", "code"]
    assert list(table.columns[6:]) == [f"{c}_R@{k}" for c in ("dress", "shirt", "toptee", "avg") for k in (10, 50)] \
        + ["avg"]  # the papers' order, the average last
    assert table["config"].nunique() == 1 and table["code"].notna().all()
    stored = json.loads((runs / "amc_s1" / "metrics.json").read_text())["splits"]["val"]
    assert table.loc[1, "dress_R@10"] == stored["dress_R@10"]
    summary = analysis.seed_summary(table)
    assert summary.loc[0, "n"] == 3 and summary.loc[0, "avg"] == pytest.approx(table["avg"].mean())
    assert summary.loc[0, "avg std"] == pytest.approx(table["avg"].std(ddof=1))
    text = analysis.seed_summary(table, text=True)
    assert text.loc[0, "avg"] == f"{table['avg'].mean():.2f} ± {table['avg'].std(ddof=1):.2f}"
    latex = table.to_latex(index=False, escape=True, float_format="%.2f", na_rep="--")  # the docstring's export
    assert r"dress\_R@10" in latex and r"amc\_s0" in latex
    with pytest.raises(ValueError, match=r"amc_s0 has no metrics of split 'test'; it has 'val'"):
        analysis.results_table([runs / "amc_s0"], split="test")
    unfinished = Path(shutil.copytree(runs / "amc_s0", tmp_path / "fitted" / "amc_fit"))
    (unfinished / "metrics.json").unlink()  # as cirlab.fit leaves a run: an empty table, then a wrong hint, before
    with pytest.raises(ValueError, match=r"no run under .*fitted has a metrics.json \(1 run folders: amc_fit\)"):
        analysis.results_table(tmp_path / "fitted", split="val")
    with pytest.raises(ValueError, match=r"seed_summary: the table has no runs"):
        analysis.seed_summary(table.iloc[:0])


def test_compare_runs_names_an_eval_output_file_by_its_stem(tmp_path):
    """cirlab eval --output amc_s0.json was a column named 'amc_s0.json'."""
    (tmp_path / "amc_s0.json").write_text(json.dumps({"splits": {"val": {"avg": 1.0}}}))
    assert list(analysis.compare_runs([tmp_path / "amc_s0.json"]).columns) == ["amc_s0"]


def test_results_table_reads_an_eval_output_s_provenance_and_seed_summary_groups_only_known_configs(tmp_path,
                                                                                                   monkeypatch):
    """eval --output files got no model, code or config, and seed_summary put every such row (an AMC and a CaLa
    result) into one group: a mean of two models."""
    from cirlab.cli import main

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    config = cirlab.load_config(CONFIG, ["train.max_steps=2", "eval.splits=[val]", "train.seed=3"])
    cirlab.run_experiment(config, output_dir=tmp_path / "runs" / "amc")
    record = tmp_path / "amc_eval.json"
    assert main(["eval", str(tmp_path / "runs" / "amc"), "--split", "val", "--output", str(record)]) == 0
    [row] = analysis.results_table([record], split="val").to_dict(orient="records")
    assert (row["run"], row["model"], row["seed"]) == ("amc_eval", "amc", 3) and row["config"] and row["code"]
    lone = tmp_path / "lone" / "metrics.json"  # a metrics file away from its run folder: no config to group by
    lone.parent.mkdir()
    lone.write_text((tmp_path / "runs" / "amc" / "metrics.json").read_text())
    with pytest.raises(ValueError, match=r"seed_summary: no run config for lone .* which runs share a config"):
        analysis.seed_summary(analysis.results_table([record, lone], split="val"))
    with pytest.raises(ValueError, match=r"results_table: two runs are named 'amc'"):
        analysis.results_table([tmp_path / "runs" / "amc", tmp_path / "runs" / "amc" / "metrics.json"])


def test_a_run_with_unreadable_records_says_so(tmp_path):
    """A run whose config.yaml and metrics.json cannot be read was listed as an ordinary finished run with blank
    model and metrics, and `--json` said message: null."""
    root = tmp_path / "runs"
    broken = _run(root / "broken", end={"ended": "2026-12-07T00:10:00+00:00", "status": "finished"}, metrics=True)
    (broken / "config.yaml").write_text(": : :\n")
    (broken / "metrics.json").write_text("{bad")
    _run(root / "fine", end={"ended": "2026-12-07T00:10:00+00:00", "status": "finished"}, metrics=True)
    table = analysis.runs_table(root).set_index("run")
    assert table.loc["broken", "message"] == "unreadable: config.yaml, metrics.json"
    assert not isinstance(table.loc["fine", "message"], str)  # nothing to say: None / NaN


def test_cirlab_runs_text_is_a_column_per_split_with_each_runs_own_metric(tmp_path, capsys):
    """Runs of several models gave a column per split *and* metric (CaLa's 66-character summed name among them):
    a 300-column table whatever the terminal, run names right-aligned."""
    from cirlab.cli import main

    _run(tmp_path / "amc", end={"status": "finished"}, metrics=True)
    cala = _run(tmp_path / "deep" / "sweep" / "cala", end={"status": "finished"})
    summed = "R@1+R@5+R@10+R@50+cirr_Rsubset@1+cirr_Rsubset@2+cirr_Rsubset@3"
    (cala / "metrics.json").write_text(json.dumps({"selection": {"metric": summed, "best_score": 260.0},
                                                   "splits": {"val": {k: 10.0 for k in summed.split("+")}}}))
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split("  ")
    assert [h.strip() for h in header if h.strip()][:10] == ["run", "model", "preset", "dataset", "state", "step",
                                                             "metric", "best val", "val", "test"]
    assert out[2].startswith("deep/sweep/cala ") and "R@1+...+cirr_Rsubset@3 (7 summed)" in out[2]
    assert " 70.00 " in out[2] and " 41.00 " in out[1] and " 39.50 " in out[1]  # each run's own metric, per split
    assert max(map(len, out[:3])) < 160
