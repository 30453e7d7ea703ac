"""Suite-wide settings: `make test` runs two pytest workers on a 2-core machine."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

# tests import their helpers (fixtures_data, naive_metrics, stub_models) by module name
sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread per worker: two workers with two threads each oversubscribe two cores, and small tensor ops
# then spend most of their time waiting for a core (measured: a BLIP tiny step 2.6 s with 2 threads vs 0.06 s with 1
# under load). Set before torch is imported by any test module; notebooks run by tests inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _own_cirlab_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The suite's own cirlab cache, shared by the run's workers (generation there is locked): the caller's
    (~/.cache/cirlab) got 17 MB of synthetic data and a report kernel's home from every run, and an entry left
    broken there by an older cirlab made unrelated tests fail. Tests that need another cache still set their own."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cirlab-cache"
    folder.mkdir(exist_ok=True)
    os.environ["CIRLAB_CACHE"] = str(folder)
    os.environ.pop("XDG_CACHE_HOME", None)


@pytest.fixture(autouse=True)
def _zone_as_tz() -> Iterator[None]:
    """After each test, the C library's time zone is $TZ's again: a test that set TZ and called tzset left the
    zone it set once monkeypatch had put the variable back, and later log lines named the wrong zone."""
    yield
    time.tzset()
