"""The top-K file: one format shared by evaluation, re-ranking and the rank-shift notebook.

A top-K file is a NumPy ``.npz`` archive (load with ``allow_pickle=False``) holding, for Q queries:

=================  ===========  ===============================================================
key                shape/dtype  meaning
=================  ===========  ===============================================================
``query_ids``      [Q] str      query id (CIRR ``pairid``, Fashion-IQ ``{category}:{index}``, ...)
``gallery_ids``    [Q, K] str   the K best gallery item names, best first
``scores``         [Q, K] f32   their scores (higher is better)
``target_rank``    [Q] int64    1-based rank of the target in the *full* ranking; 0 = unknown
                                (no ground truth, e.g. CIRR test1); for re-ranked files a target
                                outside the candidate pool keeps a rank > K (counted as a miss)
``category``       [Q] str      per-query group (Fashion-IQ category, CIRR "cirr", ...), may be ""
``target_ids``     [Q] str      target name ("" when unknown)
``meta``           [] str       JSON: model, dataset, split, stage, protocol, k, created
=================  ===========  ===============================================================
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.core.io import atomic_path


@dataclass
class TopK:
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    scores: np.ndarray
    target_rank: np.ndarray
    category: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        q = len(self.query_ids)
        self.query_ids = np.asarray(self.query_ids).astype(str)
        self.gallery_ids = np.asarray(self.gallery_ids).astype(str).reshape(q, -1)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(q, -1)
        self.target_rank = np.asarray(self.target_rank, dtype=np.int64).reshape(q)
        self.category = np.asarray(self.category if self.category is not None else [""] * q).astype(str)
        self.target_ids = np.asarray(self.target_ids if self.target_ids is not None else [""] * q).astype(str)
        if self.gallery_ids.shape != self.scores.shape:
            raise ValueError(f"gallery_ids {self.gallery_ids.shape} and scores {self.scores.shape} differ")
        for name in ("category", "target_ids"):
            if len(getattr(self, name)) != q:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {q} queries")

    @property
    def k(self) -> int:
        return int(self.gallery_ids.shape[1])

    def __len__(self) -> int:
        return len(self.query_ids)

    def to_frame(self) -> Any:
        """One row per query: query_id, category, target_id, target_rank, top1 id."""
        import pandas as pd

        return pd.DataFrame({"query_id": self.query_ids, "category": self.category, "target_id": self.target_ids,
                             "target_rank": self.target_rank,
                             "top1": self.gallery_ids[:, 0] if self.k else [""] * len(self)})


def save_topk(path: str | os.PathLike, topk: TopK) -> Path:
    """Write atomically (temp file + rename) so a reader never sees a partial file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez would append ".npz" to a name
        np.savez_compressed(fh, query_ids=topk.query_ids, gallery_ids=topk.gallery_ids, scores=topk.scores,
                            target_rank=topk.target_rank, category=topk.category, target_ids=topk.target_ids,
                            meta=np.array(json.dumps(topk.meta, sort_keys=True)))
    return path


_REQUIRED = ("query_ids", "gallery_ids", "scores", "target_rank")


def load_topk(path: str | os.PathLike) -> TopK:
    """Read a top-K file, naming the file and the missing key when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"top-K file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a cirlab top-K file (missing {missing})")
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            return TopK(z["query_ids"], z["gallery_ids"], z["scores"], z["target_rank"],
                        z["category"] if "category" in z.files else None,
                        z["target_ids"] if "target_ids" in z.files else None, meta)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot read top-K file ({err})") from err
