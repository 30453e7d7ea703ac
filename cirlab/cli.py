"""The ``cirlab`` command line: ``train``, ``eval``, ``data``, ``report``, ``submit``, ``convert``, ``models``
(:data:`EXAMPLES` is what ``cirlab --help`` shows under them)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from cirlab.core.cliargs import Parser, command_parser
from cirlab.core.paths import user_path
from cirlab.core.threads import launch_rank

logger = logging.getLogger("cirlab")
DEFAULT_CHECKPOINT = "best.pt"  # the file --checkpoint picks in a run folder's checkpoints/ by default

# exit statuses (docs/architecture.md lists them all): 2 the user's input is at fault (fix it, then run again);
# 3 the command ran and found problems (cirlab.core.errors.EXIT_FOUND: data check's, a report's failed entry);
# 75, sysexits.h's EX_TEMPFAIL, a retry may succeed as it is (the folder is in use by another cirlab process, the
# disk is full or over quota); 128 + N a stop signal (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1, 129 SIGHUP on Linux)
EXIT_INPUT = 2
EXIT_RETRY = 75

EXAMPLES = """examples (from the repository root; `cirlab COMMAND --help` explains each command):
  cirlab data synth --size tiny --out data/synth                 # the embedded synthetic sets
  cirlab train configs/amc_synthetic_tiny.yaml --set train.max_steps=20 --output-dir runs/demo
  cirlab train configs/hrem_synthetic_tiny.yaml --output-dir runs/hrem    # also cala_, dime_ configs
  cirlab train configs/amc_fashioniq.yaml --set dataset.root=$CIRLAB_DATA/fashioniq --resume
  torchrun --nproc_per_node=4 -m cirlab.cli train configs/blip_rerank_cirr_stage1.yaml   # multi-GPU
  cirlab eval runs/demo --split test
  cirlab eval released/model_best.pth --model hrem --preset f30k --dataset f30k  # DIME's too (no --trust-pickle)
  cirlab submit runs/cirr_stage2 --out submissions                # CIRR test-server files
  cirlab convert --from lavis blip2_pretrained.pth cala_init.pt --model cala
  cirlab models --params cala                                     # parameters per module, no weights read
  cirlab models --settings hrem --preset f30k                     # preset fields + the paper's recipe
  cirlab runs runs/                                               # every run under runs/: state, step, metrics
  cirlab cache --unused-for 30 --remove                           # free cache entries not used for 30 days
  cirlab report                                                   # every notebook headless -> reports/
  cirlab notebooks my-notebooks                                   # copies to open in JupyterLab
installed from a wheel (no checkout): name a shipped config without its folder, e.g. cirlab train amc_synthetic_tiny
"""


def _add_train(subparsers: Any) -> None:
    from cirlab.core.shipped import shipped_configs

    p = subparsers.add_parser(
        "train", help="train a model from a YAML run config",
        epilog=f"configs cirlab ships (pass the name): {', '.join(shipped_configs()) or 'none found'}",
        description="Train one model as a run config describes (model, preset, dataset, train, eval sections; see "
                    "configs/ and cirlab.engine.runs), then evaluate checkpoints/best.pt and write the run folder: "
                    "config.yaml, checkpoints/, log.jsonl, train_summary.json, metrics.json, topk/ (CIR models; "
                    "and tb/ when tensorboard is installed and train.tensorboard is on). Under torchrun the same "
                    "command trains with DistributedDataParallel (train.batch_size is the global batch).")
    p.add_argument("config", type=user_path,
                   help="run config YAML (e.g. configs/amc_synthetic_tiny.yaml), or the name of a config cirlab ships "
                        "(amc_synthetic_tiny; see the list below)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, value parsed as YAML; repeatable "
                        "(e.g. --set train.lr=2e-4 --set dataset.root=PATH/TO/fiq --set dataset.category=[dress])")
    p.add_argument("--output-dir", default=None, type=user_path,
                   help="run folder (default: for a run folder's own config.yaml, that folder, wherever it has "
                        "moved; else the config's output_dir, else $CIRLAB_RUNS/<config name>, ./runs/<config name> "
                        "without CIRLAB_RUNS)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output-dir>/checkpoints/last.pt when it exists (exact: same losses as an "
                        "uninterrupted run); the stored config.yaml must match (differences are listed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its config.yaml, checkpoints/, log.jsonl, tb/, "
                        "metrics.json, topk/, submission/), removed once the data and the model have been checked "
                        "and training starts; without it or --resume a folder holding a run is refused")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even though training settings differ from the stored config.yaml "
                        "(they are logged)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: train.device, 'auto')")
    p.setting_hint = _setting_hint
    p.set_defaults(func=_run_train)


def _setting_hint(flag: str) -> str | None:
    """What an unknown ``cirlab train`` option that names a setting is (the original training scripts' flags:
    ``--batch_size 32``, ``--lr 1e-4``, ``--margin 0.2``): the ``--set`` entry to use, else None."""
    from cirlab.core.config import field_names
    from cirlab.engine.runs import model_fields
    from cirlab.engine.train import TrainConfig
    from cirlab.models.registry import get_entry, list_models

    name = flag.lstrip("-").replace("-", "_")
    if name in field_names(TrainConfig) or name in TrainConfig.ORIGINAL_NAMES:
        return f"settings are config entries here: --set train.{TrainConfig.ORIGINAL_NAMES.get(name, name)}=VALUE"
    owners: dict[str, list[str]] = {}
    for model in list_models():
        renamed = getattr(get_entry(model).config_cls, "ORIGINAL_NAMES", {})
        key = name if name in model_fields(model) else renamed.get(name)
        if key:  # an entry of another section (HREM's --lr_schedules: train.lr_milestones) is named with it
            owners.setdefault(key if "." in key else f"model_overrides.{key}", []).append(model)
    if not owners:
        return None
    return "settings are config entries here: " + "; ".join(
        f"--set {key}=VALUE ({', '.join(models)})" for key, models in owners.items())


def _add_eval(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a run folder or a checkpoint",
        description="Evaluate a trained model. RUN_OR_CHECKPOINT is a run folder (its config.yaml and "
                    "checkpoints/best.pt are used) or a checkpoint file (cirlab checkpoints know their model; "
                    "others need --model/--preset). Prints the metrics as JSON and writes them with --output.")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT", type=user_path, help="run folder or checkpoint file")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="checkpoint inside a run folder's checkpoints/ (default: best.pt; last.pt also works, and "
                        "either without .pt)")
    p.add_argument("--config", default=None, type=user_path,
                   help="run config YAML describing the dataset (default: the run folder's config.yaml)")
    p.add_argument("--dataset", default=None, help="dataset name: fashioniq | shoes | cirr | f30k | coco")
    p.add_argument("--root", default=None, type=user_path,
                   help="dataset root (default: config, else $CIRLAB_DATA/<dataset> for CIR data, $CIRLAB_DATA for "
                        "f30k / coco precomp; a run's recorded root comes before CIRLAB_DATA, also when it is gone)")
    p.add_argument("--category", default=None, action=_Once,
                   help="one Fashion-IQ category (default: the run's dataset.category, else every category the split "
                        "has on disk, reported each)")
    p.add_argument("--split", action="append", default=None,
                   help="split(s) to evaluate; repeatable (default: the config's eval.splits, else the validation "
                        "split: val, or dev for f30k / coco)")
    p.add_argument("--protocol", default=None,
                   help="CIR: fashioniq | shoes | cirr (default: the dataset's); ITM: full (= f30k, the whole "
                        "matrix) | coco1k | coco5k | coco (1K and 5K; COCO's default, on its test split only)")
    p.add_argument("--k", type=int, default=None, help="top-K file length (default: the run config's eval.k)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="encoding batch size (default: the run config's eval.batch_size)")
    p.add_argument("--topk-dir", default=None, type=user_path,
                   help="write top-K files to this folder (CIR); top-K files of the evaluated splits already there are "
                        "refused unless --overwrite. Without it a re-ranker run's own topk/ gets only the files it "
                        "lacks")
    p.add_argument("--output", default=None, type=user_path,
                   help="also write the metrics JSON to this file (an existing one is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file and the --topk-dir files of the evaluated splits")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--model", default=None, help="model name, for checkpoints that do not record it")
    p.add_argument("--preset", default=None, help="model preset, with --model")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that pickle Python objects (e.g. released whole-model files); this runs "
                        "code from the file, only for sources you trust")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry (as for train), e.g. --set eval.shard_size=500")
    p.add_argument("--ensemble", action="append", default=[], metavar="RUN_OR_CHECKPOINT", type=user_path,
                   help="evaluate RUN_OR_CHECKPOINT together with this model as one ensemble; repeatable. AMC: "
                        "mean of the members' cosines (the original eval_ensemble.py); DIME: DIME* = mean of the "
                        "members' score matrices (e.g. an i2t and a t2i run). The dataset and the evaluation "
                        "settings come from the first member, the positional RUN_OR_CHECKPOINT")
    p.set_defaults(func=_run_eval)


def _add_models(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list registered models and their presets; count a model's parameters",
                              description="List every registered model with its task and presets. With --params "
                                          "MODEL: its parameters per module (total, trainable, frozen), built on "
                                          "the meta device, so a paper preset counts in seconds without memory, "
                                          "weights or a GPU (a hub BERT named bert-base-uncased counts at BERT-base "
                                          "sizes); the small tiny and lite presets are built on the CPU.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--params", metavar="MODEL", default=None,
                       help="count MODEL's parameters per module instead of listing the models")
    which.add_argument("--settings", metavar="MODEL", default=None,
                       help="print the settings a run of MODEL starts from: its preset's model fields "
                            "(model_overrides.FIELD in a run config) and the paper's training recipe (train.FIELD)")
    p.add_argument("--preset", default=None, help="with --params or --settings: the preset (default: the first paper "
                                                   "preset by name, e.g. cala -> cirr, hrem -> coco)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --params or --settings: model config fields, e.g. --set encoder=both")
    p.set_defaults(func=_run_models)


def _add_runs(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "runs", help="list the runs under a folder: state, last step, best val, final metrics",
        description="List every run folder at or under DIR, one row each, read from the folders alone: model, "
                    "preset, dataset, state (running: its lock is held; finished; stopped (SIGTERM) / failed / "
                    "error, as its last start ended; trained: the final evaluation is owed, --resume runs it; "
                    "killed: a start that never recorded its end), last logged step, best validation score, each "
                    "final split's value of the selection metric, the disk it takes (and how much of it is the "
                    "training state only --resume reads: checkpoints/last.pt), start and end time, and the message "
                    "of a stop or failure (cirlab.analysis.runs_table).")
    p.add_argument("folder", metavar="DIR", nargs="?", default=None, type=user_path,
                   help="folder to search (default: $CIRLAB_RUNS, else ./runs)")
    p.add_argument("--json", action="store_true", help="print one strict-JSON list of rows instead of a table")
    p.set_defaults(func=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from cirlab.core.io import json_text
    from cirlab.core.paths import runs_dir
    from cirlab.workbench.analysis import runs_table

    table = runs_table(args.folder or runs_dir())
    if args.json:
        print(json_text(table.to_dict(orient="records"), indent=None))
    elif table.empty:
        print(f"no runs under {args.folder or runs_dir()}")
    else:
        header, rows = _runs_text_rows(table)
        _print_columns(header, rows, numbers=[h for h in header if h not in _RUNS_TEXT_COLUMNS])
        for _, row in table[table["message"].notna()].iterrows():  # whole lines: a cut message says nothing
            print(f"{row['run']}: {row['message']}")
        finished = table[(table["state"] == "finished") & (table["resume state"] > 0)]
        if len(finished):  # the largest files a run keeps, which only a resume reads
            print(f"{len(finished)} finished run(s) keep {byte_text(int(finished['resume state'].sum()))} in "
                  "checkpoints/last.pt, the training state only --resume reads: delete it to free that, unless you "
                  "will train the run further (the results, cirlab eval and a re-run of the run's notebook need "
                  "checkpoints/best.pt)")
    return 0


_RUNS_TEXT_COLUMNS = ("run", "model", "preset", "dataset", "state", "metric", "ended (UTC)")  # left-aligned text


def _runs_text_rows(table: Any) -> tuple[list[str], list[list[str]]]:
    """``cirlab runs``'s table as text: a column per final split holding each run's own selection metric (a column
    per split and metric made the table 300 columns wide with four models), a long summed metric named short, the
    end time to the minute; ``--json`` keeps every column as it is."""
    metrics = {m for m in table["metric"] if isinstance(m, str)}
    finals = [c for c in table.columns if " " in c and c.split(" ", 1)[1] in metrics]
    splits = sorted(dict.fromkeys(c.split(" ", 1)[0] for c in finals), key=lambda s: s not in ("val", "dev"))
    header = [*_RUNS_TEXT_COLUMNS[:5], "step", "metric", "best val", *splits, "size", "resume state", "ended (UTC)"]
    rows = []
    for _, row in table.iterrows():
        metric = row["metric"] if isinstance(row["metric"], str) else None
        values = [row.get(f"{split} {metric}") if metric else None for split in splits]
        ended = row.get("ended")
        rows.append([str(row["run"]), *(_cell(row[c]) for c in ("model", "preset", "dataset", "state", "step")),
                     _short_metric(metric) if metric else "-", _cell(row["best val"]), *map(_cell, values),
                     byte_text(row["size"]), byte_text(row["resume state"]),
                     str(ended)[:16].replace("T", " ") if isinstance(ended, str) else "-"])
    return header, rows


def _cell(value: Any) -> str:
    """A table cell: ``-`` for nothing, a float to 2 decimals (41.375 -> 41.38), a whole number as it is."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _short_metric(name: str, width: int = 24) -> str:
    """A summed selection metric too long for a column (CaLa's seven CIRR recalls) as its ends and its count."""
    terms = name.split("+")
    return name if len(name) <= width or len(terms) < 3 else f"{terms[0]}+...+{terms[-1]} ({len(terms)} summed)"


def byte_text(count: int) -> str:
    """``"91.2 MB"``, ``"812 kB"``, ``"0 B"``: a size as the table shows it (decimal units, as ``du --si``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        value = count / scale
        text = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"  # rounded first: 999.6 kB is "1.0 MB"
        if float(text) >= 1 and (unit == "TB" or float(text) < 1000):
            return f"{text} {unit}"
    return f"{count} B"


def _add_cache(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cache", help="list what cirlab's cache holds (size, last use); remove what was not used for days",
        description=_wrapped(
            "List the entries of cirlab's cache ($CIRLAB_CACHE, else ~/.cache/cirlab): generated data sets, "
            "feature stores, encoded galleries, BLIP ViT token files, the emoji set's npm package; each "
            "with its size and when it was last used (its files' newest write or read; most Linux mounts "
            "record a read at most once a day). Everything there is made again when needed, so --remove "
            "only costs the time to remake it. Entries cirlab did not write whole (a file you added to a "
            "data set), the report kernels' files and locks are listed but never removed; a data set or "
            "token file being written is kept, and so is a data set a running cirlab process reads (a training, "
            "an evaluation, a notebook's kernel: until it ends). A run whose recorded data was removed gets it "
            "made again when it is next evaluated or resumed."),
        epilog="examples:\n  cirlab cache                               # a line per area, the largest first\n"
               "  cirlab cache --list                        # a line per entry\n"
               "  cirlab cache --unused-for 30               # what --remove would remove\n"
               "  cirlab cache --unused-for 30 --remove      # free it\n"
               "  cirlab cache --unused-for 0 --remove       # empty the cache (all it may remove)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unused-for", metavar="DAYS", type=_days, default=None,
                   help="list only the entries not used for DAYS days (a number >= 0; 0 lists every removable one)")
    p.add_argument("--remove", action="store_true",
                   help="remove the entries --unused-for lists (it must be given), and say what that freed")
    p.add_argument("--list", action="store_true", help="a line per entry (default: a line per area)")
    p.add_argument("--json", action="store_true", help="print one strict-JSON list of entries instead of a table")
    p.set_defaults(func=_run_cache)


def _wrapped(text: str) -> str:
    """A description for a parser whose epilog keeps its line breaks (RawDescriptionHelpFormatter), wrapped as
    argparse would wrap it (to the terminal, at most 100 columns)."""
    import shutil
    import textwrap

    # argparse copes with any width; textwrap refuses one below 1 (COLUMNS=1 or 2 failed every command)
    return textwrap.fill(text, width=max(min(shutil.get_terminal_size().columns, 100) - 2, 20))


def _days(text: str) -> float:
    """``--unused-for``: a finite number of days >= 0."""
    import math

    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (math.isfinite(days) and days >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
    return days


def _run_cache(args: argparse.Namespace) -> int:
    from cirlab.core.paths import cache_dir
    from cirlab.workbench.cache import cache_entries, unused_entries

    from cirlab.core.errors import ConfigError

    if args.remove and args.unused_for is None:
        raise ConfigError("cirlab cache: --remove needs --unused-for DAYS (0 removes every entry it may remove)")
    root = cache_dir()
    entries = cache_entries(root)
    shown = entries if args.unused_for is None else unused_entries(entries, args.unused_for)
    if not args.json:
        print(f"cirlab's cache: {root} {_cache_origin()}")
    if args.remove:  # with --json, one row per entry it was asked to remove: removed, kept or failed, and why
        return _remove_cache_entries(shown, as_json=args.json)
    if args.json:
        from cirlab.core.io import json_text

        print(json_text([_cache_row(e) for e in shown], indent=None))
        return 0
    _print_cache_table(shown, entries, args.unused_for, args.list)
    return 0


def _cache_origin() -> str:
    for var in ("CIRLAB_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(var, "").strip():
            return f"(from ${var})"
    return "(the default; set CIRLAB_CACHE to move it)"


def _cache_row(entry: Any) -> dict[str, Any]:
    import datetime as dt

    used = None if entry.last_used is None else \
        dt.datetime.fromtimestamp(entry.last_used, dt.timezone.utc).isoformat(timespec="seconds")
    return {"entry": entry.label, "kind": entry.kind, "size": entry.size, "last used": used, "kept": entry.kept}


def _print_cache_table(shown: Sequence[Any], entries: Sequence[Any], days: float | None, every: bool) -> None:
    import time

    if not entries:
        print("it holds nothing yet")
        return
    now = time.time()
    if days is None and not every:  # a line per area: a cache holds hundreds of token files and stores
        _print_columns(("area", "entries", "size", "last used", "least recently used"), _area_rows(entries, now))
    elif shown:
        ordered = sorted(shown, key=lambda e: (e.area, e.last_used or 0.0, e.name))
        _print_columns(("entry", "kind", "size", "last used"),
                       [(e.label, e.kind, byte_text(e.size), _age_text(now, e.last_used)) for e in ordered])
    for entry in shown if days is not None or every else entries:
        if entry.kept:
            print(f"{entry.label} is kept by --remove: {entry.kept}")
    total = sum(e.size for e in entries)
    if days is None:
        print(f"{len(entries)} {_entries_word(len(entries))}, {byte_text(total)} in all"
              + ("" if every else "; --list shows each")
              + "; `cirlab cache --unused-for DAYS` lists those not used for DAYS days, which --remove then removes")
    else:
        free = [e for e in shown if e.kept is None]
        print(f"{len(shown)} of {len(entries)} {_entries_word(len(entries))} not used for {days:g} days"
              + (f"; adding --remove removes {len(free)} of them, {byte_text(sum(e.size for e in free))} of the "
                 f"{byte_text(total)} the cache takes" if shown else ""))


def _area_rows(entries: Sequence[Any], now: float) -> list[tuple[str, ...]]:
    """One row per area of the cache, the largest first: entries, bytes, the newest and the oldest last use."""
    areas: dict[str, list[Any]] = {}
    for entry in entries:
        areas.setdefault(entry.area or entry.name, []).append(entry)
    rows = []
    for area, held in sorted(areas.items(), key=lambda item: -sum(e.size for e in item[1])):
        used = [e.last_used for e in held if e.last_used is not None]
        own = len(held) == 1 and not held[0].area  # a top-level folder listed whole (report-home, jupyter, locks)
        rows.append((area, "-" if own else str(len(held)), byte_text(sum(e.size for e in held)),
                     _age_text(now, max(used, default=None)), "-" if own else _age_text(now, min(used, default=None))))
    return rows


def _print_columns(header: Sequence[str], rows: Sequence[Sequence[str]],
                   numbers: Sequence[str] = ("size", "entries")) -> None:
    """A plain table: text columns left-aligned, the ``numbers`` columns (sizes, counts, scores) right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = {i for i, h in enumerate(header) if h in numbers}
    for row in (header, *rows):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def _age_text(now: float, then: float | None) -> str:
    """``"3.5 days ago"``, ``"5 h ago"``, ``"12 min ago"``, ``"now"``: how long since a last use (``-``: none)."""
    if then is None:
        return "-"
    seconds = now - then
    if seconds < 60:
        return "now"
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            value = seconds / scale
            return f"{value:.1f} {unit} ago" if unit == "days" and value < 10 else f"{value:.0f} {unit} ago"
    return "now"


def _remove_cache_entries(entries: Sequence[Any], *, as_json: bool = False) -> int:
    """Remove ``entries``, a line each (``as_json``: one strict-JSON list of rows at the end); 1 when one could not
    be removed (one kept by rule is no failure)."""
    from cirlab.workbench.cache import CacheEntryKept, CacheRemovalError, remove_entry

    freed, kept, failed, rows = 0, 0, 0, []
    for entry in entries:
        row = {**_cache_row(entry), "removed": False, "why": None}
        rows.append(row)
        try:
            size = remove_entry(entry)
        except (CacheEntryKept, CacheRemovalError) as err:
            failed += isinstance(err, CacheRemovalError)
            kept += isinstance(err, CacheEntryKept)
            row["why"] = str(err)
            if not as_json:
                print(err)
            continue
        freed += size
        row["removed"] = True
        if not as_json:
            print(f"removed {entry.label} ({byte_text(size)})")
    if as_json:
        from cirlab.core.io import json_text

        print(json_text(rows, indent=None))
    elif not entries:
        print("nothing to remove")
    else:
        notes = [f"{n} {_entries_word(n)} {what} (above)" for n, what in ((kept, "kept"), (failed, "not removed")) if n]
        print(f"freed {byte_text(freed)}" + "".join(f"; {note}" for note in notes))
    return 1 if failed else 0


def _entries_word(count: int) -> str:
    return "entry" if count == 1 else "entries"


def _add_notebooks(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "notebooks", help="copy the notebooks cirlab ships into a folder, to open them in JupyterLab",
        description="Copy the notebooks cirlab ships (quickstart, train, evaluate, router_explorer, rank_shift) into "
                    "DIR, to open and run there in JupyterLab; outside a checkout their runs go to runs/ beside "
                    "them (inside one, to the checkout's runs/; $CIRLAB_RUNS overrides both). An installed wheel "
                    "has no checkout: its notebooks lie inside the package, where nothing should be written. "
                    "Missing notebooks are copied; unchanged copies already in DIR are kept, and so are ones that "
                    "differ (edited, run, or from another cirlab version), unless --overwrite.")
    p.add_argument("out", metavar="DIR", nargs="?", default="cirlab-notebooks", type=user_path,
                   help="folder to copy them into (default: ./cirlab-notebooks; made if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the copies in DIR that differ from the shipped notebooks, keeping each as "
                        "NAME.ipynb.bak (then .bak2, ...)")
    p.set_defaults(func=_run_notebooks)


# Sub-commands owned by other modules: (name, module, hook, help). Their modules load only when the command is
# the one being run (or for a full parser): `cirlab --help` and `cirlab models` then import no numpy or torch.
_DELEGATED = (
    ("data", "cirlab.data.cli", "add_subcommands", "dataset tools: check a tree, write the synthetic or emoji sets"),
    ("report", "cirlab.workbench.report", "register_cli", "run the notebooks headless and regenerate reports/"),
    ("submit", "cirlab.rerank_cli", "register_cli", "write the CIRR test-server files of a run"),
    ("convert", "cirlab.rerank_cli", "register_cli",
     "convert checkpoints between original (BLIP, CaLa) / LAVIS layouts and cirlab"),
)


def _add_delegated(subparsers: Any, name: str, module_name: str, hook: str) -> None:
    module = importlib.import_module(module_name)
    if name == "data":
        p = subparsers.add_parser("data", help=dict((d[0], d[3]) for d in _DELEGATED)["data"],
                                  description="Dataset tools: validate trees, build the offline datasets.")
        inner = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
        getattr(module, hook)(inner)
    elif name not in subparsers.choices:  # one hook may add several commands (submit and convert)
        getattr(module, hook)(subparsers)


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _version() -> str:
    """``cirlab X (torch Y, transformers Z)``: what a bug report needs, read without importing either package."""
    from importlib.metadata import PackageNotFoundError, version

    from cirlab import __version__

    found = []
    for dist in ("torch", "transformers"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"cirlab {__version__} ({', '.join(found)})"


class _VersionAction(argparse.Action):
    """``--version``: the package metadata is read only when it is asked for, not on every command's start."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_version())
        parser.exit()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``cirlab`` parser; with ``argv``, only the sub-command being run loads its module (the others appear
    in ``--help`` by name and help line)."""
    parser = Parser(
        prog="cirlab", description="cirlab: composed image retrieval and image-text matching workbench.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print cirlab's version (and torch's, transformers') and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_eval(subparsers)
    command = _command_of(argv) if argv is not None else None
    for name, module_name, hook, help_text in _DELEGATED:
        if argv is None or command == name:
            _add_delegated(subparsers, name, module_name, hook)
        elif name not in subparsers.choices:
            subparsers.add_parser(name, help=help_text, add_help=False)
    _add_models(subparsers)
    _add_runs(subparsers)
    _add_cache(subparsers)
    _add_notebooks(subparsers)
    _accept_verbose_after_the_command(parser)
    return parser


def _accept_verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``cirlab train X -v`` as ``cirlab -v train X``: every sub-command (nested ones too) takes ``-v``. Its
    default is left out of the namespace so that the top-level flag is not overwritten by the sub-parser."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
            if "-v" not in sub._option_string_actions and "--verbose" not in sub._option_string_actions:
                sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="debug logging (as cirlab -v)")
            _accept_verbose_after_the_command(sub)


# ----------------------------------------------------------------------------------------------- commands


def _run_train(args: argparse.Namespace) -> int:
    from cirlab.core.errors import ConfigError
    from cirlab.engine.runs import is_main_process, load_config, run_experiment

    config = load_config(args.config, args.overrides)  # a missing file or a malformed --set: said before torch loads
    from cirlab.engine.train import TrainingInterrupted
    resuming = args.resume or bool((config.get("train") or {}).get("resume"))  # the flag, or train.resume
    if args.allow_config_change and not resuming:  # it qualifies a resume: alone it would be ignored
        raise ConfigError("--allow-config-change applies to a resume (--resume or train.resume; it accepts a resumed "
                          "run's changed settings); without one there is nothing to allow")
    output_dir = args.output_dir or _run_folder_of_config(Path(args.config), config, args.overrides)
    try:
        result = run_experiment(config, output_dir=output_dir, resume=args.resume, device=args.device,
                                overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except TrainingInterrupted as err:
        if not args.overwrite:
            raise
        # "the same command plus --resume" of an --overwrite run was refused: the two flags contradict each other
        raise TrainingInterrupted(str(err).replace("the same command plus --resume",
                                                   "the same command plus --resume, without --overwrite"),
                                  err.signum) from None
    if is_main_process():  # under torchrun every process returns the same gathered metrics
        from cirlab.core.io import json_text

        run = Path(result["checkpoint"]).parents[1]  # <run>/checkpoints/best.pt
        # metrics.json's record and the run folder, as strict JSON: the keys `cirlab eval` prints (checkpoint,
        # model, splits) read the same from both; the splits alone gave a script no way to the run
        print(json_text({**result, "run_dir": str(run.resolve())}))
        logger.info("run written to %s (metrics.json, checkpoints/best.pt; cirlab eval %s evaluates it again)",
                    run, shlex.quote(str(run)))
    return 0


def _run_folder_of_config(path: Path, config: dict[str, Any], overrides: Sequence[str]) -> Path | None:
    """The folder ``path`` lies in when it is a run folder's own config.yaml (checkpoints/ or provenance.json
    beside it) and neither --output-dir nor ``--set output_dir=`` names another: the run is where its config is.
    Its recorded ``output_dir`` is absolute, so a moved or received run folder resumed (or trained) into the old
    path, re-creating it, and left the run that was meant untouched."""
    from cirlab.engine.runs import parse_set

    folder = path.parent
    if path.name != "config.yaml" or not ((folder / "checkpoints").is_dir() or (folder / "provenance.json").is_file()):
        return None
    if any(keys[0] == "output_dir" for keys, _ in parse_set(overrides)):  # said on the command line: it stands
        return None
    recorded = str(config.get("output_dir") or "")
    if recorded and Path(recorded).expanduser().resolve() != folder.resolve():
        logger.info("%s is a run folder's config.yaml: the run is %s, not the output_dir it records (%s; moved or "
                    "copied?): writing there (--output-dir names another folder)", path, folder, recorded)
    return folder


def _refuse_unread_sections(overrides: Sequence[tuple[list[str], Any]], model: str | None) -> None:
    """``cirlab eval --set train.lr=...`` was accepted and read by nothing (typos and wrong types included): eval
    rebuilds the model its checkpoint records and trains nothing. ``model_overrides`` are read only for a
    checkpoint that records no model (``--model``)."""
    from cirlab.core.errors import ConfigError

    read = ("dataset", "eval", "model_overrides") if model else ("dataset", "eval")
    for path, _ in overrides:
        if path[0] not in read:
            raise ConfigError(f"--set {'.'.join(path)}: cirlab eval reads only the {' and '.join(read)} sections "
                              "(the model and its weights come from the checkpoint, nothing is trained)"
                              + ("; model_overrides apply with --model, to a checkpoint that records no model"
                                 if path[0] == "model_overrides" else ""))


def _warn_if_the_data_changed(run_dir: Path, config: dict[str, Any]) -> None:
    """The files defining the data under the root read now differ from those the run was trained on (regenerated
    synthetic data, an edited split file, another stage-I top-K): its numbers here will not match metrics.json."""
    from cirlab.data.fingerprint import summary
    from cirlab.engine.runs import data_changes_since, data_folder

    diffs = data_changes_since(run_dir, config)
    stage1 = str((config.get("eval") or {}).get("stage1_topk") or "")
    # a path that is wrong, not changed data (its error says so); or none: stage II ranks with its frozen stage I,
    # the other documented source of its lists (--set eval.stage1_topk=), whose files are not read at all
    if not stage1 or not Path(stage1).expanduser().exists():
        diffs = [d for d in diffs if not d.startswith("eval.stage1_topk/")]
    if diffs:
        logger.warning("%s was trained on other data than %s holds now (%s): these results are not comparable with "
                       "its metrics.json", run_dir, data_folder(config), summary(diffs))


def _eval_config(args: argparse.Namespace, run_dir: Path | None) -> dict[str, Any]:
    from cirlab.core.errors import ConfigError
    from cirlab.engine.runs import (apply_overrides, merge_config, parse_set, read_config_file, validate_blaming,
                                    with_defaults)

    config_path = Path(args.config) if args.config else (run_dir / "config.yaml" if run_dir else None)
    # the file the config comes from: --config (which must exist), else the run folder's config.yaml if any
    source = config_path if args.config or (config_path is not None and config_path.is_file()) else None
    raw = read_config_file(source, "--config" if args.config else "") if source is not None else {}
    if raw.get("model_name") == raw.get("model"):  # older cirlab.fit runs repeated the model's name there
        raw.pop("model_name", None)
    config = with_defaults(raw)
    base = copy.deepcopy(config)  # what the file says, before the flags and --set change it
    # (section, field, flag, value) of each flag given: the config entries it sets, and how to name it in an error
    given = [(section, field, flag, value) for section, field, flag, value in (
        ("dataset", "name", "--dataset", args.dataset), ("dataset", "root", "--root", args.root),
        ("dataset", "category", "--category", args.category), ("eval", "protocol", "--protocol", args.protocol),
        ("eval", "k", "--k", args.k), ("eval", "batch_size", "--batch-size", args.batch_size),
        ("eval", "splits", "--split", args.split)) if value is not None]
    cli: dict[str, dict[str, Any]] = {"dataset": {}, "eval": {}}
    for section, field, _, value in given:
        cli[section][field] = value
    if args.dataset and not args.root and not args.config:
        config["dataset"]["synthetic"] = None
    other = bool(args.dataset) and not _same_dataset(args.dataset, config["dataset"].get("name"))
    if other:  # the stored dataset section (root, categories, split names, options), its protocol and its split
        # list belong to its own dataset: another dataset starts from the defaults (the flags still apply)
        config["dataset"] = copy.deepcopy(with_defaults({})["dataset"])
        config["eval"].update(protocol=None, splits=None)
    config = merge_config(config, cli)
    if (other or source is None) and config["dataset"].get("name"):
        _catalog_splits(config["dataset"])
    overrides = parse_set(args.overrides)
    _refuse_unread_sections(overrides, getattr(args, "model", None))
    for path, _ in overrides:  # the flag's value was replaced by --set's without a word (--split val --set eval...)
        clash = [(flag, value, f"{section}.{field}") for section, field, flag, value in given
                 if [section, field][:len(path)] == path[:2]]
        if clash:
            flag, value, entry = clash[0]
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"{flag} {shown} and --set {'.'.join(path)} both set {entry}: give one of them")
    config = apply_overrides(config, overrides)
    if not config["dataset"].get("name"):
        if source is not None:  # a run of the Python API (cirlab.fit) records none
            raise ConfigError(f"cirlab eval: {source} records no dataset (a cirlab.fit run is given its data "
                              "in Python): pass --dataset and --root")
        raise ConfigError("cirlab eval: no dataset: pass --dataset (or --config, or a run folder)")
    stored_root = (base.get("dataset") or {}).get("root")
    # earlier versions recorded a relative root as typed: read against this folder, which may hold other data
    if (source is not None and not args.config and not args.root and stored_root
            and stored_root == config["dataset"].get("root") and not Path(str(stored_root)).expanduser().is_absolute()):
        logger.warning("%s gives a relative dataset.root %r, read from this folder as %s: the run may have read "
                       "other data; pass --root to say which", source, stored_root,
                       Path(str(stored_root)).expanduser().absolute())
    _refuse_unread_output_flags(args, config)
    flags = [f"{flag} {value}" for _, _, flag, value in given]
    validate_blaming(config, base, str(source) if source is not None else "cirlab eval",
                     flags + [f"--set {o}" for o in args.overrides], for_eval=True, check_train=bool(args.config))
    # the run's model, whatever --config says (without --config, config.yaml of the run is the config read above)
    model = getattr(args, "model", None) or (_run_model(run_dir) if args.config else None) or config.get("model")
    blamed = ([f"--model {args.model}"] if getattr(args, "model", None)  # the flag that named the model
              else flags + ([f"--config {args.config}"] if args.config else []))
    _refuse_a_task_mismatch(model, config["dataset"]["name"], blamed)
    return config


def _refuse_gone_recorded_paths(run_dir: Path | None, config: dict[str, Any], args: argparse.Namespace) -> None:
    """A path a run folder's config.yaml records (absolute) that is gone: a moved checkout, a run received from a
    colleague. Its dataset root was called a root the user had given, with CIRLAB_DATA advised (a recorded root
    comes before it); a re-ranker's stage-I top-K files were to be written again (after a warning of other data),
    though they usually lie at the new path. Each is said as what it is, with the flag that names it now."""
    from cirlab.core.errors import ConfigError, InputError, MissingPathError
    from cirlab.data.base import missing_root_hint
    from cirlab.engine.runs import read_run_config

    if run_dir is None:
        return
    recorded = read_run_config(run_dir)
    root = _gone(recorded, config, "dataset", "root") if args.root is None and args.config is None else None
    if root is not None and _unreadable(root):
        raise InputError(f"{root}: the dataset root recorded in {run_dir / 'config.yaml'} cannot be read here "
                         "(permission denied): ask its owner for access, or pass --root PATH to a copy of the data")
    from cirlab.data.generators.synthetic import settings_of_root

    if root is not None and settings_of_root(root) is None:  # a generated set is made again where it is read
        hint = missing_root_hint(str(config["dataset"]["name"]), str(root), recorded_in=run_dir / "config.yaml")
        raise MissingPathError(f"{root}: dataset root not found ({hint})")
    stage1 = _gone(recorded, config, "eval", "stage1_topk")
    if stage1 is not None and _unreadable(stage1):
        raise InputError(f"eval.stage1_topk: {stage1}, recorded in {run_dir / 'config.yaml'}, cannot be read here "
                         "(permission denied): ask its owner for access, or name a copy of the stage-I run with "
                         "--set eval.stage1_topk=PATH")
    if stage1 is not None:
        raise ConfigError(f"eval.stage1_topk: {stage1}, recorded in {run_dir / 'config.yaml'}, does not exist (the "
                          "stage-I run moved, or this run came from another machine?): name the stage-I run folder "
                          "(or its top-K files) here with --set eval.stage1_topk=PATH")


def _gone(recorded: dict[str, Any], config: dict[str, Any], section: str, key: str) -> Path | None:
    """The recorded ``section.key`` path where this command still uses it (no --set gave another) and it is gone, or
    cannot be looked at (:func:`_unreadable`: a folder above it the user may not read)."""
    value = (recorded.get(section) or {}).get(key)
    if not value or str(value) != str((config.get(section) or {}).get(key)):
        return None
    path = Path(str(value)).expanduser()
    return path if _unreadable(path) or not path.exists() else None


def _unreadable(path: Path) -> bool:
    """Whether looking at ``path`` is denied (Python 3.11's ``exists()`` raises PermissionError there)."""
    try:
        path.exists()
    except PermissionError:
        return True
    return False


def _run_model(run_dir: Path | None) -> str | None:
    """The model a run folder's config.yaml names (None without one)."""
    from cirlab.engine.runs import read_run_config

    return read_run_config(run_dir).get("model") if run_dir is not None else None


def _refuse_a_task_mismatch(model: Any, dataset: str, flags: Sequence[str]) -> None:
    """A CIR run evaluated on f30k (``--dataset f30k``, another run's ``--config``), or the reverse: said as
    ``cirlab train`` says it, before any data is read (it failed in the data code or the evaluator)."""
    from cirlab.engine.runs import refuse_task_mismatch

    if not model:
        return
    try:
        refuse_task_mismatch(str(model), dataset, f"cirlab eval{' ' + ', '.join(flags) if flags else ''}")
    except KeyError:  # not a registered name: the checkpoint's loader says what it is
        return


def _same_dataset(a: Any, b: Any) -> bool:
    from cirlab.data.catalog import canonical_name

    return b is not None and canonical_name(str(a)) == canonical_name(str(b))


def _catalog_splits(dataset: dict[str, Any]) -> None:
    """Without a config, the split names are the release's own (:mod:`cirlab.data.catalog`: f30k's validation
    split is dev, CIRR's test split test1); an unknown name is left for the config check to report."""
    from cirlab.engine.runs import release_split_names

    release_split_names(dataset, {})  # as a config that names none


class _Once(argparse.Action):
    """An option taken once: a second ``--category`` beside a repeatable ``--split`` looked like a list, and
    argparse kept only the last."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): it takes one value")
        setattr(namespace, self.dest, values)


def checkpoint_of(target_arg: str, name: str, command: str = "cirlab eval") -> tuple[Path, Path | None]:
    """(checkpoint file, its run folder or None) of a run folder or checkpoint path given to ``command``; ``name``
    (``--checkpoint``) picks the file in a run folder, and with a file given it must be the default."""
    from cirlab.core.errors import CheckpointError

    target = Path(target_arg)
    if not target.exists():
        raise CheckpointError(f"{target}: no such run folder or checkpoint file")
    run_dir = target if target.is_dir() else None
    if run_dir is None and name.removesuffix(".pt") != DEFAULT_CHECKPOINT.removesuffix(".pt"):  # read by nothing
        raise CheckpointError(f"{command} {target} --checkpoint {name}: --checkpoint picks a file in a run folder's "
                              f"checkpoints/, and {target} is a checkpoint file itself; pass the run folder with "
                              f"--checkpoint {name}, or the file you want")
    folder = target / "checkpoints"
    if run_dir is not None and not (folder / name).is_file() and (folder / f"{name}.pt").is_file():
        name = f"{name}.pt"  # --checkpoint best, as workbench.load_run(checkpoint="best") names it
    if run_dir is not None and not (folder / name).is_file():
        have = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
        from cirlab.core.config import closest

        # a slip of the name ("bset") is its near spelling; a run without best.pt (no evaluation yet) has last.pt
        near = closest(name.removesuffix(".pt"), [h.removesuffix(".pt") for h in have])
        other = f"{near}.pt" if near else "last.pt" if "last.pt" in have else have[0] if have else ""
        what = "is not a run folder (no checkpoints/)" if not folder.is_dir() else \
            f"has no checkpoints/{name} (a run still training or stopped early?); it has {', '.join(have)}: try " \
            f"--checkpoint {other}" if other else f"has no checkpoints/{name} nor any other checkpoint (a run that " \
            "has not saved one yet)"
        raise CheckpointError(f"{run_dir} {what}")
    checkpoint = folder / name if run_dir else target
    if run_dir is None:  # a file given: say what it is before the config is looked for (a text file read "no dataset")
        from cirlab.core.checkpoint import check_checkpoint_file

        check_checkpoint_file(checkpoint)
    if run_dir is None and (target.parent.parent / "config.yaml").is_file() and target.parent.name == "checkpoints":
        run_dir = target.parent.parent  # a checkpoint inside a run folder: use that run's config
    return checkpoint, run_dir


def _refuse_unread_output_flags(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """``--topk-dir`` and ``--k`` where nothing reads them: an ITM evaluation writes no top-K file (it scores whole
    matrices), and a stage-II re-ranker writes the candidates it was trained to re-rank
    (``model_overrides.rerank_k``; the warning for ``--k`` blamed the run's config.yaml and advised a model setting
    that ``cirlab eval`` refuses)."""
    from cirlab.core.errors import ConfigError
    from cirlab.data.catalog import is_itm
    from cirlab.models.registry import get_entry

    k = getattr(args, "k", None)
    for flag, value in (("--topk-dir", getattr(args, "topk_dir", None)), ("--k", k)):
        if value is not None and is_itm(str(config["dataset"]["name"])):
            raise ConfigError(f"{flag} {value}: top-K files are for composed retrieval (CIR) rankings; "
                              f"{config['dataset']['name']} is image-text matching, scored as whole score matrices")
    named = getattr(args, "model", None) or config.get("model")
    if k is None or not named:
        return
    try:
        task = get_entry(str(named)).task
    except (KeyError, ValueError):  # an unknown model: its own error comes later
        return
    if task == "rerank":
        raise ConfigError(f"--k {k}: {named} re-ranks and writes the top model_overrides.rerank_k candidates "
                          "per query it was trained with (0: the paper's K), which cirlab eval does not change: "
                          "drop --k")


def _refuse_a_mixed_run(run_dir: Path | None, checkpoint: Path, model: Any, args: argparse.Namespace) -> None:
    """A run folder whose config.yaml names another model than its checkpoint holds (a folder assembled from two
    runs, a shared "CaLa run" holding AMC weights): its numbers would be reported as the config's model's."""
    from cirlab.core.errors import CheckpointError

    named = _run_model(run_dir) if not getattr(args, "model", None) else None
    if named and named != model.model_name:
        raise CheckpointError(f"{run_dir}: its config.yaml names model {named!r}, but {checkpoint} holds a "
                              f"{model.model_name!r} model: the folder mixes two runs. Evaluate the checkpoint file "
                              "with --dataset/--root (or --config) to score it as what it is")


def _blame_a_writer(run_dir: Path | None, checkpoint: Path) -> None:
    """A checkpoint seen a moment ago is gone: when a live cirlab process holds the run folder (a ``train
    --overwrite`` of it), say so instead of a bare "checkpoint not found"."""
    from cirlab.core.errors import CheckpointError
    from cirlab.core.io import lock_holder

    if run_dir is None or checkpoint.exists():
        return
    holder = lock_holder(run_dir)
    if holder:
        err = CheckpointError(f"{checkpoint} vanished before it was read: {run_dir} is being written by another "
                              f"cirlab process ({holder}), e.g. a `cirlab train --overwrite` of it; evaluate when "
                              "it finishes")
        err.exit_code = EXIT_RETRY  # type: ignore[attr-defined]  # the folder in use: the same command, later
        raise err from None


def _run_eval(args: argparse.Namespace) -> int:
    from cirlab.core.errors import CheckpointError, UnknownNameError
    from cirlab.engine.runs import load_splits, model_from_checkpoint, parse_set, protocol_of

    checkpoint, run_dir = checkpoint_of(args.target, args.checkpoint)  # a missing run: said before torch loads
    if run_dir is not None and (run_dir / "log.jsonl").is_file() and not (run_dir / "train_summary.json").is_file():
        from cirlab.core.io import lock_holder

        holder = lock_holder(run_dir)
        why = f"still training: {holder}" if holder else "no train_summary.json: it stopped"
        logger.warning("%s: the run did not finish (%s); evaluating %s as it is now", run_dir, why, checkpoint)
    config = _eval_config(args, run_dir)
    if run_dir is not None:  # the run is where it was given, not where its config.yaml says it was trained (a copy
        config["output_dir"] = str(run_dir.absolute())  # or a moved run: a stage I writes its top-K into its own)
    splits = config["eval"].get("splits") or [config["dataset"]["val_split"]]
    _check_eval_outputs(args, splits)
    _refuse_gone_recorded_paths(run_dir, config, args)
    try:
        loaded = load_splits(config, splits)  # a wrong --root fails before the model loads
    except UnknownNameError as err:
        flag = {"split": ("--split", args.split or []), "category": ("--category", [args.category])}.get(err.field)
        if flag and err.name in flag[1]:  # the flag set it, not the config: blame the flag
            raise UnknownNameError(f"{flag[0]} {err.name}: {err.reason}", err.field, err.name, err.reason) from None
        raise
    from cirlab.engine.train import resolve_device

    device = resolve_device(args.device, "--device")
    if run_dir is not None:
        from cirlab.engine.runs import say_unrecorded_image_read

        _warn_if_the_data_changed(run_dir, config)
        say_unrecorded_image_read(run_dir, config)
    asked: dict[str, Any] = {}  # the model fields this command line asks for (--set model_overrides.F=V or ={...})
    for path, value in parse_set(args.overrides):
        if path[0] == "model_overrides":
            asked.update(value if len(path) == 1 and isinstance(value, dict) else {".".join(path[1:]): value})
    try:
        model, meta = model_from_checkpoint(checkpoint, model=args.model, preset=args.preset,
                                            trust_pickle=args.trust_pickle, overrides=config.get("model_overrides"),
                                            asked=asked)
    except CheckpointError:
        _blame_a_writer(run_dir, checkpoint)
        raise
    _refuse_a_mixed_run(run_dir, checkpoint, model, args)
    splits = _splits_worth_evaluating(args, config, loaded, type(model))  # before the evaluation, the long part
    if meta.get("converted_from") and "ignored" in meta:  # the paper's own layout, converted as it was read
        logger.info("%s: read as the %s layout; ignored: %s; kept as built (not in the file): %s", checkpoint,
                    meta["converted_layout"], _key_groups(meta.get("ignored")), _key_groups(meta.get("kept_as_built")))
    elif meta.get("converted_from"):  # a file `cirlab convert` wrote: what it came from (the layout, where recorded)
        logger.info("%s: written by cirlab convert from %s%s", checkpoint, meta["converted_from"],
                    f" ({meta['converted_layout']} layout)" if meta.get("converted_layout") else "")
    if args.ensemble:
        from cirlab.engine.runs import make_ensemble

        files = [checkpoint] + [checkpoint_of(m, args.checkpoint)[0] for m in args.ensemble]
        members = [model] + [model_from_checkpoint(path, model=args.model, preset=args.preset,
                                                   trust_pickle=args.trust_pickle,
                                                   overrides=config.get("model_overrides"), asked=asked)[0]
                                   for path in files[1:]]
        model = make_ensemble(members, [str(path) for path in files])
    model.to(device)
    results = _evaluate_splits(args, model, config, splits, loaded, device)
    from cirlab.core.provenance import code_version

    # what a paper's table needs to say where a number came from: the file (absolute: the record is read from
    # elsewhere), the code that scored it and the settings given here (as a run's metrics.json has its config.yaml)
    record: dict[str, Any] = {"checkpoint": str(checkpoint.resolve()), "model": model.model_name, "splits": results,
                              "protocols": {split: protocol_of(config, split) for split in splits},
                              "code": code_version(), "settings": list(args.overrides)}
    if args.ensemble:
        record["ensemble"] = [str(path.resolve()) for path in files]
    from cirlab.core.contracts import HasEvalPrecision

    if isinstance(model, HasEvalPrecision):  # DIME's "auto" scores in bf16 on some CPUs, fp32 on others
        record["eval_precision"] = model.eval_precision(device)
    from cirlab.core.io import json_text, write_text

    text = json_text(record)  # what is printed is what --output holds: strict JSON, non-ASCII paths as themselves
    print(text)
    if args.output:

        if args.overwrite:
            write_text(args.output, text + "\n")
        else:
            _write_new(Path(args.output), text + "\n", command="cirlab eval --output")
    return 0


def _evaluate_splits(args: argparse.Namespace, model: Any, config: dict[str, Any], splits: Sequence[str],
                     loaded: dict[str, Any], device: Any) -> dict[str, Any]:
    """Each split's metrics. Without ``--overwrite``, a top-K file that appeared in ``--topk-dir`` after the check
    before the work (a second eval writing there) is not replaced: the usual one-line refusal."""
    from cirlab.core.io import OutputExistsError, new_files_only
    from cirlab.engine.runs import evaluate_split

    from cirlab.engine.rerank import new_evaluation

    new_evaluation()  # warnings said once per evaluation, not once per process (a notebook calls main again)
    topk_dir = Path(args.topk_dir) if args.topk_dir else None
    results = {}
    with new_files_only(topk_dir) if topk_dir and not args.overwrite else contextlib.nullcontext():
        for split in splits:
            try:
                out = evaluate_split(model, config, split, device=device, loaded=loaded.pop(split), topk_dir=topk_dir,
                                     keep_run_topk=True)
            except FileExistsError as err:
                if not err.filename or Path(err.filename).parent.absolute() != topk_dir.absolute():
                    raise
                raise OutputExistsError(f"cirlab eval --topk-dir: {err.filename} exists (written by another process "
                                        "while this one ran); pass --overwrite to replace it, or choose another "
                                        "folder") from None
            results[split] = out["metrics"]
            for path in out.get("topk_paths") or ():  # the rankings are what an unlabelled split's evaluation gives
                logger.info("%s: top-K lists written to %s", split, path)
    return results


def _write_new(path: Path, text: str, *, command: str) -> None:
    """:func:`cirlab.core.io.write_new_text`, its refusal as the usual one line: the check before the work cannot see
    a second eval writing the same ``--output`` meanwhile, and a replacing write would drop its result silently."""
    from cirlab.core.io import OutputExistsError, write_new_text

    try:
        write_new_text(path, text)
    except FileExistsError:
        raise OutputExistsError(f"{command}: {path} exists (written by another process while this one ran; this "
                                "evaluation's results are printed above); pass --overwrite to replace it, or choose "
                                "another path") from None


def _splits_worth_evaluating(args: argparse.Namespace, config: dict[str, Any], loaded: dict[str, Any],
                             model_cls: type) -> list[str]:
    """The splits to evaluate. A CIR split without ground truth (Fashion-IQ test, CIRR test1) gives no metrics, only
    rankings, which without ``--topk-dir`` were computed and then written nowhere: named with ``--split`` it is
    refused; listed by the run's ``eval.splits`` it is left out with a warning (``cirlab eval RUN`` evaluates the
    others). The re-ranker's stages keep their rankings in ``<run>/topk`` by themselves (their ``evaluate_split``):
    a file missing there is written, one already there is kept (a stage II may read it); a run folder this user
    cannot write keeps none, so there such a split is refused as for the other models."""
    from cirlab.core.errors import InputError
    from cirlab.data.catalog import canonical_name
    from cirlab.engine.runs import is_precomp

    if args.topk_dir or is_precomp(config) or (hasattr(model_cls, "evaluate_split") and _run_keeps_topk(config)):
        return list(loaded)
    blind = [split for split, parts in loaded.items() if not any(p.has_targets for p in parts)]
    if not blind:
        return list(loaded)
    cirr = canonical_name(config["dataset"]["name"]) == "cirr"
    why = (f"{config['dataset']['name']} {blind[0]} has no ground-truth targets, so its evaluation gives no metrics, "
           "only rankings; pass --topk-dir DIR to keep them"
           + (" (CIRR's submission files: cirlab submit RUN --split test1)" if cirr else ""))
    rest = [split for split in loaded if split not in blind]
    if args.split or not rest:
        raise InputError(f"--split {blind[0]}: {why}" if args.split else why)
    logger.warning("left out %s: %s", ", ".join(blind), why)
    return rest


def _run_keeps_topk(config: dict[str, Any]) -> bool:
    """Whether a re-ranker's evaluation can keep its rankings in the run's own ``topk/``: there is a run folder
    (not a bare checkout of weights) and this user may write into it."""
    from cirlab.core.io import why_not_writable

    run = str(config.get("output_dir") or "")
    return bool(run) and why_not_writable(Path(run) / "topk") is None


def _check_eval_outputs(args: argparse.Namespace, splits: Sequence[str]) -> None:
    """Before any work: ``--output`` must be a file path (an existing one only with ``--overwrite``), and top-K
    files of these splits already in ``--topk-dir`` (``<split>[_<category>].topk.npz``) are refused likewise."""
    from cirlab.core.io import check_outputs, check_writable

    check_writable([Path(args.output).parent if args.output else None], command="cirlab eval --output")
    check_writable([args.topk_dir], command="cirlab eval --topk-dir")
    check_outputs([args.output], overwrite=args.overwrite, command="cirlab eval --output")
    if args.topk_dir and Path(args.topk_dir).is_dir():
        found = sorted(p for s in splits for pattern in (f"{s}.topk.npz", f"{s}_*.topk.npz")
                       for p in Path(args.topk_dir).glob(pattern))
        check_outputs(found[:1], overwrite=args.overwrite, command="cirlab eval --topk-dir")


def _key_groups(keys: Sequence[str] | None) -> str:
    """``relation.* (20), iteration``: state-dict keys grouped by module prefix, for one log line."""
    from cirlab.models.blip_interop import group_keys

    return group_keys(list(keys or ()), limit=12) or "nothing"


def _run_notebooks(args: argparse.Namespace) -> int:
    from cirlab.core.errors import ConfigError, MissingPathError
    from cirlab.core.io import check_writable
    from cirlab.core.shipped import inside_package, resource_dir

    notebooks = sorted(resource_dir("notebooks").glob("*.ipynb"))
    if not notebooks:
        raise MissingPathError(f"cirlab notebooks: no notebooks in {resource_dir('notebooks')} (a wheel built "
                               "without them: build it from the checkout, whose setup.py copies them)")
    out = Path(args.out)
    if os.path.lexists(out) and not os.path.isdir(out):  # os.path: Path.exists raises in a folder one cannot enter
        raise ConfigError(f"cirlab notebooks: {out} is a file; pass a folder")
    check_writable([out], command="cirlab notebooks")  # before any look inside it
    if inside_package(out):
        raise ConfigError(f"cirlab notebooks: {out} is inside the installed cirlab package; pass another folder")
    pairs = [(nb, out / nb.name) for nb in notebooks]
    odd = [t for _, t in pairs if os.path.lexists(t) and not t.is_file()]  # a folder or a dangling link
    if odd:
        raise ConfigError(f"cirlab notebooks: {odd[0]} is not a file (a folder or a broken link): move it away, or "
                          "choose another folder")
    same = [t for s, t in pairs if t.is_file() and t.read_bytes() == s.read_bytes()]  # copied before, not edited
    # a copy that differs was edited, run (outputs saved) or copied by another cirlab: the user's, kept unless
    # --overwrite, which keeps it beside as NAME.ipynb.bak; it no longer blocks copying the missing ones
    differ = [(s, t) for s, t in pairs if t.is_file() and t not in same]
    missing = [(s, t) for s, t in pairs if not os.path.lexists(t)]
    out.mkdir(parents=True, exist_ok=True)
    backups = {t: _free_backup_name(t) for _, t in differ} if args.overwrite else {}
    for target, backup in backups.items():
        _copy_notebook(target, backup)
    copied = missing + (differ if args.overwrite else [])
    for source, target in copied:
        _copy_notebook(source, target)
    print(_notebooks_summary(out, missing, same, differ, backups))
    print(f"open them with: jupyter lab {shlex.quote(str(out))}   (start with quickstart.ipynb)")
    return 0


def _copy_notebook(source: Path, target: Path) -> None:
    """``source`` to ``target`` whole or not at all: a full disk leaves no half file that a retry would refuse."""
    import shutil

    from cirlab.core.errors import ConfigError
    from cirlab.core.io import atomic_path

    try:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    except OSError as err:
        raise ConfigError(f"cirlab notebooks: cannot write {target} ({err.strerror or err})") from None


def _free_backup_name(target: Path) -> Path:
    """``train.ipynb.bak``, else ``train.ipynb.bak2``, ...: a backup never replaces an earlier one."""
    n = 1
    while os.path.lexists(backup := target.with_name(f"{target.name}.bak{n if n > 1 else ''}")):
        n += 1
    return backup


def _notebooks_summary(out: Path, missing: list, same: list, differ: list, backups: dict) -> str:
    """What ``cirlab notebooks`` did, a clause per kind of notebook."""
    parts = []
    if missing:
        parts.append(f"copied {len(missing)} notebook{'s' if len(missing) > 1 else ''} to {out}: "
                     f"{', '.join(t.name for _, t in missing)}")
    if backups:
        parts.append("replaced " + ", ".join(f"{t.name} (yours kept as {b.name})" for t, b in backups.items()))
    elif differ:
        parts.append(f"kept your copies of {', '.join(t.name for _, t in differ)}: they differ from the shipped "
                     "ones (edited, run, or from another cirlab version); --overwrite replaces them, keeping yours "
                     "as NAME.ipynb.bak")
    if same:
        parts.append(f"{len(same)} already there, unchanged" if parts else
                     f"the {len(same)} notebooks in {out} are up to date (nothing copied)")
    return "; ".join(parts)


def _run_models(args: argparse.Namespace) -> int:
    if args.params:
        return _run_params(args)
    if args.settings:
        return _run_settings(args)
    if args.preset or args.overrides:
        from cirlab.core.errors import ConfigError

        raise ConfigError("cirlab models: --preset and --set go with --params MODEL or --settings MODEL")
    from cirlab.models.registry import describe_models

    rows = describe_models()  # read from the model files' source: no torch import
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max([len("model")] + [len(r["model"]) for r in rows])
        print(f"{'model':<{width}}  {'task':<7} presets")
        for row in rows:
            print(f"{row['model']:<{width}}  {row['task']:<7} {', '.join(row['presets'])}")
    return 0


def _run_params(args: argparse.Namespace) -> int:
    """``cirlab models --params MODEL``: parameters per module on the meta device, as a table or JSON."""
    from cirlab.core.errors import ConfigError
    from cirlab.models.registry import parameter_table, parameter_table_device

    name, preset, overrides = _model_preset(args, "--params")
    where = {"cpu": "on the CPU", "meta": "on the meta device"}[parameter_table_device(preset)]
    try:
        rows = parameter_table(name, preset, **overrides)
    except (KeyError, TypeError, ValueError, OSError, RuntimeError, NotImplementedError) as err:
        raise ConfigError(f"cirlab models --params {name} --preset {preset}: cannot build it {where} "
                          f"({' '.join(str(err).split())})") from None
    if args.json:
        print(json.dumps({"model": name, "preset": preset, "overrides": overrides, "modules": rows}, indent=2))
        return 0
    width = max(len(r["module"]) for r in rows)
    print(f"{name} (preset {preset}{''.join(f', {k}={v}' for k, v in overrides.items())}), built {where}")
    print(f"{'module':<{width}}  {'params':>13}  {'trainable':>13}  {'frozen':>13}")
    for r in rows:
        print(f"{r['module']:<{width}}  {r['params']:>13,}  {r['trainable']:>13,}  {r['frozen']:>13,}")
    return 0


def _run_settings(args: argparse.Namespace) -> int:
    """``cirlab models --settings MODEL``: the preset's model fields and the paper's training recipe, spelt as the
    run config's entries (``model_overrides.FIELD``, ``train.FIELD``) so that a line can be copied into --set."""
    import dataclasses

    from cirlab.core.errors import ConfigError
    from cirlab.engine.train import TrainConfig
    from cirlab.models.registry import preset_settings

    name, preset, overrides = _model_preset(args, "--settings")
    try:
        settings = preset_settings(name, preset, **overrides)
    except (KeyError, TypeError, ValueError, OSError, RuntimeError, NotImplementedError) as err:
        raise ConfigError(f"cirlab models --settings {name} --preset {preset}: cannot build it "
                          f"({' '.join(str(err).split())})") from None
    # a run sets these itself (dataset.test_split, --resume) and refuses them in --set: no line to copy
    derived = ("test_split", "resume")
    defaults = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
                if k not in settings["train"] and k not in derived}
    if args.json:
        print(json.dumps({"model": name, "preset": preset, "overrides": overrides,
                          "model_overrides": settings["model"], "train": settings["train"],
                          "train_defaults": defaults}, indent=2, default=str))
        return 0
    given = ''.join(f', {k}={v}' for k, v in overrides.items())
    print(f"{name}, preset {preset}{given}: model fields (model_overrides.FIELD in a run config)")
    _print_entries("model_overrides", settings["model"])
    print("the paper's training recipe, with cirlab's changes that README lists as options (train.FIELD in a run "
          "config)")
    _print_entries("train", settings["train"])
    print("the other training fields, at cirlab's defaults")
    _print_entries("train", defaults)
    print("(a run sets train.test_split from dataset.test_split, and train.resume from --resume)")
    return 0


def _print_entries(section: str, values: dict[str, Any]) -> None:
    """``  section.key = value`` lines, the value as YAML writes it in flow style (what --set reads back)."""
    import yaml

    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        print(f"  {section}.{key} = {text.removesuffix(chr(10) + '...').strip()}")


def _model_preset(args: argparse.Namespace, flag: str) -> tuple[str, str, dict[str, Any]]:
    """The model, preset and ``--set`` overrides of ``cirlab models --params/--settings MODEL``, each checked (the
    preset defaults to the first paper preset: the sizes people ask about; a model of one's own may have only
    tiny/lite)."""
    from cirlab.core.config import did_you_mean
    from cirlab.core.errors import ConfigError
    from cirlab.engine.runs import parse_set_flat
    from cirlab.models.registry import CPU_PRESETS, build_config, list_models, list_presets

    name = getattr(args, flag.lstrip("-"))
    if name not in list_models():
        raise ConfigError(f"cirlab models {flag}: unknown model {name!r}{did_you_mean(name, list_models())}; "
                          f"known: {', '.join(list_models())}")
    presets = list_presets(name)
    if not presets and not args.preset:
        raise ConfigError(f"cirlab models {flag} {name}: the model defines no presets; pass --preset")
    preset = args.preset or next((p for p in presets if p not in CPU_PRESETS), presets[0])
    if preset not in presets:
        raise ConfigError(f"cirlab models {flag} {name}: unknown preset {preset!r}{did_you_mean(preset, presets)}; "
                          f"known: {', '.join(presets)}")
    overrides = parse_set_flat(args.overrides)
    try:  # the config first: a misspelt or mistyped --set is the user's, not a meta-device limitation
        build_config(name, preset, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cirlab models {flag} {name} --preset {preset}: --set: "
                          f"{' '.join(str(err.args[0] if err.args else err).split())}") from None
    return name, preset, overrides


def _refuse_unknown_options_before_a_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``cirlab --nosuch`` (no command) was answered "the following arguments are required: COMMAND", while an
    unknown option after a command is named (with the closest one): named here too."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    if any(word in commands for word in argv):
        return
    known = {s for action in parser._actions for s in action.option_strings}  # noqa: SLF001
    unknown = [word for word in argv if word.startswith("-") and word.split("=", 1)[0] not in known]
    if unknown:
        parser.refuse_unknown(unknown)  # type: ignore[attr-defined]


def _printable_anywhere() -> None:
    """A path the terminal's encoding cannot show (an ASCII or Latin-1 terminal, ``PYTHONIOENCODING=ascii``) is
    printed escaped (``\\xfc``), as Python's stderr does: a print at the end of a finished command raised
    UnicodeEncodeError and turned its success into exit 1."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "") == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cirlab`` command's work (the console script runs it through :func:`console`); returns the exit status.
    Callable in-process (a notebook, a test): it changes neither the output streams nor Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    _refuse_unknown_options_before_a_command(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the sub-command's parser: its usage, and the option meant (--sett: --set)
        command_parser(parser, argv).refuse_unknown(unknown)
    with _command_logging(args.verbose):
        return _run_command(args)


@contextlib.contextmanager
def _command_logging(verbose: bool) -> Iterator[None]:
    """Log lines on stderr for the command (INFO; ``-v``: cirlab's DEBUG lines too), and logging as it was
    afterwards: called in a notebook, ``logging.basicConfig`` left every library's INFO lines on for the session,
    and ``-v`` cirlab's DEBUG ones. Under ``torchrun`` the processes other than rank 0 write only warnings and
    errors, marked ``[rank N]``: every line came once per process, in the same job log."""
    root, own = logging.getLogger(), logging.getLogger("cirlab")
    levels, added, rank = (root.level, own.level), None, launch_rank()
    if not root.handlers:
        added = logging.StreamHandler(sys.stderr)
        mark = f"[rank {rank}] " if rank else ""
        added.setFormatter(logging.Formatter(f"%(asctime)s {mark}%(levelname)s %(name)s: %(message)s"))
        added.setLevel(logging.WARNING if rank else logging.NOTSET)
        root.addHandler(added)
        root.setLevel(logging.INFO)
    if verbose:  # cirlab's own debug lines: the root logger's would add every library's (PIL: lines per image)
        own.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        if added is not None:
            root.removeHandler(added)
            root.setLevel(levels[0])
        own.setLevel(levels[1])


def _run_command(args: argparse.Namespace) -> int:
    """The parsed command, its failures said as :func:`main` promises (one line for the user's input)."""
    from cirlab.core.errors import CirlabError  # config, checkpoint and data errors; imports nothing heavy

    try:
        return int(args.func(args) or 0)
    except CirlabError as err:  # the user's input: one line, never a traceback
        logger.error("%s", " ".join(str(err).split()))
        return int(getattr(err, "exit_code", EXIT_RETRY if _worth_a_retry(err) else EXIT_INPUT))
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM where a command takes it the same way (its own code)
        logger.error("%s", getattr(err, "message", "interrupted"))
        return int(getattr(err, "exit_code", 130))
    except OSError as err:  # a full, over-quota or read-only disk wherever no nearer handler names what was kept
        import errno

        from cirlab.core.io import NO_SPACE

        where = f"{err.filename}: " if err.filename else ""
        if err.errno == errno.ENAMETOOLONG:  # a path the user chose: one line, as for other input
            logger.error("%sfile name too long (a name may take 255 bytes: 255 ASCII letters, 85 CJK characters); "
                         "choose a shorter folder or file name", where)
            return EXIT_INPUT
        if err.errno in (errno.EACCES, errno.EPERM):  # a colleague's folder, a group the user is not in
            logger.error("%spermission denied: ask its owner for access or choose another folder", where)
            return EXIT_INPUT
        if err.errno not in NO_SPACE:
            raise
        logger.error("%scannot write (%s): free space or choose another folder, then run the same command again",
                     where, err.strerror or err)
        return EXIT_RETRY if _worth_a_retry(err) else EXIT_INPUT  # a read-only folder stays read-only


def _worth_a_retry(err: BaseException) -> bool:
    """Whether the same command may succeed later as it is: another cirlab process holds the folder's lock, or the
    disk was full or over quota (the error itself, or the OSError it was raised from). A requeue or retry wrapper
    tells these from the user's errors by the exit status."""
    from cirlab.core.errors import error_chain
    from cirlab.core.io import SPACE_RAN_OUT, FolderLockedError

    return any(isinstance(link, FolderLockedError) or (isinstance(link, OSError) and link.errno in SPACE_RAN_OUT)
               for link in error_chain(err))


def console() -> None:
    """The ``cirlab`` console script (and ``python -m cirlab``): :func:`main` in a process that is the command.
    Output a terminal's encoding cannot show is escaped; a second Ctrl-C of a stopping run, or one while Python
    shuts down, ends the process at once (:mod:`cirlab.core.console`). :func:`main` alone, as a notebook or a
    test calls it, leaves both as they are."""
    from cirlab.core import console as this_process

    this_process.mark_console()
    _printable_anywhere()
    this_process.survive_a_closed_stdout()
    code = main()
    this_process.end_at_next_ctrl_c()
    if sys.stdout is not None:  # None where the command started with stdout closed (`>&-`): the work is done
        sys.stdout.flush()  # a closed pipe's last buffered bytes: dropped here, not in a shutdown warning
    sys.exit(code)


if __name__ == "__main__":
    console()
