"""The router explorer: pick a query, see its gates and its top-K, edit its text and watch the gates move.

The logic is plain Python so that it runs (and is tested) without a browser:

* :func:`plot_query_view` draws one query's view as a matplotlib Figure: the gates of every router layer
  (traced gates as hollow bars, the gates for an edited text filled) and its top-K candidates;
* :func:`make_query_fn` wraps a CIR model and a split into ``query_fn(query_id, text)`` that re-runs the model on
  the query's reference image with any text, under :func:`cirlab.core.tracing.trace_routes`, and searches the gallery;
* :class:`RouterExplorer` holds the traced routes and builds the ipywidgets UI (ipywidgets is imported only in
  :meth:`RouterExplorer.build`). Its observers are traitlets callbacks, so setting ``explorer.query.value`` or
  ``explorer.text.value`` from Python re-renders ``explorer.figure`` exactly as a click does.

Headless notebooks call :meth:`RouterExplorer.view` for static figures (the same drawing code).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cirlab.workbench import analysis

logger = logging.getLogger(__name__)

QueryFn = Callable[[Any, str], Mapping[str, Any]]
"""``query_fn(query_id, text) -> {"routes": that query's route frame, "candidate_ids", "scores", "target_id"}``."""

__all__ = ["plot_query_view", "make_query_fn", "encode_gallery", "RouterExplorer"]


def _gates_by_layer(routes: Any) -> dict[str, Any]:
    """``{layer: Series(expert -> weight)}`` for one query's route rows (first query if several)."""
    if routes is None or len(routes) == 0:
        return {}
    qid = routes["query_id"].iloc[0]
    one = routes[routes["query_id"] == qid]
    return {layer: analysis.gate_matrix(one, layer).iloc[0] for layer in dict.fromkeys(one["layer"])}


def plot_query_view(routes: Any, edited: Any = None, candidate_ids: Sequence[str] = (), scores: Sequence[float] = (),
                    target_id: str | None = None, image_fn: Callable[[str], Any] | None = None,
                    title: str = "") -> Any:
    """One query: gate bars per layer (traced: hollow; for the edited text: filled) and its top-K.

    ``routes``/``edited`` are route-frame rows of a single query. Candidates are drawn as thumbnails when
    ``image_fn(name)`` is given, else as a ranked list; the target gets a green frame / green text and
    ``gid="target"``.
    """
    from matplotlib.figure import Figure

    from cirlab.workbench.viz import PALETTE, TARGET_COLOR, image_axis

    base = _gates_by_layer(routes)
    new = _gates_by_layer(edited)
    layers = list(base) or list(new)
    if not layers:
        raise ValueError("plot_query_view needs route rows for the query")
    k = len(candidate_ids)
    n_thumbs = k if image_fn is not None else (1 if k else 0)
    fig = Figure(figsize=(2.6 * len(layers) + 1.3 * max(n_thumbs, 0) + 0.5, 2.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(layers) + n_thumbs, squeeze=False,
                        width_ratios=[2.0] * len(layers) + [1.0 if image_fn is not None else 2.0] * n_thumbs)[0]
    ymax = max([float(s.max()) for s in list(base.values()) + list(new.values())] + [1e-6]) * 1.15
    for ax, layer in zip(axes, layers):
        ref = base.get(layer)
        names = list((ref if ref is not None else new[layer]).index)
        x = np.arange(len(names))
        if ref is not None:
            ax.bar(x, ref.to_numpy(dtype=float), 0.7, facecolor="none", edgecolor="black", linewidth=1.2,
                   label="traced text", gid="gates:traced")
        if layer in new:
            ax.bar(x, new[layer].reindex(names).to_numpy(dtype=float), 0.45, alpha=0.85,
                   color=[PALETTE[j % len(PALETTE)] for j in range(len(names))], label="edited text",
                   gid="gates:edited")
        ax.set_xticks(x, [str(n) for n in names], fontsize=6, rotation=90 if len(names) > 4 else 0)
        ax.set_ylim(0, ymax)
        ax.set_title(str(layer), fontsize=9)
    if new and base:
        axes[0].legend(fontsize=6)
    _draw_candidates(axes[len(layers):], candidate_ids, scores, target_id, image_fn, TARGET_COLOR, image_axis)
    fig.suptitle(title, fontsize=9)
    return fig


def _draw_candidates(axes: Sequence[Any], ids: Sequence[str], scores: Sequence[float], target_id: str | None,
                     image_fn: Callable[[str], Any] | None, target_color: str, image_axis: Callable) -> None:
    if not len(axes):
        return
    if image_fn is None:
        ax = axes[0]
        ax.axis("off")
        for j, name in enumerate(ids):
            hit = target_id is not None and str(name) == str(target_id)
            score = f"  {float(scores[j]):.3f}" if j < len(scores) else ""
            t = ax.text(0.0, 1.0 - (j + 0.5) / max(len(ids), 1), f"#{j + 1} {name}{score}", fontsize=8,
                        color=target_color if hit else "black", fontweight="bold" if hit else "normal",
                        transform=ax.transAxes, va="center")
            if hit:
                t.set_gid("target")
        ax.set_title("top-K", fontsize=9)
        return
    for j, (ax, name) in enumerate(zip(axes, ids)):
        hit = target_id is not None and str(name) == str(target_id)
        image_axis(ax, image_fn(name), title=f"#{j + 1} {name}", color=target_color if hit else None)
        if hit:
            ax.set_gid("target")


# --------------------------------------------------------------------------------------------- model glue
def encode_gallery(model: Any, split: Any, transform: Any = None, batch_size: int = 64,
                   device: str = "cpu") -> Any:
    """``encode_target`` over ``split.gallery_dataset(transform)``: ``[G, D]`` on CPU, in gallery order."""
    import torch

    data = split.gallery_dataset(transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    feats = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            feats.append(model.encode_target(batch["image"].to(device)).float().cpu())
    return torch.cat(feats)


def make_query_fn(model: Any, split: Any, transform: Any = None, gallery_features: Any = None, k: int = 5,
                  device: str = "cpu") -> QueryFn:
    """Re-run a CIR router model on one query's reference image with any text (traced), and search the gallery.

    ``gallery_features`` (``[G, D]``, in ``split.gallery_names`` order) is computed once if not given.
    """
    import torch

    from cirlab.core.metrics import target_ranks
    from cirlab.core.retrieval import topk_search
    from cirlab.core.tracing import trace_routes

    queries = split.query_dataset(transform)
    index = {t.query_id: i for i, t in enumerate(split.triplets)}
    triplets = {t.query_id: t for t in split.triplets}
    gallery = gallery_features if gallery_features is not None else encode_gallery(model, split, transform,
                                                                                   device=device)
    names = list(split.gallery_names)

    def query_fn(query_id: Any, text: str) -> dict[str, Any]:
        if query_id not in index:
            raise KeyError(f"query {query_id!r} is not in the split")
        item = queries[index[query_id]]
        trip = triplets[query_id]
        model.eval()
        with torch.no_grad(), trace_routes(model) as trace:
            trace.set_batch([query_id], category=[trip.category],
                            modification=[trip.extras.get("modification", "")])
            q = model.encode_query(item["ref_image"].unsqueeze(0).to(device), [text]).float().cpu()
        # the evaluation's own search and rank: the protocol's reference exclusion, ties to the lower index
        ref = int(item.get("ref_idx", -1)) if split.exclude_reference else -1
        exclude = torch.tensor([ref])
        top_scores, top_idx = topk_search(q, gallery, min(k, len(names) - (ref >= 0)), exclude=exclude)
        target = int(item.get("target_idx", -1))
        rank = int(target_ranks(q @ gallery.T, torch.tensor([target]), exclude)[0]) if target >= 0 else 0
        return {"routes": trace.to_frame(), "candidate_ids": [names[i] for i in top_idx[0].tolist()],
                "scores": top_scores[0].tolist(), "target_id": trip.target_name, "target_rank": rank}

    return query_fn


# --------------------------------------------------------------------------------------------- the explorer
class RouterExplorer:
    """Interactive view over traced routes (see the module docstring).

    Args:
        routes: route frame of the traced queries (``RouteTrace.to_frame()`` or ``cirlab.engine.evaluate.trace_split``).
        texts: ``{query_id: text}`` the queries were traced with (the text box starts from it).
        query_fn: optional ``query_fn(query_id, text)`` (see :func:`make_query_fn`): enables editing the text.
        topk: optional ``cirlab.core.topk.TopK`` with the traced queries' top-K (shown when no ``query_fn``).
        image_fn: optional ``image_fn(name) -> image`` to draw candidate thumbnails.
        k: how many candidates to show.
    """

    def __init__(self, routes: Any, texts: Mapping[Any, str] | None = None, query_fn: QueryFn | None = None,
                 topk: Any = None, image_fn: Callable[[str], Any] | None = None, k: int = 5) -> None:
        if routes is None or len(routes) == 0:
            raise ValueError("RouterExplorer needs a non-empty route frame")
        self.routes = routes
        self.query_ids = list(dict.fromkeys(routes["query_id"]))
        self.texts = dict(texts or {})
        self.query_fn = query_fn
        self.image_fn = image_fn
        self.k = k
        self._topk = {}
        if topk is not None:
            for i, qid in enumerate(topk.query_ids):
                self._topk[str(qid)] = (list(topk.gallery_ids[i, :k]), list(topk.scores[i, :k]),
                                        str(topk.target_ids[i]) or None)
        self.figure: Any = None
        self.renders = 0
        self.query = self.text = self.output = None  # widgets, created by build()
        self._syncing = False

    def view(self, query_id: Any, text: str | None = None) -> Any:
        """The static figure for ``query_id`` (with ``text`` re-routed through ``query_fn`` if it differs)."""
        if query_id not in self.query_ids:
            raise KeyError(f"query {query_id!r} not among the traced queries ({len(self.query_ids)} traced)")
        rows = self.routes[self.routes["query_id"] == query_id]
        original = self.texts.get(query_id)
        edited, ids, scores = None, [], []
        target = None
        cached = self._topk.get(str(query_id))
        if cached is not None:
            ids, scores, target = cached
        edit = self.query_fn is not None and text is not None and text != original
        if edit or (self.query_fn is not None and not ids and original is not None):
            # an edited text is re-routed; an unedited one is only searched when no top-K was given
            result = self.query_fn(query_id, text if edit else original)
            edited = result["routes"] if edit else None
            ids, scores = list(result.get("candidate_ids", ids)), list(result.get("scores", scores))
            target = result.get("target_id", target)
        shown = text if text is not None else original
        title = f"query {query_id}" + (f": {shown!r}" if shown else "")
        return plot_query_view(rows, edited, ids, scores, target, self.image_fn, title=title)

    # -- ipywidgets ------------------------------------------------------------------------------------------------
    def build(self) -> Any:
        """Create the widgets (query dropdown, text box, output) and render the first query."""
        import ipywidgets as widgets

        first = self.query_ids[0]
        self.query = widgets.Dropdown(options=self.query_ids, value=first, description="query")
        self.text = widgets.Text(value=self.texts.get(first, ""), description="text", continuous_update=False,
                                 disabled=self.query_fn is None, layout=widgets.Layout(width="60%"))
        self.output = widgets.Output()
        self.query.observe(self._on_query, names="value")
        self.text.observe(self._on_text, names="value")
        self.render()
        return widgets.VBox([widgets.HBox([self.query, self.text]), self.output])

    def _on_query(self, change: Mapping[str, Any]) -> None:
        self._syncing = True  # resetting the text box must not render a second time
        try:
            self.text.value = self.texts.get(change["new"], "")
        finally:
            self._syncing = False
        self.render()

    def _on_text(self, change: Mapping[str, Any]) -> None:
        if not self._syncing:
            self.render()

    def render(self) -> Any:
        """Redraw the current widget state into ``self.figure`` and the output area."""
        qid = self.query.value
        text = self.text.value if self.query_fn is not None else None
        self.figure = self.view(qid, text)
        self.renders += 1
        with self.output:
            from IPython.display import display

            self.output.clear_output(wait=True)
            display(self.figure)
        return self.figure
