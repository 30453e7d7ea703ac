"""The global random streams of Python, NumPy and torch: seeding them, and drawing under a seed without taking them
from the caller.

``create_model(seed=)`` draws a model's initial weights under its seed. Some weights are drawn later, when the
training data is known (AMC's word embeddings and the tiny presets' BERT vocabulary rows, in ``fit_vocab``): those
continue the model's own seeded streams (:func:`model_streams`), so ``create_model(seed=0)`` then
``model.fit_vocab(train)`` gives the weights it gave when the call reseeded the whole process, and the caller's
streams are given back after each part: a notebook that draws its own random numbers between the calls gets the
numbers it got without them.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

from cirlab.core.config import MAX_SEED

_MODEL_STREAMS = "_cirlab_streams"  # the attribute a seeded model keeps its streams under, between its draws


def seed_streams(seed: int) -> None:
    """Seed Python, NumPy and torch with ``seed`` (NumPy with ``seed`` modulo its range: a derived seed, seed +
    rank, may pass it)."""
    random.seed(seed)
    np.random.seed(seed % (MAX_SEED + 1))
    torch.manual_seed(seed)


def random_streams() -> tuple[Any, ...]:
    """The global random streams of Python, NumPy and torch (CUDA's when it was started), to put back later."""
    return (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def restore_streams(streams: tuple[Any, ...]) -> None:
    """Put back streams :func:`random_streams` took (torch's ``initial_seed`` with them)."""
    random.setstate(streams[0])
    np.random.set_state(streams[1])
    torch.random.set_rng_state(streams[2])
    if streams[3] is not None:
        torch.cuda.set_rng_state_all(streams[3])


@contextlib.contextmanager
def kept_streams() -> Iterator[None]:
    """The caller's random streams as they were before the block, after it (what the block draws does not move
    them): a model built only to be overwritten by a checkpoint's weights."""
    kept = random_streams()
    try:
        yield
    finally:
        restore_streams(kept)


@contextlib.contextmanager
def seeded_streams(seed: int) -> Iterator[list[tuple[Any, ...]]]:
    """Draw under ``seed`` inside the block; on leaving it, the caller's streams are given back and the yielded
    list holds the seeded streams where the block left them (to continue later, :func:`model_streams`)."""
    after: list[tuple[Any, ...]] = []
    with kept_streams():
        seed_streams(seed)
        yield after
        after.append(random_streams())


def keep_model_streams(model: Any, streams: tuple[Any, ...]) -> None:
    """Remember on ``model`` the streams its seeded build left, for :func:`model_streams`."""
    object.__setattr__(model, _MODEL_STREAMS, streams)  # a plain attribute, past nn.Module's bookkeeping


@contextlib.contextmanager
def model_streams(model: Any) -> Iterator[None]:
    """Inside the block, draw from ``model``'s own seeded streams (those its ``create_model(seed=)`` build left,
    advanced by every earlier block), and give the caller's back on leaving; a model built without a seed draws
    from the global streams as they are."""
    streams = getattr(model, _MODEL_STREAMS, None)
    if streams is None:
        yield
        return
    with kept_streams():
        restore_streams(streams)
        yield
        keep_model_streams(model, random_streams())
