"""Shared helpers for the bench/ scripts: command-line argument types, machine description, timing, and the markdown
report."""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cirlab.core.config import MAX_SEED, did_you_mean, int_range

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports" / "benchmarks"

# ----------------------------------------------------------------------------------------- argument types
# Every script's options go through these ``type=`` helpers, so bad input is argparse's one-line usage error naming
# the option and the value (exit status 2) before any work starts. Before: ``--repeats 0`` was a StatisticsError
# after the first timings, ``--threads 0`` torch's RuntimeError, ``--threads 1,abc`` a ValueError once the 1-thread
# rows had run, ``--trace-images 0`` a pandas error after the whole training.

positive_int: Callable[[str], int] = int_range(1)  # counts, sizes, repeats, steps, threads
nonneg_int: Callable[[str], int] = int_range(0)  # where 0 means "none" or "torch's default", as the help says
seed_int: Callable[[str], int] = int_range(0, MAX_SEED)  # numpy refuses a negative seed


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number above 0 (a learning rate: ``--lr -1`` failed inside the optimiser once the
    data was built, ``--lr 0`` trained nothing and said nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def _entries(text: str, what: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):  # "", "1,,2", "1,": an empty entry is a typo, not a request for nothing
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return parts


def _no_repeats(values: list[Any], text: str) -> None:
    twice = [str(v) for i, v in enumerate(values) if v in values[:i]]
    if twice:  # "1,1" ran (and reported) the same rows twice
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice in {text!r}")


def int_list(low: int = 1) -> Callable[[str], list[int]]:
    """argparse ``type``: comma-separated whole numbers of at least ``low`` (``--threads 1,2``) as a list."""
    item = int_range(low)

    def parse(text: str) -> list[int]:
        values, parts = [], _entries(text, "whole numbers such as 1,2")
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"{err} in {text!r}" if len(parts) > 1 else str(err)) from None
        _no_repeats(values, text)
        return values

    parse.__name__ = "list of whole numbers"  # argparse names the type in its own messages
    return parse


def choice_list(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[str], list[str]]:
    """argparse ``type``: comma-separated names from ``choices`` (``--dtypes fp32,bf16``) as a list. ``choices`` may
    be a function giving them, called only when the option is parsed: names read from a module that imports torch
    then cost nothing to a command line rejected for another option."""
    def parse(text: str) -> list[str]:
        choices_ = choices() if callable(choices) else choices
        names = _entries(text, f"names from {', '.join(choices_)}")
        for name in names:
            if name not in choices_:
                raise argparse.ArgumentTypeError(f"unknown {name!r}{did_you_mean(name, choices_)} in {text!r}; "
                                                 f"choose from {', '.join(choices_)}")
        _no_repeats(names, text)
        return names

    parse.__name__ = "list of names"
    return parse


def synthetic_sizes() -> list[str]:
    """``--size`` choices: the synthetic generator's size names (a misspelt size failed only once the run reached
    the generator; amc_synthetic even wrote a report saying the data could not be built, and exited 0)."""
    from cirlab.data.generators.synthetic import SIZES

    return list(SIZES)


def torch_device(text: str) -> str:
    """argparse ``type`` of ``--device``: checked as ``cirlab train`` checks ``train.device``
    (:func:`cirlab.engine.train.check_device`: a name torch knows, a GPU this machine has), ``auto`` resolved.
    ``--device gpu`` was a RuntimeError traceback, ``--device cuda`` without a GPU one from the CUDA driver after the
    model was built."""
    if text == "cpu":  # always valid; the check imports torch (1.5 s), which a rejected command line never needs
        return text
    from cirlab.core.errors import ConfigError
    from cirlab.engine.train import resolve_device

    try:
        return resolve_device(text, "device")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("device: ")) from None


REPORT_HELP = ("a bare NAME is reports/benchmarks/NAME.md; a path with a folder or ending in .md is that file "
               "(as in every bench script)")


def report_arg(text: str) -> str:
    """argparse ``type`` of the report options (``--report``, dime_eval's ``--out``): ``''`` (no report) or a name /
    path as :func:`report_path` reads it, checked before the run: a report that could not be written lost the run
    at its very end."""
    if not text:
        return text
    path = report_path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: give a report name or a .md file")
    folder = path.absolute().parent
    while not folder.exists():  # written with parents=True: the nearest existing folder must take it
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write {path} ({folder} is not a writable folder)")
    return text


def run_folder(text: str) -> str:
    """argparse ``type`` of a cirlab run folder (the diagnose scripts): checked for every folder before the first is
    measured (a typo in the last of several folders failed after the others' work)."""
    if not (Path(text) / "config.yaml").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a cirlab run folder (no config.yaml in it)")
    return text


def fill_defaults(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """Give each option of ``values`` left at ``None`` (not on the command line) its value: ``--quick`` picks small
    sizes for the options not given, instead of overwriting the ones given (``--quick --images 2000`` ran 1,000)."""
    for dest, value in values.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def machine() -> str:
    """One line: CPU model, cores, memory, torch version and threads, GPU (if any)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    units = "no bf16 dot-product flags"
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
        have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
        units = "CPU flags: " + (", ".join(have) if have else "no avx512_bf16 / amx")
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu} ({units}), {os.cpu_count()} CPU cores{mem}, {gpu}; torch {torch.__version__} "
            f"(this process: {torch.get_num_threads()} intra-op threads; the runs' own count is in the text), "
            f"Python {platform.python_version()}{load}")


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def paired(anchor: Callable[[], object], candidate: Callable[[], object], repeats: int = 3, *,
           self_timed: bool = False) -> dict:
    """Time ``anchor`` and ``candidate`` side by side, interleaved: repeat ``repeats`` times, alternating which runs
    first, and report the median of each time and the median of the per-repeat ratios ``anchor / candidate``.

    On a shared machine the load moves between repeats; a ratio taken within one repeat sees (nearly) the same load
    on both sides, and the median drops the repeats that one side lost to a burst. With ``self_timed`` each function
    returns its own measurement (seconds, e.g. per step after a warm-up) instead of being timed whole.
    """
    times: dict[str, list[float]] = {"anchor": [], "candidate": []}
    outs: dict[str, object] = {}
    for r in range(repeats):
        order = (("anchor", anchor), ("candidate", candidate))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(float(outs[name]) if self_timed else time.perf_counter() - t0)
    ratios = [a / c for a, c in zip(times["anchor"], times["candidate"])]
    return {"anchor": statistics.median(times["anchor"]), "candidate": statistics.median(times["candidate"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "repeats": repeats,
            "anchor_out": outs["anchor"], "candidate_out": outs["candidate"]}


def command_line() -> str:
    rel = Path(sys.argv[0]).resolve()
    try:
        rel = rel.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(rel), *map(shlex.quote, sys.argv[1:])])


def report_path(name: str) -> Path:
    """``reports/benchmarks/<name>.md`` for a bare name; a name with a folder or ending in ``.md`` is that file (a
    path such as ``$TMP/dime_eval_gpu.md`` became ``.../reports/benchmarks/$TMP/dime_eval_gpu.md.md``)."""
    if name.endswith(".md") or os.sep in name or "/" in name:
        return Path(name)
    return REPORTS / f"{name}.md"


def write_report(name: str, title: str, body: str) -> Path:
    """Write the report :func:`report_path` names, with the command and the machine above the results."""
    path = report_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\nCommand (from the repository root):\n\n```\n{command_line()}\n```\n\n"
            f"Machine: {machine()}\n\nDate: {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n{body.strip()}\n")
    path.write_text(text)
    return path


def diagnosis_report(results: dict[str, dict[str, dict[str, float]]], intro: str, report: str, title: str) -> None:
    """Print ``intro`` and one table per run (a row per quantity, a column per model state such as untrained /
    trained); with ``report``, also write reports/benchmarks/<report>.md (the diagnose scripts)."""
    lines = [intro, ""]
    for run, by_state in results.items():
        keys = list(next(iter(by_state.values())))
        lines += [f"## `{run}`", "", "| quantity | " + " | ".join(by_state) + " |",
                  "| --- | " + " | ".join("---:" for _ in by_state) + " |"]
        lines += [f"| {k} | " + " | ".join(f"{v[k]:.3f}" for v in by_state.values()) + " |" for k in keys]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if report:
        print(f"wrote {write_report(report, title, text)}")
