"""The argument parser of every ``cirlab`` command: options are spelled out (no abbreviations), and an unknown
option is answered by the usage of the command it was given to, with the closest option's name."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without prefix matching: ``cirlab eval --out DIR/`` was taken as ``--output``
    (a metrics *file*) while ``--out`` names a folder on ``submit`` and ``report``. Sub-command parsers made by
    ``add_subparsers`` are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # flag -> what to say of an unknown one that is a setting (cirlab train --batch_size 32: a config entry)
        self.setting_hint: Callable[[str], str | None] | None = None

    def refuse_unknown(self, unknown: Sequence[str]) -> None:
        """Exit with this parser's usage and "unrecognized arguments", naming for each the setting it is (the
        command's ``setting_hint``), else the closest option (never --help: ``--lr`` is no slip of it)."""
        from cirlab.core.config import closest

        options = [s for action in self._actions for s in action.option_strings if s not in ("-h", "--help")]
        hints = []
        for i, arg in enumerate(unknown):
            flag = arg.split("=", 1)[0]
            if not arg.startswith("-"):
                continue
            setting = self.setting_hint(flag) if self.setting_hint else None
            if setting:  # --batch_size 32: the entry with the value as typed; --lr_schedules 15 25: a list
                setting = setting.replace("=VALUE", f"={_value_of(arg, unknown[i + 1:])}")
            close = None if setting else _completion(flag, options) or closest(flag, options)
            if setting:
                hints.append(f"{flag}: {setting}")
            elif close:
                hints.append(f"{flag}: did you mean {close}?")
        self.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _value_of(arg: str, rest: Sequence[str]) -> str:
    """The value an unknown ``--flag`` was given, as ``--set`` takes it: ``--x=1`` and ``--x 1`` as typed, the
    original scripts' ``nargs="+"`` (``--lr_schedules 15 25``) as a YAML list, none as ``VALUE``."""
    if "=" in arg:
        return arg.split("=", 1)[1]
    values = []
    for word in rest:
        if word.startswith("-") and not _is_number(word):
            break
        values.append(word)
    return "VALUE" if not values else values[0] if len(values) == 1 else f"[{','.join(values)}]"


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _completion(flag: str, options: Sequence[str]) -> str | None:
    """The options ``flag`` begins (``--out``: ``--output-dir``; ``--no``: ``--notebooks`` and the ``--no-*``
    switches): what argparse's prefix matching would have taken or found ambiguous, so the likeliest meanings, ahead
    of a spelling that merely looks alike (``--set``)."""
    longer = [o for o in options if o.startswith(flag) and o != flag] if flag.startswith("--") and len(flag) > 3 else []
    if len(longer) > 1:
        return f"{', '.join(longer[:-1])} or {longer[-1]}"
    return longer[0] if longer else None


def command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the (nested: ``data check``) sub-command ``argv`` runs, else ``parser`` itself."""
    current = parser
    for word in argv:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        if subs and word in subs[0].choices:
            current = subs[0].choices[word]
    return current
