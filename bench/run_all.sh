#!/usr/bin/env bash
# The performance benches of issue 19, each printing its ratios measured side by side (paired, interleaved,
# repeated; medians of per-repeat ratios) and writing reports/benchmarks/<name>.md with its command and machine.
# Full sizes, repeats trimmed where a run would be long: about 12-15 minutes on 2 shared CPU cores.
#   bash bench/run_all.sh            (make bench)
#   PY=python3 bash bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
start=$SECONDS

# ITM / CIRR ranks vs the original loops (about 1 min)
$PY bench/metrics.py
# exact top-K vs faiss IndexFlatIP: 100k x 512 gallery, 5k queries, k = 50, 1 and 2 threads (about 4 min);
# `auto` is bf16 on CPUs with bf16 units, so bf16 is the goal's row and filter the fallback without them
if $PY -c "import faiss" 2>/dev/null; then
    $PY bench/retrieval.py --backends bf16,filter --threads 1,2 --repeats 3
else
    echo "bench/retrieval.py skipped: its anchor needs faiss-cpu (pip install faiss-cpu)" >&2
fi
# DIME full-matrix scoring vs the 64x64 shard loop, 24 x 120 pairs, both directions, fp32 and bf16 (about 5 min)
$PY bench/dime_eval.py --repeats 3
# AMC lite with / without the frozen-feature cache (about 1 min)
$PY bench/amc_cache.py --repeats 5
# DIME tiny training step: profile and A/B (under 1 min)
$PY bench/dime_step.py
echo "bench/run_all.sh: $((SECONDS - start)) s"
