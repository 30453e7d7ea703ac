"""Router tracing: one mechanism for every router model (AMC gates, DIME path matrices).

Models call :func:`emit` from inside their router modules. When no trace is active, ``emit`` returns
after one list check, so tracing costs nothing in training. Inside ``with trace_routes(model) as trace:``
every emission from a module of ``model`` is detached, moved to CPU and kept::

    with cirlab.trace_routes(model) as trace:
        model.encode_query(images, texts)
    df = trace.to_frame()          # query_id, layer, source, destination, expert, weight, ...
    gates = trace.gates("layer1")  # [N, E] tensor in code order

Kinds of emission:

* ``"gate"``: ``weights`` is ``[B, E]``, one weight per expert (AMC).
* ``"path"``: ``weights`` is ``[B, D, S]``, the weight of the path from source cell ``s`` into destination
  cell ``d`` (DIME). ``B`` may be a batch of (image, caption) pairs; pass their ids through ``meta``.
* ``"vector"``: any per-sample tensor kept as-is (e.g. DIME's 36-d path vector); not in ``to_frame``.

Names are given in the model's code order; ``paper_names`` maps a code name to the name a paper's
figure uses, so both stay explicit in the frame (columns ``code_index`` and ``paper_name``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from cirlab.core.config import did_you_mean
from cirlab.core.contracts import FRAME_COLUMNS
from cirlab.core.errors import UnknownKeyError

_ACTIVE: list["RouteTrace"] = []


def is_active() -> bool:
    """True while at least one trace is recording (lets models skip optional bookkeeping)."""
    return bool(_ACTIVE)


@dataclass
class _Record:
    layer: str
    kind: str
    weights: torch.Tensor  # CPU float32
    names: dict[str, list[str]]  # axis name -> labels in code order
    paper_names: dict[str, str]
    ids: list[Any] | None
    meta: dict[str, list[Any]]


@dataclass(eq=False)  # identity: nested traces are removed from the active list by identity, not by equal content
class RouteTrace:
    """What one ``trace_routes`` block recorded."""

    module_ids: set[int]
    records: list[_Record] = field(default_factory=list)
    _pending_ids: list[Any] | None = None
    _pending_meta: dict[str, list[Any]] = field(default_factory=dict)
    _pending_used: set[tuple[str, str]] = field(default_factory=set)  # (layer, kind) already labelled by them

    def set_batch(self, ids: Sequence[Any] | None = None, **meta: Sequence[Any]) -> None:
        """Attach query ids (and metadata columns such as ``category``) to the emissions of the next batch.

        Call it before every batch: a layer that emits a second time under the same ids is an error (it would label
        the second batch with the first batch's ids, and the analysis would average different queries as one).
        A metadata name that is one of :meth:`to_frame`'s own columns, or another name for the ids (``id=``), is an
        error: it would shadow a column, or become a column while the query ids stay unset."""
        for name, values in meta.items():
            if name in FRAME_COLUMNS or name in ("id", "qid", "qids", "query_ids"):
                raise TypeError(f"set_batch({name}=...): {name!r} is not a metadata column (to_frame writes "
                                f"{', '.join(FRAME_COLUMNS)} itself); pass the query ids as ids=")
        self._pending_ids = _per_query("ids", ids) if ids is not None else None
        self._pending_meta = {k: _per_query(k, v) for k, v in meta.items()}
        self._pending_used = set()

    def layers(self, kind: str | None = None) -> list[str]:
        """The recorded layer names in first-emission order, only those of ``kind`` ("gate", "path", "vector")
        when given."""
        seen: dict[str, None] = {}
        for r in self.records:
            if kind is None or r.kind == kind:
                seen.setdefault(r.layer, None)
        return list(seen)

    def _stack(self, layer: str, kind: str) -> torch.Tensor:
        parts = [r.weights for r in self.records if r.layer == layer and r.kind == kind]
        if not parts:
            raise UnknownKeyError(f"no {kind!r} records for layer {layer!r}{did_you_mean(layer, self.layers())}; "
                                  f"recorded: {', '.join(self.layers()) or '(nothing)'}")
        return torch.cat(parts, dim=0)

    def gates(self, layer: str) -> torch.Tensor:
        """All gate weights of ``layer`` in emission order, ``[N, E]``."""
        return self._stack(layer, "gate")

    def paths(self, layer: str) -> torch.Tensor:
        """All path matrices of ``layer`` in emission order, ``[N, D, S]``."""
        return self._stack(layer, "path")

    def vectors(self, layer: str) -> torch.Tensor:
        """All vector emissions of ``layer`` in emission order, ``[N, ...]`` (e.g. DIME's 36-d path vector)."""
        return self._stack(layer, "vector")

    def names(self, layer: str) -> dict[str, list[str]]:
        for r in self.records:
            if r.layer == layer:
                return r.names
        raise UnknownKeyError(f"no records for layer {layer!r}{did_you_mean(layer, self.layers())}; recorded: "
                              f"{', '.join(self.layers()) or '(nothing)'}")

    def to_frame(self) -> "Any":
        """A tidy pandas DataFrame, one row per (sample, layer, expert or source->destination) weight.

        Columns: ``query_id`` (``set_batch``'s ids, else a running index per layer), ``layer``, ``source`` and
        ``destination`` (paths), ``expert`` (the gate's expert; for a path its destination cell, so one column
        groups both kinds), ``code_index``, ``paper_name``, ``weight``, then the metadata of ``set_batch`` and of
        the emitting model (e.g. DIME's ``image_id``, ``caption_id``, ``source_code_index``). Vector emissions are
        not in it (:meth:`vectors`). Empty (with these columns) when nothing was recorded."""
        import pandas as pd

        rows: list[dict[str, Any]] = []
        counters: dict[tuple[str, str], int] = {}
        for rec in self.records:
            if rec.kind == "vector":
                continue
            start = counters.get((rec.layer, rec.kind), 0)
            counters[(rec.layer, rec.kind)] = start + rec.weights.shape[0]
            rows.extend(_record_rows(rec, start))
        columns = list(FRAME_COLUMNS)  # first, in this order; the metadata of set_batch and emit follow
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=columns)
        extra = [c for c in frame.columns if c not in columns]
        return frame[columns + extra]


def _record_rows(rec: _Record, start: int) -> Iterator[dict[str, Any]]:
    w = rec.weights.numpy()
    for b in range(w.shape[0]):
        base = {"query_id": rec.ids[b] if rec.ids is not None else start + b, "layer": rec.layer}
        base.update({k: v[b] for k, v in rec.meta.items()})
        if rec.kind == "gate":
            for e, name in enumerate(rec.names["expert"]):
                yield {**base, "source": None, "destination": None, "expert": name, "code_index": e,
                       "paper_name": rec.paper_names.get(name, name), "weight": float(w[b, e])}
        else:
            # expert / code_index / paper_name describe the destination (one routed cell per row group);
            # the source_* columns give the same for the sending cell, so either axis reads in paper numbering
            for d, dst in enumerate(rec.names["destination"]):
                for s, src in enumerate(rec.names["source"]):
                    yield {**base, "source": src, "destination": dst, "expert": dst, "code_index": d,
                           "paper_name": rec.paper_names.get(dst, dst), "source_code_index": s,
                           "source_paper_name": rec.paper_names.get(src, src), "weight": float(w[b, d, s])}


def _per_query(name: str, values: Any) -> list[Any]:
    """``set_batch``'s values as one plain value per query: a string or a scalar is refused before the forward pass
    (it would fail there, or be spread letter by letter), a tensor becomes numbers (not ``tensor(0)`` objects)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"set_batch({name}=...): expected one value per query (a list), got {values!r}")
    return values.tolist() if hasattr(values, "tolist") else list(values)


def emit(module: torch.nn.Module, layer: str, weights: torch.Tensor, *, kind: str = "gate",
         experts: Sequence[str] | None = None, sources: Sequence[str] | None = None,
         destinations: Sequence[str] | None = None, paper_names: dict[str, str] | None = None,
         ids: Sequence[Any] | None = None, meta: dict[str, Sequence[Any]] | None = None) -> None:
    """Record ``weights`` from ``module`` into every active trace that covers it (no-op otherwise)."""
    if not _ACTIVE:
        return
    for trace in _ACTIVE:
        if id(module) in trace.module_ids:
            trace.records.append(_make_record(trace, layer, weights, kind, experts, sources, destinations,
                                              paper_names, ids, meta))


def _make_record(trace: RouteTrace, layer: str, weights: torch.Tensor, kind: str, experts, sources,
                 destinations, paper_names, ids, meta) -> _Record:
    w = weights.detach().float().cpu()
    if kind == "gate":
        if w.dim() != 2 or experts is None or len(experts) != w.shape[1]:
            raise ValueError(f"gate emission for {layer!r} needs [B, E] weights and E expert names")
        names = {"expert": list(experts)}
    elif kind == "path":
        if w.dim() != 3 or sources is None or destinations is None:
            raise ValueError(f"path emission for {layer!r} needs [B, D, S] weights with source/destination names")
        if (len(destinations), len(sources)) != tuple(w.shape[1:]):
            raise ValueError(f"path emission for {layer!r}: names {len(destinations)}x{len(sources)} "
                             f"do not match weights {tuple(w.shape[1:])}")
        names = {"destination": list(destinations), "source": list(sources)}
    elif kind == "vector":
        names = {}
    else:
        raise ValueError(f"unknown emission kind {kind!r}")
    batch_ids = list(ids) if ids is not None else trace._pending_ids
    # the caller's set_batch columns describe the batch; an emitter's own columns (e.g. DIME's image/caption ids)
    # are added on top. When the emission is not per batch item (DIME scores every image x caption pair), the
    # batch columns cannot be aligned and only the emitter's own columns are kept.
    pending = {k: list(v) for k, v in trace._pending_meta.items() if len(v) == w.shape[0]}
    from_batch = pending if meta else trace._pending_meta
    if (ids is None and trace._pending_ids is not None) or from_batch:
        _use_batch_labels(trace, layer, kind)
    batch_meta = {**from_batch, **{k: list(v) for k, v in (meta or {}).items()}}
    for key, values in ([("ids", batch_ids)] if batch_ids is not None else []) + list(batch_meta.items()):
        if len(values) != w.shape[0]:
            raise ValueError(f"trace {key!r} has {len(values)} entries for a batch of {w.shape[0]} ({layer!r})")
    return _Record(layer, kind, w, names, dict(paper_names or {}), batch_ids, batch_meta)


# the views of the models whose retrieval forward emits no routes (their attention and graph come from own calls)
OTHER_VIEWS = {"cala": "CaLa's HCA/TAC attention: cirlab.workbench.cala_trace (or model.trace)",
               "hrem": "HREM's relation graph: cirlab.workbench.hrem_relation (or cirlab.models.hrem.relation_frames)"}


def nothing_traced(name: str, what: str) -> str:
    """The message for a trace that recorded nothing from model ``name``: which models emit, and where the others'
    views are."""
    view = f"; {OTHER_VIEWS[name]}" if name in OTHER_VIEWS else ""
    return (f"{what} recorded nothing from model {name}: router models emit while traced (AMC's gates in "
            f"encode_query, DIME's paths in score; a model of your own through cirlab.core.tracing.emit){view}")


@contextlib.contextmanager
def trace_routes(model: torch.nn.Module) -> Iterator[RouteTrace]:
    """Record every router emission from ``model``'s modules while the block runs; yields the :class:`RouteTrace`.

    Call ``trace.set_batch(ids=..., **meta)`` before each batch to label its rows, run the model's retrieval
    forward (AMC: ``encode_query``; DIME: ``score``), then read ``trace.to_frame()`` (one row per weight: query_id,
    layer, expert or source/destination, weight, code_index, paper_name, and the metadata) or the tensors
    (``gates``, ``paths``, ``vectors``). A block that records nothing logs a warning that says where the model's
    own view is (CaLa's attention, HREM's relation graph: their retrieval forward has no router)."""
    from cirlab.core.contracts import model_label

    if not isinstance(model, torch.nn.Module):  # a model's name failed as "'str' object has no attribute 'modules'"
        raise TypeError(f"trace_routes needs the model itself (cirlab.create_model(...)), got {model!r}")
    trace = RouteTrace(module_ids={id(m) for m in model.modules()})
    _ACTIVE.append(trace)
    try:
        yield trace
    finally:
        _ACTIVE.remove(trace)
    if not trace.records:  # an empty frame, without a word, was all a CaLa, HREM or BLIP user got
        logging.getLogger("cirlab").warning("%s", nothing_traced(model_label(model), "trace_routes"))


def _use_batch_labels(trace: RouteTrace, layer: str, kind: str) -> None:
    """One forward pass emits each layer once: a layer that comes again under the same ``set_batch`` belongs to a
    second batch, which would carry the first batch's ids (and to_frame's analysis would average the two as one)."""
    if (layer, kind) in trace._pending_used:
        raise ValueError(f"{layer!r} emitted twice under one set_batch: call set_batch before each batch (the second "
                         "batch would carry the first batch's ids)")
    trace._pending_used.add((layer, kind))
