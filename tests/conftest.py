"""Suite-wide settings: `make test` runs two pytest workers on a 2-core machine."""
from __future__ import annotations

import os
import sys
from pathlib import Path

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
