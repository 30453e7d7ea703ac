"""The bench scripts' command lines: bad input is argparse's one-line usage error (exit status 2, the option and the
value named, no traceback) before any work starts, and ``--help`` says what a script measures and where it writes.

Before: ``--repeats 0`` was a StatisticsError after the first timings, ``--threads 0`` torch's RuntimeError,
``--threads 1,abc`` a ValueError once the 1-thread rows had run, a misspelt ``--size`` a report saying "Not run" with
exit status 0, ``--quick --images 0`` silently ran 1,000 images, and a ``--report``/``--out`` that could not be
written lost the run at its end. Every call below stops at parsing, so it costs the script's import time only.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import bench_scripts

ROOT = Path(__file__).resolve().parents[1]

# (script, arguments, words the error line must hold: the option and the bad value). "{tmp}" is a fresh folder.
BAD = [
    ("metrics", ["--quick", "--repeats", "0"], ["--repeats", "0"]),
    ("metrics", ["--quick", "--threads", "0"], ["--threads", "0"]),
    ("metrics", ["--quick", "--images", "0"], ["--images", "0"]),  # --quick used to overwrite it with 1,000
    ("metrics", ["--quick", "--cirr-gallery", "5"], ["--cirr-gallery", "5"]),
    ("amc_cache", ["--quick", "--threads", "-1"], ["--threads", "-1"]),
    ("amc_cache", ["--quick", "--warmup", "0"], ["--warmup", "0"]),
    ("dime_step", ["--no-write", "--repeats", "-2"], ["--repeats", "-2"]),
    ("retrieval", ["--quick", "--threads", "1,abc"], ["--threads", "abc"]),
    ("retrieval", ["--quick", "--threads", ""], ["--threads", "''"]),
    ("retrieval", ["--quick", "--threads", "1,,2"], ["--threads", "1,,2"]),
    ("retrieval", ["--quick", "--backends", "blocks,bogus"], ["--backends", "bogus"]),
    ("retrieval", ["--quick", "--gallery", "50", "-k", "100"], ["-k 100", "--gallery 50"]),
    ("dime_eval", ["--no-write", "--dtypes", "fp32,fp8"], ["--dtypes", "fp8"]),
    ("dime_eval", ["--no-write", "--images", "0"], ["--images", "0"]),
    ("dime_eval", ["--no-write", "--device", "gpu"], ["--device", "gpu"]),
    ("dime_eval", ["--out", "{tmp}"], ["--out", "{tmp}"]),  # a folder: IsADirectoryError after the whole run
    ("dime_eval", ["--no-write", "--out", "{tmp}/x.md"], ["--out", "x.md", "--no-write"]),
    ("train_step", ["--model", "amc", "--steps", "0"], ["--steps", "0"]),
    ("train_step", ["--model", "amc", "--preset", "bogus"], ["--preset", "bogus"]),
    ("train_step", ["--model", "amc", "--set", "foo=1"], ["--set", "foo"]),
    ("train_step", ["--model", "amc", "--report", "{tmp}"], ["--report", "{tmp}"]),
    ("dime_synthetic", ["--out-dir", "{tmp}", "--directions", ""], ["--directions", "''"]),
    ("dime_synthetic", ["--out-dir", "{tmp}", "--trace-images", "0"], ["--trace-images", "0"]),
    ("hrem_synthetic", ["--out-dir", "{tmp}"], ["--train", "--report"]),  # nothing to do: ran nothing, exit 0
    ("hrem_synthetic", ["--out-dir", "{tmp}", "--train", "--threads", "0"], ["--threads", "0"]),
    ("hrem_synthetic", ["--out-dir", "{tmp}", "--train", "--embed", "100"], ["--embed 100", "--heads 8"]),
    ("hrem_synthetic", ["--out-dir", "{tmp}", "--train", "--epochs", "5", "--decay", "9"], ["--decay 9", "--epochs 5"]),
    ("dime_synthetic", ["--out-dir", "{tmp}", "--data", "{tmp}", "--size", "tiny"], ["--size tiny", "--data"]),
    ("rerank_synthetic", ["--out", "{tmp}", "--data", "{tmp}", "--size", "tiny"], ["--size tiny", "--data"]),
    ("amc_synthetic", ["--work", "{tmp}", "--parts", "synthetic", "--size", "huge"], ["--size", "huge"]),
    ("cala_synthetic", ["--work", "{tmp}", "--report", "", "--jobs", "0"], ["--jobs", "0"]),
    ("cala_diagnose", ["{tmp}/no_run"], ["runs", "no_run"]),
    ("faults", ["--only", "resume", "--report", "{tmp}/f.md"], ["--only", "--report"]),
    ("rerank_synthetic", ["--out", "{tmp}", "--threads", "0"], ["--threads", "0"]),
    ("seeded_items", ["--items", "0"], ["--items", "0"]),
    ("feature_digest", ["--repeats", "0"], ["--repeats", "0"]),
]


@pytest.mark.parametrize("script,args,words", BAD, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD])
def test_bad_argument_is_a_one_line_usage_error_before_any_work(script, args, words, tmp_path):
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    result = subprocess.run([sys.executable, f"bench/{script}.py", *map(fill, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr  # one line, the last
    assert all(fill(word) in errors[0] for word in words), errors[0]
    assert result.stdout == ""  # nothing ran: not even the machine line or the data summary


def test_scripts_parse_before_importing_torch():
    """Loading a bench script imports neither torch nor what imports it: each builds and runs its parser first, so
    a bad argument costs 0.1 s, not torch's 1.5 s import (34 cases above: about a minute of the suite before)."""
    code = ("import sys; sys.path.insert(0, 'tests'); import bench_scripts\n"
            "for name in sys.argv[1:]:\n"
            "    bench_scripts.load(name)\n"
            "    assert 'torch' not in sys.modules, name\n")
    result = subprocess.run([sys.executable, "-c", code, *sorted(WRITES)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_argument_types_reject_bad_lists_and_keep_good_ones():
    common = bench_scripts.load("_common")
    assert common.int_list(1)("1, 2") == [1, 2]
    assert common.choice_list(["fp32", "bf16"])("bf16,fp32") == ["bf16", "fp32"]
    for text, words in (("1,abc", "'abc'"), ("", "''"), ("1,", "'1,'"), ("2,0", "got 0"), ("1,1", "given twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            common.int_list(1)(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown 'bf61'.*did you mean 'bf16'"):
        common.choice_list(["fp32", "bf16"])("bf61")
    with pytest.raises(argparse.ArgumentTypeError, match="above 0"):
        common.positive_float("-1e-3")


def test_quick_fills_only_the_sizes_not_given():
    common = bench_scripts.load("_common")
    args = argparse.Namespace(images=2000, cirr_queries=None)
    common.fill_defaults(args, {"images": 1000, "cirr_queries": 1000})
    assert (args.images, args.cirr_queries) == (2000, 1000)


def test_report_option_means_the_same_file_in_every_script(tmp_path):
    """``--report NAME`` is reports/benchmarks/NAME.md in every script (amc_synthetic, dime_synthetic, faults,
    hrem_synthetic and train_step wrote a file NAME in the current folder), and a report that cannot be written is
    refused before the run."""
    common = bench_scripts.load("_common")
    assert common.report_path("x") == common.REPORTS / "x.md"
    assert common.report_path(str(tmp_path / "y.md")) == tmp_path / "y.md"
    assert common.report_arg("") == "" and common.report_arg(str(tmp_path / "new" / "r.md"))
    (tmp_path / "file").write_text("")
    for bad in (str(tmp_path), str(tmp_path / "file" / "r.md")):
        with pytest.raises(argparse.ArgumentTypeError):
            common.report_arg(bad)


# where each script writes, as its --help must say
WRITES = {"amc_cache": "reports/benchmarks/amc_cache.md", "amc_synthetic": "reports/benchmarks/NAME.md",
          "cala_diagnose": "reports/benchmarks/NAME.md", "cala_synthetic": "reports/benchmarks/NAME.md",
          "dime_eval": "reports/benchmarks/dime_eval.md", "dime_step": "reports/benchmarks/dime_step.md",
          "dime_synthetic": "reports/benchmarks/dime_synthetic.md", "faults": "reports/benchmarks/faults.md",
          "feature_digest": "reports/benchmarks/feature_digest.md",
          "hrem_diagnose": "reports/benchmarks/NAME.md", "hrem_synthetic": "reports/benchmarks/NAME.md",
          "lite_minilm_vectors": "reports/benchmarks/NAME.md",
          "metrics": "reports/benchmarks/metrics.md", "rerank_synthetic": "metrics.json",
          "retrieval": "reports/benchmarks/retrieval.md", "seeded_items": "reports/benchmarks/seeded_items.md",
          "train_step": "reports/benchmarks/NAME.md"}


def test_every_script_is_covered():
    assert sorted(WRITES) == sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("script", sorted(WRITES))
def test_help_says_what_is_measured_and_where_it_goes(script, capsys):
    module = bench_scripts.load(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the option help
    assert exit_.value.code == 0
    assert WRITES[script] in text
    # what it measures: the docstring's first paragraph whole (dime_synthetic's and faults' help cut it mid-sentence:
    # "... DIME* (ensemble), and")
    assert " ".join(module.__doc__.split("\n\n")[0].split()) in text
