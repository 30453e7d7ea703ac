#!/usr/bin/env bash
# The performance benches (issue 19), each printing its ratios measured side by side (paired, interleaved, repeated)
# and writing reports/benchmarks/<name>.md with its command and machine. About 10-15 minutes on 2 CPU cores.
#   bash bench/run_all.sh            (make bench)
#   PY=python3 bash bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

$PY bench/metrics.py                                             # ITM / CIRR ranks vs the original loops
$PY bench/retrieval.py --backends bf16,filter,blocks --threads 1,2  # exact top-K vs faiss IndexFlatIP (needs faiss-cpu)
$PY bench/dime_eval.py                                           # DIME full-matrix scoring vs the 64x64 shard loop
$PY bench/amc_cache.py                                           # AMC lite with / without the frozen-feature cache
$PY bench/dime_step.py                                           # DIME tiny training step: profile and A/B
