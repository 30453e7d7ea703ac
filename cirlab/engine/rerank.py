"""Two-stage re-ranking: stage I's top-K file -> stage II re-ranking -> the paper's metrics, the re-ranked top-K
file and the CIRR test-server files.

This is the one re-ranking code path: ``cirlab eval`` and ``cirlab train`` reach it through the models'
``evaluate_split`` hooks, ``cirlab submit`` through :func:`cirr_submission`, the rank-shift notebook through
:func:`run_pipeline`, and ``bench/rerank_synthetic.py`` calls the same functions. The pure tensor pieces
(re-ordering, fused scores, target ranks after re-ranking, subset rankings, the submission writer) are in
:mod:`cirlab.core.retrieval`; what is specific to a model is its ``candidate_scorer``.

Protocol of Liu et al., "Candidate Set Re-ranking for Composed Image Retrieval with Dual Multi-modal Encoder", TMLR
2024 (https://github.com/Cuberick-Orion/Candidate-Reranking-CIR, ``validate_stage2.py`` and
``cirr_test_submission_stage2.py``):

* stage I ranks the whole gallery (CIRR: the reference removed first) and keeps a top-K list (the paper saves 200);
* stage II scores the first K of each list (Fashion-IQ 100, CIRR 50) and re-orders them; a query whose target is not
  among the K stays a miss with all queries in the denominator: its target keeps its stage-I rank (> K) in the
  re-ranked top-K file, so R@k for k >= K equals stage I's;
* CIRR Recall_subset re-scores the five non-reference ``img_set`` members with stage II, whatever K;
* CIRR test: the re-ranked top 50 and the best 3 members are what the server files hold.

A re-ranker (``task="rerank"``) offers ``candidate_scorer(split) -> score(rows, candidates)`` (rows index
``split.triplets``, candidates ``split.gallery_names``; [b] x [b, K] -> [b, K] scores) and, to rank without a top-K
file, its first stage as ``.stage1`` (a CIR model).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from cirlab.core import metrics as M
from cirlab.core.contracts import Reranker, eval_mode, model_label
from cirlab.core import retrieval
from cirlab.core.topk import TopK, load_topk, save_topk

logger = logging.getLogger(__name__)

MISS_SCORE = -99999.99  # stage-II score of a query that was not re-scored (the original's fill value)
SUBMISSION_K = 50  # names per query in the CIRR recall file
ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (query rows [b], candidate gallery indices [b, K]) -> scores [b, K]


def _config_error(message: str) -> Exception:
    from cirlab.engine.runs import ConfigError

    return ConfigError(message)


def topk_name(split: Any) -> str:
    """``<split>[_<category>]``: the name of a split's top-K file in a run folder's ``topk/``."""
    return f"{split.split}_{split.category}" if getattr(split, "category", None) else str(split.split)


def topk_dir_for(eval_config: Mapping[str, Any], topk_dir: Any = None) -> Path | None:
    """Where top-K files go: ``topk_dir`` when given, else ``<run>/topk`` for an existing run folder (``run_dir``,
    set by :func:`cirlab.engine.runs.evaluate_split`) unless ``eval.topk`` is false."""
    if topk_dir is not None:
        return Path(topk_dir)
    run = str(eval_config.get("run_dir") or "")
    if run and Path(run).is_dir() and eval_config.get("topk", True):
        return Path(run) / "topk"
    return None


KEEP_RUN_TOPK = "keep_run_topk"  # eval-config flag (cirlab eval): the run folder's own top-K files are kept


def keeps_run_topk(eval_config: Mapping[str, Any], topk_dir: Any, out: Path | None) -> bool:
    """Whether the top-K files go to the run folder's ``topk/`` (``out``, :func:`topk_dir_for`) under cirlab eval's
    rule (:func:`keep_in_run`): no ``topk_dir`` was named and the caller set :data:`KEEP_RUN_TOPK`. ``cirlab train``
    writes them as made."""
    return out is not None and topk_dir is None and bool(eval_config.get(KEEP_RUN_TOPK))


_SAID_UNWRITABLE: set[str] = set()  # run folders already named in a warning (one per folder and evaluation)


def new_evaluation() -> None:
    """Forget the run folders :func:`keep_in_run` named: an evaluation starts (``cirlab eval``, called again)."""
    _SAID_UNWRITABLE.clear()


def keep_in_run(files: Mapping[str, TopK], folder: Path, run: Path) -> list[str]:
    """``cirlab eval``'s writes into a run's ``topk/``: a file already there is never replaced (a stage II's
    ``eval.stage1_topk`` may read it; where the new lists differ, a warning names it and ``--topk-dir``); a missing
    one is written. A folder that cannot be written costs only the files, said once: the metrics stand.
    ``files``: file name -> lists; ``folder``: the run's ``topk/`` (or a folder in it). Returns the paths written."""
    written = []
    for name, topk in files.items():
        path = folder / name
        if path.exists():
            _say_if_replaced_lists_differ(path, topk)
            continue
        try:
            written.append(str(save_topk(path, topk)))
        except OSError as err:
            if not _cannot_write(err):
                raise
            _say_unwritable(run, err)
            break
    return written


def _cannot_write(err: OSError) -> bool:
    """A folder the user may not write (permission, a read-only file system) or a full disk: the run is someone
    else's, or its disk's; the evaluation's metrics do not depend on it."""
    import errno

    from cirlab.core.io import NO_SPACE

    return err.errno in NO_SPACE or err.errno in (errno.EACCES, errno.EPERM)


def _say_unwritable(run: Path, err: OSError) -> None:
    if str(run) in _SAID_UNWRITABLE:
        return
    _SAID_UNWRITABLE.add(str(run))
    logger.warning("%s: cannot write this evaluation's top-K files there (%s); metrics are computed all the same: "
                   "pass --topk-dir DIR to keep the top-K files", run, err.strerror or err)


def _say_if_replaced_lists_differ(path: Path, new: TopK) -> None:
    """A kept file whose lists are not this evaluation's (other data, another category, other weights): said, as the
    file stays what a stage II reads."""
    try:
        old = load_topk(path)
    except (OSError, ValueError) as err:
        logger.warning("%s: kept as it is (cannot read it to compare: %s); pass --topk-dir DIR to keep this "
                       "evaluation's top-K lists", path, getattr(err, "strerror", None) or err)
        return
    if old.k != new.k and same_lists(*(_first(t, min(old.k, new.k)) for t in (old, new))):
        logger.info("%s: kept as it is: it holds the top %d per query, this evaluation's top %d (their first %d "
                    "agree); pass --topk-dir DIR to keep the new ones", path, old.k, new.k, min(old.k, new.k))
    elif not same_lists(old, new):
        logger.warning("%s: kept as it is, though this evaluation's top-K lists differ from it (other data, category "
                       "or weights?); pass --topk-dir DIR to keep the new ones", path)
    else:  # nothing new to write: said, or a re-run could not tell "kept" from "written"
        logger.info("%s: kept as it is (it holds this evaluation's top-K lists already)", path)


def _first(topk: TopK, k: int) -> TopK:
    """The first ``k`` of each of ``topk``'s lists (the target ranks are the full ranking's, whatever the length)."""
    return TopK(topk.query_ids, topk.gallery_ids[:, :k], topk.scores[:, :k], topk.target_rank, topk.category,
                topk.target_ids, topk.meta)


def same_lists(a: TopK, b: TopK) -> bool:
    """Whether two top-K files hold the same lists: queries, candidates, target ranks, and scores up to float
    noise (the meta, with its creation time, is not compared)."""
    if a.query_ids.shape != b.query_ids.shape or a.gallery_ids.shape != b.gallery_ids.shape:
        return False
    return bool((a.query_ids == b.query_ids).all() and (a.gallery_ids == b.gallery_ids).all()
                and (a.target_rank == b.target_rank).all() and np.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5))


def _written_files(folder: Path) -> dict[str, TopK]:
    """The top-K files of a staging folder, by file name."""
    return {path.name: load_topk(path) for path in sorted(folder.glob("*.topk.npz"))}


# ----------------------------------------------------------------------------------------------- stage I


def evaluate_stage1(model: Any, splits: Sequence[Any], *, eval_config: Mapping[str, Any], device: Any,
                    topk_dir: Any = None) -> dict[str, Any]:
    """Stage I is a CIR model: :func:`cirlab.engine.evaluate.evaluate_cir` with its top-K file, ``eval.k`` long
    (200 in the paper), written to :func:`topk_dir_for`."""
    out = topk_dir_for(eval_config, topk_dir)
    if not keeps_run_topk(eval_config, topk_dir, out):
        return _stage1_cir(model, splits, eval_config, device, out)
    with tempfile.TemporaryDirectory(prefix="cirlab-topk-") as staging:  # cirlab eval: the run's files are kept
        result = _stage1_cir(model, splits, eval_config, device, Path(staging))
        result["topk_paths"] = keep_in_run(_written_files(Path(staging)), out, out.parent)
    return result


def _stage1_cir(model: Any, splits: Sequence[Any], eval_config: Mapping[str, Any], device: Any,
                out: Path | None) -> dict[str, Any]:
    from cirlab.engine.evaluate import evaluate_cir

    return evaluate_cir(model, list(splits), eval_config.get("protocol"), device=device,
                        batch_size=int(eval_config.get("batch_size") or 64), k=int(eval_config.get("k") or 200),
                        topk_path=out, meta={"stage": "stage1"}, num_workers=int(eval_config.get("num_workers") or 0))


def load_stage1_topk(source: str | os.PathLike, split: Any, k: int = 0) -> TopK:
    """Stage I's lists for ``split``'s queries, in triplet order, from a ``.topk.npz`` file, a folder of them
    (``<split>[_<category>].topk.npz``) or a stage-I run folder (its ``topk/``). Errors name the file."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "topk" if (path / "topk").is_dir() else path
        path = folder / f"{topk_name(split)}.topk.npz"
    if not path.is_file():
        raise _config_error(f"eval.stage1_topk: no stage-I top-K file {path} ({_missing_topk_hint(source, split)})")
    try:
        topk = load_topk(path)
    except ValueError as err:
        raise _config_error(f"eval.stage1_topk: {err}") from None
    index = {q: i for i, q in enumerate(topk.query_ids)}
    wanted = [str(t.query_id) for t in split.triplets]
    missing = [q for q in wanted if q not in index]
    if missing:
        raise _config_error(f"eval.stage1_topk: {path} has no list for {len(missing)} of the {len(wanted)} queries of "
                            f"{split.dataset} {topk_name(split)} (e.g. {missing[0]!r}): written for another split?")
    _refuse_short_lists(path, topk, split, k)
    rows = np.asarray([index[q] for q in wanted], dtype=np.int64)
    return TopK(topk.query_ids[rows], topk.gallery_ids[rows], topk.scores[rows], topk.target_rank[rows],
                topk.category[rows], topk.target_ids[rows], {**topk.meta, "file": str(path)})


def _missing_topk_hint(source: str | os.PathLike, split: Any) -> str:
    """What to do about a missing stage-I file: a stage-I folder that is gone has usually moved (with this run), and
    writing its files again (the advice for a split it never evaluated) would redo what exists elsewhere."""
    given = Path(source).expanduser()
    if not given.exists():
        return f"{given} does not exist: name where the stage-I run is now with --set eval.stage1_topk=PATH"
    return (f"write it with `cirlab eval STAGE1_RUN --split {split.split}`, or name other files with "
            "--set eval.stage1_topk=PATH")


def _refuse_short_lists(path: Path, topk: TopK, split: Any, k: int) -> None:
    """Stage II re-ranks the first ``k`` of each list, or all of them where the gallery holds fewer (rerank_topk
    clamps): a file of every candidate a query ranks is complete, whatever ``eval.k`` was. A shorter one is refused
    with the ``eval.k`` that would have written enough."""
    from cirlab.engine.evaluate import candidates_per_query

    available = candidates_per_query(split)
    need = min(k, available)
    if not k or topk.k >= need:
        return
    small = f" (the gallery has only {available} candidates per query)" if available < k else ""
    raise _config_error(f"eval.stage1_topk: {path} holds the top {topk.k}, stage II re-ranks {need}{small}: write "
                        f"stage I's top-K with eval.k >= {need}")


def _clamped(k: int, available: int) -> tuple[int, str]:
    """The length of the lists stage II works on for ``eval.k`` = ``k`` where a query has ``available`` candidates
    (rerank_topk clamps), and the words that say why it is shorter ("" where it is not)."""
    if available >= k:
        return k, ""
    return available, f"not {k}: the gallery has only {available} candidates per query"


def check_stage1_topk(model: Any, eval_config: Mapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """Before the first training step: every split the run will re-rank (``loaded``: split name -> its CIR splits,
    as :func:`cirlab.engine.runs.load_split` returns them: the selection split and the final evaluation's) has a
    stage-I top-K in ``eval.stage1_topk`` that lists its queries, names only its gallery and is at least as long as
    the model re-ranks (``model.config.k``). The files are there before training starts, and
    :func:`evaluate_reranker` refuses the same files with the same errors, but only at the first evaluation: an epoch
    of training later, with the run folder left behind. Models that are not re-rankers, re-rankers without the
    evaluation hook (their evaluation is skipped, so they read no file) and an empty ``eval.stage1_topk`` (the
    frozen stage I ranks at evaluation time) have nothing to check."""
    from cirlab.core.contracts import HasOwnEvaluation

    source = eval_config.get("stage1_topk") or ""
    k = getattr(getattr(model, "config", None), "k", None)
    if not source or getattr(model, "task", None) != "rerank" or not isinstance(model, HasOwnEvaluation) or not k:
        return
    for splits in loaded.values():
        for split in splits:
            first = load_stage1_topk(source, split, int(k))
            _gallery_indices(first.gallery_ids[:, :int(k)], split)  # a top-K of another split or protocol


def stage1_topk(model: Any, splits: Sequence[Any], *, eval_config: Mapping[str, Any], device: Any, k: int,
                topk_dir: Path | None = None, kept_in: Path | None = None) -> dict[str, TopK]:
    """Stage I's top-K per split: read from ``eval.stage1_topk`` when set, else ranked now by the re-ranker's own
    frozen first stage (``model.stage1``; the lists are kept under ``<topk_dir>/stage1/`` when there is one, or
    under ``<kept_in>/stage1/`` by :func:`keep_in_run`'s rule)."""
    source = eval_config.get("stage1_topk") or ""
    if source:
        return {topk_name(s): load_stage1_topk(source, s, k) for s in splits}
    first = getattr(model, "stage1", None)
    if first is None:
        raise _config_error(f"{type(model).__name__}: set eval.stage1_topk to the stage-I run (or its top-K files)")
    from cirlab.engine.evaluate import candidates_per_query

    shown, why = _clamped(k, min(candidates_per_query(s) for s in splits))
    logger.info("eval.stage1_topk is empty: ranking with the frozen stage I inside the re-ranker (top %d%s)", shown,
                f", {why}" if why else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = topk_dir / "stage1" if topk_dir is not None else Path(tmp)
        evaluate_stage1(first, splits, eval_config={**eval_config, "k": k, "run_dir": ""}, device=device,
                        topk_dir=out)
        if kept_in is not None:  # the lists re-ranked are this evaluation's, whatever the run folder keeps
            keep_in_run(_written_files(out), kept_in / "stage1", kept_in.parent)
        return {topk_name(s): load_stage1_topk(out, s, k) for s in splits}


# ----------------------------------------------------------------------------------------------- stage II


def _gallery_indices(names: np.ndarray, split: Any) -> Tensor:
    index = split.gallery_index
    flat = [index.get(str(n), -1) for n in names.reshape(-1)]
    if -1 in flat:
        bad = str(names.reshape(-1)[flat.index(-1)])
        raise _config_error(f"the stage-I top-K of {split.dataset} {topk_name(split)} names {bad!r}, which is not in "
                            "that split's gallery: written for another split or protocol?")
    return torch.tensor(flat, dtype=torch.long).reshape(names.shape)


@torch.no_grad()
def rerank_topk(score_fn: ScoreFn, split: Any, stage1: TopK, k: int, *, skip_misses: bool = True,
                batch_size: int = 8, alpha: float = 0.0, meta: Mapping[str, Any] | None = None) -> TopK:
    """Re-rank the first ``k`` candidates of each stage-I list with ``score_fn``.

    A target among the K gets its new position as ``target_rank``; otherwise it keeps the stage-I rank (> K), so
    the query stays a miss with all queries as denominator. With ``skip_misses`` (the original's shortcut, same
    recalls) a query whose target is known to lie outside the K is not scored: its scores are :data:`MISS_SCORE`
    and its stage-I order is kept. Splits without targets (CIRR test1) have every query scored. ``alpha > 0``
    ranks by ``alpha * stage-I score + (1 - alpha) * stage-II score`` (:func:`cirlab.core.retrieval.fuse_scores`);
    the paper uses the stage-II scores alone (``alpha = 0``).
    """
    k = min(int(k), stage1.k)
    candidates = _gallery_indices(stage1.gallery_ids[:, :k], split)  # [Q, K]
    target = torch.tensor(split.target_indices(), dtype=torch.long)
    first_ranks = _removed_missed(torch.from_numpy(stage1.target_rank.astype(np.int64)), split)
    hit = (first_ranks >= 1) & (first_ranks <= k)
    rows = hit.nonzero()[:, 0] if skip_misses and split.has_targets else torch.arange(len(candidates))
    scores = torch.full(candidates.shape, MISS_SCORE)
    order = candidates.clone()
    if len(rows):
        first_scores = torch.from_numpy(stage1.scores[rows.numpy(), :k]) if alpha else None
        new_scores, new_order = retrieval.rerank(score_fn, rows, candidates[rows], batch_size=batch_size,
                                                 stage1_scores=first_scores, alpha=alpha)
        scores[rows], order[rows] = new_scores.float().cpu(), new_order.cpu()
    ranks = retrieval.reranked_target_ranks(order, target, first_ranks)
    info = {**stage1.meta, **dict(meta or {}), "stage": "stage2", "stage1_k": stage1.k, "skip_misses": skip_misses,
            "reranked_queries": int(len(rows)), "alpha": alpha}
    info.pop("file", None)
    return retrieval.make_topk(scores, order, query_ids=list(stage1.query_ids), gallery_ids=split.gallery_names,
                               target=target, ranks=ranks, category=list(stage1.category), meta=info)


def _removed_missed(ranks: Tensor, split: Any) -> Tensor:
    """Ranks read from a top-K file, with a target that is its own removed reference a miss at every cut-off, as the
    stage-I metrics count it (:func:`cirlab.core.metrics.removed_targets_missed`): files of earlier versions hold
    ``G + 1`` there, a hit for a re-ranking K past the gallery size."""
    if not split.exclude_reference:
        return ranks
    return M.removed_targets_missed(ranks, split.target_indices(), split.ref_indices())


def _members(split: Any) -> tuple[Tensor, Tensor]:
    """The split's padded subset members (as the evaluation pads them) and its reference images' indices."""
    from cirlab.engine.evaluate import pad_members

    return pad_members(split.member_indices()), torch.tensor(split.ref_indices(), dtype=torch.long)


@torch.no_grad()
def subset_scores(score_fn: ScoreFn, split: Any, *, batch_size: int = 8) -> Tensor:
    """CIRR: every query's non-reference ``img_set`` members scored by ``score_fn``, in a [Q, G] matrix whose other
    entries are -inf (feed it to :func:`cirlab.core.metrics.cirr_subset_ranks` or
    :func:`cirlab.core.retrieval.subset_topk`)."""
    members, reference = _members(split)
    keep = (members >= 0) & (members != reference[:, None])
    out = torch.full((len(members), len(split.gallery_names)), float("-inf"))
    for i0 in range(0, len(members), batch_size):
        rows = torch.arange(i0, min(len(members), i0 + batch_size))
        cand = members[rows].clamp(min=0)
        s = score_fn(rows, cand).float().cpu()
        valid = keep[rows]
        out[rows[:, None].expand_as(cand)[valid], cand[valid]] = s[valid]
    return out


def subset_ranks(scores: Tensor, split: Any) -> Tensor:
    """Recall_subset ranks (1-based among the five non-reference members) of the queries with a target."""
    from cirlab.engine.evaluate import known_rows

    members, reference = _members(split)
    target = torch.tensor(split.target_indices(), dtype=torch.long)
    known = target >= 0
    return M.cirr_subset_ranks(known_rows(scores, known), target[known], reference[known], members[known])


def reranked_metrics(protocol: str, splits: Sequence[Any], topks: Mapping[str, TopK],
                     subset: Tensor | None = None) -> dict[str, float]:
    """The protocol's metrics (:func:`cirlab.engine.evaluate.cir_protocol_metrics`) from the re-ranked files'
    target ranks, over every query with a known target."""
    from cirlab.engine.evaluate import cir_protocol_metrics, say_no_targets

    ranks = {}
    for split in splits:
        name = topk_name(split)
        known = torch.tensor(split.target_indices()) >= 0
        if bool(known.any()):
            key = split.category or name if protocol == "fashioniq" else name
            ranks[key] = _removed_missed(torch.from_numpy(topks[name].target_rank.astype(np.int64)), split)[known]
    if not ranks:
        say_no_targets([topk_name(split) for split in splits])
        return {}
    return cir_protocol_metrics(protocol, ranks, subset)


def evaluate_reranker(model: Any, splits: Sequence[Any], *, eval_config: Mapping[str, Any], device: Any,
                      topk_dir: Any = None, k: int | None = None, skip_misses: bool = True) -> dict[str, Any]:
    """Re-rank stage I's top-K of each split with ``model`` and report the protocol's metrics.

    ``eval`` keys read: ``stage1_topk`` (stage I's top-K: a run folder, a folder or a file; empty = ranked by
    ``model.stage1``), ``protocol``, ``batch_size`` (queries per scoring call). ``k`` defaults to ``model.config.k``
    (the paper's K); the Figure-8 analysis re-ranks all of stage I's list instead. The re-ranked top-K files go to
    :func:`topk_dir_for`.

    Returns:
        ``{"metrics", "ranks": {name: target ranks}, "query_ids", "topk_paths"}``, as ``evaluate_cir`` returns.
    """
    splits = list(splits)
    k = int(k or model.config.k)
    out_dir = topk_dir_for(eval_config, topk_dir)
    keep = keeps_run_topk(eval_config, topk_dir, out_dir)
    firsts = stage1_topk(model, splits, eval_config=eval_config, device=device, k=k,
                         topk_dir=None if keep else out_dir, kept_in=out_dir if keep else None)
    protocol = eval_config.get("protocol") or splits[0].dataset
    batch = int(eval_config.get("batch_size") or 8)
    topks, subset = {}, None
    with eval_mode(model):
        for split in splits:
            name = topk_name(split)
            score = model.candidate_scorer(split, batch_size=batch)
            topks[name] = rerank_topk(score, split, firsts[name], k, skip_misses=skip_misses, batch_size=batch,
                                      meta={"model": model_label(model)})
            if protocol == "cirr" and split.has_targets:
                subset = subset_ranks(subset_scores(score, split, batch_size=batch), split)
            shown, why = _clamped(k, firsts[name].k)
            logger.info("re-ranked %s: top %d of %d queries (%d scored%s)", name, shown, len(split.triplets),
                        topks[name].meta["reranked_queries"], f"; {why}" if why else "")
    named = {f"{n}.topk.npz": t for n, t in topks.items()}
    if keep:
        paths = keep_in_run(named, out_dir, out_dir.parent)
    else:
        paths = [str(save_topk(out_dir / name, t)) for name, t in named.items()] if out_dir is not None else []
    return {"metrics": reranked_metrics(protocol, splits, topks, subset),
            "ranks": {n: t.target_rank for n, t in topks.items()},
            "query_ids": {n: list(t.query_ids) for n, t in topks.items()}, "topk_paths": paths}


# ----------------------------------------------------------------------------------------------- CIRR test server


@torch.no_grad()
def score_matrix(model: Any, split: Any, *, batch_size: int = 64, device: Any = "cpu") -> Tensor:
    """[Q, G] scores of a CIR model over ``split.gallery_names``: the engine's evaluation scores (query embeddings
    times gallery features, or the model's own gallery scorer)."""
    from cirlab.engine.evaluate import cir_transform, score_split

    model.eval()
    return score_split(model, split, transform=cir_transform(model, None), batch_size=batch_size, device=device,
                       num_workers=0, cache_dir=None)


def cirr_rankings(model: Any, split: Any, *, eval_config: Mapping[str, Any], device: Any,
                  topk_dir: Any = None) -> tuple[list[list[str]], list[list[str]]]:
    """The two name lists of a CIRR submission for ``model`` on ``split``: the top 50 with the reference removed
    and the best 3 non-reference members. A re-ranker re-orders stage I's first K (positions past K keep stage I's
    order) and scores the members itself; a CIR model ranks by its embeddings."""
    batch = int(eval_config.get("batch_size") or 64)
    reference = torch.tensor(split.ref_indices(), dtype=torch.long)
    # the server's 50 names per query need a gallery of 51 (the reference is never listed): said at once for a
    # stage II too, which otherwise refused stage I's shorter top-K file first, with advice that could not work
    retrieval.check_k(SUBMISSION_K, len(split.gallery_names), reference)
    if not isinstance(model, Reranker):
        return retrieval.cirr_rankings(score_matrix(model, split, batch_size=batch, device=device), reference,
                                       _members(split)[0], split.gallery_names, k=SUBMISSION_K)
    k = int(model.config.k)
    first = stage1_topk(model, [split], eval_config=eval_config, device=device, k=max(k, SUBMISSION_K),
                        topk_dir=topk_dir_for(eval_config, topk_dir))[topk_name(split)]
    _refuse_short_submission(first, split)
    model.eval()
    score = model.candidate_scorer(split, batch_size=batch)
    top = rerank_topk(score, split, first, k, batch_size=batch)
    ranked = [list(a[:k]) + list(b[k:SUBMISSION_K]) for a, b in zip(top.gallery_ids, first.gallery_ids)]
    members, reference = _members(split)
    best = retrieval.subset_topk(subset_scores(score, split, batch_size=batch), reference, members, 3)
    names = np.asarray(split.gallery_names)
    return ranked, names[best.numpy()].tolist()


def _refuse_short_submission(first: TopK, split: Any) -> None:
    """Stage I's lists fill the recall file past the re-ranked K; load_stage1_topk accepts a list of every candidate
    however short, but the server wants :data:`SUBMISSION_K` names, which a smaller gallery cannot give."""
    if first.k < SUBMISSION_K:
        raise _config_error(f"CIRR submission: the stage-I top-K of {split.dataset} {topk_name(split)} holds the top "
                            f"{first.k} (every candidate of its {len(split.gallery_names)}-image gallery), but the "
                            f"test server's recall file lists {SUBMISSION_K} names per query")


def check_submission(submission: Mapping[str, Mapping[str, Any]], split: Any) -> None:
    """Beyond the server schema (:func:`cirlab.core.metrics.validate_cirr_submission`): exactly the split's pair
    ids, gallery names only, never the query's reference, subset names from its own ``img_set``."""
    pair_ids = [t.query_id for t in split.triplets]
    gallery = set(split.gallery_names)
    for metric, obj in submission.items():
        M.validate_cirr_submission(obj, pair_ids=pair_ids)
        for t in split.triplets:
            names = obj[str(int(t.query_id))]
            bad = [n for n in names if n not in gallery] or [n for n in names if n == t.ref_name]
            if metric == "recall_subset":
                allowed = set(t.extras.get("members") or ()) - {t.ref_name}
                bad = bad or [n for n in names if allowed and n not in allowed]
            if bad:
                raise ValueError(f"CIRR submission ({metric}): pair {t.query_id} lists {bad[0]!r}, which is not a "
                                 "valid candidate (outside the gallery, the reference, or outside its img_set)")


def cirr_submission(model: Any, split: Any, *, eval_config: Mapping[str, Any], device: Any = "cpu",
                    topk_dir: Any = None) -> dict[str, dict[str, Any]]:
    """The two CIRR test-server dicts (``recall``, ``recall_subset``) of ``model`` on ``split``, validated
    against the split; write them with :func:`cirlab.core.retrieval.save_cirr_submission`."""
    if split.dataset != "cirr":
        raise _config_error(f"CIRR submissions are for the CIRR dataset, not {split.dataset!r}")
    ranked, subset = cirr_rankings(model, split, eval_config=eval_config, device=device, topk_dir=topk_dir)
    submission = M.cirr_submission([t.query_id for t in split.triplets], ranked, subset)
    check_submission(submission, split)
    return submission


# ----------------------------------------------------------------------------------------------- whole pipeline


def pipeline_configs(dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike, *,
                     preset: str = "tiny", k: int = 50, stage1: Sequence[str] = (),
                     stage2: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run configs of both stages on one dataset root (or a data root holding ``<dataset>/``): stage I writes its
    top-``k`` (``eval.k``); stage II starts its streams from stage I's text encoder (``init_from: stage1``; the
    paper starts them from BLIP), freezes that stage I (``stage1_checkpoint``), re-ranks all ``k`` candidates and reads
    stage I's top-K files (``eval.stage1_topk``). ``stage1`` / ``stage2`` are ``--set``-style overrides
    (``train.epochs=3``)."""
    from cirlab.data.catalog import canonical_name, dataset_root
    from cirlab.engine.runs import apply_overrides, parse_set, validate_config, with_defaults

    out = Path(output_dir)
    data_root = dataset_root(dataset, data_root)  # <data_root>/<dataset> when the root holds several layouts
    dataset = canonical_name(dataset)  # "fiq", "CIRR": the comparisons below lost the protocol and test1
    options = {"protocol": "rerank"} if dataset == "fashioniq" else {}  # the paper's Fashion-IQ gallery and captions
    test = "test1" if dataset == "cirr" else "val"
    base = {"preset": preset, "dataset": {"name": dataset, "root": str(data_root), "category": None,
                                          "test_split": test, "options": options},
            "train": {"selection": "last", "progress": "log", "tensorboard": False, "eval_every": 0}}
    first = with_defaults({**base, "name": "stage1", "model": "blip_rerank_stage1", "output_dir": str(out / "stage1"),
                           "eval": {"splits": ["val"], "k": k}})
    second = with_defaults({**base, "name": "stage2", "model": "blip_rerank_stage2",
                            "output_dir": str(out / "stage2"),
                            "model_overrides": {"init_from": "stage1", "stage1_checkpoint": str(out / "stage1"),
                                                "rerank_k": k},
                            "eval": {"splits": ["val"], "stage1_topk": str(out / "stage1"), "batch_size": 16}})
    configs = (apply_overrides(first, parse_set(stage1)), apply_overrides(second, parse_set(stage2)))
    for config in configs:
        validate_config(config, f"rerank pipeline {config['name']}")
    return configs


def run_pipeline(dataset: str, data_root: str | os.PathLike, output_dir: str | os.PathLike, *, preset: str = "tiny",
                 k: int = 50, stage1: Sequence[str] = (), stage2: Sequence[str] = (),
                 device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train stage I, write its top-``k``, train stage II on it and re-rank: what ``cirlab train`` does with the
    two configs of :func:`pipeline_configs`, in one call (the rank-shift notebook's Figure 8).

    Returns ``{"stage1": metrics.json, "stage2": metrics.json, "stage1_topk": folder, "stage2_topk": folder}``.
    A re-run replaces the two runs it finished before; any other run in ``<output_dir>/stage1`` or ``stage2`` is
    refused (both checked before anything trains) unless ``overwrite``.
    """
    from cirlab.engine.runs import run_experiment
    from cirlab.engine.train import claim_for_recipe, mark_recipe_run

    first, second = pipeline_configs(dataset, data_root, output_dir, preset=preset, k=k, stage1=stage1, stage2=stage2)
    replace = [claim_for_recipe(c["output_dir"], overwrite=overwrite, resume=False, what="re-rank pipeline folder",
                                fix="choose another output folder, or pass overwrite=True") for c in (first, second)]
    result = {}
    for config, again in zip((first, second), replace):
        result[config["name"]] = run_experiment(config, device=device, overwrite=again)
        mark_recipe_run(config["output_dir"])
    return {**result, "stage1_topk": str(Path(first["output_dir"]) / "topk"),
            "stage2_topk": str(Path(second["output_dir"]) / "topk")}
