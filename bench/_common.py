"""Shared helpers for the bench/ scripts: machine description, timing, and the markdown report."""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports" / "benchmarks"


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
