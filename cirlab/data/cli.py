"""``cirlab data ...`` subcommands: ``check`` here, plus ``synth`` / ``emoji`` from their own modules when present.

The top-level CLI calls :func:`add_subcommands` on the ``data`` command's subparsers; ``python -m cirlab.data.cli``
runs the same commands standalone. Each subcommand sets ``func(args) -> int`` (the exit status).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from cirlab.core.cliargs import Parser
from cirlab.core.paths import user_path
from cirlab.core.signals import stop_signals_interrupt
from cirlab.core.config import int_range

logger = logging.getLogger(__name__)

# modules that contribute their own subcommand through register_cli(subparsers)
_PLUGINS = ("cirlab.data.generators.synthetic", "cirlab.data.generators.emoji")


def _run_check(args: argparse.Namespace) -> int:
    from cirlab.core.errors import EXIT_FOUND, ConfigError, MissingPathError
    from cirlab.data.check import ITM_CHOICES, check_dataset, format_problems, format_stats

    options = {key: getattr(args, key) for key in ("dim", "regions") if getattr(args, key) is not None}
    if options and args.dataset not in ITM_CHOICES:  # a flag that would change nothing must not look like it did
        raise ConfigError(f"--{'/--'.join(options)} applies to precomp features (--dataset "
                          f"{', '.join(ITM_CHOICES)}), not to {args.dataset}")
    if args.root is not None and not Path(args.root).expanduser().exists():  # input, as every other command says
        raise MissingPathError(f"--root {args.root}: no such folder")
    # only the problems listed are kept (the others are counted): millions of bad entries must not take gigabytes
    problems = check_dataset(args.dataset, args.root, verify_images=args.verify_images, options=options,
                             max_per_kind=args.max_per_kind)
    if args.json:
        print(_as_json(args.dataset, problems, args.max_per_kind))
        return EXIT_FOUND if problems else 0
    if problems.warnings:
        print(format_problems(problems.warnings, max_per_kind=args.max_per_kind).replace(" problem", " warning"))
    if problems:
        print(format_problems(problems, max_per_kind=args.max_per_kind))
        if args.max_per_kind is not None and any(n > args.max_per_kind for n in problems.counts().values()):
            print(f"(at most {args.max_per_kind} listed per kind: --max-per-kind all lists every one)")
        print(f"{args.dataset}: FAILED with {problems.total} problem{'s' if problems.total != 1 else ''} "
              f"({'found: ' if problems.stats else ''}{format_stats(problems.stats)})")
        return EXIT_FOUND  # 3: checked, problems found (1 is a crash, 2 input refused)
    # the folder checked, which is a subfolder of --root when --root holds several layouts
    print(f"{args.dataset}: OK ({format_stats(problems.stats)}) in {problems.root}")
    return 0


def _as_json(dataset: str, problems: Any, max_per_kind: int | None) -> str:
    """``cirlab data check --json``: the check's result for a script (strict JSON)."""
    from dataclasses import asdict

    from cirlab.core.io import json_text

    return json_text({"dataset": dataset, "root": None if problems.root is None else str(problems.root),
                      "ok": not problems, "total": problems.total, "counts": dict(problems.counts()),
                      "stats": dict(problems.stats), "listed_per_kind": max_per_kind,
                      "problems": [asdict(p) for p in problems], "warnings": [asdict(w) for w in problems.warnings]})


def _add_check(subparsers: argparse._SubParsersAction) -> None:
    from cirlab.data.check import DATASETS

    parser = subparsers.add_parser(
        "check", help="validate a dataset tree and list every problem",
        description="Walk a whole dataset tree and find every problem (missing image, malformed JSON, unknown name, "
                    "caption/image count mismatch, wrong array shape), grouped by kind with counts (the first "
                    f"{LISTED_PER_KIND} of each kind listed). Exit status 3 when any problem is found, 0 with a "
                    "summary line when the tree is valid (2 when it refuses its input, e.g. a --root that is not "
                    "there).")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="layout to check; 'precomp' checks every *_precomp folder (and GPO's "
                             "<name>/precomp/) under --root")
    parser.add_argument("--root", default=None, type=user_path,
                        help="dataset root, or a folder holding <dataset>/ (as cirlab data synth writes); "
                             "default: $CIRLAB_DATA/<dataset>; precomp: $CIRLAB_DATA (./data without CIRLAB_DATA)")
    parser.add_argument("--verify-images", action="store_true",
                        help="fully decode every image file (slow on the full datasets); by default only each "
                             "image's header and ending are checked (catches empty, garbage and truncated files)")
    for option, what, default in (("dim", "feature dimension", 2048), ("regions", "number of regions", 36)):
        parser.add_argument(f"--{option}", type=int_range(1), default=None, metavar="N",
                            help=f"precomp: the {what} of the features (default {default}, BUTD's); the run-config "
                                 f"spelling is dataset.options.{option}")
    parser.add_argument("--max-per-kind", type=_count_or_all, default=LISTED_PER_KIND, metavar="N",
                        help=f"list at most N problems of each kind (counts still cover all), 'all' lists every "
                             f"one; default {LISTED_PER_KIND}: a folder of 77,000 missing images is one screen, "
                             f"not 77,000 lines")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the text (dataset, root, ok, total, counts per kind, "
                             "stats, and the problems and warnings listed, each with kind, file, entry, message); "
                             "the exit status is the same")
    parser.set_defaults(func=_run_check)


LISTED_PER_KIND = 20  # problems listed per kind by default


def _count_or_all(text: str) -> int | None:
    """``--max-per-kind``: a whole number >= 0, or ``all`` (None: list and keep every problem)."""
    return None if text.strip().lower() == "all" else int_range(0)(text)


_count_or_all.__name__ = "whole number or 'all'"  # argparse names the type in its own messages


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` and, when their modules exist, ``synth`` and ``emoji`` to the ``data`` subparsers."""
    _add_check(subparsers)
    for module_name in _PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:  # the module exists but one of its imports is missing: a real error
                raise
            logger.debug("%s not available; its subcommand is skipped", module_name)
            continue
        before = set(subparsers.choices)
        module.register_cli(subparsers)
        for parser in {id(p): p for name, p in subparsers.choices.items() if name not in before}.values():
            if parser.get_default("func") is not None:
                parser.set_defaults(func=_stop_signals_as_ctrl_c(parser.get_default("func")))


def _stop_signals_as_ctrl_c(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func`` with SIGTERM, SIGHUP and SIGUSR1 taken as Ctrl-C inside it (:func:`stop_signals_interrupt`): a
    generator killed by their default action left its folder lock and said nothing, where Ctrl-C releases the lock
    and says "interrupted". The folder is left unfinished either way, and marked so."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        with stop_signals_interrupt():
            return func(args)

    return run


def build_parser(prog: str = "cirlab data") -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Dataset tools: validate trees, build offline datasets.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cirlab data`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from cirlab.core.errors import CirlabError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CirlabError as err:  # the user's input: one line naming the file or option, exit status 2
        logger.error("%s", " ".join(str(err).split()))
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
