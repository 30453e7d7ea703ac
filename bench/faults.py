"""Fault-injection table (issue 18): run every kind of bad input and fault in ``tests/test_faults.py`` and write
``reports/benchmarks/faults.md``.

::

    .venv/bin/python bench/faults.py                  # all kinds, writes reports/benchmarks/faults.md
    .venv/bin/python bench/faults.py --only resume    # kinds whose name contains "resume", table on stdout only

Each kind runs in a fresh workspace that also holds somebody's own dataset and notes; its outcome is one of: clear
(a one-line error naming the field or file with exit status 2 -- 1 for ``data check`` problems, 75 where the same
command may succeed later -- or, for faults the tool absorbs, the right result plus a line saying what it did),
traceback, silent (exit 0 or nothing said where
something was due), unclear message (an error, but not the right words or exit status), data lost (a file outside
the case's own run folder changed). The kinds and the verdicts are the test module's, so this table and
``make test`` can never disagree.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPORT_HELP, report_arg, report_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="",
                        help="run only kinds whose name contains this text; prints the table, writes no report")
    parser.add_argument("--report", type=report_arg, default=None,
                        help=f"the Markdown report (default reports/benchmarks/faults.md): {REPORT_HELP}; "
                             "'' = print the table only")
    args = parser.parse_args(argv)
    if args.only and args.report:  # a partial table is never the report; --only used to ignore --report silently
        parser.error(f"--only prints the table of the kinds it runs and writes no report: drop --report "
                     f"{args.report!r} or --only")
    if args.report is None:
        args.report = "" if args.only else "faults"
    # tests/ is on the path: the fault kinds and the harness; imported after the checks above, which need
    # neither it nor torch (a bad argument is rejected in 0.1 s)
    import test_faults as tf

    kinds = [k for k in tf.FAULTS if args.only in k.name]
    if not kinds:  # a misspelt --only ran nothing and exited 0
        parser.error(f"--only {args.only!r} matches no kind; kinds: {', '.join(k.name for k in tf.FAULTS)[:400]}...")
    if args.report:  # before the run, not after it: a missing folder lost the whole table
        report_path(args.report).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cirlab-faults-") as tmp:
        shared = tf.Shared(Path(tmp) / "shared")
        shared.root.mkdir()
        for i, kind in enumerate(kinds):
            t0 = time.perf_counter()
            outcome = tf.run_fault(kind, Path(tmp) / f"case{i:03d}", shared)
            # the table shows no machine paths (a detail cut mid-path keeps only the start of the folder name)
            outcome.detail = re.sub(re.escape(str(Path(tmp))) + r"|/tmp/cirlab-faults-\S*", "$TMP", outcome.detail)
            rows.append((kind, outcome, time.perf_counter() - t0))
            print(f"{outcome.verdict:>15}  {kind.name}  ({rows[-1][2]:.1f}s)", flush=True)
    text = report(rows, time.perf_counter() - start, " ".join(sys.argv[1:]))
    if not args.report:
        print(text)
    else:
        report_path(args.report).write_text(text, encoding="utf-8")
        print(f"wrote {report_path(args.report)}")
    return 0 if all(o.verdict == "clear" for _, o, _ in rows) else 1


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(rows: list, seconds: float, argv: str) -> str:
    import torch

    import test_faults as tf

    count = {v: sum(o.verdict == v for _, o, _ in rows) for v in tf.VERDICTS}
    absorbed = sum(k.absorbed and o.verdict == "clear" for k, o, _ in rows)
    lines = [
        "# Fault injection: nothing lost, nothing silent (issue 18)", "",
        f"Command: `.venv/bin/python bench/faults.py{(' ' + argv) if argv else ''}` (the same kinds run in "
        "`make test` as `tests/test_faults.py`).  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU used. Wall time {seconds / 60:.1f} min.", "",
        "Every kind runs in a fresh workspace that also holds somebody's own Fashion-IQ folder and notes, hashed "
        "before and after (`$TMP` below is the temporary folder of the run). *Clear* means a one-line error "
        "naming the field or file (exit status 2; 1 for `cirlab "
        "data check`'s list of problems; 75 where the same command may succeed later: a folder in use by another "
        "cirlab process, a full disk; 130/143 after Ctrl-C/SIGTERM, with `last.pt` saved and the resume command "
        f"named) or, for the {sum(k.absorbed for k, _, _ in rows)} faults the tool must absorb, the right result "
        "plus a line saying what it did. *Unclear message* would be an error with the wrong words or exit status.",
        "",
        "| kinds tried | clear errors | tracebacks | silent results | data lost | unclear messages |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(rows)} | {count['clear']} (of which {absorbed} absorbed) | {count['traceback']} | {count['silent']} | "
        f"{count['data lost']} | {count['unclear message']} |", "",
        "| group | kinds | clear | tracebacks | silent | data lost | unclear |", "|---|---:|---:|---:|---:|---:|---:|"]
    for group in tf.GROUPS:
        mine = [o for k, o, _ in rows if k.group == group]
        lines.append(f"| {group} | {len(mine)} | " + " | ".join(str(sum(o.verdict == v for o in mine))
                                                                for v in tf.VERDICTS) + " |")
    lines += ["", "## Every kind", "", "| # | group | kind | expected | outcome | what the user sees |",
              "|---:|---|---|---|---|---|"]
    for i, (kind, outcome, _) in enumerate(rows, 1):
        lines.append(f"| {i} | {kind.group} | {_cell(kind.name)} | {_cell(kind.expected)} | {outcome.verdict} | "
                     f"{_cell(outcome.detail)[:200]} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
