"""Headless regeneration of every notebook: ``cirlab report``.

``cirlab report [--only NAME] [--set key=value ...] [--out reports] [--smoke]`` executes the notebooks in
``notebooks/`` with papermill in dependency order (train -> evaluate -> router_explorer -> rank_shift, then
train_dime -> router_explorer_dime, then quickstart) on the embedded synthetic data (generated into the cache
on first use), prints one progress line per notebook, and writes::

    reports/<notebook>/<notebook>.ipynb   executed notebook (papermill)
    reports/<notebook>/<notebook>.html    the same, rendered by nbconvert
    reports/<notebook>/metrics.json       written by the notebook's last cell
    reports/<notebook>/config.json        the notebook's resolved parameters
    reports/<notebook>/figures/*.png|svg  its figures
    reports/index.html                    links to everything, key figures and metric tables

A report entry is a notebook run with one parameter set: ``train_dime`` and ``router_explorer_dime`` run the
``train`` and ``router_explorer`` notebooks a second time, for DIME on the synthetic precomp data (:data:`SOURCE`
maps an entry to its notebook).

A failing notebook stops the report: the failing cell's error is printed and the exit status is 1.

The parameters passed to each notebook are :data:`REPORT_PARAMETERS` (``--smoke``: :data:`SMOKE_PARAMETERS`)
with ``{out}`` (the report folder), ``{data}`` (the synthetic data root) and ``{itm_data}`` (the synthetic ITM
precomp data: the "small" size, because DIME scores every image-caption pair with cross-attention and the
default size's 100 x 500 validation pairs cost minutes per evaluation on two CPU cores; ``--smoke`` and
``--set data_root=...`` use ``{data}`` for both) filled in; ``tests/test_notebooks.py``
checks them against ``papermill.inspect_notebook``. Secrets (tracking keys) never go through parameters: they
are read from environment variables by the code that needs them, because papermill writes every parameter into
the executed notebook.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from cirlab.core.threads import thread_env

logger = logging.getLogger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
ORDER = ("train", "evaluate", "router_explorer", "rank_shift", "train_dime", "router_explorer_dime",
         "quickstart")  # dependency order
DEPENDS: dict[str, tuple[str, ...]] = {"evaluate": ("train",), "router_explorer": ("train",),
                                       "rank_shift": ("evaluate",), "router_explorer_dime": ("train_dime",)}
SOURCE: dict[str, str] = {"train_dime": "train", "router_explorer_dime": "router_explorer"}  # entry -> notebook
# Entries `cirlab report --no-dime` leaves out (DIME with the frozen MiniLM: about 3 min of the full report on an idle
# 2-core machine; far more when other jobs load it).
OPTIONAL: tuple[str, ...] = ("train_dime", "router_explorer_dime")


def notebook_of(name: str) -> str:
    """The notebook a report entry executes (``train_dime`` -> ``train``)."""
    return SOURCE.get(name, name)
SYNTHETIC_SEED = 0

# Parameters `cirlab report` passes; "{out}" and "{data}" are filled in at run time.
_COMMON = {"device": "cpu", "seed": 0}
# Short CPU runs need a faster recipe than the papers' (50 epochs at lr 1e-4 with EMA 0.999 would leave a few hundred
# steps' EMA weights almost at their initial values): these `cirlab train --set` overrides are the demo's, measured
# to train in about a minute on 2 cores. Paper presets and defaults are untouched.
AMC_DEMO = ["train.lr=1e-3", "train.ema_decay=0.99", "train.lr_milestones=[]", "train.eval_every=0",
            "model_overrides.image_size=32"]
DIME_DEMO = ["train.lr=3e-3", "train.eval_every=0", "model_overrides.direction=t2i",
             "model_overrides.lambda_softmax=9.0", "model_overrides.max_violation_warmup_epochs=5",
             # the real (frozen) MiniLM, not the tiny preset's random BERT: the path regulariser aligns routes with
             # sentence similarity, which only a pretrained encoder gives meaning, so only then do the routes
             # differ by caption type (bench/dime_synthetic.py); 32 positions hold the longest synthetic captions
             "model_overrides.bert=minilm", "model_overrides.max_words=32"]

REPORT_PARAMETERS: dict[str, dict[str, Any]] = {
    "quickstart": {"data_root": "{data}", "output_dir": "{out}/quickstart", "preset": "tiny", "max_steps": 160,
                   "batch_size": 32, "n_show": 4, "settings": AMC_DEMO, **_COMMON},
    "train": {"model": "amc", "preset": "tiny", "dataset": "fashioniq", "data_root": "{data}",
              "output_dir": "{out}/train", "epochs": 10, "max_steps": 240, "batch_size": 32, "resume": "",
              "settings": AMC_DEMO, **_COMMON},
    "evaluate": {"runs": ["{out}/train"], "dataset": "fashioniq", "data_root": "{data}", "split": "val",
                 "output_dir": "{out}/evaluate", "k": 50, "include_untrained": True, "n_show": 4,
                 "device": "cpu"},
    "router_explorer": {"run_dir": "{out}/train", "dataset": "fashioniq", "data_root": "{data}", "split": "val",
                        "output_dir": "{out}/router_explorer", "n_queries": 90, "query_id": "",
                        "interactive": False, "device": "cpu"},
    "rank_shift": {"before": "{out}/evaluate/topk/untrained", "after": "{out}/evaluate/topk/train",
                   "output_dir": "{out}/rank_shift", "pool_k": 50, "bins": 10,
                   "label_before": "untrained", "label_after": "trained"},
    # DIME (ITM) on the synthetic precomp data: the train and router_explorer notebooks again
    "train_dime": {"model": "dime", "preset": "tiny", "dataset": "f30k", "data_root": "{itm_data}",
                   "output_dir": "{out}/train_dime", "epochs": 8, "max_steps": 0, "batch_size": 32, "resume": "",
                   "settings": DIME_DEMO, **_COMMON},
    "router_explorer_dime": {"run_dir": "{out}/train_dime", "dataset": "f30k", "data_root": "{itm_data}",
                             "split": "val",
                             "output_dir": "{out}/router_explorer_dime", "n_queries": 100, "query_id": "",
                             "interactive": False, "device": "cpu"},
}
SMOKE_PARAMETERS: dict[str, dict[str, Any]] = {
    name: {**params, **{k: v for k, v in {"max_steps": 2, "epochs": 1, "batch_size": 8, "n_queries": 12,
                                          "n_show": 2, "k": 10, "pool_k": 10, "bins": 5}.items() if k in params}}
    for name, params in REPORT_PARAMETERS.items()
}
SYNTHETIC_SIZE = {"report": "default", "smoke": "tiny"}
SYNTHETIC_SIZE_ITM = "small"  # the report's {itm_data} (precomp only); smoke runs use {data}


# --------------------------------------------------------------------------------------------- parameters
def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", "train.max_steps=10"]`` -> ``{"key": value, "train.max_steps": 10}``: parsed exactly as
    ``cirlab train --set`` parses (:func:`cirlab.engine.runs.parse_set`: YAML values, ``2e-4`` a float)."""
    from cirlab.engine.runs import parse_set as parse_overrides

    return {".".join(path): value for path, value in parse_overrides(items)}


def _fill(value: Any, out: Path, data: Path, itm_data: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{out}", str(out)).replace("{itm_data}", str(itm_data)).replace("{data}", str(data))
    if isinstance(value, list):
        return [_fill(v, out, data, itm_data) for v in value]
    return value


def uses_itm_data(names: Sequence[str]) -> bool:
    """Whether any of these entries reads ``{itm_data}``."""
    return any("{itm_data}" in str(v) for n in names for v in REPORT_PARAMETERS[n].values())


def notebook_parameters(name: str, out: str | os.PathLike, data_root: str | os.PathLike, smoke: bool = False,
                        overrides: Mapping[str, Any] | None = None,
                        itm_data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parameters ``cirlab report`` passes to notebook ``name`` (``overrides``: ``key`` or ``name.key``).

    ``itm_data_root`` fills ``{itm_data}`` (default: ``data_root``)."""
    base = (SMOKE_PARAMETERS if smoke else REPORT_PARAMETERS)[name]
    itm = Path(itm_data_root) if itm_data_root else Path(data_root)
    params = {k: _fill(v, Path(out), Path(data_root), itm) for k, v in base.items()}
    for key, value in (overrides or {}).items():
        nb, _, field = key.rpartition(".")
        if nb and nb != name:
            continue
        if field in params:
            params[field] = value
    return params


def check_overrides(overrides: Mapping[str, Any], names: Sequence[str]) -> None:
    """Every ``--set`` key must name a parameter of at least one selected notebook (typos fail early)."""
    for key in overrides:
        nb, _, field = key.rpartition(".")
        if nb and nb not in REPORT_PARAMETERS:
            raise ValueError(f"--set {key}: unknown notebook {nb!r}; notebooks: {', '.join(ORDER)}")
        targets = [nb] if nb else list(names)
        if field != "data_root" and not any(field in REPORT_PARAMETERS[t] for t in targets):
            known = sorted({p for t in targets for p in REPORT_PARAMETERS[t]})
            raise ValueError(f"--set {key}: no such parameter; known: {', '.join(known)}")


def plan(only: str | None = None, out: Path | None = None, with_optional: bool = True) -> list[str]:
    """Entries to run, in order: all (:data:`OPTIONAL` ones only ``with_optional``), or ``only`` plus any
    prerequisite whose outputs are missing."""
    if only is None:
        return [n for n in ORDER if with_optional or n not in OPTIONAL]
    if only not in REPORT_PARAMETERS:
        raise ValueError(f"unknown notebook {only!r}; notebooks: {', '.join(ORDER)}")
    needed = {only}
    stack = [only]
    while stack:
        for dep in DEPENDS.get(stack.pop(), ()):
            if out is None or not (out / dep / "metrics.json").is_file():
                needed.add(dep)
                stack.append(dep)
    return [n for n in ORDER if n in needed]


# --------------------------------------------------------------------------------------------- execution
def ensure_synthetic_data(size: str = "default", seed: int = SYNTHETIC_SEED, root: str | os.PathLike | None = None,
                          stream: TextIO | None = None, layouts: Sequence[str] | None = None) -> Path:
    """The embedded default data (``cirlab.data.generators.synthetic.ensure``: generated into the cache on first use)."""
    from cirlab.data.generators import synthetic

    t0 = time.time()
    path = synthetic.ensure(root, seed=seed, size=size, **({"layouts": tuple(layouts)} if layouts else {}))
    _say(stream, f"data: synthetic ({size}, seed {seed}) ready in {time.time() - t0:.1f}s -> {path}")
    return path


def notebook_kernel(path: Path, fallback: str = "python3") -> str:
    """The kernel the notebook names if it is installed (``make setup`` installs ``cirlab``), else ``fallback``."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager

    name = nbformat.read(path, as_version=4).metadata.get("kernelspec", {}).get("name", fallback)
    installed = KernelSpecManager().find_kernel_specs()
    if name in installed:
        return name
    logger.warning("kernel %r named by %s is not installed; using %r", name, path.name, fallback)
    return fallback


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the failing cell's index and error."""


def run_notebook(name: str, params: Mapping[str, Any], out_dir: Path, kernel_name: str | None = None,
                 notebook_dir: Path = NOTEBOOK_DIR, html_export: bool = True, timeout: int | None = None) -> Path:
    """Execute one notebook with papermill into ``out_dir/<name>.ipynb`` (+ HTML); raise NotebookFailed."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    src = notebook_dir / f"{notebook_of(name)}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"notebook not found: {src} (run `python notebooks/sync.py` to generate it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.ipynb"
    try:
        pm.execute_notebook(str(src), str(dst), parameters=dict(params),
                            kernel_name=kernel_name or notebook_kernel(src), progress_bar=False, cwd=str(out_dir),
                            execution_timeout=timeout, start_timeout=120)
    except PapermillExecutionError as err:
        raise NotebookFailed(f"{name}: cell {err.exec_count} failed: {err.ename}: {err.evalue}") from err
    finally:
        if html_export and dst.is_file():
            export_html(dst)
    return dst


def export_html(notebook: Path) -> Path:
    """Render an executed notebook to HTML next to it (nbconvert, no re-execution)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    path = notebook.with_suffix(".html")
    path.write_text(body, encoding="utf-8")
    return path


def run_report(out: str | os.PathLike = "reports", only: str | None = None,
               overrides: Mapping[str, Any] | None = None, smoke: bool = False, kernel_name: str | None = None,
               notebook_dir: Path = NOTEBOOK_DIR, stream: TextIO | None = sys.stdout,
               with_optional: bool = True) -> int:
    """Run the report; returns the exit status (0 = every notebook ran, 1 = one failed).

    ``with_optional=False`` leaves the :data:`OPTIONAL` entries (the DIME runs) out of a full report."""
    out = Path(out).resolve()
    overrides = dict(overrides or {})
    os.environ.update(thread_env())  # the kernels inherit it: one passive-waiting thread on a small machine
    names = plan(only, out, with_optional)
    check_overrides(overrides, names)
    data_override = overrides.pop("data_root", "")
    data = Path(data_override) if data_override else ensure_synthetic_data(
        SYNTHETIC_SIZE["smoke" if smoke else "report"], stream=stream)
    itm_data = data
    if not data_override and not smoke and uses_itm_data(names):
        itm_data = ensure_synthetic_data(SYNTHETIC_SIZE_ITM, stream=stream, layouts=("precomp",))
    t_all = time.time()
    for i, name in enumerate(names, start=1):
        params = notebook_parameters(name, out, data, smoke, overrides, itm_data)
        t0 = time.time()
        _say(stream, f"[{i}/{len(names)}] {name}: running ...")
        try:
            run_notebook(name, params, out / name, kernel_name, notebook_dir)
        except NotebookFailed as err:
            _say(stream, f"[{i}/{len(names)}] {name}: FAILED after {time.time() - t0:.1f}s\n{err}\n"
                         f"executed notebook: {out / name / (name + '.ipynb')}")
            write_index(out)
            return 1
        _say(stream, f"[{i}/{len(names)}] {name}: done in {time.time() - t0:.1f}s -> {out / name}")
    index = write_index(out)
    _say(stream, f"report: {len(names)} notebook(s) in {time.time() - t_all:.1f}s -> {index}")
    return 0


def _say(stream: TextIO | None, line: str) -> None:
    logger.info(line)
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


# --------------------------------------------------------------------------------------------- index.html
def _metrics_html(path: Path) -> str:
    from cirlab.workbench.analysis import flatten_metrics

    try:
        flat = flatten_metrics(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        return f"<p>metrics unreadable: {html.escape(str(err))}</p>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in list(flat.items())[:60])
    more = f"<p>... {len(flat) - 60} more in metrics.json</p>" if len(flat) > 60 else ""
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>{more}"


def write_index(out: str | os.PathLike) -> Path:
    """``<out>/index.html``: per notebook, links to its files, its metrics table and its figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>cirlab report</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%;border:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "</style></head><body><h1>cirlab report</h1>"]
    for name in ORDER:
        folder = out / name
        if not folder.is_dir():
            continue
        links = [f"<a href='{name}/{f}'>{f}</a>" for f in (f"{name}.html", f"{name}.ipynb", "metrics.json",
                                                           "config.json") if (folder / f).is_file()]
        source = f" <small>(notebook {notebook_of(name)})</small>" if notebook_of(name) != name else ""
        parts.append(f"<h2 id='{name}'>{name}{source}</h2><p>{' | '.join(links)}</p>")
        if (folder / "metrics.json").is_file():
            parts.append(_metrics_html(folder / "metrics.json"))
        for png in sorted((folder / "figures").glob("*.png")):
            rel = png.relative_to(out).as_posix()
            parts.append(f"<h4>{html.escape(png.stem)}</h4><a href='{rel[:-4]}.svg'><img src='{rel}'></a>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


# --------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cirlab report`` to the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "report", help="execute the notebooks headlessly and write reports/",
        description="Execute notebooks/*.ipynb with papermill in dependency order (train -> evaluate -> "
                    "router_explorer -> rank_shift, train_dime -> router_explorer_dime, then quickstart) on the "
                    "embedded synthetic data and write "
                    "reports/<notebook>/ (executed notebook, HTML, metrics.json, figures) and reports/index.html.")
    _add_arguments(parser)
    parser.set_defaults(func=_run_from_args)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=list(ORDER), default=None,
                        help="run one notebook (and any prerequisite whose outputs are missing)")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter: KEY=VALUE for every notebook that has it, or "
                             "NOTEBOOK.KEY=VALUE for one; data_root=PATH uses your data instead of the synthetic set")
    parser.add_argument("--out", default="reports", help="report folder (default: reports)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps (seconds per notebook)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's, else python3)")
    parser.add_argument("--no-dime", dest="with_dime", action="store_false",
                        help="skip train_dime and router_explorer_dime (DIME on the synthetic precomp data; about "
                             "3 min on an idle 2-core CPU)")


def _run_from_args(args: argparse.Namespace) -> int:
    try:
        overrides = parse_set(args.set_)
        return run_report(args.out, args.only, overrides, args.smoke, args.kernel,
                          with_optional=getattr(args, "with_dime", True))
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"cirlab report: {err}\n")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cirlab.workbench.report`` (same options as ``cirlab report``)."""
    parser = argparse.ArgumentParser(prog="cirlab report")
    _add_arguments(parser)
    return _run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
