"""Config helpers shared by every model config dataclass: named flat presets, dict round trips, and the
"did you mean" suggestions every config check uses."""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

from cirlab.core.errors import ConfigError

T = TypeVar("T", bound="PresetMixin")


class UnknownFieldError(ConfigError, TypeError):
    """A config names a field its dataclass does not have (a ``TypeError`` too, like a bad keyword argument)."""


def closest(name: Any, choices: Iterable[Any]) -> str | None:
    """The one of ``choices`` closest to ``name`` (a near spelling, a case slip, a prefix), else None."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
    if not close:  # a case slip ("Cosine") or a prefix ("cos") still deserves a hint
        lower = {c.lower(): c for c in names}
        close = [lower[str(name).lower()]] if str(name).lower() in lower else [
            c for c in names if c.startswith(str(name)) and str(name)][:1]
    return close[0] if close else None


def did_you_mean(name: Any, choices: Iterable[Any]) -> str:
    """``" (did you mean 'root'?)"`` for the closest of ``choices`` to ``name``, else ``""``."""
    close = closest(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def unknown_names_message(where: str, unknown: Iterable[Any], known: Iterable[Any]) -> str:
    """``"<where>: unknown field 'rooot' (did you mean 'root'?); known: a, b"`` for one or more unknown names."""
    unknown, known = sorted(str(u) for u in unknown), sorted(str(k) for k in known)
    parts = [f"{u!r}{did_you_mean(u, known)}" for u in unknown]
    noun = "field" if len(unknown) == 1 else "fields"
    return f"{where}: unknown {noun} {', '.join(parts)}; " + (f"known: {', '.join(known)}" if known else "it has none")


class UnknownPresetError(ConfigError, KeyError):
    """A preset name the config does not define (a ``KeyError`` too, as a missing mapping key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PresetMixin:
    """Mix into a ``@dataclass``; subclasses set ``PRESETS = {"tiny": {...}, "lite": {...}, ...}``.

    Presets are flat dicts of field overrides on the dataclass defaults (no inheritance chains).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # the original code's training seed, when the paper's recipe fixes one (AMC 300, CaLa 42): the model's
    # default_train_config reports it, and run_experiment draws the initial weights under it unless train.seed is set
    TRAIN_SEED: ClassVar[int | None] = None
    # True: the config's ``dataset`` field is set from the run config's dataset.name unless model_overrides sets it
    FOLLOWS_RUN_DATASET: ClassVar[bool] = False
    # dataset name -> the loader options the paper evaluates it with (CaLa and the re-ranker read Fashion-IQ with
    # CLIP4Cir's protocol): a run reading it otherwise is told that its numbers follow another protocol
    PAPER_DATA_OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {}
    # old field name -> new one: a stored config (a checkpoint's) is read under the new name; a config file that
    # sets the old one is refused with the new name (unknown keys are errors)
    RENAMED: ClassVar[dict[str, str]] = {}
    # field removed since -> why, and what to do instead: a stored config (a checkpoint's) drops it; a config file
    # that sets it is refused with the reason (unknown keys are errors)
    RETIRED: ClassVar[dict[str, str]] = {}

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(cls.PRESETS)

    @classmethod
    def from_preset(cls: type[T], name: str, **overrides: Any) -> T:
        if name not in cls.PRESETS:
            raise UnknownPresetError(f"{cls.__name__}: unknown preset {name!r}{did_you_mean(name, cls.PRESETS)}; "
                           f"known presets: {', '.join(cls.presets())}")
        values = {**cls.PRESETS[name], **overrides}
        check_fields(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        check_fields(cls, values)
        return cls(**values)

    @classmethod
    def from_stored(cls: type[T], values: dict[str, Any], where: str = "") -> T:
        """A config an earlier run stored (a checkpoint's ``model_config``): :meth:`from_dict`, which a config class
        relaxes for settings that earlier versions accepted and never read (``where`` names the file for its
        warning), so that such a run still loads. Fields renamed since (``RENAMED``) are read under their new
        names."""
        return cls.from_dict(cls.current_names(values))

    @classmethod
    def current_names(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with fields renamed since (``RENAMED``) under their new names, without fields removed since
        (``RETIRED``); the others as they are."""
        return {cls.RENAMED.get(k, k): v for k, v in values.items() if k not in cls.RETIRED}


def field_names(cls: type) -> list[str]:
    """The field names of a config dataclass."""
    return [f.name for f in dataclasses.fields(cls)]


def check_fields(cls: type, values: dict[str, Any]) -> None:
    """Refuse field names ``cls`` does not have (with "did you mean") and values of the wrong type."""
    unknown = sorted(set(values) - set(field_names(cls)))
    if unknown:
        raise UnknownFieldError(unknown_fields_message(cls, unknown, cls.__name__))
    check_field_types(cls, values)
    check_field_ranges(cls, values)


def unknown_fields_message(cls: type, unknown: Sequence[str], context: str) -> str:
    """The refusal of fields ``cls`` does not have, after ``context`` (the class, or the config file's section): a
    field renamed since (``RENAMED``) names its new name, one removed since (``RETIRED``) says why; others get
    "did you mean" and the known names."""
    renamed, retired = getattr(cls, "RENAMED", {}), getattr(cls, "RETIRED", {})
    for name in unknown:
        if name in renamed:
            return f"{context}: field {name!r} is called {renamed[name]!r} now; rename it in your config"
        if name in retired:
            return f"{context}: field {name!r} is no longer read: {retired[name]}"
    return unknown_names_message(context, list(unknown), field_names(cls))


def check_field_types(cls: type, values: dict[str, Any]) -> None:
    """Refuse a value that does not fit its field's annotation (``--set vision_heads=abc``), naming the field,
    before the model is built: otherwise the mistake surfaces deep inside a constructor as a traceback or as an
    unrelated message. Ints pass for floats, lists for tuples, paths for strings; unresolvable hints pass."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved is not checked
        return
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            raise FieldTypeError(f"{cls.__name__}.{name}: expected {_describe(hint)}, got {value!r} "
                                 f"({type(value).__name__})")


class FieldTypeError(ConfigError, TypeError):
    """A config value of the wrong type (a ``TypeError`` too, like a bad argument)."""


class FieldValueError(ConfigError, ValueError):
    """A config value of the right type out of its range (a ``ValueError`` too)."""


def _is_size_field(name: str) -> bool:
    """Widths, head counts and image sizes: a layer of width -4 or 0 heads has no meaning in any of the models."""
    return name in ("dim", "nhead", "embed_size", "image_size", "patch_size") or name.endswith(("_dim", "_heads",
                                                                                               "_hidden"))


def refuse_unread(config_name: str, settings: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Refuse a file setting that the rest of the config never reads (``glove_path`` beside
    ``word_vectors='random'``): it would be ignored without a word. ``settings``: ``(field, value, read, reader)``
    with ``read`` whether the config reads the field and ``reader`` the setting that would."""
    for name, value, read, reader in settings:
        if value and not read:
            raise ValueError(f"{config_name}.{name}={value!r} is read only with {reader}; clear it or set {reader}")


def _is_count_field(name: str) -> bool:
    """Warm-up lengths and step counts (DIME's and HREM's warm-up epochs, HREM's warmup_iters, CaLa's tac_steps): a
    negative count has no meaning; 0 switches the phase off."""
    return name.endswith(("_epochs", "_iters", "_steps"))


def check_field_ranges(cls: type, values: Mapping[str, Any]) -> None:
    """Refuse a size field (:func:`_is_size_field`) below 1 and a count (:func:`_is_count_field`) below 0, naming
    it, before the config or the model is built: a config's own checks or torch would fail with a modulo by zero or
    a message about tensor shapes instead, or a negative warm-up would be read as none."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if _is_size_field(name) and value < 1:
            raise FieldValueError(f"{cls.__name__}.{name}: expected a positive size, got {value}")
        if _is_count_field(name) and value < 0:
            raise FieldValueError(f"{cls.__name__}.{name}: expected a count >= 0, got {value}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in args:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not inner or all(_fits(v, inner[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # anything else (callables, protocols, forward references) is the constructor's to check


def _describe(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def is_whole(value: Any) -> bool:
    """An int, numpy's too, but not a bool (True is a 1 nobody meant) and not 2.0 (a float count is a slip)."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def name_list(names: Any) -> list[Any]:
    """``names`` as a list, where one name (a string, or a scalar such as an int query id) is a list of that name:
    iterated, ``"dress:0"`` or ``"png"`` was its letters and ``5`` a TypeError."""
    if isinstance(names, (str, bytes)) or not isinstance(names, collections.abc.Iterable):
        return [names]
    return list(names)


def whole_number(value: Any, name: str, low: int = 1) -> int:
    """``value`` as an int when it is a whole number >= ``low`` (a count, a cut-off, a pool size), else a
    :class:`FieldValueError` naming ``name``: k=0 or n=-3 otherwise gives empty tables, zero recalls or a slice
    from the end instead of an error."""
    if not is_whole(value) or value < low:
        raise FieldValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


MAX_SEED = 2**32 - 1  # numpy's seed range (np.random.default_rng / RandomState refuse a negative seed)


def int_range(low: int, high: int | None = None) -> Any:
    """An argparse ``type`` for a whole number in ``[low, high]``: ``--image-size 0`` or ``--seed -1`` is a usage
    error naming the flag (argparse adds it), not a traceback from deep inside numpy or PIL."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"of at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its own messages
    return parse

