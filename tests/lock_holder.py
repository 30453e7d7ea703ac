"""A cirlab lock held by another thread for the length of a block: another thread opens the lock file anew, so the
OS lock meets it exactly as it would another process (cirlab.core.io.folder_lock), without a subprocess's start-up."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ContextManager, Iterator


@contextlib.contextmanager
def held_by_another_thread(lock: Callable[[], ContextManager[Any]]) -> Iterator[None]:
    """Run the block while another thread holds ``lock()`` (e.g. ``lambda: folder_lock(path)``)."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock():
            taken.set()
            done.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(30), "the other thread never took the lock"
        yield
    finally:
        done.set()
        thread.join(30)
