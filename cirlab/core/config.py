"""Config helpers shared by every model config dataclass: named flat presets, dict round trips, and the
"did you mean" suggestions every config check uses."""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
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


def unknown_names_message(where: str, unknown: Iterable[Any], known: Iterable[Any],
                          hints: Mapping[str, str] | None = None) -> str:
    """``"<where>: unknown field 'rooot' (did you mean 'root'?); known: a, b"`` for one or more unknown names. A
    name with a hint (:func:`original_hints`: an option of the papers' original code; a setting of another
    section) is given that instead of a near spelling: the spelling of ``val_step`` is ``max_steps``, its meaning
    ``eval_every_steps``."""
    unknown, known = sorted(str(u) for u in unknown), sorted(str(k) for k in known)
    hints = hints or {}
    parts = [f"{u!r} ({hints[u]})" if u in hints else f"{u!r}{did_you_mean(u, known)}" for u in unknown]
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
    # the paper's original code's option names that are not a field's (its name -> where the setting is here:
    # a field, or "train.x" / "model_overrides.x" in another section), for the refusal of such a name
    ORIGINAL_NAMES: ClassVar[dict[str, str]] = {}
    # field removed since -> why, and what to do instead: a stored config (a checkpoint's) drops it; a config file
    # that sets it is refused with the reason (unknown keys are errors)
    RETIRED: ClassVar[dict[str, str]] = {}
    # field -> its valid range, where the name alone does not say it (check_field_ranges: sizes >= 1, counts >= 0
    # and drop probabilities in [0, 1) follow from the name): positive temperatures and scales, 0 meaning "off"
    RANGES: ClassVar[dict[str, "Bound"]] = {}
    # whether the wide naming rule holds (depths, layer/token counts, lengths >= 1; drop probabilities in [0, 1)):
    # cirlab's own configs, whose fields follow it; a user's config opts in, or declares its RANGES
    NAME_RANGES: ClassVar[bool] = False

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


def unknown_fields_message(cls: type, unknown: Sequence[str], context: str,
                           elsewhere: Mapping[str, str] | None = None) -> str:
    """The refusal of fields ``cls`` does not have, after ``context`` (the class, or the config file's section): a
    field renamed since (``RENAMED``) names its new name, one removed since (``RETIRED``) says why; others get
    the hints of :func:`original_hints` (``elsewhere``: settings of another section), else "did you mean", and the
    known names."""
    renamed, retired = getattr(cls, "RENAMED", {}), getattr(cls, "RETIRED", {})
    for name in unknown:
        if name in renamed:
            return f"{context}: field {name!r} is called {renamed[name]!r} now; rename it in your config"
        if name in retired:
            return f"{context}: field {name!r} is no longer read: {retired[name]}"
    return unknown_names_message(context, list(unknown), field_names(cls), original_hints(cls, elsewhere))


def original_hints(cls: type, elsewhere: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hints :func:`unknown_names_message` gives for ``cls``'s ``ORIGINAL_NAMES`` (``"the original code's
    --val_step; here: eval_every_steps"``) and for names that are settings of another section (``elsewhere``: name
    -> its key there, e.g. ``{"margin": "model_overrides.margin"}``)."""
    hints = {name: f"not a field here: the {where} setting" for name, where in (elsewhere or {}).items()}
    hints.update({name: f"the original code's --{name}; here: {where}"
                  for name, where in getattr(cls, "ORIGINAL_NAMES", {}).items()})
    return hints


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


@dataclasses.dataclass(frozen=True)
class Bound:
    """The valid range of a numeric config field: ``low``/``high`` (None: unbounded), each inclusive unless its
    ``*_open`` flag says otherwise. A refusal below ``low`` names ``kind`` ("a positive size") where set, else the
    range, and says ``why``; one above ``high`` names the range and says ``why_high`` (else ``why``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind: str = ""
    why: str = ""
    why_high: str = ""

    def admits(self, value: float) -> bool:
        return not self.below(value) and (self.high is None or (value < self.high if self.high_open
                                                                 else value <= self.high))

    def below(self, value: float) -> bool:
        """Whether ``value`` lies under the range (its refusal then names ``kind`` and ``why``)."""
        return self.low is not None and (value <= self.low if self.low_open else value < self.low)

    def describe(self) -> str:
        """``"a value in [0, 1)"``, ``"a value >= 1"``, ``"a value > 0"``, ``"a value <= 512"``."""
        low, high = _number(self.low), _number(self.high)
        if low is not None and high is not None:
            return f"a value in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"a value {'>' if self.low_open else '>='} {low}"
        return f"a value {'<' if self.high_open else '<='} {high}" if high is not None else "a number"


def _number(value: float | None) -> str | None:
    """``1048576`` for an int (``:g`` writes 1.04858e+06), ``0.5`` for a float."""
    return None if value is None else str(value) if isinstance(value, int) else f"{value:g}"


# No layer, vocabulary or text length of these models comes near a million: a Linear 2**20 wide alone holds 4 TB
# of fp32 weights, so a larger size is a slip (an extra digit, 1e9) that would otherwise end in an allocator
# traceback, or a native abort, after minutes of loading.
MAX_SIZE = 2**20
# Image sides: the papers use 224-384 px; at 8192 px a ViT-B/16 already sees 262,144 tokens per image.
MAX_IMAGE_SIDE = 8192

SIZE = Bound(1, MAX_SIZE, kind="a positive size", why_high="no layer, vocabulary or text of these models comes near "
                                                             "a million; it would not fit in memory")
IMAGE_SIDE = Bound(1, MAX_IMAGE_SIDE, kind="a positive size", why_high="an image side in pixels; the papers use 224 "
                                                                        "to 384")
COUNT = Bound(0, kind="a count >= 0", why="0 switches the phase off")
PROBABILITY = Bound(0, 1, high_open=True, why="a drop probability; 1 would drop everything")
POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)


def _is_size_field(name: str, wide: bool = True) -> bool:
    """Widths, head counts and image sizes (any config: a layer of width -4 or 0 heads has no meaning in any model);
    with ``wide`` (cirlab's own configs, ``PresetMixin.NAME_RANGES``) also depths, layer and token counts, lengths and
    frequencies, where the five models mean none of them 0 (0 as "off" or "the default" is declared in the config's
    ``RANGES``). A user's config may mean ``max_len=0`` or ``num_negatives=0`` as "off": only the narrow names hold
    there."""
    if name in ("dim", "nhead", "embed_size", "patch_size") or name.endswith(("_dim", "_heads", "_hidden")):
        return True
    return wide and (name == "vocab_size" or name.startswith(("num_", "hid_"))
                     or name.endswith(("_hid", "_width", "_depth", "_layers", "_intermediate", "_mlp", "_len",
                                       "_length", "_freq", "_tokens", "_vocab_size")))


def _is_count_field(name: str) -> bool:
    """Warm-up lengths and step counts (DIME's and HREM's warm-up epochs, HREM's warmup_iters, CaLa's tac_steps): a
    negative count has no meaning; 0 switches the phase off."""
    return name.endswith(("_epochs", "_iters", "_steps"))


def _is_drop_field(name: str) -> bool:
    """Dropout, region-drop and drop-path probabilities (``dropout``, ``qformer_dropout``, ``region_drop``,
    ``frozen_vit_drop_path``): torch refuses one outside [0, 1] only when the layer is built, as a traceback."""
    return "dropout" in name or name.endswith("_drop") or "drop_path" in name


def field_bound(cls: type, name: str) -> Bound | None:
    """The range of field ``name`` of ``cls``: the class's own ``RANGES`` entry, else the one its name implies
    (:func:`_is_size_field`, ``image_size``, :func:`_is_count_field`, :func:`_is_drop_field`), else None."""
    declared = getattr(cls, "RANGES", {})
    if name in declared:
        return declared[name]
    if name == "image_size":
        return IMAGE_SIDE
    wide = bool(getattr(cls, "NAME_RANGES", False))
    if _is_size_field(name, wide):
        return SIZE
    if _is_count_field(name):
        return COUNT
    return PROBABILITY if wide and _is_drop_field(name) else None


def refuse_unread(config_name: str, settings: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Refuse a file setting that the rest of the config never reads (``glove_path`` beside
    ``word_vectors='random'``): it would be ignored without a word. ``settings``: ``(field, value, read, reader)``
    with ``read`` whether the config reads the field and ``reader`` the setting that would."""
    for name, value, read, reader in settings:
        if value and not read:
            raise ConfigError(f"{config_name}.{name}={value!r} is read only with {reader}; clear it or set {reader}")


def choice_problem(value: Any, allowed: Iterable[Any]) -> str | None:
    """``"expected one of i2t, t2i (did you mean 't2i'?)"`` for a value not among ``allowed``, else None; the
    caller adds the field and ``", got <value>"``, as for a range (:func:`check_field_ranges`)."""
    allowed = tuple(allowed)
    return None if value in allowed else f"expected one of {', '.join(map(str, allowed))}{did_you_mean(value, allowed)}"


def refuse_unknown_choices(config_name: str, fields: Iterable[tuple[str, Any, Iterable[Any]]]) -> None:
    """Refuse a value that is not one of its field's choices (``(field, value, allowed)``), with the nearest
    spelling: a slip in a choice ("cosin", "bf-16") would otherwise fail far from the config, or not at all."""
    for name, value, allowed in fields:
        problem = choice_problem(value, allowed)
        if problem:
            raise FieldValueError(f"{config_name}.{name}: {problem}, got {value!r}")


def refuse_indivisible(config_name: str, pairs: Iterable[tuple[str, int, str, int]]) -> None:
    """Refuse a width its head count does not divide (``(width field, width, heads field, heads)``): the attention
    layer would fail as it is built, as a traceback from transformers or torch."""
    for width_name, width, heads_name, heads in pairs:
        if heads > 0 and width % heads:
            raise FieldValueError(f"{config_name}: {width_name} {width} is not divisible by {heads_name} {heads}")


def check_field_ranges(cls: type, values: Mapping[str, Any]) -> None:
    """Refuse a non-finite number (NaN, inf) in any field, and a number outside its field's range
    (:func:`field_bound`; each item of a list of sizes), naming the field, before the config or the model is built:
    otherwise torch fails later with a modulo by zero, a negative dimension or an allocator error as a traceback,
    or a NaN temperature surfaces steps later as a "non-finite loss" that blames the data."""
    for name, value in values.items():
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            where = f"{cls.__name__}.{name}" + ("" if index is None else f"[{index}]")
            problem = _range_problem(item, field_bound(cls, name))
            if problem:
                raise FieldValueError(f"{where}: {problem}")


def _range_problem(value: Any, bound: Bound | None) -> str | None:
    """Why ``value`` is out of ``bound`` (None when it fits, or is not a number)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value}"
    if bound is None or bound.admits(value):
        return None
    below = bound.below(value)
    expected = bound.kind if below and bound.kind else bound.describe()
    why = bound.why if below else bound.why_high or bound.why
    return f"expected {expected}, got {_number(value)}" + (f" ({why})" if why else "")


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

