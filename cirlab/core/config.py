"""Config helpers shared by every model config dataclass: named flat presets and dict round trips."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="PresetMixin")


class PresetMixin:
    """Mix into a ``@dataclass``; subclasses set ``PRESETS = {"tiny": {...}, "lite": {...}, ...}``.

    Presets are flat dicts of field overrides on the dataclass defaults (no inheritance chains).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(cls.PRESETS)

    @classmethod
    def from_preset(cls: type[T], name: str, **overrides: Any) -> T:
        if name not in cls.PRESETS:
            raise KeyError(f"{cls.__name__}: unknown preset {name!r}; known presets: {', '.join(cls.presets())}")
        values = {**cls.PRESETS[name], **overrides}
        _check_fields(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        _check_fields(cls, values)
        return cls(**values)


def _check_fields(cls: type, values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
