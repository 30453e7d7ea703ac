"""The protocols' metric names and cut-offs (``avg``, ``R@10``, ``dress_R@10``, ``cirr_Rsubset@1``, ``i2t_R@1``,
``rsum``), without torch: the commands that only name or check metrics (``cirlab data check``, the report's index)
start in a fraction of a second. :mod:`cirlab.core.metrics` computes them and re-exports every name here."""
from __future__ import annotations

import re

AVG = "avg"  # the headline average of a protocol (FIQ overall, Shoes mean, CIRR (R@5 + Rsubset@1) / 2)
# what ``avg`` is, per protocol, in words for tables (cirlab.core.metrics computes it)
AVG_DEFINITIONS = {"fashioniq": "(avg_R@10 + avg_R@50) / 2", "shoes": "(R@1 + R@10 + R@50) / 3",
                   "cirr": "(R@5 + Rsubset@1) / 2"}
RSUM = "rsum"  # ITM: i2t R@1+R@5+R@10 + t2i R@1+R@5+R@10
TIES = ("stable", "optimistic", "pessimistic")
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
FIQ_KS = (10, 50)
SHOES_KS = (1, 10, 50)
CIRR_KS = (1, 5, 10, 50)
RECALL_KS = {"fashioniq": FIQ_KS, "shoes": SHOES_KS, "cirr": CIRR_KS}  # each CIR protocol's recall cut-offs
CIRR_SUBSET_KS = (1, 2, 3)
ITM_KS = (1, 5, 10)
CIRR_VERSION = "rc2"
CIRR_SUBMISSION_K = {"recall": 50, "recall_subset": 3}  # list length per submission file (CIRR test server)


def recall_key(k: int, prefix: str = "") -> str:
    """``"R@10"``, or ``"dress_R@10"`` with a prefix."""
    return f"{prefix}_R@{k}" if prefix else f"R@{k}"


def subset_key(k: int) -> str:
    """CIRR Recall_subset key, ``"cirr_Rsubset@1"``."""
    return f"cirr_Rsubset@{k}"


def is_recall_key(key: str) -> bool:
    """A recall in % that :func:`recall_key`, :func:`subset_key` or :func:`itm_key` names (``"R@10"``,
    ``"dress_R@10"``, ``"cirr_Rsubset@1"``, ``"i2t_R@1"``); not ``avg``, ``rsum`` or a median rank."""
    return re.search(r"(^|_)R(subset)?@\d+$", key) is not None


def itm_key(direction: str, stat: str | int) -> str:
    """``itm_key("i2t", 1) -> "i2t_R@1"``, ``itm_key("t2i", "medr") -> "t2i_medr"``."""
    return f"{direction}_R@{stat}" if isinstance(stat, int) else f"{direction}_{stat}"
