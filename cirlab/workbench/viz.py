"""Plot functions for the notebooks: every function returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas), never through pyplot, so no
global figure state leaks between calls and nothing needs a display: the same call works in a headless
papermill run, in a test and in Jupyter (where ``%matplotlib inline`` renders a returned figure).
:func:`save_figure` writes PNG and SVG.

Inputs are plain data: a route-trace frame (``cirlab.core.tracing.RouteTrace.to_frame()``), a frame from
:func:`cirlab.workbench.analysis.align_ranks`, metric dicts, a ``log.jsonl``. The computations behind the plots live
in :mod:`cirlab.workbench.analysis` and are tested there.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cirlab.workbench import analysis

logger = logging.getLogger(__name__)

__all__ = [
    "save_figure", "plot_retrieval_gallery", "plot_metrics_bars", "plot_table", "plot_expert_heatmaps",
    "plot_query_gates", "plot_gate_distributions", "plot_gate_entropy", "plot_dime_flows", "plot_path_matrices",
    "plot_path_space",
    "plot_rank_shift", "plot_figure8", "plot_training_curves", "plot_run_comparison", "TARGET_COLOR",
]

TARGET_COLOR = "#2ca02c"  # green frame around the ground-truth target in galleries
QUERY_COLOR = "#1f77b4"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig: Any, out_dir: str | os.PathLike, name: str,
                formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<name>.<fmt>`` for each format; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=120 if fmt == "png" else None)
        paths.append(path)
    logger.info("saved figure %s (%s)", out / name, ", ".join(formats))
    return paths


# --------------------------------------------------------------------------------------------- images
def _to_image(x: Any) -> np.ndarray:
    """An image (path, PIL image, HWC/CHW array or tensor) as an HWC float array in [0, 1]."""
    if isinstance(x, (str, os.PathLike)):
        from PIL import Image

        with Image.open(x) as im:
            return np.asarray(im.convert("RGB"), dtype=float) / 255.0
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL image
        return np.asarray(x.convert("RGB"), dtype=float) / 255.0
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


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)) or " "


def plot_retrieval_gallery(rows: Sequence[Mapping[str, Any]], k: int = 5, title: str = "") -> Any:
    """One row per query: reference image, modification text, then the top-``k`` candidates.

    Each row is a mapping with ``ref_image``, ``text``, ``candidates`` (images, best first) and optionally
    ``candidate_ids``, ``scores``, ``target_position`` (0-based index of the target among the candidates,
    -1/None when it is not shown), ``target_rank`` and ``query_id``. The target's axes get a green frame and
    ``gid="target"``; the reference gets ``gid="query"``.
    """
    if not rows:
        raise ValueError("plot_retrieval_gallery needs at least one query row")
    ncols = k + 2
    fig = _figure(1.5 * ncols, 1.7 * len(rows))
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
    caption = _wrap(row.get("text", "")) + (f"\n\n(target rank {rank})" if rank else "")
    axes[1].text(0.0, 0.5, caption, fontsize=7, va="center", ha="left", transform=axes[1].transAxes)
    cands = list(row.get("candidates", []))[:k]
    ids = list(row.get("candidate_ids", [""] * len(cands)))
    scores = row.get("scores")
    target = row.get("target_position")
    for j in range(k):
        ax = axes[2 + j]
        if j >= len(cands):
            ax.axis("off")
            continue
        label = f"#{j + 1} {ids[j]}" if j < len(ids) else f"#{j + 1}"
        if scores is not None:
            label += f"\n{float(scores[j]):.3f}"
        is_target = target is not None and int(target) == j
        image_axis(ax, cands[j], title=label, color=TARGET_COLOR if is_target else None)
        if is_target:
            ax.set_gid("target")


# --------------------------------------------------------------------------------------------- tables
def plot_metrics_bars(metrics: Mapping[str, float] | Any, title: str = "", ylabel: str = "recall (%)") -> Any:
    """Bars of a metric dict (one bar per key) or of a ``metric x run`` frame (grouped bars per run)."""
    import pandas as pd

    table = pd.DataFrame({"value": pd.Series(analysis.flatten_metrics(metrics))}) if isinstance(metrics, Mapping) \
        else pd.DataFrame(metrics)
    if table.empty:
        raise ValueError("plot_metrics_bars got no numeric metrics")
    n_metrics, n_runs = table.shape
    fig = _figure(max(4.0, 0.45 * n_metrics * max(n_runs, 1) + 1.5), 3.2)
    ax = fig.add_subplot()
    width = 0.8 / n_runs
    x = np.arange(n_metrics)
    for j, run in enumerate(table.columns):
        bars = ax.bar(x + (j - (n_runs - 1) / 2) * width, table[run].to_numpy(dtype=float), width,
                      label=str(run), color=PALETTE[j % len(PALETTE)])
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if n_runs > 1:
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.grid(axis="y", linestyle="--", alpha=0.5)
    return fig


def plot_table(table: Any, title: str = "", fmt: str = "{:.2f}") -> Any:
    """A DataFrame drawn as a matplotlib table (for reports: metrics per protocol, run comparisons)."""
    import pandas as pd

    df = pd.DataFrame(table)
    cells = [[fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in df.to_numpy()]
    fig = _figure(min(1.2 + 1.1 * (df.shape[1] + 1), 14.0), 0.6 + 0.25 * (len(df) + 1))
    ax = fig.add_subplot()
    ax.axis("off")
    tab = ax.table(cellText=cells or [[""] * df.shape[1]], colLabels=[str(c) for c in df.columns],
                   rowLabels=[str(i) for i in df.index], loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_run_comparison(runs: Mapping[str, Any], metrics: Sequence[str] | None = None, title: str = "") -> Any:
    """Several runs side by side: a table (top) and grouped bars (bottom) of the chosen metrics."""
    table = analysis.compare_runs(runs)
    if metrics is not None:
        missing = [m for m in metrics if m not in table.index]
        if missing:
            raise KeyError(f"metrics {missing} not in every run; available: {list(table.index)}")
        table = table.loc[list(metrics)]
    fig = _figure(max(6.0, 0.5 * len(table) * len(table.columns) + 2.0), 2.5 + 0.22 * len(table) + 2.6)
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
               color=PALETTE[j % len(PALETTE)])
    bx.set_xticks(x, list(table.index), rotation=45, ha="right", fontsize=7)
    bx.legend(fontsize=7)
    bx.grid(axis="y", linestyle="--", alpha=0.5)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------- routing
def _layers(frame: Any, layers: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(frame["layer"]))
    if layers is None:
        return present
    unknown = [l for l in layers if l not in present]
    if unknown:
        raise KeyError(f"layers {unknown} not in the route frame; layers: {present}")
    return list(layers)


def plot_expert_heatmaps(frame: Any, layers: Sequence[str] | None = None, max_queries: int = 40,
                         sort_by: str | None = "category") -> Any:
    """Per layer, a ``query x expert`` heatmap of routing weights (DIME: columns are source->destination)."""
    layers = _layers(frame, layers)
    ids = list(dict.fromkeys(frame["query_id"]))
    if sort_by and sort_by in frame.columns:
        order = frame.drop_duplicates("query_id").sort_values(sort_by, kind="stable")["query_id"].tolist()
        ids = [q for q in order if q in set(ids)]
    ids = ids[:max_queries]
    widths = [max(2.0, 0.35 * analysis.gate_matrix(frame, l).shape[1] + 1.0) for l in layers]
    fig = _figure(sum(widths) + 1.0, 1.2 + 0.16 * len(ids))
    axes = fig.subplots(1, len(layers), squeeze=False, width_ratios=widths)[0]
    vmax = float(frame["weight"].max()) or 1.0
    for ax, layer in zip(axes, layers):
        mat = analysis.gate_matrix(frame, layer).reindex(ids)
        image = ax.imshow(mat.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest")
        ax.set_xticks(range(mat.shape[1]), [str(c) for c in mat.columns], rotation=90 if mat.shape[1] > 3 else 0,
                      fontsize=6 if mat.shape[1] > 3 else 8)
        ax.set_yticks(range(len(ids)), [str(q) for q in ids], fontsize=5)
        ax.set_title(str(layer), fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="routing weight")
    fig.suptitle("Expert activations per layer (query x expert)")
    return fig


def plot_query_gates(frame: Any, query_ids: Sequence[Any], layers: Sequence[str] | None = None,
                     title: str = "") -> Any:
    """Bar charts of the gates of a few queries: one row per query, one panel per layer."""
    layers = _layers(frame, layers)
    query_ids = list(query_ids)
    if not query_ids:
        raise ValueError("plot_query_gates needs at least one query id")
    fig = _figure(2.6 * len(layers) + 0.5, 1.6 * len(query_ids) + 0.4)
    axes = fig.subplots(len(query_ids), len(layers), squeeze=False, sharey=True)
    ymax = max(float(frame["weight"].max()), 1e-6) * 1.1
    for r, qid in enumerate(query_ids):
        for c, layer in enumerate(layers):
            mat = analysis.gate_matrix(frame, layer)
            if qid not in mat.index:
                raise KeyError(f"query {qid!r} not in the route frame for layer {layer!r}")
            ax = axes[r, c]
            values = mat.loc[qid].to_numpy(dtype=float)
            ax.bar(range(len(values)), values, color=[PALETTE[j % len(PALETTE)] for j in range(len(values))])
            ax.set_xticks(range(len(values)), [str(v) for v in mat.columns], fontsize=6,
                          rotation=90 if len(values) > 4 else 0)
            ax.set_ylim(0, ymax)
            ax.set_title(f"{qid} | {layer}", fontsize=7)
    fig.suptitle(title or "Router gates per query")
    return fig


def plot_gate_distributions(frame: Any, by: str = "category", layers: Sequence[str] | None = None) -> Any:
    """Per layer, box plots of each expert's weight grouped by ``by`` (category, modification type, ...)."""
    if by not in frame.columns:
        raise KeyError(f"the route frame has no {by!r} column; columns: {list(frame.columns)}")
    layers = _layers(frame, layers)
    groups = sorted(frame[by].dropna().astype(str).unique())
    fig = _figure(max(4.0, 3.5 * len(layers)), 3.2)
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    for ax, layer in zip(axes, layers):
        mat = analysis.gate_matrix(frame, layer)
        labels = frame.drop_duplicates("query_id").set_index("query_id")[by].astype(str).reindex(mat.index)
        width = 0.8 / max(len(groups), 1)
        for g, group in enumerate(groups):
            data = [mat.loc[labels == group, col].dropna().to_numpy(dtype=float) for col in mat.columns]
            pos = np.arange(mat.shape[1]) + (g - (len(groups) - 1) / 2) * width
            box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False,
                             showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(PALETTE[g % len(PALETTE)])
                patch.set_gid(f"box:{group}")
        ax.set_xticks(range(mat.shape[1]), [str(c) for c in mat.columns], fontsize=7,
                      rotation=90 if mat.shape[1] > 4 else 0)
        ax.set_title(str(layer), fontsize=9)
        ax.grid(axis="y", linestyle="--", alpha=0.5)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=PALETTE[g % len(PALETTE)], label=grp) for g, grp in enumerate(groups)],
               loc="outside right upper", fontsize=7, title=by)
    fig.suptitle(f"Gate distributions per {by}")
    return fig


def plot_gate_entropy(frame: Any, layers: Sequence[str] | None = None) -> Any:
    """Left: histogram of normalised gate entropy per layer. Right: expert utilisation (mean share, top-1)."""
    layers = _layers(frame, layers)
    stats = analysis.route_statistics(frame[frame["layer"].isin(layers)])
    fig = _figure(9.0, 3.2)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
    for i, layer in enumerate(layers):
        ent = analysis.gate_entropy(analysis.gate_matrix(frame, layer).to_numpy())
        left.hist(ent, bins=np.linspace(0, 1, 21), alpha=0.6, label=str(layer), color=PALETTE[i % len(PALETTE)])
    left.set_xlabel("gate entropy / log(E)  (1 = uniform)")
    left.set_ylabel("queries")
    left.legend(fontsize=7)
    labels = [f"{r.layer}\n{r.expert}" for r in stats.itertuples()]
    x = np.arange(len(stats))
    right.bar(x - 0.2, stats["mean_share"], 0.4, label="mean share", color=PALETTE[0])
    right.bar(x + 0.2, stats["top1_share"], 0.4, label="top-1 share", color=PALETTE[1])
    right.set_xticks(x, labels, fontsize=6, rotation=90 if len(x) > 8 else 0)
    right.set_ylabel("fraction")
    right.legend(fontsize=7)
    right.set_title("Expert utilisation", fontsize=9)
    left.set_title("Routing entropy", fontsize=9)
    return fig


def plot_path_matrices(frame: Any, title: str = "Mean path weight per layer (destination x source)") -> Any:
    """Per-layer path heatmaps (DIME): the mean ``[destination x source]`` weight matrix of each layer
    (:func:`cirlab.workbench.analysis.flow_matrices`), values written in the cells.

    Each panel has its own colour scale: near-uniform routing (every weight close to 1/4) would otherwise
    look flat, and the differences between cells are what the panel is for.
    """
    mats = analysis.flow_matrices(frame)
    fig = _figure(3.2 * len(mats) + 0.6, 3.4)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (layer, sources, dests, mat) in zip(axes, mats):
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        ax.set_gid(f"paths:{layer}")
        ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(dests)), dests, fontsize=8)
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("source cell", fontsize=8)
        mid = (mat.max() + mat.min()) / 2
        for (d, s_), v in np.ndenumerate(mat):
            ax.text(s_, d, f"{v:.3f}", ha="center", va="center", fontsize=7,
                    color="black" if v > mid else "white")
        fig.colorbar(im, ax=ax, shrink=0.8)
    axes[0].set_ylabel("destination cell", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_dime_flows(frame: Any, min_weight: float = 0.0) -> Any:
    """Dense routing as a Sankey-like flow: columns of cells per layer, band width = mean path weight.

    Column ``l`` holds layer ``l``'s source cells, column ``l + 1`` its destinations. Each drawn band has
    ``gid="flow:<layer>:<source>-><destination>"`` and a line width proportional to its mean weight.
    """
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MPath

    flows = analysis.flow_matrices(frame)
    fig = _figure(2.6 * (len(flows) + 1), 3.8)
    ax = fig.add_subplot()
    columns = [flows[0][1]] + [f[2] for f in flows]
    ypos = [{name: (len(col) - 1) / 2 - i for i, name in enumerate(col)} for col in columns]
    wmax = max(float(f[3].max()) for f in flows) or 1.0
    for l, (layer, sources, dests, mat) in enumerate(flows):
        for d, dst in enumerate(dests):
            for s, src in enumerate(sources):
                w = float(mat[d, s])
                if w <= min_weight:
                    continue
                y0, y1 = ypos[l][src], ypos[l + 1][dst]
                verts = [(l + 0.12, y0), (l + 0.5, y0), (l + 0.5, y1), (l + 0.88, y1)]
                path = MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
                patch = PathPatch(path, facecolor="none", edgecolor=PALETTE[s % len(PALETTE)],
                                  linewidth=0.5 + 12.0 * w / wmax, alpha=0.55, capstyle="butt")
                patch.set_gid(f"flow:{layer}:{src}->{dst}")
                ax.add_patch(patch)
    for c, col in enumerate(columns):
        for name, y in ypos[c].items():
            box = FancyBboxPatch((c - 0.12, y - 0.18), 0.24, 0.36, boxstyle="round,pad=0.02", facecolor="white",
                                 edgecolor="black", linewidth=0.8, zorder=3)
            ax.add_patch(box)
            ax.text(c, y, str(name), ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xticks(range(len(columns)), ["input"] + [str(f[0]) for f in flows], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.4, len(columns) - 0.6)
    span = max(len(c) for c in columns) / 2 + 0.3
    ax.set_ylim(-span, span)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title("Cell-to-cell routing flows (band width = mean path weight)", fontsize=9)
    return fig


def plot_path_space(frame: Any, color_by: str = "category", annotate: int = 0) -> Any:
    """A 2-D PCA map of queries in path space (all layers' weights concatenated), coloured by ``color_by``."""
    x, ids, labels = analysis.path_vectors(frame, meta=color_by)
    coords, ratio = analysis.pca_2d(x)
    fig = _figure(5.0, 4.2)
    ax = fig.add_subplot()
    groups = sorted(set(map(str, labels)))
    labels = np.array([str(v) for v in labels])
    for g, group in enumerate(groups):
        m = labels == group
        ax.scatter(coords[m, 0], coords[m, 1], s=14, alpha=0.8, color=PALETTE[g % len(PALETTE)],
                   label=group or "(none)", gid=f"group:{group}")
    for i in range(min(annotate, len(ids))):
        ax.annotate(str(ids[i]), coords[i], fontsize=6)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% var.)")
    if len(groups) > 1:
        ax.legend(fontsize=7, title=color_by)
    ax.set_title("Queries in path space", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------- rank shift
def plot_figure8(table: Any, title: str = "") -> Any:
    """Figure 8 of the re-ranking paper from :func:`cirlab.workbench.analysis.rank_shift_table` (one bin per rank).

    Top: average delta (rank before - rank after) per initial rank; bottom: number of queries (symlog).
    """
    from matplotlib.gridspec import GridSpec

    fig = _figure(5.156, 3.683)  # the paper's panel size (rerank_cala.md A.9)
    fig.set_layout_engine("none")
    gs = GridSpec(2, 1, figure=fig, height_ratios=[2, 1], hspace=0.0, left=0.15, right=0.97, bottom=0.14,
                  top=0.9 if title else 0.97)
    top = fig.add_subplot(gs[0])
    bottom = fig.add_subplot(gs[1], sharex=top)
    x = table["bin_start"].to_numpy()
    top.bar(x, table["average_delta"].to_numpy(), width=0.8, align="center", color="royalblue")
    top.set_ylabel(r"Average $\Delta$")
    top.grid(True, linestyle="--", alpha=0.6)
    top.tick_params(labelbottom=False)
    bottom.plot(x, table["count"].to_numpy(), color="chocolate", linewidth=0.9)
    bottom.set_yscale("symlog")
    bottom.set_ylabel("Number of samples")
    bottom.set_xlabel("Initial ranking (index)")
    bottom.grid(True, linestyle="--", alpha=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_rank_shift(aligned: Any, k: int, bins: int | Sequence[int] | None = 20, title: str = "",
                    label_before: str = "before", label_after: str = "after") -> Any:
    """Four panels comparing two rankings of the same queries (aligned by :func:`cirlab.workbench.analysis.align_ranks`).

    (a) per-query target rank before vs after (log axes, diagonal = no change); (b) mean rank after per bin
    of the rank before, inside the candidate pool of size ``k``; (c) share of queries improved / unchanged /
    worsened per category; (d) recall before/after per category with the pool's ceiling recall R@k.
    """
    table = analysis.rank_shift_table(aligned["rank_before"], aligned["rank_after"], k, bins)
    per_cat = analysis.rank_shift_by_category(aligned, k, ks=(1, 10))
    fig = _figure(10.0, 7.0)
    (a, b), (c, d) = fig.subplots(2, 2)
    _rank_scatter(a, aligned, k, label_before, label_after)
    full = table[table["count"] > 0]
    b.plot(full["mean_rank_before"], full["mean_rank_after"], "o-", color=PALETTE[0], gid="binned_means",
           label=f"mean {label_after} rank")
    b.plot([1, k], [1, k], "--", color="gray", linewidth=0.8, label="no change")
    b.set_xlabel(f"rank {label_before} (bin mean, pool top-{k})")
    b.set_ylabel(f"mean rank {label_after}")
    b.legend(fontsize=7)
    b.set_title("(b) mean rank after per bin of rank before", fontsize=9)
    _shift_shares(c, per_cat)
    _ceiling_bars(d, per_cat, k)
    if title:
        fig.suptitle(title)
    return fig


def _rank_scatter(ax: Any, aligned: Any, k: int, label_before: str, label_after: str) -> None:
    cats = sorted(aligned["category"].astype(str).unique())
    for g, cat in enumerate(cats):
        m = aligned["category"].astype(str) == cat
        ax.scatter(aligned.loc[m, "rank_before"], aligned.loc[m, "rank_after"], s=8, alpha=0.6,
                   color=PALETTE[g % len(PALETTE)], label=cat or "all", gid=f"scatter:{cat}")
    top = float(max(aligned["rank_before"].max(), aligned["rank_after"].max(), k))
    ax.plot([1, top], [1, top], "--", color="gray", linewidth=0.8)
    ax.axvline(k, color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"target rank {label_before}")
    ax.set_ylabel(f"target rank {label_after}")
    ax.set_title("(a) per-query target rank (below diagonal = improved)", fontsize=9)
    if len(cats) > 1:
        ax.legend(fontsize=6)


def _shift_shares(ax: Any, per_cat: Any) -> None:
    y = np.arange(len(per_cat))
    left = np.zeros(len(per_cat))
    for key, color in (("improved_pct", PALETTE[2]), ("unchanged_pct", "#bbbbbb"), ("worsened_pct", PALETTE[3])):
        vals = per_cat[key].fillna(0).to_numpy()
        ax.barh(y, vals, left=left, color=color, label=key.replace("_pct", ""), gid=f"share:{key}")
        left += vals
    ax.set_yticks(y, per_cat["category"].tolist(), fontsize=7)
    ax.set_xlabel("% of queries with target in the pool")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("(c) improved / unchanged / worsened", fontsize=9)


def _ceiling_bars(ax: Any, per_cat: Any, k: int) -> None:
    keys = [c for c in per_cat.columns if c.startswith(("before_R@", "after_R@"))] + [f"ceiling_R@{k}"]
    x = np.arange(len(per_cat))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, per_cat[key].to_numpy(), width, label=key,
               color="black" if key.startswith("ceiling") else PALETTE[j % len(PALETTE)],
               alpha=0.35 if key.startswith("ceiling") else 1.0, gid=f"recall:{key}")
    ax.set_xticks(x, per_cat["category"].tolist(), fontsize=7)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=6, ncols=2)
    ax.set_title(f"(d) recall and candidate-pool ceiling (top-{k})", fontsize=9)


# --------------------------------------------------------------------------------------------- training
def plot_training_curves(log: Any, x: str | None = None, keys: Sequence[str] | None = None) -> Any:
    """Training curves from a ``log.jsonl`` (path, run folder or frame): one panel per logged quantity.

    ``x`` defaults to ``step`` (else ``epoch``, else the record index); ``keys`` defaults to every numeric
    column ending in ``loss`` plus ``lr`` and any validation metric (``val`` prefix or ``R@`` in the name).
    """
    import pandas as pd

    df = log if isinstance(log, pd.DataFrame) else analysis.read_log(log)
    if df.empty:
        raise ValueError("the training log has no records")
    x = x or next((c for c in ("step", "global_step", "epoch") if c in df.columns), None)
    numeric = [c for c in df.columns if c != x and pd.api.types.is_numeric_dtype(df[c])]
    if keys is None:
        keys = [c for c in numeric if c.endswith("loss") or c == "lr" or "R@" in c or c.startswith("val")]
        keys = keys or numeric
    keys = [k for k in keys if k in df.columns]
    if not keys:
        raise ValueError(f"no plottable columns in the training log; columns: {list(df.columns)}")
    ncols = min(3, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    fig = _figure(3.3 * ncols, 2.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    xs = df[x] if x else pd.Series(np.arange(len(df)))
    for ax, key in zip(axes, keys):
        m = df[key].notna()
        ax.plot(xs[m], df.loc[m, key], marker="." if m.sum() < 30 else None, linewidth=1.0, gid=f"curve:{key}")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel(x or "record", fontsize=7)
        ax.grid(True, linestyle="--", alpha=0.5)
    for ax in axes[len(keys):]:
        ax.axis("off")
    return fig
