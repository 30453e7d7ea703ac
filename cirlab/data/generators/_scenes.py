"""The scene grammar behind the synthetic data: objects, edits, their phrasing, rendering and consistency checks.

A *scene* is a small set of objects on a 3x3 grid; an object has a shape, a colour, a size (small | large) and a cell.
An *edit* changes one scene into another in one of five ways (the ``modification`` types):

=========  ==============================================  =====================================================
kind       meaning                                         example phrasing
=========  ==============================================  =====================================================
color      recolour the referred object                    "make the red circle blue"
add        add a fully described object in a free cell     "add a small green square at the top left"
remove     remove the referred object                      "remove the triangle"
move       move the referred object one cell (up/down/      "move the star to the right",
           left/right) or to a corner / the centre         "put the star in the bottom left corner"
size       make the referred object bigger / smaller       "make the blue square bigger"
=========  ==============================================  =====================================================

An object is *referred to* by its shape alone ("the circle") when it is the only object of that shape, or by colour
and shape ("the red circle") when it is the only one of that colour and shape; an edit whose referring expression
does not pick exactly one object does not apply. Every text is generated from one edit, and one text always means the
same edit (``phrase`` never renders two edits to the same string), so text -> edit is a function.

The two consistency checks make the "not recoverable from one modality" claim countable:

* :func:`consistent_with_text`: could this gallery scene be the result of this edit applied to *some* scene?
  (what a model that reads only the text can know);
* :func:`one_edit_neighbours`: every scene one grammar edit away from a reference (what a model that sees only the
  reference can know).

No torch here; PIL is imported inside :func:`render`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 85, 220),
    "yellow": (236, 196, 20),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring")
SIZES = ("small", "large")
KINDS = ("color", "add", "remove", "move", "size")
GRID = 3
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
DIRECTIONS: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
# absolute move targets: corners and centre only, so "move ... to the right" (a direction) never names a cell
ABSOLUTE_CELLS: tuple[tuple[int, int], ...] = ((0, 0), (0, 2), (1, 1), (2, 0), (2, 2))
_RADIUS = {"small": 0.22, "large": 0.42}  # object radius as a fraction of the cell side


class Obj(NamedTuple):
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


Scene = tuple[Obj, ...]  # always sorted (see make_scene), so equal scenes compare and hash equal


@dataclass(frozen=True)
class SceneSpec:
    """The vocabulary and object-count range of one family of scenes (one Fashion-IQ category, CIRR, ...)."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...] = tuple(COLORS)
    min_objects: int = 2
    max_objects: int = 5
    background: tuple[int, int, int] = (255, 255, 255)

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": list(self.shapes), "colors": list(self.colors), "min_objects": self.min_objects,
                "max_objects": self.max_objects, "background": list(self.background)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SceneSpec":
        return cls(tuple(d["shapes"]), tuple(d["colors"]), int(d["min_objects"]), int(d["max_objects"]),
                   tuple(d["background"]))


@dataclass(frozen=True)
class Edit:
    """One modification.

    Attributes:
        kind: "color" | "add" | "remove" | "move" | "size".
        shape: shape of the referred object (add: unused, see ``value``).
        color: colour in the referring expression; None = the shape alone refers ("the circle").
        value: color -> new colour; size -> new size; move -> direction name or (row, col); add -> the new Obj.
    """

    kind: str
    shape: str = ""
    color: str | None = None
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"kind": self.kind, "shape": self.shape, "color": self.color, "value": value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Edit":
        value = d["value"]
        if d["kind"] == "add":
            value = Obj(*value)
        elif d["kind"] == "move" and isinstance(value, list):
            value = tuple(value)
        return cls(d["kind"], d["shape"], d["color"], value)


# ----------------------------------------------------------------------------------------------------------------------
# scenes


def make_scene(objects: Iterable[Obj]) -> Scene:
    return tuple(sorted(objects))


def scene_key(scene: Scene) -> str:
    """A canonical string for a scene (equal scenes, equal keys)."""
    return "|".join(f"{o.shape}:{o.color}:{o.size}:{o.row}{o.col}" for o in scene)


def scene_to_json(scene: Scene) -> list[list[Any]]:
    return [list(o) for o in scene]


def scene_from_json(items: Sequence[Sequence[Any]]) -> Scene:
    return make_scene(Obj(str(s), str(c), str(z), int(r), int(k)) for s, c, z, r, k in items)


def free_cells(scene: Scene) -> list[tuple[int, int]]:
    used = {o.cell for o in scene}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]


def resolve(scene: Scene, shape: str, color: str | None) -> Obj | None:
    """The one object the referring expression picks, or None when it picks none or several."""
    hits = [o for o in scene if o.shape == shape and (color is None or o.color == color)]
    return hits[0] if len(hits) == 1 else None


def referring_forms(scene: Scene, obj: Obj) -> list[str | None]:
    """The referring expressions that pick ``obj``: None (shape alone) and/or its colour."""
    return [c for c in (None, obj.color) if resolve(scene, obj.shape, c) == obj]


def _replace(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    rest = [o for o in scene if o != old]
    return make_scene(rest + ([new] if new is not None else []))


def apply_edit(edit: Edit, scene: Scene, spec: SceneSpec) -> Scene | None:
    """The edited scene, or None when the edit does not apply to ``scene``."""
    if edit.kind == "add":
        new: Obj = edit.value
        if len(scene) >= spec.max_objects or new.cell not in free_cells(scene):
            return None
        return make_scene([*scene, new])
    obj = resolve(scene, edit.shape, edit.color)
    if obj is None:
        return None
    if edit.kind == "color":
        return None if edit.value == obj.color else _replace(scene, obj, obj._replace(color=edit.value))
    if edit.kind == "size":
        return None if edit.value == obj.size else _replace(scene, obj, obj._replace(size=edit.value))
    if edit.kind == "remove":
        return None if len(scene) <= spec.min_objects else _replace(scene, obj, None)
    if edit.kind == "move":
        if isinstance(edit.value, str):
            dr, dc = DIRECTIONS[edit.value]
            cell = (obj.row + dr, obj.col + dc)
        else:
            cell = tuple(edit.value)
        if cell not in free_cells(scene):  # also rejects off-grid cells and the object's own cell
            return None
        return _replace(scene, obj, obj._replace(row=cell[0], col=cell[1]))
    raise ValueError(f"unknown edit kind {edit.kind!r}")


def random_scene(rng: np.random.Generator, spec: SceneSpec, n_objects: int) -> Scene:
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    picked = rng.permutation(len(cells))[:n_objects]
    return make_scene(random_object(rng, spec, cells[int(i)]) for i in picked)


def random_object(rng: np.random.Generator, spec: SceneSpec, cell: tuple[int, int]) -> Obj:
    return Obj(str(rng.choice(spec.shapes)), str(rng.choice(spec.colors)), str(rng.choice(SIZES)), *cell)


def sample_edit(rng: np.random.Generator, scene: Scene, spec: SceneSpec, kind: str) -> Edit | None:
    """A random applicable edit of ``kind`` for ``scene`` (None when the scene admits none)."""
    if kind == "add":
        cells = free_cells(scene)
        if len(scene) >= spec.max_objects or not cells:
            return None
        return Edit("add", value=random_object(rng, spec, cells[int(rng.integers(len(cells)))]))
    options = [(o, form) for o in scene for form in referring_forms(scene, o)]
    if not options:
        return None
    obj, form = options[int(rng.integers(len(options)))]
    if kind == "color":
        value: Any = str(rng.choice([c for c in spec.colors if c != obj.color]))
    elif kind == "size":
        value = "large" if obj.size == "small" else "small"
    elif kind == "remove":
        value = None
    elif kind == "move":
        value = _sample_move(rng, scene, obj)
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    edit = Edit(kind, obj.shape, form, value)
    return edit if apply_edit(edit, scene, spec) is not None else None


def _sample_move(rng: np.random.Generator, scene: Scene, obj: Obj) -> Any:
    free = set(free_cells(scene))
    steps = [d for d, (dr, dc) in DIRECTIONS.items() if (obj.row + dr, obj.col + dc) in free]
    jumps = [c for c in ABSOLUTE_CELLS if c in free]
    if steps and (not jumps or rng.random() < 0.6):
        return str(rng.choice(steps))
    return tuple(jumps[int(rng.integers(len(jumps)))]) if jumps else "right"


def all_edits(scene: Scene, spec: SceneSpec) -> Iterator[Edit]:
    """Every edit of the grammar that applies to ``scene`` (several may give the same result)."""
    if len(scene) < spec.max_objects:
        for cell in free_cells(scene):
            for shape in spec.shapes:
                for color in spec.colors:
                    for size in SIZES:
                        yield Edit("add", value=Obj(shape, color, size, *cell))
    for obj in scene:
        form = referring_forms(scene, obj)
        if not form:
            continue
        ref = (obj.shape, form[0])
        for color in spec.colors:
            if color != obj.color:
                yield Edit("color", *ref, color)
        yield Edit("size", *ref, "large" if obj.size == "small" else "small")
        if len(scene) > spec.min_objects:
            yield Edit("remove", *ref, None)
        for value in [*DIRECTIONS, *ABSOLUTE_CELLS]:
            edit = Edit("move", *ref, value)
            if apply_edit(edit, scene, spec) is not None:
                yield edit


def one_edit_neighbours(scene: Scene, spec: SceneSpec) -> set[str]:
    """Keys of every scene reachable from ``scene`` with one edit: all an image-only model can narrow down to."""
    return {scene_key(apply_edit(e, scene, spec)) for e in all_edits(scene, spec)}  # type: ignore[arg-type]


def _preimages(edit: Edit, result: Scene, spec: SceneSpec) -> Iterator[Scene]:
    """Candidate scenes r with apply_edit(edit, r) == result (a superset; callers verify)."""
    if edit.kind == "add":
        if edit.value in result:
            yield _replace(result, edit.value, None)
        return
    if edit.kind == "remove":
        colors = [edit.color] if edit.color else list(spec.colors)
        for cell in free_cells(result):
            for color in colors:
                for size in SIZES:
                    yield make_scene([*result, Obj(edit.shape, color, size, *cell)])
        return
    for obj in result:
        if obj.shape != edit.shape:
            continue
        if edit.kind == "color" and obj.color == edit.value:
            for old in [edit.color] if edit.color else spec.colors:
                yield _replace(result, obj, obj._replace(color=old))
        elif edit.kind == "size" and obj.size == edit.value:
            yield _replace(result, obj, obj._replace(size="small" if edit.value == "large" else "large"))
        elif edit.kind == "move":
            for cell in free_cells(result):
                yield _replace(result, obj, obj._replace(row=cell[0], col=cell[1]))


def consistent_with_text(edit: Edit, candidate: Scene, spec: SceneSpec) -> bool:
    """True when some valid scene becomes ``candidate`` under ``edit``: all a text-only model can narrow down to."""
    for ref in _preimages(edit, candidate, spec):
        if spec.min_objects <= len(ref) <= spec.max_objects and apply_edit(edit, ref, spec) == candidate:
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------------
# phrasing

_COLOR_T = ("make {obj} {new}", "change the colour of {obj} to {new}", "turn {obj} {new}", "paint {obj} {new}",
            "{obj} should be {new}", "recolour {obj} {new}", "make {obj} {new} instead")
_ADD_T = ("add {thing} {at}", "put {thing} {at}", "place {thing} {at}", "insert {thing} {at}",
          "there should also be {thing} {at}", "{at}, add {thing}")
_REMOVE_T = ("remove {obj}", "delete {obj}", "take away {obj}", "get rid of {obj}", "without {obj}",
             "{obj} should disappear")
_STEP_T = ("move {obj} {dir}", "shift {obj} {dir}", "slide {obj} {dir}", "push {obj} {dir}")
_STEP_DIR = {"up": ("up", "upwards", "one step up"), "down": ("down", "downwards", "one step down"),
             "left": ("to the left", "one step to the left", "one cell left"),
             "right": ("to the right", "one step to the right", "one cell right")}
_JUMP_T = ("move {obj} {to}", "put {obj} {to}", "relocate {obj} {to}")
_BIGGER_T = ("make {obj} bigger", "make {obj} larger", "enlarge {obj}", "{obj} should be larger",
             "increase the size of {obj}")
_SMALLER_T = ("make {obj} smaller", "shrink {obj}", "reduce the size of {obj}", "{obj} should be smaller",
              "make {obj} tiny")


def at_phrases(cell: tuple[int, int]) -> tuple[str, ...]:
    """Ways to say where a cell is ("at the top left", "in the top left corner", ...)."""
    name = CELL_NAMES[cell]
    if cell == (1, 1):
        return ("in the center", "in the middle")
    if " " in name:  # a corner
        return (f"at the {name}", f"in the {name} corner")
    return (f"at the {name}", f"along the {name} edge") if name in ("top", "bottom") else \
        (f"on the {name}", f"at the {name} edge")


def _to_phrases(cell: tuple[int, int]) -> tuple[str, ...]:
    name = CELL_NAMES[cell]
    return ("to the center", "into the middle") if cell == (1, 1) else (f"to the {name} corner",
                                                                        f"into the {name} corner")


def templates(edit: Edit) -> list[str]:
    """Every phrasing of ``edit`` (deterministic order)."""
    obj = f"the {edit.color} {edit.shape}" if edit.color else f"the {edit.shape}"
    if edit.kind == "color":
        return [t.format(obj=obj, new=edit.value) for t in _COLOR_T]
    if edit.kind == "add":
        o: Obj = edit.value
        thing = f"a {o.size} {o.color} {o.shape}"
        return [t.format(thing=thing, at=at) for t in _ADD_T for at in at_phrases(o.cell)]
    if edit.kind == "remove":
        return [t.format(obj=obj) for t in _REMOVE_T]
    if edit.kind == "move":
        if isinstance(edit.value, str):
            return [t.format(obj=obj, dir=d) for t in _STEP_T for d in _STEP_DIR[edit.value]]
        return [t.format(obj=obj, to=to) for t in _JUMP_T for to in _to_phrases(tuple(edit.value))]
    if edit.kind == "size":
        return [t.format(obj=obj) for t in (_BIGGER_T if edit.value == "large" else _SMALLER_T)]
    raise ValueError(f"unknown edit kind {edit.kind!r}")


def phrase(edit: Edit, rng: np.random.Generator, n: int = 1) -> list[str]:
    """``n`` distinct random phrasings of ``edit`` (Fashion-IQ entries need two)."""
    options = templates(edit)
    picked = rng.permutation(len(options))[:n]
    return [options[int(i)] for i in picked]


_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# ITM caption types (caption k of an image has type k): each says something different about the scene, so a
# matcher has to use different evidence (colour, shape, position or relations between objects) per type
CAPTION_TYPES: tuple[str, ...] = ("full", "color", "shape", "layout", "relation")


def describe(scene: Scene, style: int, rng: np.random.Generator) -> str:
    """One ITM caption of a scene; ``style`` indexes :data:`CAPTION_TYPES` and picks the *content*:

    0 ``full``: every object with size, colour, shape and cell ("a small red circle at the top left , ...");
    1 ``color``: the colours and how many objects have each ("two red objects and one blue object");
    2 ``shape``: the object count and the shapes ("three shapes : two circles and one star");
    3 ``layout``: where the objects are and how big, no colour or shape ("a small object at the top left , ...");
    4 ``relation``: spatial relations between objects named by colour and shape, no absolute cells or sizes
      ("the red circle is above and left of the blue star and ...").

    Only ``full`` identifies the scene on its own; the others match every scene that agrees on their attributes.
    Tokens are space-separated, punctuation included (the SCAN precomp caption style).
    """
    objs = [scene[int(i)] for i in rng.permutation(len(scene))]  # mention order carries no information
    if style == 0:
        text = _join([f"a {o.size} {o.color} {o.shape} {at_phrases(o.cell)[0]}" for o in objs])
    elif style == 1:
        text = _join([f"{_NUMBERS[n]} {c} {'object' if n == 1 else 'objects'}"
                      for c, n in _counts([o.color for o in objs])])
    elif style == 2:
        text = f"{_NUMBERS[len(objs)]} shapes : " + _join([f"{_NUMBERS[n]} {_plural(s, n)}"
                                                          for s, n in _counts([o.shape for o in objs])])
    elif style == 3:
        text = _join([f"a {o.size} object {at_phrases(o.cell)[0]}" for o in objs])
    elif style == 4:
        if len(objs) == 1:
            text = f"a {objs[0].color} {objs[0].shape} on its own"
        else:
            text = _join([f"the {a.color} {a.shape} is {_relation(a, b)} the {b.color} {b.shape}"
                          for a, b in zip(objs, objs[1:])])
    else:
        raise ValueError(f"describe: style must be 0..{len(CAPTION_TYPES) - 1}, got {style}")
    return text.replace(",", " ,").replace("  ", " ") + " ."


def _counts(values: list[str]) -> list[tuple[str, int]]:
    """(value, count) in order of first mention."""
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return list(out.items())


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b`` (distinct cells): "above", "left of", "below and right of", ..."""
    parts = []
    if a.row != b.row:
        parts.append("above" if a.row < b.row else "below")
    if a.col != b.col:
        parts.append("left of" if a.col < b.col else "right of")
    return " and ".join(parts)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------------------------------------------------
# rendering


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * k / n),
                 cy + radius * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if kind == "triangle":
        return ring(3, r, -math.pi / 2)
    if kind == "diamond":
        return ring(4, r, -math.pi / 2)
    if kind == "hexagon":
        return ring(6, r, 0.0)
    if kind == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":
        a, b = r, r * 0.36
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown polygon shape {kind!r}")


def render(scene: Scene, spec: SceneSpec, size: int = 64, supersample: int = 4) -> Any:
    """Draw ``scene`` as an RGB PIL image of ``size`` x ``size`` (drawn larger, then box-filtered: anti-aliased)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    img = Image.new("RGB", (big, big), tuple(spec.background))
    draw = ImageDraw.Draw(img)
    cell = big / GRID
    for o in scene:
        cx, cy, r = (o.col + 0.5) * cell, (o.row + 0.5) * cell, _RADIUS[o.size] * cell
        fill = COLORS[o.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "ring":
            draw.ellipse(box, outline=fill, width=max(1, int(r * 0.4)))
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img.resize((size, size), Image.BOX) if supersample > 1 else img
