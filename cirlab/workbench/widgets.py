"""The explorers: pick a query, see its gates (or paths) and what it retrieves, edit its text and watch them move.

The logic is plain Python so that it runs (and is tested) without a browser:

* :func:`plot_query_view` draws one CIR query as a matplotlib Figure: the reference image, the text, the top-K
  thumbnails (the target framed in green, and shown with its rank when it falls outside the top-K), and the gates
  of every router layer: as traced, for the edited text, and for a second checkpoint side by side;
* :func:`plot_pair_view` draws one image-caption pair of an ITM router model (DIME): the path matrices of every
  layer, as traced and for the edited caption against the chosen image;
* :func:`make_query_fn` / :func:`make_pair_fn` wrap a model and a split into the functions the explorers call:
  ``query_fn(query_id, text)`` re-runs a CIR model on the query's reference image with any text (traced) and
  searches the gallery; ``pair_fn(image_idx, text)`` scores an edited caption against one image (traced) and ranks
  that image among all images of the split for it;
* :class:`RouterExplorer` (CIR) and :class:`PathExplorer` (ITM) hold the traced routes and build the ipywidgets
  UI (ipywidgets is imported only in ``build()``). Their observers are traitlets callbacks, so setting a widget's
  value from Python re-renders ``explorer.figure`` exactly as a click in JupyterLab does.

Headless notebooks call ``explorer.view(...)`` for static figures (the same drawing code). Texts are shown as
people read them (:func:`cirlab.workbench.viz.plain_text`: no ``<BOS>``/``<AND>``/``<EOS>`` markup); a model
trained on the markup adds it on its own text path.
"""
from __future__ import annotations

import html
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cirlab.core.contracts import eval_mode
from cirlab.core.errors import InputError, UnknownKeyError
from cirlab.workbench import analysis
from cirlab.workbench.viz import MIN_FONT, PALETTE, QUERY_COLOR, TARGET_MARK, candidate_label, text_on_viridis

logger = logging.getLogger(__name__)

QueryFn = Callable[[Any, str], Mapping[str, Any]]
"""``query_fn(query_id, text) -> {"routes": that query's route frame, "candidate_ids", "scores", "target_id",
"target_rank" (1-based rank in the whole gallery, 0 when unknown), "gallery_size", "reference_id"}``."""
PairFn = Callable[[int, str], Mapping[str, Any]]
"""``pair_fn(image_idx, text) -> {"routes": the pair's path frame, "score", "image_rank", "n_images"}``."""

__all__ = ["plot_query_view", "plot_pair_view", "make_query_fn", "make_pair_fn", "encode_gallery", "RouterExplorer",
           "PathExplorer", "live_frontend"]

MAIN_COLOR, COMPARE_COLOR = PALETTE[0], PALETTE[1]  # the figures' first two colours


def live_frontend() -> bool:
    """Whether this kernel is driven by a live Jupyter frontend (JupyterLab, Notebook, VS Code): the notebooks
    build their widgets only then, never under papermill (:func:`cirlab.core.console.live_frontend`)."""
    from cirlab.core import console

    return console.live_frontend()


def _gates_by_layer(routes: Any) -> dict[str, Any]:
    """``{layer: Series(expert -> weight)}`` for one query's route rows (first query if several), experts in the
    paper's order."""
    from cirlab.workbench.viz import paper_order

    if routes is None or len(routes) == 0:
        return {}
    qid = routes["query_id"].iloc[0]
    one = routes[routes["query_id"] == qid]
    out = {}
    for layer in dict.fromkeys(one["layer"]):
        row = analysis.gate_matrix(one, layer).iloc[0]
        out[layer] = row[paper_order(list(row.index))]
    return out


def plot_query_view(routes: Any, edited: Any = None, candidate_ids: Sequence[str] = (), scores: Sequence[float] = (),
                    target_id: str | None = None, image_fn: Callable[[str], Any] | None = None, title: str = "", *,
                    target_rank: int | None = None, gallery_size: int | None = None, reference_id: str | None = None,
                    text: str | None = None, compare: Mapping[str, Any] | None = None,
                    labels: Sequence[str] = ("this run", "compare")) -> Any:
    """One CIR query: its gates per layer and what it retrieves.

    ``routes``/``edited`` are route-frame rows of the query as traced / re-run with an edited text; ``compare``
    (``{"routes", "target_rank"}``) is a second checkpoint's answer for the current text, drawn beside it (hatched,
    ``labels[1]``). Gate bars have ``gid`` ``gates:traced`` (filled when there is no edit, an outline otherwise),
    ``gates:edited`` and ``gates:compare``. Candidates are thumbnails when ``image_fn(name)`` is given (the
    reference first when ``reference_id`` is, then the top-K, then the target with its rank when it is not among
    them: ``gid="target_outside"``), else a ranked list; the target gets a green frame / green text and
    ``gid="target"``.
    """
    from cirlab.workbench.viz import TARGET_COLOR, display_label, image_axis, new_figure, plain_text, wrap_text

    base, new = _gates_by_layer(routes), _gates_by_layer(edited)
    other = _gates_by_layer(compare.get("routes")) if compare else {}
    layers = list(base) or list(new)
    if not layers:
        raise InputError("plot_query_view needs route rows for the query")
    ids = [str(c) for c in candidate_ids]
    target = None if target_id is None else str(target_id)
    outside = image_fn is not None and target is not None and target not in ids and bool(target_rank)
    thumbs = len(ids) + int(outside) + int(reference_id is not None and image_fn is not None)
    top_cols = (thumbs + int(text is not None)) if image_fn is not None else 0
    width = max(2.6 * len(layers) + (0 if image_fn is not None else 2.6), 1.25 * top_cols) + 0.6
    fig = new_figure(width, 2.9 + (2.0 if image_fn is not None else 0.0))
    grid = fig.add_gridspec(2 if image_fn is not None else 1, 1, height_ratios=[1.0, 1.45] if image_fn else None)
    bottom = grid[-1].subgridspec(1, len(layers) + (0 if image_fn is not None else 1),
                                  width_ratios=[2.0] * len(layers) + ([] if image_fn is not None else [2.2]))
    gate_axes = [fig.add_subplot(bottom[0, i]) for i in range(len(layers))]
    ymax = max([float(s.max()) for s in [*base.values(), *new.values(), *other.values()]] + [1e-6]) * 1.15
    for ax, layer in zip(gate_axes, layers):
        _gate_bars(ax, layer, base, new, other, labels)
        ax.set_ylim(0, ymax)
        ax.set_title(str(layer), fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        names = list((base.get(layer) if layer in base else new[layer]).index)
        ax.set_xticks(np.arange(len(names)), [display_label(n) for n in names], fontsize=MIN_FONT,
                      rotation=90 if len(names) > 4 else 0)
        ax.tick_params(axis="y", labelsize=MIN_FONT)
    gate_axes[0].set_ylabel("gate weight", fontsize=8)
    if len(gate_axes[0].get_legend_handles_labels()[0]) > 1:
        gate_axes[0].legend(fontsize=MIN_FONT, loc="upper right")
    ranks = _rank_line(target_rank, gallery_size, compare, labels)
    if image_fn is None:
        _candidate_list(fig.add_subplot(bottom[0, len(layers)]), ids, scores, target, ranks, TARGET_COLOR)
    else:
        top = grid[0].subgridspec(1, max(top_cols, 1))
        slots = iter(range(top_cols))
        first = [next(slots) for _ in range(int(reference_id is not None) + int(text is not None))]
        cand_slots = [next(slots) for _ in ids]
        for j, (slot, name) in enumerate(zip(cand_slots, ids)):
            ax = fig.add_subplot(top[0, slot])
            hit = name == target
            title = candidate_label(j + 1, name, scores[j] if j < len(scores) else None, hit)
            image_axis(ax, image_fn(name), title=title, color=TARGET_COLOR if hit else None)
            if hit:
                ax.set_gid("target")
        if outside:
            ax = fig.add_subplot(top[0, next(slots)])
            image_axis(ax, image_fn(target), title=f"target {target}\nrank {analysis.shown_rank(target_rank)}",
                       color=TARGET_COLOR, width=2.0)
            for spine in ax.spines.values():
                spine.set_linestyle("--")
            ax.set_gid("target_outside")
        if reference_id is not None:
            ax = fig.add_subplot(top[0, first.pop(0)])
            image_axis(ax, image_fn(str(reference_id)), title=f"reference\n{reference_id}", color=QUERY_COLOR,
                       width=2.0)
            ax.set_gid("query")
        if text is not None:
            ax = fig.add_subplot(top[0, first.pop(0)])
            ax.axis("off")
            ax.text(0.0, 0.5, wrap_text(plain_text(text), 24) + ("\n\n" + ranks if ranks else ""), fontsize=7,
                    va="center", ha="left", transform=ax.transAxes, gid="query_text")
    fig.suptitle(title, fontsize=9)
    return fig


def _gate_bars(ax: Any, layer: str, base: Mapping[str, Any], new: Mapping[str, Any], other: Mapping[str, Any],
               labels: Sequence[str]) -> None:
    ref = base.get(layer)
    names = list((ref if ref is not None else new[layer]).index)
    x = np.arange(len(names))
    shift = 0.19 if layer in other else 0.0
    width = 0.36 if layer in other else 0.55
    if ref is not None:
        if layer in new:  # the traced text as an outline behind the edited one
            ax.bar(x - shift, ref.to_numpy(dtype=float), width + 0.14, facecolor="none", edgecolor="black",
                   linewidth=1.0, label=f"{labels[0]}, traced text", gid="gates:traced")
        else:
            ax.bar(x - shift, ref.to_numpy(dtype=float), width, color=MAIN_COLOR, label=labels[0],
                   gid="gates:traced")
    if layer in new:
        ax.bar(x - shift, new[layer].reindex(names).to_numpy(dtype=float), width, color=MAIN_COLOR, alpha=0.9,
               label=f"{labels[0]}, edited text", gid="gates:edited")
    if layer in other:
        ax.bar(x + shift, other[layer].reindex(names).to_numpy(dtype=float), width, color=COMPARE_COLOR,
               hatch="//", edgecolor="white", label=labels[1], gid="gates:compare")


def _rank_line(rank: int | None, size: int | None, compare: Mapping[str, Any] | None, labels: Sequence[str]) -> str:
    if not rank:
        return ""
    of = f" of {size}" if size else ""
    line = f"target rank {analysis.shown_rank(rank)}{of}"
    if compare and compare.get("target_rank"):
        line += f" ({labels[0]})\n{analysis.shown_rank(compare['target_rank'])}{of} ({labels[1]})"
    return line


def _candidate_list(ax: Any, ids: Sequence[str], scores: Sequence[float], target: str | None, ranks: str,
                    color: str) -> None:
    ax.axis("off")
    rows = len(ids) + (2 if ranks else 0)
    for j, name in enumerate(ids):
        hit = target is not None and name == target
        score = f"  {float(scores[j]):.3f}" if j < len(scores) else ""
        mark = f"  {TARGET_MARK}" if hit else ""
        t = ax.text(0.0, 1.0 - (j + 0.5) / max(rows, 1), f"#{j + 1} {name}{score}{mark}", fontsize=8,
                    color=color if hit else "black", fontweight="bold" if hit else "normal", transform=ax.transAxes,
                    va="center")
        if hit:
            t.set_gid("target")
    if ranks:
        ax.text(0.0, 1.0 - (len(ids) + 1.2) / rows, ranks, fontsize=7, color=color, transform=ax.transAxes,
                va="center", gid="target_rank")
    ax.set_title("top-K", fontsize=9)


def plot_pair_view(routes: Any, edited: Any = None, title: str = "", labels: Sequence[str] = ("traced", "edited")
                   ) -> Any:
    """One image-caption pair of a path-routing model (DIME): per layer, the ``destination x source`` path matrix
    as traced (top row) and, when ``edited`` is given, for the edited caption / chosen image (bottom row).

    Each heatmap has ``gid`` ``paths:<row label>:<layer>``; values are written in the cells.
    """
    from cirlab.workbench.viz import new_figure

    rows = [(labels[0], routes)] + ([(labels[1], edited)] if edited is not None and len(edited) else [])
    mats = [(label, analysis.flow_matrices(frame)) for label, frame in rows]
    ncols = len(mats[0][1])
    fig = new_figure(3.0 * ncols + 1.0, 2.9 * len(mats) + 0.5)
    axes = fig.subplots(len(mats), ncols, squeeze=False)
    for r, (label, layers) in enumerate(mats):
        for c, (layer, sources, dests, mat) in enumerate(layers):
            ax = axes[r, c]
            image = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            image.set_gid(f"paths:{label}:{layer}")
            ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=MIN_FONT)
            ax.set_yticks(range(len(dests)), dests, fontsize=MIN_FONT)
            for (d, s), v in np.ndenumerate(mat):
                ax.text(s, d, f"{v:.2f}", ha="center", va="center", fontsize=MIN_FONT,
                        color=text_on_viridis(v))
            ax.set_title(f"{layer} ({label})", fontsize=8)
            ax.set_xlabel("source cell", fontsize=MIN_FONT)
        axes[r, 0].set_ylabel("destination cell", fontsize=MIN_FONT)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="path weight")
    fig.suptitle(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------- model glue
def encode_gallery(model: Any, split: Any, transform: Any = None, batch_size: int = 64,
                   device: str | None = None) -> Any:
    """``encode_target`` over ``split.gallery_dataset(transform)``: ``[G, D]`` on CPU, in gallery order (``device``:
    where the model runs, by default where its weights are), in eval mode (the model's own mode given back)."""
    import torch

    from cirlab.engine.evaluate import ordered_loader
    from cirlab.workbench.recipes import run_device

    device = run_device(device, model)
    data = split.gallery_dataset(transform)
    loader = ordered_loader(data, batch_size)
    feats = []
    with eval_mode(model), torch.no_grad():  # the caller's mode given back
        for batch in loader:
            feats.append(model.encode_target(batch["image"].to(device)).float().cpu())
    return torch.cat(feats)


def make_query_fn(model: Any, split: Any, transform: Any = None, gallery_features: Any = None, k: int = 5,
                  device: str | None = None) -> QueryFn:
    """Re-run a CIR router model on one query's reference image with any text (traced), and search the gallery.

    ``gallery_features`` (``[G, D]``, in ``split.gallery_names`` order) is computed once if not given. The result
    has the top-``k`` candidates and the target's 1-based rank in the whole gallery (``target_rank``; 0 when the
    split has no target), searched as the evaluation searches (the protocol's reference exclusion, ties to the
    lower index).
    """
    import torch

    from cirlab.core.metrics import target_ranks
    from cirlab.core.retrieval import similarity, topk_search
    from cirlab.core.tracing import trace_routes
    from cirlab.workbench.recipes import require_split, run_device

    require_split(split, "make_query_fn", one=True)
    device = run_device(device, model)

    queries = split.query_dataset(transform)
    index = {t.query_id: i for i, t in enumerate(split.triplets)}
    triplets = {t.query_id: t for t in split.triplets}
    gallery = gallery_features if gallery_features is not None else encode_gallery(model, split, transform,
                                                                                   device=device)
    names = list(split.gallery_names)

    def query_fn(query_id: Any, text: str) -> dict[str, Any]:
        if query_id not in index:
            raise UnknownKeyError(f"query {query_id!r} is not in the split")
        item = queries[index[query_id]]
        trip = triplets[query_id]
        with eval_mode(model), torch.no_grad(), trace_routes(model) as trace:
            trace.set_batch([query_id], category=[trip.category],
                            modification=[trip.extras.get("modification", "")])
            q = model.encode_query(item["ref_image"].unsqueeze(0).to(device), [text]).float().cpu()
        ref = int(item.get("ref_idx", -1)) if split.exclude_reference else -1
        exclude = torch.tensor([ref])
        top_scores, top_idx = topk_search(q, gallery, min(k, len(names) - (ref >= 0)), exclude=exclude)
        target = int(item.get("target_idx", -1))
        # one query row: similarity() keeps it on the kernel topk_search used, so the rank matches the list above
        rank = int(target_ranks(similarity(q, gallery), torch.tensor([target]), exclude)[0]) if target >= 0 else 0
        return {"routes": trace.to_frame(), "candidate_ids": [names[i] for i in top_idx[0].tolist()],
                "scores": top_scores[0].tolist(), "target_id": trip.target_name, "target_rank": rank,
                "gallery_size": len(names) - (ref >= 0), "reference_id": trip.ref_name}

    return query_fn


def make_pair_fn(model: Any, split: Any, device: str | None = None) -> PairFn:
    """Score any caption against one image of a precomp split with an ITM router model (traced), and rank that
    image among all the split's images for the caption (text-to-image retrieval).

    The images are encoded once, on the first call. Diagnostic layers (DIME's ``*_raw``) are dropped from the
    returned routes, as the notebooks' traces drop them.
    """
    import torch

    from cirlab.core.metrics import target_ranks
    from cirlab.core.tracing import trace_routes
    from cirlab.workbench.recipes import require_split, run_device

    require_split(split, "make_pair_fn", itm=True)
    device = run_device(device, model)
    cache: dict[str, Any] = {}

    def images() -> Any:
        if "all" not in cache:
            feats = torch.stack([split.features(i) for i in range(split.num_images)]).to(device)
            with torch.no_grad():
                cache["all"] = model.encode_image(feats)
        return cache["all"]

    def pair_fn(image_idx: int, text: str) -> dict[str, Any]:
        i = int(image_idx)
        if not 0 <= i < split.num_images:
            raise UnknownKeyError(f"image {i} is not in the split (0..{split.num_images - 1})")
        with eval_mode(model), torch.no_grad():
            with trace_routes(model) as trace:
                trace.set_batch(ids=[f"image {i}"], image_idx=[i], text=[text])
                score = model.score(model.encode_image(split.features(i)[None].to(device)), model.encode_text([text]))
            all_scores = model.score(images(), model.encode_text([text]))[:, 0].float().cpu()
        frame = trace.to_frame()
        frame = frame[~frame["layer"].astype(str).str.endswith("_raw")].reset_index(drop=True)
        # the evaluation's rank (cirlab.core.metrics, ties to the lower image index, NaN refused): counting only
        # higher scores put a duplicated image one place ahead of its rank in the run's t2i metrics
        rank = int(target_ranks(all_scores[None], [i])[0])
        return {"routes": frame, "score": float(score.reshape(-1)[0]), "image_rank": rank,
                "n_images": int(split.num_images)}

    return pair_fn


# --------------------------------------------------------------------------------------------- the explorers
def _retrieval_line(ids: Sequence[Any], scores: Sequence[float], target: Any, rank: int | None,
                    gallery_size: int | None) -> str:
    """``target t: rank 3 of 40; top 5: a (0.812), b (0.790), ...``: the query view's numbers as text."""
    parts = []
    if target is not None:
        of = f" of {gallery_size}" if gallery_size else ""
        parts.append(f"target {target}: rank {analysis.shown_rank(rank) if rank else 'unknown'}{of}")
    if len(ids):
        parts.append(f"top {len(ids)}: " + ", ".join(f"{i} ({float(s):.3f})" for i, s in zip(ids, scores)))
    return "; ".join(parts)


def _pair_line(label: str, image: int, answer: Mapping[str, Any]) -> str:
    return (f"{label}: image {image}, score {answer['score']:.3f}, image rank {answer['image_rank']} of "
            f"{answer['n_images']} for the caption")


class _Explorer:
    """Shared widget plumbing: ``build()`` creates the controls, every change calls :meth:`render`."""

    figure: Any = None
    renders: int = 0
    summary: str = ""  # the last view's numbers as one line of text (the widget's status line shows it)

    def _start(self) -> None:
        self.figure, self.renders, self.output, self.status = None, 0, None, None
        self._syncing = False
        self._made: list[Any] = []  # the widgets build() made, closed by close()

    query_ids: list[Any]

    def close(self) -> None:
        """Close every widget :meth:`build` made. ipywidgets keeps each open widget (and through its callbacks this
        explorer, its models and its data) for the whole kernel session: a notebook re-running its explorer cell
        kept every earlier one alive. ``build()`` closes the widgets of its previous call itself."""
        for widget in self._made:
            widget.close()
        self._made.clear()

    def __enter__(self) -> "_Explorer":
        return self

    def __exit__(self, *exc: Any) -> None:  # ``with explorer_for(...) as explorer:`` closes it after the block
        self.close()

    def _keep(self, box: Any) -> Any:
        """``box`` and every widget inside it, with their layout and style widgets (each one open on its own),
        remembered for :meth:`close`; returns ``box``."""
        stack = [box]
        while stack:
            widget = stack.pop()
            self._made.append(widget)
            self._made += [part for part in (getattr(widget, "layout", None), getattr(widget, "style", None))
                           if part is not None]
            stack.extend(getattr(widget, "children", ()))
        return box

    def pick(self, query_id: Any = "") -> Any:
        """The traced query named ``query_id`` (compared as text, so a notebook's string parameter finds DIME's
        integer caption ids); the first traced query for ``""``."""
        if query_id is None or str(query_id) == "":
            return self.query_ids[0]
        for qid in self.query_ids:
            if str(qid) == str(query_id):
                return qid
        raise UnknownKeyError(f"query {query_id!r} not among the {len(self.query_ids)} traced queries "
                              f"(first: {self.query_ids[:3]})")

    def _show(self, make_figure: Callable[[], Any]) -> Any:
        """Draw into ``self.figure`` and the output area; a failing model call shows its error in the status line."""
        try:
            self.figure = make_figure()
        except Exception as err:  # noqa: BLE001 - shown to the user in the widget, the figure stays as it was
            logger.exception("explorer: drawing failed")
            if self.status is not None:
                # the status line is HTML, and the message quotes data (paths, image names, the edited text)
                message = html.escape(f"{type(err).__name__}: {err}")
                self.status.value = f"<span style='color:#b00'>error: {message}</span>"
            return self.figure
        self.renders += 1
        if self.status is not None:  # what the figure shows, as text too: a screen reader reads no figure
            self.status.value = html.escape(self.summary)
        if self.output is not None:
            from IPython.display import display

            with self.output:
                self.output.clear_output(wait=True)
                display(self.figure)
        return self.figure


class RouterExplorer(_Explorer):
    """Interactive view over the traced routes of a CIR router model (see the module docstring).

    Args:
        routes: route frame of the traced queries (``RouteTrace.to_frame()`` or ``cirlab.engine.evaluate.trace_split``).
        texts: ``{query_id: text}`` the queries were traced with (the text box starts from it, as plain text).
        query_fn: optional ``query_fn(query_id, text)`` (see :func:`make_query_fn`): enables editing the text.
        topk: optional ``cirlab.core.topk.TopK`` with the traced queries' top-K (shown for an unedited text).
        image_fn: optional ``image_fn(name) -> image`` to draw the reference, candidate and target thumbnails.
        k: how many candidates to show.
        compare_fn: optional second checkpoint's ``query_fn``: its gates for the current text are drawn beside.
        labels: legend names of the run and of the compared checkpoint.
    """

    def __init__(self, routes: Any, texts: Mapping[Any, str] | None = None, query_fn: QueryFn | None = None,
                 topk: Any = None, image_fn: Callable[[str], Any] | None = None, k: int = 5,
                 compare_fn: QueryFn | None = None, labels: Sequence[str] = ("this run", "compare")) -> None:
        from cirlab.workbench.viz import plain_text

        if routes is None or len(routes) == 0:
            raise InputError("RouterExplorer needs a non-empty route frame")
        self._start()
        self.routes = routes
        self.query_ids = list(dict.fromkeys(routes["query_id"]))
        self.texts = {q: plain_text(t) for q, t in (texts or {}).items()}
        self.query_fn, self.compare_fn, self.image_fn = query_fn, compare_fn, image_fn
        self.k, self.labels = k, tuple(labels)
        self._topk: dict[str, tuple[list[str], list[float], str | None, int]] = {}
        if topk is not None:
            for i, qid in enumerate(topk.query_ids):
                self._topk[str(qid)] = (list(topk.gallery_ids[i, :k]), list(topk.scores[i, :k]),
                                        str(topk.target_ids[i]) or None, int(topk.target_rank[i]))
        self.query = self.text = None  # widgets, created by build()

    def view(self, query_id: Any, text: str | None = None) -> Any:
        """The static figure for ``query_id`` (with ``text`` re-routed through ``query_fn`` if it differs)."""
        if query_id not in self.query_ids:
            raise UnknownKeyError(f"query {query_id!r} not among the traced queries ({len(self.query_ids)} traced)")
        rows = self.routes[self.routes["query_id"] == query_id]
        original = self.texts.get(query_id)
        current = text if text is not None else original
        edit = self.query_fn is not None and text is not None and text != original
        ids, scores, target, rank = self._topk.get(str(query_id), ([], [], None, 0))
        answer: Mapping[str, Any] = {}
        if edit or (self.query_fn is not None and not ids and original is not None):
            # an edited text is re-routed; an unedited one is only searched when no top-K was given
            answer = self.query_fn(query_id, current if edit else original)
            ids, scores = list(answer.get("candidate_ids", ids)), list(answer.get("scores", scores))
            target, rank = answer.get("target_id", target), answer.get("target_rank", rank)
        compare = None
        if self.compare_fn is not None and current is not None:
            compare = self.compare_fn(query_id, current)
        title = f"query {query_id}" + (f": {current!r}" if current and self.image_fn is None else "")
        self.summary = _retrieval_line(ids, scores, target, rank, answer.get("gallery_size"))
        return plot_query_view(rows, answer.get("routes") if edit else None, ids, scores, target, self.image_fn,
                               title=title, target_rank=rank or None, gallery_size=answer.get("gallery_size"),
                               reference_id=answer.get("reference_id"),
                               text=current if self.image_fn is not None else None, compare=compare,
                               labels=self.labels)

    # -- ipywidgets ------------------------------------------------------------------------------------------------
    def build(self) -> Any:
        """Create the widgets (query dropdown, text box, status line, output) and render the first query."""
        import ipywidgets as widgets

        self.close()
        first = self.query_ids[0]
        self.query = widgets.Dropdown(options=self.query_ids, value=first, description="query")
        self.text = widgets.Text(value=self.texts.get(first, ""), description="text", continuous_update=False,
                                 disabled=self.query_fn is None, layout=widgets.Layout(width="60%"))
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.query.observe(self._on_query, names="value")
        self.text.observe(self._on_text, names="value")
        self.render()
        return self._keep(widgets.VBox([widgets.HBox([self.query, self.text]), self.status, self.output]))

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
        return self._show(lambda: self.view(qid, text))


class PathExplorer(_Explorer):
    """Interactive view over the traced pairs of an ITM path-routing model (DIME).

    A query is one matching image-caption pair (``query_id`` = the caption's index). The caption box and the image
    dropdown re-score the edited caption against the chosen image through ``pair_fn`` (:func:`make_pair_fn`): its
    path matrices are drawn under the traced ones, with the score and the chosen image's rank for the caption.

    Args:
        routes: the traced frame (``query_id``, ``image_id`` or ``image_idx``, layers ``layer0..2``).
        texts: ``{query_id: caption}``.
        pair_fn: optional ``pair_fn(image_idx, text)``; without it the explorer only shows the traced paths.
        n_images: how many images the image dropdown offers (the split's first ``n_images``; default: the traced).
    """

    def __init__(self, routes: Any, texts: Mapping[Any, str] | None = None, pair_fn: PairFn | None = None,
                 n_images: int | None = None) -> None:
        if routes is None or len(routes) == 0:
            raise InputError("PathExplorer needs a non-empty route frame")
        self._start()
        self.routes = routes
        self.query_ids = list(dict.fromkeys(routes["query_id"]))
        self.texts = {q: str(t) for q, t in (texts or {}).items()}
        column = "image_id" if "image_id" in routes.columns else "image_idx"
        first = routes.drop_duplicates("query_id").set_index("query_id")
        self.image_of = {q: int(first.loc[q, column]) for q in self.query_ids} if column in routes.columns else {}
        traced_images = sorted(set(self.image_of.values()))
        self.images = list(range(n_images)) if n_images else traced_images
        self.pair_fn = pair_fn
        self._traced: dict[Any, Mapping[str, Any]] = {}  # pair_fn's answer for each pair as traced (score, rank)
        self.query = self.text = self.image = None

    def view(self, query_id: Any, text: str | None = None, image: int | None = None) -> Any:
        """The pair's traced paths and, when the caption or the image differ, the re-scored ones below them."""
        if query_id not in self.query_ids:
            raise UnknownKeyError(f"pair {query_id!r} not among the traced pairs ({len(self.query_ids)} traced)")
        rows = self.routes[self.routes["query_id"] == query_id]
        own = self.image_of.get(query_id)
        original = self.texts.get(query_id, "")
        caption = original if text is None else text
        chosen = own if image is None else int(image)
        edited, info = None, ""
        if self.pair_fn is not None:
            if query_id not in self._traced and own is not None:
                self._traced[query_id] = self.pair_fn(own, original)
            if query_id in self._traced:
                info += "\n" + _pair_line("traced", own, self._traced[query_id])
            if caption != original or chosen != own:
                answer = self.pair_fn(chosen, caption)
                edited = answer["routes"]
                info += "\n" + _pair_line("edited", chosen, answer)
        title = f"pair {query_id}: image {own}, caption {original!r}" + info
        self.summary = "; ".join(info.strip().splitlines())
        return plot_pair_view(rows, edited, title=title, labels=("traced", "edited"))

    def build(self) -> Any:
        """Create the widgets (pair dropdown, image dropdown, caption box, status, output) and render."""
        import ipywidgets as widgets

        self.close()
        first = self.query_ids[0]
        self.query = widgets.Dropdown(options=self.query_ids, value=first, description="pair")
        self.image = widgets.Dropdown(options=self.images, value=self.image_of.get(first, self.images[0]),
                                      description="image", disabled=self.pair_fn is None)
        self.text = widgets.Text(value=self.texts.get(first, ""), description="caption", continuous_update=False,
                                 disabled=self.pair_fn is None, layout=widgets.Layout(width="60%"))
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.query.observe(self._on_query, names="value")
        self.text.observe(self._on_edit, names="value")
        self.image.observe(self._on_edit, names="value")
        self.render()
        return self._keep(widgets.VBox([widgets.HBox([self.query, self.image]), self.text, self.status,
                                        self.output]))

    def _on_query(self, change: Mapping[str, Any]) -> None:
        self._syncing = True
        try:
            self.text.value = self.texts.get(change["new"], "")
            if self.image_of.get(change["new"]) in self.images:
                self.image.value = self.image_of[change["new"]]
        finally:
            self._syncing = False
        self.render()

    def _on_edit(self, change: Mapping[str, Any]) -> None:
        if not self._syncing:
            self.render()

    def render(self) -> Any:
        qid = self.query.value
        text = self.text.value if self.pair_fn is not None else None
        image = self.image.value if self.pair_fn is not None else None
        return self._show(lambda: self.view(qid, text, image))
