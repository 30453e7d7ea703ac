"""Plot functions for the notebooks: every function returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas), never through pyplot, so no
global figure state leaks between calls and nothing needs a display: the same call works in a headless
papermill run, in a test and in Jupyter: a returned figure (a cell's last value, or ``display(fig)``) is drawn in
any notebook, with or without ``%matplotlib inline``. ``plt.show()`` does not show them (pyplot never holds them).
:func:`save_figure` writes PNG and SVG.

Inputs are plain data: a route-trace frame (``cirlab.core.tracing.RouteTrace.to_frame()``), a frame from
:func:`cirlab.workbench.analysis.align_ranks`, metric dicts, a ``log.jsonl``. The computations behind the plots live
in :mod:`cirlab.workbench.analysis` and are tested there.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from cirlab.core.config import name_list, whole_number
from cirlab.core.errors import InputError, UnknownKeyError
from cirlab.core.metric_keys import is_recall_key
from cirlab.workbench import analysis

logger = logging.getLogger(__name__)

__all__ = [
    "save_figure", "plot_retrieval_gallery", "plot_metrics_bars", "plot_table", "plot_expert_heatmaps",
    "plot_query_gates", "plot_gate_distributions", "plot_gate_entropy", "plot_dime_flows", "plot_path_matrices",
    "plot_path_space",
    "plot_rank_shift", "plot_figure8", "plot_training_curves", "plot_run_comparison", "TARGET_COLOR",
    "plain_text", "paper_order", "image_axis", "plot_cala_bridges", "plot_bridge_words", "plot_relation_graph",
    "plot_word_region",
]

TARGET_COLOR = "#2ca02c"  # green frame around the ground-truth target in galleries
# written after the target's label too: a green frame alone is lost on readers who cannot tell green (WCAG 1.4.1)
TARGET_MARK = "\u2713 target"
QUERY_COLOR = "#1f77b4"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
# Okabe & Ito's colour-universal-design set (https://jfly.uni-koeln.de/color/), ordered so that neighbours differ for
# every common colour-vision deficiency: matplotlib's default puts green next to red, which deuteranopes cannot tell
# apart. Used for categories and other groups in the router and rank-shift plots.
CVD_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
# one meaning per colour inside a figure: better / worse (rank moved up or down, a word's bridge value above or below
# zero) is a blue / orange pair, which stays two colours for deuteranopes and protanopes, unlike green / red
BETTER_COLOR, WORSE_COLOR, NEUTRAL_COLOR = "#0072B2", "#E69F00", "#BBBBBB"
# grouped bars (runs, categories) also differ in hatching: colour alone fails in greyscale and for a reader who
# tells two neighbouring colours apart by hue only
GROUP_HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
# a marker shape per scatter group, for the same reason: groups told apart by hue alone merge for colour-blind readers
GROUP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
WORSE_HATCH = "//"  # the worse side is also hatched, so it reads in greyscale prints too
MIN_FONT = 8  # smallest text size (points) for tick labels and legends: below it labels are hard to read when saved


def _legend_outside(ax: Any, **kwargs: Any) -> Any:
    """The axes' legend to the right of its plot area, where it cannot cover data (bars reaching 100 %, scatter
    points in every corner); the constrained layout makes room for it."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def new_figure(width: float, height: float) -> Any:
    """An empty Figure (no pyplot) of ``width`` x ``height`` inches at 100 dpi, constrained layout, that a notebook
    draws when a cell returns or displays it (:func:`_shown_by_ipython`): every cirlab figure starts here."""
    from matplotlib.figure import Figure

    _shown_by_ipython(Figure)
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _shown_by_ipython(figure_type: type) -> None:
    """Let IPython draw a returned figure: a Figure made without pyplot has no image formatter until
    ``%matplotlib inline`` installs one, so a user's own notebook showed ``<Figure size ...>`` as text (and
    ``plt.show()`` cannot show a figure pyplot does not know). Registers PNG only where no format is registered
    yet: a user's ``%matplotlib inline``, SVG or widget backend choice stays theirs. Outside IPython, nothing."""
    import sys

    ipython = sys.modules.get("IPython")  # never import IPython here: a plain script or test does not need it
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    chosen = [*formatters.values(), shell.display_formatter.ipython_display_formatter]  # the last: ipympl's
    if any(figure_type in f.type_printers for f in chosen):
        return
    import functools

    from IPython.core.pylabtools import print_figure

    formatters["image/png"].for_type(figure_type, functools.partial(print_figure, fmt="png", base64=True))


def save_figure(fig: Any, out_dir: str | os.PathLike, name: str,
                formats: Sequence[str] | str = ("png", "svg"), *, width: float | None = None) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<name>.<fmt>`` for each format; returns the paths written. ``name`` is a file
    name (no folders, no ``..``: ``../x`` wrote outside ``out_dir``); one ending in a requested format's extension
    loses it (``"g3.png"`` writes ``g3.png`` and ``g3.svg``, not ``g3.png.png``). ``out_dir`` must not be a file.

    ``width``: the width in inches the files are laid out at (a paper's column, e.g. 3.3; a page, 7.0), the height
    scaled with it; text keeps its size in points, so it reads at that size where the figure is printed at that
    width. The figure itself keeps its size (the notebook shows it as before)."""
    from cirlab.core.io import file_name_part

    formats = name_list(formats)
    if not formats:  # nothing would be written, without a word
        raise InputError("save_figure: formats is empty; give one or more of e.g. 'png', 'svg', 'pdf'")
    if width is not None and not (isinstance(width, (int, float)) and 0.5 <= width <= 100):
        raise InputError(f"save_figure: width is in inches, from 0.5 to 100 (a column is about 3.3), got {width!r}")
    file_name_part(name, "save_figure: name")
    name = _without_extension(name, formats)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"save_figure: out_dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with _laid_out_at(fig, width), _settled_layout(fig):
        for fmt in formats:
            paths.append(_save_one(fig, out / f"{name}.{fmt}", fmt))
    logger.info("saved figure %s (%s)", out / name, ", ".join(formats))
    return paths


@contextlib.contextmanager
def _laid_out_at(fig: Any, width: float | None) -> Iterator[None]:
    """``fig`` at ``width`` inches (its height scaled with it) inside the block, at its own size again after it."""
    if width is None:
        yield
        return
    size = tuple(fig.get_size_inches())
    fig.set_size_inches(width, size[1] * width / size[0])
    try:
        yield
    finally:
        fig.set_size_inches(size)


# SVG text stays text (matplotlib draws it as outlines by default): screen readers read it, search finds it. PDF and
# PostScript embed TrueType (Type 42) fonts: matplotlib's Type 3 fonts are refused by the camera-ready checks of
# many venues (IEEE PDF eXpress, ACM). A fixed hash salt and no date make the same figure the same bytes (matplotlib
# salts its clip-path ids with a random uuid, so every re-run changed every SVG in a committed reports/)
_SAVE_RC = {"svg.fonttype": "none", "svg.hashsalt": "cirlab", "pdf.fonttype": 42, "ps.fonttype": 42}


def _save_one(fig: Any, path: Path, fmt: str) -> Path:
    """``fig`` as ``path``, written to a temporary beside it and renamed (a kill mid-write left a truncated PNG or
    SVG in the report), through an open file, not the temporary's name, which PostScript wrote into its %%Title."""
    import io

    import matplotlib

    from cirlab.core.io import atomic_path

    buffer = io.BytesIO()
    with matplotlib.rc_context(_SAVE_RC):
        fig.savefig(buffer, format=fmt, dpi=120 if fmt == "png" else None, **_fixed_metadata(fmt))
    data = buffer.getvalue()
    if fmt == "svg":
        data = _numbered_svg_ids(data)
    elif fmt in ("ps", "eps"):  # the PostScript backend writes the save time whatever metadata says
        data = re.sub(rb"^%%CreationDate: [^\n]*\n", b"", data, count=1, flags=re.M)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def _numbered_svg_ids(svg: bytes) -> bytes:
    """matplotlib names an SVG's clip paths by a hash of their bounds, floats whose last bits move between two draws
    of the same figure: numbered in order of appearance instead, the same figure is the same file."""
    ids: dict[bytes, bytes] = {}
    for found in re.findall(rb'id="(p[0-9a-f]{10})"', svg):
        ids.setdefault(found, b"clip%d" % len(ids))
    if not ids:
        return svg
    return re.sub(rb"\b(p[0-9a-f]{10})\b", lambda m: ids.get(m.group(1), m.group(1)), svg)


@contextlib.contextmanager
def _settled_layout(fig: Any, draws: int = 50) -> Iterator[None]:
    """The figure's constrained layout run until the axes stop moving, then held while it is saved: each draw moved
    them a little (positions in the 5th digit), so a figure drawn in a notebook and saved, saved twice, or saved as
    PNG then SVG gave other bytes each time, and a paper's repository churned."""
    engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None  # a figure-like writer
    if engine is None:
        yield
        return
    before = None
    for _ in range(draws):  # square images with colour bars settle geometrically (x0.3 a draw), some never exactly
        fig.draw_without_rendering()
        now = np.array([ax.get_position().bounds for ax in fig.axes], dtype=float).reshape(-1, 4)
        if before is not None and np.allclose(now, before, rtol=0.0, atol=1e-13):
            break
        before = now
    fig.set_layout_engine("none")
    try:
        yield
    finally:
        fig.set_layout_engine(engine)


def _fixed_metadata(fmt: str) -> dict[str, Any]:
    """``savefig`` metadata that leaves out the save time where the format writes one (SVG's dc:date, PDF's
    CreationDate): the file then depends on the figure alone."""
    if fmt.lower() == "svg":
        return {"metadata": {"Date": None}}
    if fmt.lower() == "pdf":
        return {"metadata": {"CreationDate": None}}
    return {}


def _without_extension(name: str, formats: Sequence[str]) -> str:
    """``name`` less a trailing ``.<fmt>`` of one of ``formats`` (any case); other dots stay (``fig.v2``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or ext.lower() not in {str(f).lower() for f in formats}:
        return name
    if not stem:
        raise InputError(f"save_figure: name {name!r} is only an extension; give a file name such as 'figure'")
    return stem


# --------------------------------------------------------------------------------------------- images
def _to_image(x: Any) -> np.ndarray:
    """An image (path, PIL image, HWC/CHW array or tensor) as an HWC float array in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        from cirlab.data.base import load_image  # as the loaders read it: upright, 8-bit, transparency on white

        return np.asarray(load_image(Path(x)), dtype=float) / 255.0
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL image
        from cirlab.data.base import to_rgb

        return np.asarray(to_rgb(x), dtype=float) / 255.0
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=float)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.max(initial=0) > 1.0 or a.min(initial=0) < 0.0:  # uint8 or a normalised tensor: rescale for display
        a = a / 255.0 if a.min() >= 0 and a.max() <= 255 and a.max() > 1.0 else (a - a.min()) / (np.ptp(a) or 1.0)
    return np.clip(a, 0.0, 1.0)


def candidate_label(rank: int, name: Any, score: Any = None, target: bool = False) -> str:
    """A shown candidate's title: its 1-based rank and id, its score on a second line when given, and the target
    mark when it is the ground truth (so the target is told by text as well as by its green frame)."""
    label = f"#{rank} {name}".rstrip() + (f" {TARGET_MARK}" if target else "")
    return label if score is None else f"{label}\n{float(score):.3f}"


def image_axis(ax: Any, image: Any, title: str = "", color: str | None = None, width: float = 4.0) -> None:
    ax.imshow(_to_image(image), cmap="gray" if np.ndim(image) == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    if color:
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(width)


def wrap_text(text: str, width: int = 28) -> str:
    """``text`` wrapped to lines of at most ``width`` characters (a single space when empty, for matplotlib)."""
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or " "


def plain_text(text: Any) -> str:
    """A query text as people read it: Fashion-IQ's ``"<BOS> c0 <AND> c1 <EOS>"`` (AMC's caption policy) becomes
    ``"c0 and c1"``. Models that were trained on the markup add it back on their own text path (AMC:
    ``TextEncoder.with_markup``), so a plain text typed in the explorer scores exactly as the loader's text."""
    s = re.sub(r"^\s*<BOS>\s*", "", str(text))
    s = re.sub(r"\s*<EOS>\s*$", "", s)
    return re.sub(r"\s*<AND>\s*", " and ", s).strip()


def paper_order(labels: Sequence[Any]) -> list[Any]:
    """Labels in the paper's order: AMC's traces name the experts ``α1 NIN``, ``α3 CRN``, ``α2 GTN`` (code order
    NIN, CRN, GTN; the paper's Fig. 3 numbers the gates α1 NIN, α2 GTN, α3 CRN), so plots sort them by their α
    number. Labels without one keep their (code) order. The frames keep ``code_index``: only the display changes."""
    numbers = [re.match(r"^α(\d+)\b", str(label)) for label in labels]
    if not labels or not all(numbers):
        return list(labels)
    return [label for _, label in sorted(zip((int(m.group(1)) for m in numbers), labels), key=lambda t: t[0])]


def _paper_columns(mat: Any) -> Any:
    return mat[paper_order(list(mat.columns))]


def display_label(label: Any) -> str:
    """``RIC->GLGC`` (a DIME path, source->destination) as ``RIC→GLGC``."""
    return str(label).replace("->", "→")


def plot_retrieval_gallery(rows: Sequence[Mapping[str, Any]], k: int = 5, title: str = "") -> Any:
    """One row per query: reference image, modification text, then the top-``k`` candidates.

    Each row is a mapping with ``ref_image``, ``text``, ``candidates`` (images, best first) and optionally
    ``candidate_ids``, ``scores``, ``target_position`` (0-based index of the target among the candidates,
    -1/None when it is not shown), ``target_rank``, ``target_image`` and ``query_id``. The target's axes get a
    green frame and ``gid="target"``; the reference gets ``gid="query"``. When a row's target ranks below ``k`` and
    the row has ``target_image``, a last column shows it with its rank (``gid="target_outside"``). Texts are shown
    without Fashion-IQ's ``<BOS>``/``<AND>``/``<EOS>`` markup (:func:`plain_text`).
    """
    if not rows:
        raise InputError("plot_retrieval_gallery needs at least one query row")
    whole_number(k, "plot_retrieval_gallery: k")
    outside = any(_target_outside(row) for row in rows)
    ncols = k + 2 + int(outside)
    fig = new_figure(1.5 * ncols, 1.7 * len(rows))
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    for r, row in enumerate(rows):
        _gallery_row(axes[r], row, k)
    if title:
        fig.suptitle(title)
    return fig


def _gallery_row(axes: Sequence[Any], row: Mapping[str, Any], k: int) -> None:
    qid = row.get("query_id", "")
    image_axis(axes[0], row["ref_image"], title=f"query {qid}".strip(), color=QUERY_COLOR, width=2.0)
    axes[0].set_gid("query")
    axes[1].axis("off")
    rank = row.get("target_rank")
    caption = wrap_text(plain_text(row.get("text", ""))) + \
        (f"\n\n(target rank {analysis.shown_rank(rank)})" if rank else "")
    axes[1].text(0.0, 0.5, caption, fontsize=7, va="center", ha="left", transform=axes[1].transAxes)
    cands = list(row.get("candidates", []))[:k]
    ids = list(row.get("candidate_ids", [""] * len(cands)))
    scores = row.get("scores")
    target = _shown_at(row)
    for j in range(k):
        ax = axes[2 + j]
        if j >= len(cands):
            ax.axis("off")
            continue
        is_target = target is not None and int(target) == j
        label = candidate_label(j + 1, ids[j] if j < len(ids) else "", None if scores is None else scores[j],
                                is_target)
        image_axis(ax, cands[j], title=label, color=TARGET_COLOR if is_target else None)
        if is_target:
            ax.set_gid("target")
    if len(axes) > k + 2:
        ax = axes[k + 2]
        if _target_outside(row):
            image_axis(ax, row["target_image"], title=f"target\nrank {rank}", color=TARGET_COLOR, width=2.0)
            for spine in ax.spines.values():
                spine.set_linestyle("--")
            ax.set_gid("target_outside")
        else:
            ax.axis("off")


def _shown_at(row: Mapping[str, Any]) -> int | None:
    """The target's 0-based position among the shown candidates, None when it is not shown (-1 or None)."""
    position = row.get("target_position")
    return None if position is None or int(position) < 0 else int(position)


def _target_outside(row: Mapping[str, Any]) -> bool:
    return row.get("target_image") is not None and _shown_at(row) is None and bool(row.get("target_rank"))


# --------------------------------------------------------------------------------------------- tables
def plot_metrics_bars(metrics: Mapping[str, float] | Any, title: str = "", ylabel: str = "recall (%)") -> Any:
    """Bars of a metric dict (one bar per key) or of a ``metric x run`` frame (grouped bars per run)."""
    import pandas as pd

    table = pd.DataFrame({"value": pd.Series(analysis.flatten_metrics(metrics))}) if isinstance(metrics, Mapping) \
        else pd.DataFrame(metrics)
    if table.empty:
        raise InputError("plot_metrics_bars got no numeric metrics")
    n_metrics, n_runs = table.shape
    fig = new_figure(max(4.0, 0.45 * n_metrics * max(n_runs, 1) + 1.5), 3.2)
    ax = fig.add_subplot()
    width = 0.8 / n_runs
    x = np.arange(n_metrics)
    for j, run in enumerate(table.columns):
        bars = ax.bar(x + (j - (n_runs - 1) / 2) * width, table[run].to_numpy(dtype=float), width,
                      label=str(run), **group_style(j))
        ax.bar_label(bars, fmt="%.2f", fontsize=6)  # as the tables: Fashion-IQ's recalls step by 0.25 (50.75)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    values = table.to_numpy(dtype=float)
    if "%" in ylabel and np.nanmin(values) >= 0 and np.nanmax(values) <= 100:
        ax.set_ylim(0, 108)  # the whole percent scale: an autoscaled axis made chance-level bars look tall
    if n_runs > 1:
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.grid(axis="y", linestyle="--", alpha=0.5)
    return fig


def text_on_viridis(fraction: float) -> str:
    """Black or white text on the viridis colour at ``fraction`` of its scale, whichever contrasts more: the switch
    at 0.434 keeps both sides at 4.5:1 or better (at the middle, white text on viridis fell to 3.8:1, below
    WCAG's 4.5:1 for small text)."""
    return "black" if fraction > 0.434 else "white"


def group_style(j: int) -> dict[str, Any]:
    """Bar style of group ``j`` (a run, a category): a colour-blind-safe colour and a hatching, both cycling.
    matplotlib's default colours put orange next to green, which protanopes see as one colour."""
    return {"color": CVD_PALETTE[j % len(CVD_PALETTE)], "hatch": GROUP_HATCHES[j % len(GROUP_HATCHES)],
            "edgecolor": "white", "linewidth": 0}


def plot_table(table: Any, title: str = "", fmt: str = "{:.2f}") -> Any:
    """A DataFrame drawn as a matplotlib table (for reports: metrics per protocol, run comparisons); a flat dict of
    scalars (``{"R@1": 1.0, "R@10": 5.0}``) is one row, labelled ``value``."""
    import pandas as pd

    if isinstance(table, Mapping) and table and all(pd.api.types.is_scalar(v) for v in table.values()):
        table = pd.DataFrame([dict(table)], index=["value"])  # pandas refuses all-scalar dicts without an index
    df = pd.DataFrame(table)
    if df.shape[1] == 0:
        raise InputError("plot_table: the table has no columns")
    cells = [[fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in df.to_numpy()]
    fig = new_figure(min(1.2 + 1.1 * (df.shape[1] + 1), 14.0), 0.6 + 0.25 * (len(df) + 1))
    ax = fig.add_subplot()
    ax.axis("off")
    tab = ax.table(cellText=cells or [[""] * df.shape[1]], colLabels=[str(c) for c in df.columns],
                   rowLabels=[str(i) for i in df.index], loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_run_comparison(runs: Mapping[str, Any] | Sequence[str | os.PathLike],
                        metrics: Sequence[str] | str | None = None, title: str = "") -> Any:
    """Several runs side by side: a table (top) and grouped bars (bottom) of the chosen metrics. ``runs`` as for
    :func:`cirlab.workbench.analysis.compare_runs` (a dict of runs, or a list of run folders)."""
    table = analysis.compare_runs(runs)
    if metrics is not None:
        metrics = name_list(metrics)
        missing = [m for m in metrics if m not in table.index]
        if missing:
            raise UnknownKeyError(f"metrics {missing} not in every run; available: {list(table.index)}")
        table = table.loc[list(metrics)]
    if table.empty:  # no runs, no metrics chosen, or runs without numeric metrics
        raise InputError(f"plot_run_comparison: nothing to compare ({len(runs)} run(s), metrics "
                         f"{list(metrics) if metrics is not None else 'all'})")
    fig = new_figure(max(6.0, 0.5 * len(table) * len(table.columns) + 2.0), 2.5 + 0.22 * len(table) + 2.6)
    top, bottom = fig.subfigures(2, 1, height_ratios=[0.5 + 0.22 * len(table), 2.6])
    ax = top.add_subplot()
    ax.axis("off")
    tab = ax.table(cellText=[[f"{v:.2f}" for v in row] for row in table.to_numpy()],
                   colLabels=[str(c) for c in table.columns], rowLabels=list(table.index), loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    bx = bottom.add_subplot()
    width = 0.8 / len(table.columns)
    x = np.arange(len(table))
    for j, run in enumerate(table.columns):
        bx.bar(x + (j - (len(table.columns) - 1) / 2) * width, table[run].to_numpy(), width, label=str(run),
               **group_style(j))
    bx.set_xticks(x, list(table.index), rotation=45, ha="right", fontsize=7)
    bx.legend(fontsize=7)
    bx.grid(axis="y", linestyle="--", alpha=0.5)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------- routing
def _layers(frame: Any, layers: Sequence[str] | str | None) -> list[str]:
    present = list(dict.fromkeys(frame["layer"]))
    if not present:
        raise InputError("the route frame is empty: nothing was traced (no queries, or a model without routers)")
    if layers is None:
        return present
    layers = name_list(layers)
    if not layers:
        raise InputError(f"layers is empty; layers of the route frame: {present}")
    unknown = [l for l in layers if l not in present]
    if unknown:
        raise UnknownKeyError(f"layers {unknown} not in the route frame; layers: {present}")
    return layers


def _is_path_frame(frame: Any) -> bool:
    """Whether the frame holds DIME-style paths (source -> destination) rather than per-expert gates."""
    return "source" in frame.columns and bool((frame["source"].notna() & (frame["source"].astype(str) != "None")).any())


def _rows_name(frame: Any) -> str:
    """What one row id of the frame is: DIME (ITM) traces every image x caption pair, whose ids are in its
    ``image_id`` / ``caption_id`` columns (``cirlab.models.dime``); the CIR routers (AMC) trace queries."""
    pairs = _is_path_frame(frame) or {"image_id", "caption_id"} <= set(frame.columns)
    return "image–caption pairs" if pairs else "queries"


def _weight_name(frame: Any) -> str:
    """One name for the routed quantity in every panel and colour bar: DIME's paths carry path weights, AMC's
    routers gate weights (the heatmap's colour bar said "routing weight" where the bar charts said "gate weight")."""
    return "path weight" if _is_path_frame(frame) else "gate weight"


def _group_column(frame: Any, by: str | None, argument: str) -> str | None:
    """The column that groups queries: ``by`` when the frame has it; None for the default ``category`` on a frame
    without one (HREM, a bare trace); any other missing name is an error (a misspelt ``sort_by`` / ``color_by`` drew
    one ungrouped block without a word)."""
    if not by or by in frame.columns:
        return by or None
    if by == "category":
        return None
    raise UnknownKeyError(f"{argument}={by!r} is not a column of the route frame; columns: "
                          f"{', '.join(map(str, frame.columns))}")


def _pick_queries(frame: Any, max_queries: int, by: str | None) -> tuple[list[Any], list[str]]:
    """Up to ``max_queries`` query ids spread evenly over the groups of column ``by`` (groups sorted, each in
    trace order), with each id's group: heatmap rows grouped and labelled by category."""
    whole_number(max_queries, "max_queries")
    by = _group_column(frame, by, "sort_by")
    first = frame.drop_duplicates("query_id")
    if not by:
        ids = list(first["query_id"])[:max_queries]
        return ids, [""] * len(ids)
    groups: dict[str, list[Any]] = {}
    for qid, group in zip(first["query_id"], first[by].astype(str)):
        groups.setdefault(group, []).append(qid)
    names = sorted(groups)
    take = {g: 0 for g in names}
    left = max_queries
    while left > 0 and any(take[g] < len(groups[g]) for g in names):
        for g in names:  # round robin: every group gets its share before any gets more
            if left > 0 and take[g] < len(groups[g]):
                take[g] += 1
                left -= 1
    ids = [q for g in names for q in groups[g][:take[g]]]
    return ids, [g for g in names for _ in range(take[g])]


def _label_groups(ax: Any, labels: Sequence[str], with_ticks: bool) -> None:
    """Horizontal lines between row groups; the group names as y tick labels at each group's centre."""
    bounds, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            bounds.append((start, i, labels[start]))
            start = i
    for lo, hi, _ in bounds[1:]:
        ax.axhline(lo - 0.5, color="white", linewidth=1.5)
    if with_ticks:
        ax.set_yticks([(lo + hi - 1) / 2 for lo, hi, _ in bounds], [f"{name} ({hi - lo})" for lo, hi, name in bounds],
                      fontsize=MIN_FONT)
    else:
        ax.set_yticks([])


_SCALES = ("auto", "layer", "shared")


def _check_scale(scale: str, caller: str, frame: Any) -> str:
    """``scale`` checked, ``"auto"`` resolved: one range per layer for path frames, one shared range for gates."""
    if scale not in _SCALES:
        raise InputError(f"{caller}: scale={scale!r}; expected one of {', '.join(_SCALES)}")
    if scale == "auto":
        return "layer" if _is_path_frame(frame) else "shared"
    return scale


def _colour_ranges(mats: Sequence[Any], scale: str, floor: float | None = None) -> list[tuple[float, float]]:
    """``(vmin, vmax)`` per panel: each panel's own range (``scale="layer"``) or one range over all of them
    (``"shared"``); ``floor`` fixes the shared range's bottom (weights from 0). A constant panel gets a range of
    its value so that imshow does not divide by zero."""
    lows = [float(np.nanmin(m)) if np.size(m) else 0.0 for m in mats]
    highs = [float(np.nanmax(m)) if np.size(m) else 1.0 for m in mats]
    if scale == "shared":
        lo = min(lows) if floor is None else floor
        return [(lo, max(max(highs), lo + 1e-12))] * len(mats)
    return [(lo, max(hi, lo + 1e-12)) for lo, hi in zip(lows, highs)]


def plot_expert_heatmaps(frame: Any, layers: Sequence[str] | str | None = None, max_queries: int = 40,
                         sort_by: str | None = "category", scale: str = "auto") -> Any:
    """Per layer, a ``query x expert`` heatmap of routing weights (DIME: columns are source→destination paths).

    Rows are up to ``max_queries`` queries spread over the values of ``sort_by`` (default: the category; DIME: the
    caption type), grouped and labelled by it. AMC's experts are drawn in the paper's order (α1 NIN, α2 GTN, α3 CRN).
    ``scale="layer"`` gives each panel its own colour range and colour bar: DIME's 16 paths of a hidden layer share
    about 1/4 of the weight each, which a range set by the output layer (near 1) draws as one flat colour.
    ``scale="shared"``: one range from 0 for all panels, to compare weights across layers. ``"auto"`` (default):
    ``layer`` for path models (DIME), ``shared`` for gate models (AMC's sigmoid gates, comparable in [0, 1]).
    """
    analysis.refuse_attention_trace(frame, "plot_expert_heatmaps")
    scale = _check_scale(scale, "plot_expert_heatmaps", frame)
    layers = _layers(frame, layers)
    ids, groups = _pick_queries(frame, max_queries, sort_by)
    paths = _is_path_frame(frame)
    mats = [_paper_columns(analysis.gate_matrix(frame, l)).reindex(ids) for l in layers]
    widths = [max(2.0, 0.3 * m.shape[1] + 0.8) for m in mats]
    # 0.16 in (11.5 pt) a row: room for a query id at MIN_FONT without the labels running into each other
    fig = new_figure(sum(widths) + 2.0, 1.6 + 0.16 * len(ids))
    weight = _weight_name(frame)
    axes = fig.subplots(1, len(layers), squeeze=False, width_ratios=widths)[0]
    ranges = _colour_ranges([m.to_numpy(dtype=float) for m in mats], scale, floor=0.0)
    for i, (ax, layer, mat, (vmin, vmax)) in enumerate(zip(axes, layers, mats, ranges)):
        image = ax.imshow(mat.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        if scale == "layer":
            fig.colorbar(image, ax=ax, shrink=0.8, label=weight)
        names = [display_label(c) for c in mat.columns]
        many = mat.shape[1] > 4 or max(map(len, names)) > 7  # long DIME path names would run together: turned
        ax.set_xticks(range(mat.shape[1]), names, rotation=90 if many else 0, fontsize=MIN_FONT)
        ax.set_xlabel("path (source→destination cell)" if paths else "expert", fontsize=8)
        if any(groups):
            _label_groups(ax, groups, with_ticks=i == 0)
        elif i == 0:
            ax.set_yticks(range(len(ids)), [str(q) for q in ids], fontsize=MIN_FONT)
        else:
            ax.set_yticks([])
        ax.set_title(str(layer), fontsize=9)
    what = {"queries": "query"}.get(_rows_name(frame), "image–caption pair")  # singular: "query (40 shown)"
    axes[0].set_ylabel(f"{what} ({len(ids)} shown" + (f", grouped by {sort_by})" if any(groups) else ")"), fontsize=8)
    if scale == "shared":
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=weight)
    fig.suptitle("Path weights per pair and layer" if paths else "Router gates per query and layer")
    return fig


def plot_query_gates(frame: Any, query_ids: Sequence[Any] | Any, layers: Sequence[str] | str | None = None,
                     title: str = "") -> Any:
    """Bar charts of the gates of a few queries (or of one id): one row per query, one panel per layer (AMC: paper
    order)."""
    analysis.refuse_attention_trace(frame, "plot_query_gates")
    layers = _layers(frame, layers)
    query_ids = name_list(query_ids)
    if not query_ids:
        raise InputError("plot_query_gates needs at least one query id")
    fig = new_figure(2.6 * len(layers) + 0.8, 1.6 * len(query_ids) + 0.6)
    axes = fig.subplots(len(query_ids), len(layers), squeeze=False, sharey=True)
    ymax = max(float(frame["weight"].max()), 1e-6) * 1.1
    for r, qid in enumerate(query_ids):
        for c, layer in enumerate(layers):
            mat = _paper_columns(analysis.gate_matrix(frame, layer))
            if qid not in mat.index:
                raise UnknownKeyError(f"query {qid!r} not in the route frame for layer {layer!r}")
            ax = axes[r, c]
            values = mat.loc[qid].to_numpy(dtype=float)
            ax.bar(range(len(values)), values, color=[CVD_PALETTE[j % len(CVD_PALETTE)] for j in range(len(values))])
            ax.set_xticks(range(len(values)), [display_label(v) for v in mat.columns], fontsize=MIN_FONT,
                          rotation=90 if len(values) > 4 else 0)
            ax.tick_params(axis="y", labelsize=MIN_FONT)
            ax.set_ylim(0, ymax)
            ax.set_title(f"{qid} | {layer}", fontsize=MIN_FONT)
            if c == 0:
                ax.set_ylabel(_weight_name(frame), fontsize=MIN_FONT)
            if r == len(query_ids) - 1:
                ax.set_xlabel("path" if _is_path_frame(frame) else "expert", fontsize=MIN_FONT)
    default = "Path weights per image–caption pair" if _is_path_frame(frame) else "Router gates per query"
    fig.suptitle(title or default)
    return fig


def plot_gate_distributions(frame: Any, by: str = "category", layers: Sequence[str] | str | None = None,
                            scale: str = "auto") -> Any:
    """Per layer, each expert's weight grouped by ``by`` (category, modification type, ...).

    Gate models (AMC): box plots per expert and group. Path models (DIME, 16 paths a layer): a heatmap of the mean
    path weight per group (rows: source→destination paths, columns: groups), readable where 16 x groups boxes are not;
    ``scale`` as in :func:`plot_expert_heatmaps`. Box plots get a y range per layer: AMC's layer-1 gates sit within a
    few hundredths of each other, and a y axis shared with layer 2's wider spread drew them as flat lines.
    """
    analysis.refuse_attention_trace(frame, "plot_gate_distributions")
    scale = _check_scale(scale, "plot_gate_distributions", frame)
    if by not in frame.columns:
        raise UnknownKeyError(f"the route frame has no {by!r} column; columns: {list(frame.columns)}")
    layers = _layers(frame, layers)
    if _is_path_frame(frame):
        return _group_means_heatmaps(frame, by, layers, scale)
    groups = sorted(frame[by].dropna().astype(str).unique())
    fig = new_figure(max(4.0, 3.5 * len(layers)), 3.2)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    colors = [CVD_PALETTE[g % len(CVD_PALETTE)] for g in range(len(groups))]
    for ax, layer in zip(axes, layers):
        mat = _paper_columns(analysis.gate_matrix(frame, layer))
        labels = frame.drop_duplicates("query_id").set_index("query_id")[by].astype(str).reindex(mat.index)
        width = 0.8 / max(len(groups), 1)
        for g, group in enumerate(groups):
            data = [mat.loc[labels == group, col].dropna().to_numpy(dtype=float) for col in mat.columns]
            pos = np.arange(mat.shape[1]) + (g - (len(groups) - 1) / 2) * width
            box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False,
                             showfliers=False, medianprops={"color": "black"})  # the default orange is a group colour
            for patch in box["boxes"]:
                patch.set_facecolor(colors[g])
                patch.set_hatch(GROUP_HATCHES[g % len(GROUP_HATCHES)])  # groups told apart without colour too
                patch.set_gid(f"box:{group}")
        ax.set_xticks(range(mat.shape[1]), [display_label(c) for c in mat.columns], fontsize=MIN_FONT,
                      rotation=90 if mat.shape[1] > 4 else 0)
        ax.tick_params(axis="y", labelsize=MIN_FONT)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel(f"{_weight_name(frame)} (own scale per layer)", fontsize=8)  # each panel its own y range
        ax.set_title(str(layer), fontsize=9)
        ax.grid(axis="y", linestyle="--", alpha=0.5)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(facecolor=c, hatch=GROUP_HATCHES[g % len(GROUP_HATCHES)], edgecolor="black", label=grp)
                        for g, (c, grp) in enumerate(zip(colors, groups))],
               loc="outside right upper", fontsize=MIN_FONT, title=by)
    fig.suptitle(f"Gate distributions per {by}")
    return fig


def _group_means_heatmaps(frame: Any, by: str, layers: Sequence[str], scale: str) -> Any:
    """Per layer: rows = paths, columns = groups of ``by``, cell = mean weight of the path in the group."""
    groups = sorted(frame[by].dropna().astype(str).unique())
    labels = frame.drop_duplicates("query_id").set_index("query_id")[by].astype(str)
    mats = []
    for layer in layers:
        mat = analysis.gate_matrix(frame, layer)
        lab = labels.reindex(mat.index)
        mats.append(np.stack([mat.loc[lab == g].mean(axis=0).to_numpy(dtype=float) for g in groups], axis=1)
                    if groups else np.zeros((mat.shape[1], 0)))
    rows = max(m.shape[0] for m in mats)
    fig = new_figure(max(4.0, (1.6 + 0.45 * len(groups)) * len(layers) + 1.2), 1.4 + 0.2 * rows)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer, data, (vmin, vmax) in zip(axes, layers, mats, _colour_ranges(mats, scale)):
        names = list(analysis.gate_matrix(frame, layer).columns)
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        image.set_gid(f"means:{layer}")
        if scale == "layer":
            fig.colorbar(image, ax=ax, shrink=0.8, label=f"mean {_weight_name(frame)}")
        ax.set_yticks(range(len(names)), [display_label(n) for n in names], fontsize=MIN_FONT)
        ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=MIN_FONT)
        ax.set_xlabel(by, fontsize=8)
        ax.set_title(str(layer), fontsize=9)
    axes[0].set_ylabel("path (source→destination cell)", fontsize=8)
    if scale == "shared":
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=f"mean {_weight_name(frame)}")
    fig.suptitle(f"Mean {_weight_name(frame)} per {by}")
    return fig


def plot_gate_entropy(frame: Any, layers: Sequence[str] | str | None = None) -> Any:
    """Left: histogram of normalised gate entropy per layer. Right, one panel per layer: each expert's (DIME: each
    path's) mean share of the routing weight and the share of queries (DIME: image–caption pairs) it wins (top-1), as
    horizontal bars so that 16 path names stay readable. The layers are colours; the two shares are two greys (the
    second hatched), so no colour means a layer in one panel and a statistic in the next."""
    analysis.refuse_attention_trace(frame, "plot_gate_entropy")
    layers = _layers(frame, layers)
    stats = analysis.route_statistics(frame[frame["layer"].isin(layers)])
    per_layer = {layer: stats[stats["layer"] == layer] for layer in layers}
    rows = max(len(s) for s in per_layer.values())
    fig = new_figure(3.2 + 2.4 * len(layers), max(3.0, 1.0 + 0.22 * rows))
    axes = fig.subplots(1, 1 + len(layers), width_ratios=[1.3] + [1.0] * len(layers), squeeze=False)[0]
    left = axes[0]
    entropies = [analysis.gate_entropy(analysis.gate_matrix(frame, layer).to_numpy()) for layer in layers]
    # the axis starts a little below the lowest entropy (DIME's routing sits at 0.97-1.0, one bin of [0, 1])
    low = min(float(np.nanmin(e)) for e in entropies) if any(len(e) for e in entropies) else 0.0
    start = max(0.0, np.floor(20 * low) / 20 - 0.05)
    # one bar per layer side by side in each bin: overlaid translucent bars mixed into a third colour
    _, _, bars = left.hist(entropies, bins=np.linspace(start, 1, 21), label=[str(layer) for layer in layers],
                           color=[CVD_PALETTE[i % len(CVD_PALETTE)] for i in range(len(layers))])
    for layer, container in zip(layers, bars if len(layers) > 1 else [bars]):
        for patch in container:
            patch.set_gid(f"entropy:{layer}")
    rows_name = _rows_name(frame)
    left.set_xlabel("gate entropy / log(E)  (1 = uniform)", fontsize=8)
    left.set_ylabel(rows_name)
    left.tick_params(labelsize=MIN_FONT)
    left.legend(fontsize=MIN_FONT, title="layer", title_fontsize=MIN_FONT)
    left.set_title("Routing entropy", fontsize=9)
    for ax, layer in zip(axes[1:], layers):
        s = per_layer[layer].set_index("expert")
        names = paper_order(list(s.index))[::-1]  # barh draws bottom-up: first expert on top
        s = s.loc[names]
        y = np.arange(len(s))
        ax.barh(y + 0.2, s["mean_share"], 0.4, label="mean share of the weight", color="#404040", gid="mean_share")
        ax.barh(y - 0.2, s["top1_share"], 0.4, label=f"top-1 share of {rows_name}", color="#B0B0B0", hatch="///",
                edgecolor="white", linewidth=0, gid="top1_share")
        ax.set_yticks(y, [display_label(n) for n in names], fontsize=MIN_FONT)
        ax.tick_params(axis="x", labelsize=MIN_FONT)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share (see legend)", fontsize=8)
        ax.set_title(f"Utilisation: {layer}", fontsize=9)
        ax.grid(axis="x", linestyle="--", alpha=0.5)
    # under the panels: inside one it covered the bars of the last paths
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=MIN_FONT)
    return fig


def plot_path_matrices(frame: Any, title: str = "Mean path weight per layer (destination x source)") -> Any:
    """Per-layer path heatmaps (DIME): the mean ``[destination x source]`` weight matrix of each layer
    (:func:`cirlab.workbench.analysis.flow_matrices`), values written in the cells.

    Each panel has its own colour scale: near-uniform routing (every weight close to 1/4) would otherwise
    look flat, and the differences between cells are what the panel is for.
    """
    analysis.refuse_attention_trace(frame, "plot_path_matrices")
    mats = analysis.flow_matrices(frame)
    fig = new_figure(3.2 * len(mats) + 0.6, 3.4)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (layer, sources, dests, mat) in zip(axes, mats):
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        ax.set_gid(f"paths:{layer}")
        ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(dests)), dests, fontsize=8)
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("source cell", fontsize=8)
        lo, span = mat.min(), float(np.ptp(mat)) or 1.0
        for (d, s_), v in np.ndenumerate(mat):
            ax.text(s_, d, f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color=text_on_viridis((v - lo) / span))
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("destination cell", fontsize=8)
    fig.suptitle(title)
    return fig


_BAND_WIDTHS = (1.0, 12.0)  # line widths (points) of a layer's lightest and heaviest band


def _band_width(w: float, lo: float, hi: float) -> float:
    """Line width of a band of weight ``w`` in a layer whose bands weigh ``lo..hi``: the layer's range spread over
    :data:`_BAND_WIDTHS`. DIME's hidden-layer means all lie near 1/4 (0.22-0.27 in the demo run); widths
    proportional to the weight drew them as one width, so the range is stretched and the key gives the values."""
    thin, thick = _BAND_WIDTHS
    if hi - lo < 1e-12:
        return (thin + thick) / 2
    return thin + (thick - thin) * (w - lo) / (hi - lo)


def _is_normalised(mat: np.ndarray) -> bool:
    """Whether each destination's incoming weights sum to 1 (DIME's hidden layers: ``raw / raw.sum(-1)`` in
    ``mix_dense``); DIME's last layer keeps the raw sigmoid gates (``mix_final``), which do not."""
    return bool(np.allclose(mat.sum(axis=1), 1.0, atol=1e-3))


def _flow_key(ax: Any, x: float, y: float, layer: str, lo: float, hi: float, normalised: bool) -> None:
    """A width key above the bands of one layer: three sample bands (lightest, middle, heaviest) with their mean
    weights, under the layer's name and whether its weights are normalised."""
    kind = "normalised per destination" if normalised else "raw gates, not normalised"
    ax.text(x, y + 0.55, f"{layer} paths\n({kind})", ha="center", va="bottom", fontsize=MIN_FONT, color="dimgray",
            gid=f"paths:{layer}")
    for i, w in enumerate((lo, (lo + hi) / 2, hi) if hi - lo >= 1e-12 else (lo,)):
        x0 = x - 0.3 + 0.22 * i if hi - lo >= 1e-12 else x - 0.07
        ax.plot([x0, x0 + 0.14], [y, y], color="dimgray", linewidth=_band_width(w, lo, hi), solid_capstyle="butt",
                gid=f"key:{layer}:{i}")
        ax.text(x0 + 0.07, y + 0.13, f"{w:.3f}", ha="center", va="bottom", fontsize=MIN_FONT, gid=f"keyval:{layer}")


def plot_dime_flows(frame: Any, min_weight: float = 0.0) -> Any:
    """Dense routing as a Sankey-like flow: columns of cells per layer, band width = mean path weight.

    Column ``l`` holds layer ``l``'s source cells, column ``l + 1`` its destinations. Each drawn band has
    ``gid="flow:<layer>:<source>-><destination>"``. Widths are scaled per layer, from the layer's lightest to its
    heaviest band (:func:`_band_width`), and a key above each layer gives the weights of three widths: DIME's
    last layer holds raw sigmoid gates (0.4-0.9) beside hidden layers normalised to about 1/4, and on one scale
    the hidden layers' bands all looked alike.
    """
    analysis.refuse_attention_trace(frame, "plot_dime_flows")
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MPath

    flows = analysis.flow_matrices(frame)
    fig = new_figure(2.6 * (len(flows) + 1), 4.6)
    ax = fig.add_subplot()
    columns = [flows[0][1]] + [f[2] for f in flows]
    ypos = [{name: (len(col) - 1) / 2 - i for i, name in enumerate(col)} for col in columns]
    for l, (layer, sources, dests, mat) in enumerate(flows):
        drawn = mat[mat > min_weight]
        lo, hi = (float(drawn.min()), float(drawn.max())) if drawn.size else (0.0, 0.0)
        for d, dst in enumerate(dests):
            for s, src in enumerate(sources):
                w = float(mat[d, s])
                if w <= min_weight:
                    continue
                y0, y1 = ypos[l][src], ypos[l + 1][dst]
                verts = [(l + 0.12, y0), (l + 0.5, y0), (l + 0.5, y1), (l + 0.88, y1)]
                path = MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
                patch = PathPatch(path, facecolor="none", edgecolor=CVD_PALETTE[s % len(CVD_PALETTE)],
                                  linewidth=_band_width(w, lo, hi), alpha=0.55, capstyle="butt")
                patch.set_gid(f"flow:{layer}:{src}->{dst}")
                ax.add_patch(patch)
        _flow_key(ax, l + 0.5, max(len(c) for c in columns) / 2 + 0.1, layer, lo, hi, _is_normalised(mat))
    for c, col in enumerate(columns):
        for name, y in ypos[c].items():
            box = FancyBboxPatch((c - 0.12, y - 0.18), 0.24, 0.36, boxstyle="round,pad=0.02", facecolor="white",
                                 edgecolor="black", linewidth=0.8, zorder=3)
            ax.add_patch(box)
            ax.text(c, y, str(name), ha="center", va="center", fontsize=MIN_FONT, zorder=4)
    # column l holds the cells routing layer l reads from (layer0's own cells first), the last column where the last
    # routing layer sends to; each band's layer is written between its two columns
    last = str(flows[-1][2][0]) if len(flows[-1][2]) == 1 else f"after {flows[-1][0]}"  # DIME: "output"
    ax.set_xticks(range(len(columns)), [f"{f[0]} cells" for f in flows] + [last], fontsize=MIN_FONT)
    ax.set_yticks([])
    ax.set_xlim(-0.4, len(columns) - 0.6)
    span = max(len(c) for c in columns) / 2 + 0.3
    ax.set_ylim(-span, span + 1.2)  # head room for the keys
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title("Cell-to-cell routing flows: band width = mean path weight, on each layer's own scale (keys above)",
                 fontsize=9)
    return fig


def plot_path_space(frame: Any, color_by: str = "category", annotate: int = 0, standardize: bool = True) -> Any:
    """A 2-D PCA map of queries in path space (all layers' weights concatenated), coloured by ``color_by``.

    ``standardize`` (default): every weight is scaled to unit variance before the PCA. DIME's output-layer weights
    are raw sigmoids (0.4-0.9) beside hidden-layer weights normalised to about 1/4, and unscaled, one output path
    made 99% of the variance: the map showed that path alone."""
    analysis.refuse_attention_trace(frame, "plot_path_space")
    x, ids, labels = analysis.path_vectors(frame, meta=_group_column(frame, color_by, "color_by"))
    coords, ratio = analysis.pca_2d(x, standardize=standardize)
    fig = new_figure(5.0, 4.2)
    ax = fig.add_subplot()
    groups = sorted(set(map(str, labels)))
    labels = np.array([str(v) for v in labels])
    for g, group in enumerate(groups):
        m = labels == group
        ax.scatter(coords[m, 0], coords[m, 1], s=14, alpha=0.8, color=CVD_PALETTE[g % len(CVD_PALETTE)],
                   marker=GROUP_MARKERS[g % len(GROUP_MARKERS)], label=group or "(none)", gid=f"group:{group}")
    for i in range(min(annotate, len(ids))):
        ax.annotate(str(ids[i]), coords[i], fontsize=6)
    scaled = ", weights standardised" if standardize else ""
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% var.{scaled})")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% var.{scaled})")
    if len(groups) > 1:
        _legend_outside(ax, fontsize=MIN_FONT, title=color_by)
    ax.set_title(f"{_rows_name(frame).capitalize()} in path space", fontsize=9)  # DIME (ITM) traces pairs
    return fig


# --------------------------------------------------------------------------------------------- rank shift
def plot_figure8(table: Any, title: str = "", label_before: str = "stage I", label_after: str = "stage II") -> Any:
    """Figure 8 of the re-ranking paper (Liu et al., TMLR 2024, appendix) from
    :func:`cirlab.workbench.analysis.rank_shift_table` (one bin per initial rank).

    Top: average delta per initial rank, ``rank before - rank after`` (positive = the target moved forward, the
    paper's sign; the axis label says so); bottom: number of queries per initial rank on a symlog axis with plain
    integer ticks (0, 1, 10, 100, ...). The paper's panel size; the two y labels are aligned and each stays within
    its own panel. Bars are blue where the target moved up and orange (hatched) where it moved down, the colours of
    improved / worsened in :func:`plot_rank_shift`; the count line is black, a colour with no such meaning.
    """
    from matplotlib.gridspec import GridSpec
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    analysis.require_frame(table, "plot_figure8: table", "pass analysis.rank_shift_table(rank_before, rank_after, k)")
    analysis.require_columns(table, ("bin_start", "average_delta", "count"), "the rank-shift table")
    if table.empty:
        raise InputError("plot_figure8: the rank-shift table has no rows (no query had its target in the pool)")
    if not (table["count"] > 0).any():  # rank_shift_table always gives k rows: an empty input drew all zeros
        raise InputError("plot_figure8: every count of the rank-shift table is 0 (no query had its target in the pool)")
    if "bin_end" in table.columns and (table["bin_end"] != table["bin_start"]).any():
        raise InputError("plot_figure8 draws one bin per initial rank; this table has wider bins (bin_end != "
                         "bin_start): call rank_shift_table with bins=None")
    fig = new_figure(5.156, 3.683)  # the paper's panel size
    fig.set_layout_engine("none")
    gs = GridSpec(2, 1, figure=fig, height_ratios=[2, 1], hspace=0.0, left=0.16, right=0.97, bottom=0.13,
                  top=0.91 if title else 0.97)
    top = fig.add_subplot(gs[0])
    bottom = fig.add_subplot(gs[1], sharex=top)
    x = table["bin_start"].to_numpy()
    delta = table["average_delta"].to_numpy()
    up = delta >= 0
    top.bar(x, delta, width=0.8, align="center", color=np.where(up, BETTER_COLOR, WORSE_COLOR))
    for patch, moved_up in zip(top.patches, up):
        if not moved_up:
            patch.set_hatch(WORSE_HATCH)
            patch.set_edgecolor("white")
            patch.set_linewidth(0)
    top.axhline(0.0, color="black", linewidth=0.6)
    top.set_ylabel(f"Average $\\Delta$ = rank {label_before}\n− rank {label_after} (> 0: moved up)",
                   fontsize=MIN_FONT)
    top.yaxis.set_major_locator(MaxNLocator(nbins=5, prune="lower"))  # no label on the seam between the panels
    top.grid(True, linestyle="--", alpha=0.6)
    top.tick_params(labelbottom=False, labelsize=MIN_FONT)
    counts = table["count"].to_numpy()
    bottom.plot(x, counts, color="black", linewidth=0.9)
    bottom.set_yscale("symlog", linthresh=1.0)
    peak = max(float(counts.max()) if len(counts) else 1.0, 1.0)
    decades = [0.0] + [10.0 ** e for e in range(int(np.floor(np.log10(peak))) + 1)]
    bottom.set_ylim(0.0, peak * 3.0)  # head room: the highest tick label stays below the seam
    bottom.yaxis.set_major_locator(FixedLocator(decades))
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bottom.yaxis.set_minor_locator(NullLocator())
    bottom.set_ylabel("Queries", fontsize=MIN_FONT)
    bottom.set_xlabel(f"Initial rank ({label_before}, 1-based)", fontsize=MIN_FONT)
    bottom.tick_params(labelsize=MIN_FONT)
    bottom.grid(True, linestyle="--", alpha=0.6)
    fig.align_ylabels([top, bottom])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_rank_shift(aligned: Any, k: int, bins: int | Sequence[int] | None = 20, title: str = "",
                    label_before: str = "before", label_after: str = "after", reranked: bool = True) -> Any:
    """Four panels comparing two rankings of the same queries (aligned by
    :func:`cirlab.workbench.analysis.align_ranks`).

    (a) per-query target rank before vs after (log axes, diagonal = no change); (b) mean rank after per bin
    of the rank before, inside the candidate pool of size ``k``; (c) share of queries improved / unchanged /
    worsened per category, among those with the target in the pool; (d) recall before/after per category with the
    pool's ceiling recall R@k.
    ``reranked=False``: the second ranking is a full ranking of its own, not a re-ranking of the first's top ``k``,
    so there is no pool: (b) bins every query with a known target by its first rank (log-spaced bins, ``bins`` of
    them when an int, else 12), (c) counts every such query, (d) has no ceiling and ``k`` is not used. A top-``k``
    filter there would keep only the queries the first ranking already did well on, and make any second ranking
    look worse.
    """
    aligned = analysis.aligned_frame(aligned, "plot_rank_shift: aligned")
    if "category" not in aligned.columns:  # one group, as rank_shift_by_category reads it
        aligned = aligned.assign(category="")
    if reranked:
        table = analysis.rank_shift_table(aligned["rank_before"], aligned["rank_after"], k, bins)
    else:
        k = int(_placed(aligned["rank_before"]).max(initial=0))  # the whole first ranking, log-scale bins
        if k < 1:  # 0 = unknown target (CIRR's test split): nothing to compare
            raise InputError("plot_rank_shift: no query has a known target rank in the first ranking")
        count = whole_number(bins, "bins") if isinstance(bins, (int, np.integer)) else 12
        edges = np.unique(np.geomspace(1, k + 1, count + 1).round().astype(int))
        table = analysis.rank_shift_table(aligned["rank_before"], aligned["rank_after"], k, edges)
    per_cat = analysis.rank_shift_by_category(aligned, k if reranked else None, ks=(1, 10))
    fig = new_figure(10.0, 7.0)
    (a, b), (c, d) = fig.subplots(2, 2)
    _rank_scatter(a, aligned, k if reranked else None, label_before, label_after)
    full = table[table["count"] > 0]
    if full.empty:  # panel (b) was an empty frame with only the diagonal, as if nothing had been measured
        logger.warning("plot_rank_shift: no query has its target inside the top-%d pool before; panel (b) is empty",
                       k)
        b.text(0.5, 0.5, f"no query with its target\nin the top-{k} pool before", ha="center", va="center",
               transform=b.transAxes, gid="no_in_pool")
    b.plot(full["mean_rank_before"], full["mean_rank_after"], "o-", color="black", gid="binned_means",
           label=f"mean {label_after} rank")  # not blue: blue means "improved" in (c)
    b.plot([1, k], [1, k], "--", color="gray", linewidth=0.8, label="no change")
    if reranked:
        b.set_xlabel(f"rank {label_before} (bin mean, pool top-{k})")
    else:
        b.set_xscale("log")
        b.set_yscale("log")
        b.set_xlabel(f"rank {label_before} (bin mean, log-spaced bins over all queries)")
    b.set_ylabel(f"mean rank {label_after}")
    b.tick_params(labelsize=MIN_FONT)
    b.legend(fontsize=MIN_FONT)
    b.set_title("(b) mean rank after per bin of rank before", fontsize=9)
    _shift_shares(c, per_cat, "% of queries with the target in the pool" if reranked
                  else "% of queries (all with a known target)")
    _ceiling_bars(d, per_cat, k if reranked else None, label_before, label_after)
    if title:
        fig.suptitle(title)
    return fig


# rank-shift figures: blue / orange are better / worse (BETTER_COLOR, WORSE_COLOR) and nothing else; categories take
# the other colour-blind-safe colours and a marker each, recall bars one purple, light before and dark after
_SHIFT_CATEGORY_COLORS = ("#009E73", "#000000", "#56B4E9", "#D55E00", "#F0E442")
_SHIFT_MARKERS = ("o", "s", "^", "D", "v", "P")
_RECALL_BEFORE, _RECALL_AFTER = "#E6BCD3", "#8F5575"  # Okabe-Ito's reddish purple #CC79A7, lightened / darkened
_METRIC_HATCHES = ("", "...", "xxx", "---")  # R@1 plain, R@10 dotted, ...


def _placed(ranks: Any) -> np.ndarray:
    """The ranks that are places in a ranking: a target removed with its reference has
    :func:`cirlab.workbench.analysis.removed_rank` (past every cut-off), which as an axis end stretched the plot to
    1e19 and broke its bins."""
    values = np.asarray(ranks, dtype=float)
    return values[values < analysis.removed_rank()]


def _rank_scatter(ax: Any, aligned: Any, k: int | None, label_before: str, label_after: str) -> None:
    """Target rank before vs after per query, a colour and marker per category; the diagonal and the pool's edge
    ``k`` (when there is one) are in the legend."""
    cats = sorted(aligned["category"].astype(str).unique())
    removed = float(analysis.removed_rank())  # a target removed with its reference has no place to draw
    aligned = aligned[(aligned["rank_before"] < removed) & (aligned["rank_after"] < removed)]
    for g, cat in enumerate(cats):
        m = aligned["category"].astype(str) == cat
        ax.scatter(aligned.loc[m, "rank_before"], aligned.loc[m, "rank_after"], s=9, alpha=0.6,
                   color=_SHIFT_CATEGORY_COLORS[g % len(_SHIFT_CATEGORY_COLORS)],
                   marker=_SHIFT_MARKERS[g % len(_SHIFT_MARKERS)], linewidths=0, label=cat or "all queries",
                   gid=f"scatter:{cat}")
    top = float(max(aligned["rank_before"].max(), aligned["rank_after"].max(), k or 1)) if len(aligned) else k or 1.0
    ax.plot([1, top], [1, top], "--", color="gray", linewidth=0.8, label="no change")
    if k is not None:  # right of it the second stage did not re-rank: those targets keep their rank
        ax.axvline(k, color="black", linewidth=0.8, linestyle=":", label=f"pool edge: top-{k} re-ranked",
                   gid="pool_edge")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"target rank {label_before}")
    ax.set_ylabel(f"target rank {label_after}")
    ax.tick_params(labelsize=MIN_FONT)
    ax.set_title("(a) per-query target rank (below diagonal = improved)", fontsize=9)
    _legend_outside(ax, fontsize=MIN_FONT, markerscale=1.5)


def _shift_shares(ax: Any, per_cat: Any, xlabel: str) -> None:
    """Stacked shares improved (blue) / unchanged (grey) / worsened (orange, hatched) per category."""
    y = np.arange(len(per_cat))
    left = np.zeros(len(per_cat))
    for key, color, hatch in (("improved_pct", BETTER_COLOR, ""), ("unchanged_pct", NEUTRAL_COLOR, ""),
                              ("worsened_pct", WORSE_COLOR, WORSE_HATCH)):
        vals = per_cat[key].fillna(0).to_numpy()
        ax.barh(y, vals, left=left, color=color, hatch=hatch, edgecolor="white", linewidth=0,
                label=key.replace("_pct", ""), gid=f"share:{key}")
        left += vals
    ax.set_yticks(y, per_cat["category"].tolist(), fontsize=MIN_FONT)
    ax.tick_params(axis="x", labelsize=MIN_FONT)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 100)
    _legend_outside(ax, fontsize=MIN_FONT)
    ax.set_title("(c) improved / unchanged / worsened", fontsize=9)


def _ceiling_bars(ax: Any, per_cat: Any, k: int | None, label_before: str = "before",
                  label_after: str = "after") -> None:
    """Recall before/after per category, and the top-``k`` pool's ceiling unless ``k`` is None (no pool); the legend
    names the rankings (``stage I R@1``), not the table's keys. Before and after of one metric stand side by side,
    light and dark of one colour; the metrics differ by hatching; the ceiling is an empty outline."""
    metrics = [c.partition("_")[2] for c in per_cat.columns if c.startswith("before_R@")]
    keys = [f"{side}_{m}" for m in metrics for side in ("before", "after") if f"{side}_{m}" in per_cat.columns]
    keys += [f"ceiling_R@{k}"] if k else []
    x = np.arange(len(per_cat))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        side, _, metric = key.partition("_")
        offset = x + (j - (len(keys) - 1) / 2) * width
        if side == "ceiling":
            ax.bar(offset, per_cat[key].to_numpy(), width, facecolor="none", edgecolor="black", linewidth=0.8,
                   label=f"ceiling {metric}", gid=f"recall:{key}")
            continue
        name = label_before if side == "before" else label_after
        ax.bar(offset, per_cat[key].to_numpy(), width, label=f"{name} {metric}",
               color=_RECALL_BEFORE if side == "before" else _RECALL_AFTER, edgecolor="black", linewidth=0.5,
               hatch=_METRIC_HATCHES[metrics.index(metric) % len(_METRIC_HATCHES)], gid=f"recall:{key}")
    ax.set_xticks(x, per_cat["category"].tolist(), fontsize=MIN_FONT)
    ax.tick_params(axis="y", labelsize=MIN_FONT)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    _legend_outside(ax, fontsize=MIN_FONT)
    ax.set_title(f"(d) recall and candidate-pool ceiling (top-{k})" if k else "(d) recall", fontsize=9)


# --------------------------------------------------------------------------------------------- training
def plot_training_curves(log: Any, x: str | None = None, keys: Sequence[str] | str | None = None) -> Any:
    """Training curves from a ``log.jsonl`` (path, run folder or frame): one panel per logged quantity.

    ``x`` defaults to ``step`` (else ``epoch``, else the record index); ``keys`` defaults to every numeric
    column ending in ``loss`` plus ``lr`` and any validation metric (``val`` prefix or ``R@`` in the name).
    A quantity that never changes (a constant learning rate) gets no panel: its value is written under the figure.
    A 0/1 phase flag a model logs (a column ending in ``_on``: DIME's ``max_violation_on`` after its sum-of-violations
    warm-up, HREM's ``relation_on`` after ``warmup_iters``) shades every panel from the first logged record where it
    is on to the end of the run (the phase lasts to the end), with the interval before it, back to the last record
    where it is off, hatched (the switch is somewhere in it), both named in a legend above the panels: a loss that
    changes its definition there moves for that reason. (A band over the switch interval alone read as "on only
    during this interval".)
    """
    import pandas as pd

    df = log if isinstance(log, pd.DataFrame) else analysis.read_log(log)
    if df.empty:
        raise InputError("the training log has no records")
    keys = None if keys is None else name_list(keys)
    if x is not None or keys is not None:  # a misspelt name would plot nothing, or index records, without a word
        analysis.require_columns(df, ([x] if x else []) + list(keys or []), "the training log")
    x = x or next((c for c in ("step", "global_step", "epoch") if c in df.columns), None)
    # "time" (each record's wall clock) is no curve to plot
    numeric = [c for c in df.columns if c not in (x, "time") and pd.api.types.is_numeric_dtype(df[c])]
    if keys is None:
        keys = [c for c in numeric if c.endswith("loss") or c == "lr" or is_recall_key(c) or c.startswith("val")]
        keys = keys or numeric
    if not keys:
        raise InputError(f"no plottable columns in the training log; columns: {list(df.columns)}")
    constant = {k: df[k].dropna().iloc[0] for k in keys if df[k].notna().sum() > 1 and df[k].dropna().nunique() == 1}
    keys = [k for k in keys if k not in constant] or keys
    constant = {k: v for k, v in constant.items() if k not in keys}
    ncols = min(3, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    fig = new_figure(3.3 * ncols, 2.4 * nrows + (0.3 if constant else 0.0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    xs = df[x] if x else pd.Series(np.arange(len(df)))
    for ax, key in zip(axes, keys):
        m = df[key].notna()
        ax.plot(xs[m], df.loc[m, key], marker="." if m.sum() < 30 else None, linewidth=1.0, gid=f"curve:{key}")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x or "record", fontsize=MIN_FONT)
        ax.set_ylabel(key, fontsize=MIN_FONT)
        ax.tick_params(labelsize=MIN_FONT)
        ax.grid(True, linestyle="--", alpha=0.5)
    phases = _phase_starts(df, xs)
    end = float(pd.to_numeric(xs, errors="coerce").max()) if phases else 0.0  # an x of dates has no phases
    for name, (off, on) in phases.items():
        for ax in axes[:len(keys)]:
            _shade_phase(ax, name, off, on, end)
    if phases:
        _phase_legend(fig, list(phases))
    for ax in axes[len(keys):]:
        ax.axis("off")
    if constant:
        note = "constant: " + ", ".join(f"{k} = {float(v):g}" for k, v in constant.items())
        fig.supxlabel(note, fontsize=8, gid="constants")
    return fig


def _shade_phase(ax: Any, name: str, off: float, on: float, end: float) -> None:
    """The phase ``name`` in one panel: grey from its first 'on' record ``on`` to the run's ``end``, hatched over
    ``off..on``, where it switched at some step the log does not record."""
    ax.axvspan(on, max(on, end), color="gray", alpha=0.15, linewidth=0, gid=f"phase:{name}")
    ax.axvspan(off, on, facecolor="none", edgecolor="gray", hatch="//", linewidth=0, alpha=0.5, gid=f"switch:{name}")


def _phase_legend(fig: Any, names: Sequence[str]) -> None:
    """Above the panels: grey = the phase is on, hatched = it switched somewhere between two logged records."""
    from matplotlib.patches import Patch

    handles = []
    for name in names:
        label = name.removesuffix("_on").replace("_", " ")
        handles += [Patch(color="gray", alpha=0.15, label=f"{label} on (to the end)"),
                    Patch(facecolor="none", edgecolor="gray", hatch="//", label=f"{label} switched on in here")]
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=MIN_FONT, frameon=False)


def _phase_starts(df: Any, xs: Any) -> dict[str, tuple[float, float]]:
    """``{flag: (x_off, x_on)}`` for each logged 0/1 column ending in ``_on`` that is off at first and on later: the
    x of the last logged record where it is off and of the first where it is on."""
    starts = {}
    for name in (c for c in df.columns if str(c).endswith("_on")):
        values = df[name]
        seen = values.notna()
        flags = values[seen].to_numpy(dtype=float)
        if len(flags) < 2 or not set(np.unique(flags)) <= {0.0, 1.0} or flags[0] != 0.0 or not flags.any():
            continue
        first_on = int(np.argmax(flags == 1.0))
        at = xs[seen].to_numpy()
        starts[str(name)] = (float(at[first_on - 1]), float(at[first_on]))
    return starts


# --------------------------------------------------------------------------------------------- CaLa: HCA and TAC
def _heat(fig: Any, ax: Any, mat: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str,
          cmap: str = "viridis", center: bool = False, label: str = "",
          limits: tuple[float, float] | None = None, levels: Mapping[float, str] | None = None,
          bar_location: str = "right") -> None:
    """A labelled heatmap with its own colour bar, titled ``label`` (what the colours measure); ``limits`` fixes
    the colour range (panels that show the same quantity share one); ``levels`` names the only values a map holds
    (a 0/1 mask: its bar shows those two, not a continuous scale); ``bar_location`` puts the bar ("bottom": under
    the panel, where its label cannot be read as the next panel's y label). A uniform map (TAC's later steps, every
    weight 1/n) gets no bar: a 0.20-0.28 scale for one value carried nothing, the panel says "uniform" instead."""
    kw: dict[str, Any] = {"cmap": cmap, "aspect": "auto"}
    if limits is not None:
        kw.update(vmin=limits[0], vmax=limits[1])
    elif center:
        lim = float(np.nanmax(np.abs(mat))) or 1.0
        kw.update(cmap="RdBu_r", vmin=-lim, vmax=lim)
    elif np.nanmax(mat) - np.nanmin(mat) < 1e-4:
        _uniform(ax, mat, rows, cols, title)
        return
    im = ax.imshow(mat, **kw)
    _heat_ticks(ax, rows, cols, title)
    bar = fig.colorbar(im, ax=ax, shrink=0.8, label=label or None, location=bar_location)
    bar.ax.xaxis.label.set_fontsize(8)
    bar.ax.yaxis.label.set_fontsize(8)
    bar.ax.tick_params(labelsize=MIN_FONT)
    if levels:
        bar.set_ticks(list(levels), labels=list(levels.values()), fontsize=MIN_FONT)
        return
    bar.formatter.set_useOffset(False)
    bar.update_ticks()


def _heat_ticks(ax: Any, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    ax.set_xticks(range(len(cols)), list(cols), rotation=60, ha="right", fontsize=MIN_FONT)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=MIN_FONT)
    ax.set_title(title, fontsize=9)


def _uniform(ax: Any, mat: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    """A map with one value everywhere, drawn light grey with the value written on it (1/n when it is a uniform
    attention over n keys)."""
    mid = float(np.nanmean(mat))
    n = mat.shape[1]
    share = f"1/{n} = " if n and abs(mid - 1.0 / n) < 1e-4 else ""
    ax.imshow(np.zeros_like(mat, dtype=float), cmap="Greys", vmin=0.0, vmax=10.0, aspect="auto")
    _heat_ticks(ax, rows, cols, f"{title} (uniform, {mid:.3g})")
    ax.text(0.5, 0.5, f"uniform:\n{share}{mid:.3g} everywhere\n(no information)", transform=ax.transAxes,
            ha="center", va="center", fontsize=9, gid="uniform")


def plot_cala_bridges(frame: Any, query_id: Any | None = None, text: str = "", steps: Sequence[int] = (1, 4)) -> Any:
    """Which caption words bridge reference and target in CaLa, for one traced query (``CaLa.trace`` frame).

    Top row, HCA (the hinge cross-attention of Jiang et al., "CaLa: Complementary Association Learning for
    Augmenting Composed Image Retrieval", SIGIR 2024, Sec. 3): reference queries x words (``S_rc``), words x target
    queries (``S_ct``), the hinge softmax reference x target, and per word its bridge value: its share of reference
    query 0's expected hinge logit (positive: the word links the reference to the target the hinge attends to).
    Bottom row, TAC's twin attention at the given ``steps``: reference queries attending to target tokens and
    target queries attending to reference tokens (step 1 attends to the other image's tokens, later steps to the
    previous step's output).
    """
    analysis.require_frame(frame, "plot_cala_bridges: frame")
    analysis.require_columns(frame, ("layer", "query_id"), "the CaLa trace frame")
    if frame.empty:
        raise InputError("plot_cala_bridges: the trace frame is empty (nothing was traced)")
    steps = [whole_number(s, "steps") for s in name_list(steps)]  # steps=2 was "int is not iterable"
    if not steps:
        raise InputError("plot_cala_bridges: steps is empty; TAC's steps are 1..4")
    if query_id is None:
        bridge_ids = frame.loc[frame["layer"] == "hca.bridge", "query_id"]
        if bridge_ids.empty:  # another model's trace was an IndexError
            raise InputError("plot_cala_bridges needs a CaLa trace (rows of layer 'hca.bridge'); the frame's layers: "
                             f"{', '.join(map(str, frame['layer'].unique()))}")
        query_id = bridge_ids.iloc[0]
    rc, refs, words = analysis.layer_matrix(frame, "hca.ref_to_text", query_id)
    ct, words2, tgts = analysis.layer_matrix(frame, "hca.text_to_target", query_id)
    hinge, _, tgt_cols = analysis.layer_matrix(frame, "hca.hinge", query_id)
    bridge, _, bridge_words = analysis.layer_matrix(frame, "hca.bridge", query_id)
    fig = new_figure(17, 9.5)
    grid = fig.add_gridspec(2, 4)
    top = [fig.add_subplot(grid[0, i]) for i in range(4)]
    _heat(fig, top[0], rc, refs, words, "HCA: reference query x word (S_rc)", label="score S_rc")
    top[0].set_xlabel("caption word", fontsize=8)
    top[0].set_ylabel("reference query", fontsize=8)
    _heat(fig, top[1], ct, words2, tgts, "HCA: word x target query (S_ct)", label="score S_ct")
    top[1].set_xlabel("target query", fontsize=8)
    top[1].set_ylabel("caption word", fontsize=8)
    _heat(fig, top[2], hinge, refs, tgt_cols, "HCA hinge: softmax(S_rc S_ct)", label="hinge weight")
    top[2].set_xlabel("target query", fontsize=8)
    top[2].set_ylabel("reference query", fontsize=8)
    ax = top[3]
    _signed_bars(ax, bridge[0], bridge_words)
    ax.set_gid("hca:bridge")
    ax.set_title("bridge: word's share of ref query 0's hinge logit", fontsize=9)
    ax.set_xlabel("bridge value", fontsize=8)
    tac = grid[1, :].subgridspec(1, 2 * len(steps))
    for i, (name, label) in enumerate((("ref", "reference -> target"), ("target", "target -> reference"))):
        for j, step in enumerate(steps):
            axis = fig.add_subplot(tac[0, i * len(steps) + j])
            mat, dst, src = analysis.layer_matrix(frame, f"tac.{name}_attention.step{step}", query_id)
            _heat(fig, axis, mat, dst, src, f"TAC {label}, step {step}", cmap="magma", label="attention weight")
            axis.set_xlabel(_tac_keys(name, step), fontsize=8)
            axis.set_ylabel(f"{name} query", fontsize=8)
    fig.suptitle(f"CaLa query {query_id}" + (f": \u201c{text}\u201d" if text else ""), fontsize=11)
    return fig


def _tac_keys(name: str, step: int) -> str:
    """What TAC attends to at ``step`` (``CaLa``'s ``TwinAttentionCompositor._iterate``): the other image's tokens at
    step 1, then its own previous output, whose token j the trace names ``prev<j>``."""
    if step == 1:
        return "attended token: " + ("target token t<j>" if name == "ref" else "reference token r<j>")
    return f"attended token: prev<j> = token j of step {step - 1}'s output"


def _signed_bars(ax: Any, values: Any, labels: Sequence[str]) -> None:
    """Horizontal bars, one per label top-down: blue above zero, orange and hatched below, with a legend."""
    from matplotlib.patches import Patch

    values = np.asarray(values, dtype=float)
    bars = ax.barh(range(len(values)), values, color=[BETTER_COLOR if v >= 0 else WORSE_COLOR for v in values])
    for bar, v in zip(bars, values):
        if v < 0:
            bar.set_hatch(WORSE_HATCH)
            bar.set_edgecolor("white")
            bar.set_linewidth(0)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=MIN_FONT)
    ax.tick_params(axis="x", labelsize=MIN_FONT)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.legend(handles=[Patch(color=BETTER_COLOR, label="> 0: bridges"),
                       Patch(facecolor=WORSE_COLOR, hatch=WORSE_HATCH, edgecolor="white", label="< 0: works against")],
              fontsize=MIN_FONT, loc="best")


def plot_bridge_words(frame: Any, top: int = 15, title: str = "") -> Any:
    """The words with the largest mean HCA bridge value over every traced query
    (:func:`cirlab.workbench.analysis.bridge_words`), with how often each occurs."""
    analysis.require_frame(frame, "plot_bridge_words: frame")
    table = analysis.bridge_words(frame, top=top)
    fig = new_figure(6.5, 0.32 * max(len(table), 4) + 1.4)
    ax = fig.add_subplot()
    _signed_bars(ax, table["bridge"].to_numpy(dtype=float),
                 [f"{w} ({c})" for w, c in zip(table["word"], table["count"])])
    ax.set_xlabel("mean bridge value")
    ax.set_ylabel("word (occurrences)", fontsize=8)
    ax.set_title(title or f"CaLa: words that bridge reference and target ({frame['query_id'].nunique()} queries)",
                 fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------- HREM: relation graph
_RELATION_UNITS = {"connection": "connection", "relevance": "relevance",
                   "attention": "fusion attention weight", "mask": "additive attention mask"}


def plot_relation_graph(edges: Any, matrices: Sequence[str] | str = ("connection", "relevance", "attention"),
                        title: str = "") -> Any:
    """HREM's instance-level graph of one batch (Fu et al., "Learning Semantic Relationship among Instances for
    Image-Text Matching", CVPR 2023): the joint ``2B x 2B`` matrix over B images then B captions, one panel per
    ``matrices`` entry (the connection relation, the relevance relation, the fusion attention; ``mask`` is the
    attention bias), the four blocks i2i / i2t / t2i / t2t separated and labelled. Rows are the attention queries;
    the mask's unconnected entries (-inf) are blank. The 0/1 connection gets a two-entry legend (connected / not),
    the continuous maps a colour bar under their own panel, and every panel its own axis labels: a bar's label at
    its right read as the next panel's y label."""
    analysis.require_frame(edges, "plot_relation_graph: edges", "pass hrem_relation(...)['edges']")
    analysis.require_columns(edges, ("matrix",), "the relation frame")
    have = list(dict.fromkeys(edges["matrix"]))
    present = name_list(matrices)
    if not present:
        raise InputError(f"plot_relation_graph: matrices is empty; the frame's matrices: {', '.join(map(str, have))}")
    unknown = [m for m in present if m not in have]
    if unknown:  # a misspelt name was dropped without a word (or left no panel at all)
        raise UnknownKeyError(f"plot_relation_graph: matrices {unknown} not in the relation frame; its matrices: "
                              f"{', '.join(map(str, have)) or '(none)'}")
    from matplotlib import patheffects

    fig = new_figure(5.2 * len(present) + 0.4, 6.2)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, name in zip(axes, present):
        mat, labels, b = analysis.relation_matrix(edges, name)
        if name == "connection":
            _binary_map(ax, mat, labels, name)
        else:
            _heat(fig, ax, mat, labels, labels, name, label=_RELATION_UNITS.get(name, name), bar_location="bottom")
        ax.set_gid(f"relation:{name}")
        # black on a white halo: seen on every cell colour (red vanished on viridis' dark purple, and its tags
        # were 4.0:1 on their white boxes, under WCAG's 4.5:1 for small text)
        halo = [patheffects.withStroke(linewidth=3.2, foreground="white")]
        ax.axhline(b - 0.5, color="black", lw=1.2, path_effects=halo, gid="block_edge")
        ax.axvline(b - 0.5, color="black", lw=1.2, path_effects=halo, gid="block_edge")
        for block, (r0, c0) in zip(analysis.EDGE_BLOCKS, ((0, 0), (0, b), (b, 0), (b, b))):
            # a small tag in the block's top-left corner: a large name in the middle hid the cells it sat on
            ax.text(c0 - 0.5, r0 - 0.5, f" {block} ", ha="left", va="top", fontsize=7, color="black",
                    fontweight="bold", gid=f"block:{block}",
                    bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "black", "lw": 0.6})
        ax.set_xlabel("key node (images | captions)", fontsize=8)
        ax.set_ylabel("query node (images | captions)", fontsize=8)
    fig.suptitle(title or f"HREM relation graph of one batch ({b} images + {mat.shape[0] - b} captions)")
    return fig


def _binary_map(ax: Any, mat: np.ndarray, labels: Sequence[str], title: str) -> None:
    """A 0/1 matrix in black (1) and white (0) with a two-entry legend under the panel, not a grey colour bar that
    suggests values in between."""
    from matplotlib.patches import Patch

    ax.imshow(mat, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    _heat_ticks(ax, labels, labels, title)
    ax.legend(handles=[Patch(facecolor="black", edgecolor="black", label="connected"),
                       Patch(facecolor="white", edgecolor="black", label="not connected")],
              loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2, fontsize=MIN_FONT, frameon=False)


def plot_word_region(word_region: Any, image_id: Any | None = None, text: str = "", value: str = "score") -> Any:
    """HREM's word-region relevance for one caption: left, its words x the regions of one image (default: the
    caption's own image, caption id // 5 on five-caption precomp data, when it is in the batch); right, each word's
    best region score against every image of the batch (the caption's own image marked). Words are the
    tokenizer's, as HREM reads them."""
    analysis.require_frame(word_region, "plot_word_region: word_region", "pass hrem_relation(...)['word_region']")
    analysis.require_columns(word_region, ("caption_id", "image_id"), "the word-region frame")
    if word_region.empty:
        raise InputError("plot_word_region: the word-region frame is empty")
    cap = word_region["caption_id"].iloc[0]
    images = list(dict.fromkeys(word_region["image_id"]))
    if image_id is None:  # the caption's own image when it is in the batch, else the first
        own = int(cap) // 5
        if own not in images:
            own = images[0]
    else:  # an unknown id drew image 0 under the title "image 0"
        own = analysis.image_key(word_region, image_id)
    mat, words = analysis.word_region_matrix(word_region, own, value)
    best, words2, cols = analysis.word_image_matrix(word_region, value)
    # one colour range for both panels: the right one holds row maxima of such matrices (its own-image column is
    # the left panel's row max), so equal colours must mean equal values
    limits = _colour_ranges([mat, best], "shared")[0]
    fig = new_figure(14, 0.28 * len(words) + 2.6)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
    _heat(fig, left, mat, words, [str(r) for r in range(mat.shape[1])], f"words x regions of image {own}",
          label=f"word-region {value}", limits=limits)
    if mat.shape[1] > 20:  # 36 regions at a readable size do not fit: every fifth
        left.set_xticks(range(0, mat.shape[1], 5), [str(r) for r in range(0, mat.shape[1], 5)], rotation=0,
                        ha="center", fontsize=7)
    left.set_xlabel("region", fontsize=8)
    left.set_ylabel("caption word", fontsize=8)
    left.set_gid("word_region")
    _heat(fig, right, best, words2, [f"img {c}" for c in cols], f"best region {value} per image",
          label=f"max over regions of the {value}", limits=limits)
    right.set_gid("word_image")
    right.set_xlabel("image (own image in bold)", fontsize=8)
    for lab, c in zip(right.get_xticklabels(), cols):
        if c == own:
            lab.set_fontweight("bold")
    fig.suptitle(f"HREM caption {cap}" + (f": \u201c{wrap_text(text, 110)}\u201d" if text else ""), fontsize=10)
    return fig
