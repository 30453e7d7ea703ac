"""One rule for texts longer than a model reads (AMC, DIME, HREM, the BLIP re-ranker, CaLa).

Every model cuts a caption at a fixed token budget (its position embeddings, or the original's protocol: DIME reads
30 WordPieces). A cut changes what is scored, so it is never silent: the first batch of a model instance that cuts
logs a warning with the count and the limit; later batches log at DEBUG level (an evaluation over thousands of long
captions would otherwise repeat the line for every batch)."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Sequence

import torch

_warned: weakref.WeakSet = weakref.WeakSet()


def say_cut(log: logging.Logger, owner: Any, model: str, cut: int, total: int, limit: int, unit: str,
            longest: int | None = None) -> None:
    """Log that ``cut`` of ``total`` texts were cut to ``limit`` ``unit`` (``unit`` may end with a parenthesis
    saying what the limit counts)."""
    if cut <= 0:
        return
    first = owner not in _warned
    if first:
        _warned.add(owner)
    log.log(logging.WARNING if first else logging.DEBUG,
            "%s: %d of the %d text(s) in a batch were cut to %d %s%s%s", model, cut, total, limit, unit,
            f" (the longest had {longest})" if longest is not None else "",
            "; later cuts by this model are logged at DEBUG level" if first else "")


def hf_cut_count(tokenizer: Any, texts: Sequence[str], mask: torch.Tensor, limit: int) -> int:
    """How many of ``texts`` a ``transformers`` tokenizer call with ``truncation=True, max_length=limit`` cut.

    Only rows that fill the limit (``mask``'s row sum) can have been cut; those are tokenised again one token
    longer, so a text of exactly ``limit`` tokens is not counted and a pasted book costs no more than its first
    ``limit + 1`` tokens."""
    full = [text for text, n in zip(texts, mask.sum(dim=1).tolist()) if n >= limit]
    if not full:
        return 0
    again = tokenizer(full, truncation=True, max_length=limit + 1)["input_ids"]
    return sum(len(ids) > limit for ids in again)
