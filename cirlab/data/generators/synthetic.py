"""The embedded default data: rendered shape scenes written in the real Fashion-IQ, CIRR, Shoes and precomp layouts.

Zero network, deterministic by seed (same seed -> byte-identical files), the default size in seconds on 2 cores::

    import cirlab.data
    from cirlab.data.generators import synthetic
    info = synthetic.generate("data/synthetic", seed=0, size="default")
    split = cirlab.data.load_cir("fashioniq", info["layouts"]["fashioniq"]["root"], "val", category="dress")

or ``cirlab data synth --out data/synthetic``. What is written under ``out_root``:

=====================================  =================================================================================
``fashioniq/``                         Fashion-IQ layout (``captions/cap.{cat}.{split}.json``, ``image_splits/``,
                                       ``images/*.png``); categories ``dress``/``shirt``/``toptee`` are three scene
                                       families (different shape sets and backgrounds, see ``CATEGORY_SPECS``), so the
                                       per-category protocol runs unchanged. Two phrasings of the edit per entry.
                                       Unlike the public release, the test split ships its targets.
``cirr/``                              CIRR rc2 layout (root = the ``cirr_dataset`` folder: ``cirr/captions``,
                                       ``cirr/image_splits``, ``train/<k>/``, ``dev/``, ``test1/``); every ``img_set``
                                       holds six near-duplicate scenes (a reference and five one-edit variants);
                                       ``test1`` has no targets.
``shoes/``                             Shoes layout (``relative_captions_shoes.json``, ``train_im_names.txt``,
                                       ``eval_im_names.txt``, ``attributedata/womens_synthetic/0/*.jpg``).
``precomp/f30k_precomp/``              ITM precomp layout: ``{train,dev,test}_ims.npy`` [N, 36, 2048] float32 region
                                       features (one region per object, derived from its attributes plus noise, the
                                       rest background regions) and ``{split}_caps.txt`` (5 captions per image,
                                       caption k of type ``_scenes.CAPTION_TYPES[k]``: full, color, shape, layout,
                                       relation; they differ in content, not only wording; the meta file lists the
                                       type of every caption). Load with ``load_precomp(out_root / "precomp",
                                       "f30k", split)``.
``<layout>/synthetic_meta.json``       ground truth for audits: every image's objects and every text's edit
``synthetic.json``                     the manifest (seed, size, counts); written last, so its presence means complete
``.cirlab-generated.json``             marks ``out_root`` and each layout folder as written by this generator
=====================================  =================================================================================

The generator writes only into folders it created: a non-empty ``out_root`` or layout folder without its marker
(e.g. your own Fashion-IQ folder) is refused, naming what would be deleted, unless ``force=True`` (``--force``). So is
an ``out_root`` it wrote with other settings (seed, size, image size, file format: what ``synthetic.json`` records),
naming what it holds and what was asked: runs trained there would read other data. The same settings again rewrite
byte-identical files, with no ``force`` (``cirlab data synth`` leaves a complete folder of the same settings as it
is instead: a run may be reading it).

Every caption entry carries an extra key ``"modification"`` (color | add | remove | move | size), which the loaders
keep in ``Triplet.extras``.

Why it is learnable but not trivial. Queries come in *groups*: one set of M edits (20 for Fashion-IQ and Shoes, 10
for CIRR; the five kinds in about equal shares) is applied to N = 4 different but similar references (one base scene and
small perturbations of it). So every reference has M targets in the gallery (its one-edit neighbours: the reference
alone cannot tell which one is meant, best possible R@1 = 1/M) and every edit text has N different targets (the text
alone cannot tell which one, best possible R@1 = 1/N), while reference + text determine the target exactly (the oracle's
R@1 is 100%; all scenes in a category are distinct). :func:`audit_split` measures all three on the files as written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cirlab.core.config import MAX_SEED, int_range, is_whole, name_list
from cirlab.core.errors import ConfigError, MissingPathError, first_few
from cirlab.core.io import write_text
from cirlab.data.generators import _owned
from cirlab.data.generators import _scenes as sc
from cirlab.data.generators._owned import OtherSettingsError
from cirlab.data.generators._scenes import Edit, Scene, SceneSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: precomp captions differ in content by type (caption_type in the meta)
MANIFEST = "synthetic.json"
COMMAND = "cirlab data synth"  # what writes these trees, named where an unfinished one is refused
META = "synthetic_meta.json"
MAX_IMAGE_SIZE = 1024  # BLIP's 384 fits; 100000 px squares exhausted memory before the first image was written
LAYOUTS = ("fashioniq", "cirr", "shoes", "precomp")
# what the manifest records about how its data was made: a write that differs in any of them writes other data
# (``spec`` only for a custom SynthSize, whose name "custom" says nothing about its counts)
SETTINGS = ("format", "seed", "size", "spec", "image_size")


CATEGORY_SPECS: dict[str, SceneSpec] = {
    "dress": SceneSpec(("circle", "square", "triangle", "star")),
    "shirt": SceneSpec(("diamond", "cross", "hexagon", "ring"), background=(232, 232, 232)),
    "toptee": SceneSpec(("circle", "triangle", "diamond", "ring"), background=(250, 243, 226)),
}
SHOES_SPEC = SceneSpec(("circle", "square", "triangle", "star", "cross"))
CIRR_SPEC = SceneSpec(sc.SHAPES)
PRECOMP_SPEC = SceneSpec(sc.SHAPES)


@dataclass(frozen=True)
class SynthSize:
    """How much to write. CIR sizes count queries (rounded to whole groups), precomp sizes count images."""

    fashioniq: tuple[int, int, int]  # queries per category: train, val, test
    cirr: tuple[int, int, int]  # queries: train, val, test1
    shoes: tuple[int, int]  # queries: train, test (eval_im_names)
    precomp: tuple[int, int, int]  # images: train, dev, test (5 captions each)
    regions: int = 36  # precomp regions per image
    feature_dim: int = 2048  # precomp feature size


SIZES: dict[str, SynthSize] = {
    "tiny": SynthSize((80, 80, 80), (40, 40, 40), (80, 80), (20, 10, 10)),
    "small": SynthSize((250, 100, 50), (400, 200, 80), (500, 100), (100, 50, 50)),
    "default": SynthSize((800, 400, 160), (2520, 520, 320), (2500, 500), (500, 100, 100)),
}


@dataclass(frozen=True)
class GroupShape:
    edits: int  # M: edits per reference (its targets)
    refs: int  # N: references sharing the same edits

    @property
    def queries(self) -> int:
        return self.edits * self.refs


FIQ_GROUP = GroupShape(edits=20, refs=4)
SHOES_GROUP = GroupShape(edits=20, refs=4)
CIRR_GROUP = GroupShape(edits=10, refs=4)  # two img_sets of 6 per reference


# ----------------------------------------------------------------------------------------------------------------------
# scene groups


@dataclass
class Cluster:
    """A reference and its one-edit targets (one per edit, in edit order)."""

    ref: Scene
    edits: list[Edit]
    targets: list[Scene]


def _rng(seed: int, *parts: str) -> np.random.Generator:
    # stable per-part streams: adding a layout or split never shifts the random numbers of another one
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def _group_edits(rng: np.random.Generator, base: Scene, spec: SceneSpec, m: int) -> list[Edit] | None:
    """M edits of ``base`` with distinct results, the five kinds in equal shares (kinds shuffled)."""
    offset = int(rng.integers(len(sc.KINDS)))  # M < 5 (precomp pairs): a random kind, not always the first
    kinds = [sc.KINDS[(i + offset) % len(sc.KINDS)] for i in range(m)]
    kinds = [kinds[int(i)] for i in rng.permutation(m)]
    edits: list[Edit] = []
    results = {sc.scene_key(base)}
    for kind in kinds:
        # a kind that has run out for this scene (e.g. a fourth "remove" of a three-object scene) hands its slot
        # to the kinds with the most room left, so large M stays possible; shares stay roughly equal
        for fallback in (kind, "color", "move", "add", "size"):
            edit = _new_edit(rng, base, spec, fallback, edits, results)
            if edit is not None:
                edits.append(edit)
                break
        else:
            return None
    return edits


def _new_edit(rng: np.random.Generator, base: Scene, spec: SceneSpec, kind: str, edits: list[Edit],
              results: set[str]) -> Edit | None:
    """An edit of ``kind`` not in ``edits`` whose result is a scene not in ``results`` (which it joins)."""
    for _ in range(30):
        edit = sc.sample_edit(rng, base, spec, kind)
        if edit is None or edit in edits:
            continue
        key = sc.scene_key(sc.apply_edit(edit, base, spec))  # type: ignore[arg-type]
        if key not in results:
            results.add(key)
            return edit
    return None


def _perturb(rng: np.random.Generator, scene: Scene, spec: SceneSpec) -> Scene:
    """One or two random attribute changes (any object): a sibling reference that looks like the base."""
    objs = list(scene)
    for _ in range(1 + int(rng.random() < 0.4)):
        op = int(rng.integers(5))
        i = int(rng.integers(len(objs)))
        free = [c for c in sc.free_cells(sc.make_scene(objs))]
        if op == 0:
            objs[i] = objs[i]._replace(color=str(rng.choice([c for c in spec.colors if c != objs[i].color])))
        elif op == 1:
            objs[i] = objs[i]._replace(size="large" if objs[i].size == "small" else "small")
        elif op == 2 and free:
            cell = free[int(rng.integers(len(free)))]
            objs[i] = objs[i]._replace(row=cell[0], col=cell[1])
        elif op == 3 and free and len(objs) < spec.max_objects:
            objs.append(sc.random_object(rng, spec, free[int(rng.integers(len(free)))]))
        elif op == 4 and len(objs) > spec.min_objects:
            objs.pop(i)
    return sc.make_scene(objs)


def _cluster(ref: Scene, edits: list[Edit], spec: SceneSpec, taken: set[str]) -> Cluster | None:
    keys = [sc.scene_key(ref)]
    targets = []
    for edit in edits:
        target = sc.apply_edit(edit, ref, spec)
        if target is None:
            return None
        targets.append(target)
        keys.append(sc.scene_key(target))
    if len(set(keys)) != len(keys) or any(k in taken for k in keys):
        return None
    return Cluster(ref, list(edits), targets)


def make_group(rng: np.random.Generator, spec: SceneSpec, shape: GroupShape, taken: set[str]) -> list[Cluster]:
    """N clusters sharing one list of M edits; every scene is new (``taken`` holds the keys used so far)."""
    for _ in range(500):
        base = sc.random_scene(rng, spec, int(rng.integers(3, 5)))
        edits = _group_edits(rng, base, spec, shape.edits)
        if edits is None:
            continue
        clusters: list[Cluster] = []
        used = set(taken)
        for attempt in range(60 * shape.refs):
            ref = base if attempt == 0 else _perturb(rng, base, spec)
            cluster = _cluster(ref, edits, spec, used)
            if cluster is not None:
                clusters.append(cluster)
                used.update(sc.scene_key(s) for s in (cluster.ref, *cluster.targets))
                if len(clusters) == shape.refs:
                    taken.update(used)
                    return clusters
    raise RuntimeError(f"could not build a group of {shape} for {spec}; the scene grammar is too small")


def make_clusters(rng: np.random.Generator, spec: SceneSpec, shape: GroupShape, n_queries: int,
                  taken: set[str]) -> list[Cluster]:
    """Whole groups adding up to about ``n_queries`` queries (at least one group)."""
    n_groups = max(1, round(n_queries / shape.queries))
    return [c for _ in range(n_groups) for c in make_group(rng, spec, shape, taken)]


# ----------------------------------------------------------------------------------------------------------------------
# writing helpers


class _Meta:
    """Collects ground truth for ``synthetic_meta.json``: scenes by image name, edits by text, specs."""

    def __init__(self, layout: str, seed: int) -> None:
        self.layout, self.seed = layout, seed
        self.scenes: dict[str, list] = {}
        self.edits: dict[str, dict] = {}
        self.specs: dict[str, dict] = {}
        self.categories: dict[str, str] = {}

    def scene(self, name: str, scene: Scene, category: str) -> None:
        self.scenes[name] = sc.scene_to_json(scene)
        self.categories[name] = category

    def texts(self, texts: Iterable[str], edit: Edit) -> None:
        d = edit.to_dict()
        for text in texts:
            if self.edits.setdefault(text, d) != d:  # a guard on the grammar: one text must mean one edit
                raise RuntimeError(f"text {text!r} phrases two different edits")

    def write(self, root: Path) -> None:
        _owned.write_release_json(root / META, {"format": FORMAT_VERSION, "generator": __name__, "layout": self.layout,
                                  "seed": self.seed, "specs": self.specs, "categories": self.categories,
                                  "scenes": self.scenes, "edits": self.edits})


def _save_image(scene: Scene, spec: SceneSpec, path: Path, image_size: int) -> None:
    img = sc.render(scene, spec, image_size)
    with _owned.staged(path) as tmp:  # the temporary's suffix is not the image's: the format is named
        if path.suffix == ".jpg":
            img.save(tmp, format="JPEG", quality=95, subsampling=0)  # Shoes ships JPEGs; libjpeg is deterministic
        else:
            img.save(tmp, format="PNG", optimize=False, compress_level=6)


def _images_of(clusters: Sequence[Cluster]) -> list[Scene]:
    return [s for c in clusters for s in (c.ref, *c.targets)]


def _shuffled(rng: np.random.Generator, items: Sequence[Any]) -> list[Any]:
    return [items[int(i)] for i in rng.permutation(len(items))]


def _named(rng: np.random.Generator, scenes: Sequence[Scene], fmt: str, start: int = 0) -> dict[str, str]:
    """key -> name, numbering a shuffled order so names reveal nothing about clusters or roles."""
    order = _shuffled(rng, list(scenes))
    return {sc.scene_key(s): fmt.format(start + i) for i, s in enumerate(order)}


# ----------------------------------------------------------------------------------------------------------------------
# layouts


def write_fashioniq(root: Path, seed: int, size: SynthSize, image_size: int) -> dict[str, Any]:
    meta = _Meta("fashioniq", seed)
    counts: dict[str, dict[str, int]] = {}
    for cat, spec in CATEGORY_SPECS.items():
        meta.specs[cat] = spec.to_dict()
        taken: set[str] = set()
        for split, n in zip(("train", "val", "test"), size.fashioniq):
            rng = _rng(seed, "fashioniq", cat, split)
            clusters = make_clusters(rng, spec, FIQ_GROUP, n, taken)
            scenes = _images_of(clusters)
            names = _named(rng, scenes, f"{cat}_{split}_{{:05d}}")
            entries = []
            for c in clusters:
                for edit, target in zip(c.edits, c.targets):
                    caps = sc.phrase(edit, rng, 2)
                    meta.texts(caps, edit)
                    entries.append({"candidate": names[sc.scene_key(c.ref)], "target": names[sc.scene_key(target)],
                                    "captions": caps, "modification": edit.kind})
            _owned.write_release_json(root / "captions" / f"cap.{cat}.{split}.json", _shuffled(rng, entries))
            gallery = _shuffled(rng, scenes)
            _owned.write_release_json(root / "image_splits" / f"split.{cat}.{split}.json",
                                      [names[sc.scene_key(s)] for s in gallery])
            for s in scenes:
                name = names[sc.scene_key(s)]
                meta.scene(name, s, cat)
                _save_image(s, spec, root / "images" / f"{name}.png", image_size)
            counts[f"{cat}/{split}"] = {"queries": len(entries), "images": len(scenes)}
    meta.write(root)
    return counts


def write_cirr(root: Path, seed: int, size: SynthSize, image_size: int) -> dict[str, Any]:
    meta = _Meta("cirr", seed)
    meta.specs["cirr"] = CIRR_SPEC.to_dict()
    taken: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    pairid, set_id = 0, 0
    for split, folder, n in zip(("train", "val", "test1"), ("train", "dev", "test1"), size.cirr):
        rng = _rng(seed, "cirr", split)
        clusters = make_clusters(rng, CIRR_SPEC, CIRR_GROUP, n, taken)
        scenes = _images_of(clusters)
        names = _named(rng, scenes, f"{folder}-{{:05d}}-img0")
        entries = []
        for c in clusters:
            half = len(c.edits) // 2
            for part in (slice(0, half), slice(half, None)):  # two img_sets of six per reference
                members = _shuffled(rng, [names[sc.scene_key(s)] for s in (c.ref, *c.targets[part])])
                ref_name = names[sc.scene_key(c.ref)]
                for edit, target in zip(c.edits[part], c.targets[part]):
                    text = sc.phrase(edit, rng)[0]
                    meta.texts([text], edit)
                    tname = names[sc.scene_key(target)]
                    entry: dict[str, Any] = {"pairid": pairid, "reference": ref_name}
                    img_set = {"id": set_id, "members": members, "reference_rank": members.index(ref_name)}
                    if split != "test1":
                        entry.update(target_hard=tname, target_soft={tname: 1.0})
                        img_set["target_rank"] = members.index(tname)
                    entry.update(caption=text, img_set=img_set, modification=edit.kind)
                    entries.append(entry)
                    pairid += 1
                set_id += 1
        _owned.write_release_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", _shuffled(rng, entries))
        paths = {}
        for i, s in enumerate(_shuffled(rng, scenes)):
            name = names[sc.scene_key(s)]
            sub = f"train/{i // 1000}" if split == "train" else folder  # real CIRR buckets train images
            paths[name] = f"./{sub}/{name}.png"
            meta.scene(name, s, "cirr")
            _save_image(s, CIRR_SPEC, root / sub / f"{name}.png", image_size)
        _owned.write_release_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", paths)
        counts[split] = {"queries": len(entries), "images": len(scenes)}
    meta.write(root)
    return counts


def write_shoes(root: Path, seed: int, size: SynthSize, image_size: int) -> dict[str, Any]:
    meta = _Meta("shoes", seed)
    meta.specs["shoes"] = SHOES_SPEC.to_dict()
    taken: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    entries: list[dict[str, Any]] = []
    start = 0
    for split, list_file, n in zip(("train", "test"), ("train_im_names.txt", "eval_im_names.txt"), size.shoes):
        rng = _rng(seed, "shoes", split)
        clusters = make_clusters(rng, SHOES_SPEC, SHOES_GROUP, n, taken)
        scenes = _images_of(clusters)
        names = _named(rng, scenes, "img_womens_synthetic_{:05d}.jpg", start)
        start += len(scenes)
        split_entries = []
        for c in clusters:
            for edit, target in zip(c.edits, c.targets):
                text = sc.phrase(edit, rng)[0]
                meta.texts([text], edit)
                split_entries.append({"ImageName": names[sc.scene_key(target)],
                                      "ReferenceImageName": names[sc.scene_key(c.ref)],
                                      "RelativeCaption": text, "modification": edit.kind})
        entries += _shuffled(rng, split_entries)
        listed = [names[sc.scene_key(s)] for s in _shuffled(rng, scenes)]
        write_text(root / list_file, "".join(f"{n}\n" for n in listed))
        for s in scenes:
            name = names[sc.scene_key(s)]
            meta.scene(name, s, "shoes")
            _save_image(s, SHOES_SPEC, root / "attributedata" / "womens_synthetic" / "0" / name, image_size)
        counts[split] = {"queries": len(split_entries), "images": len(scenes)}
    _owned.write_release_json(root / "relative_captions_shoes.json", entries)
    meta.write(root)
    return counts


class RegionFeaturizer:
    """Precomp region features: an object's region is ``relu(attribute prototype sum + noise)``.

    Prototypes are fixed Gaussian vectors per attribute value (colour, shape, size, row, column), so a region carries
    its object's attributes linearly, blurred by noise; the other regions come from a few background prototypes at a
    lower level (BUTD features are non-negative, post-ReLU, as these are).
    """

    def __init__(self, seed: int, dim: int, noise: float = 0.35, n_background: int = 6) -> None:
        rng = _rng(seed, "precomp", "prototypes")
        self.dim, self.noise = dim, noise
        values = [("color", c) for c in sc.COLORS] + [("shape", s) for s in sc.SHAPES] + \
                 [("size", z) for z in sc.SIZES] + [("row", r) for r in range(sc.GRID)] + \
                 [("col", c) for c in range(sc.GRID)]
        self.protos = {v: rng.standard_normal(dim).astype(np.float32) for v in values}
        self.background = rng.standard_normal((n_background, dim)).astype(np.float32)

    def object_mean(self, o: sc.Obj) -> np.ndarray:
        parts = [("color", o.color), ("shape", o.shape), ("size", o.size), ("row", o.row), ("col", o.col)]
        return sum(self.protos[p] for p in parts) / np.sqrt(len(parts))

    def features(self, scene: Scene, regions: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((regions, self.dim), np.float32)
        slots = rng.permutation(regions)  # objects sit at random region slots, as detector order is arbitrary
        bg = rng.integers(len(self.background), size=regions)
        noise = rng.standard_normal((regions, self.dim)).astype(np.float32) * self.noise
        for slot in range(regions):
            out[slot] = 0.5 * self.background[bg[slot]] - 0.4 + noise[slot]
        for o, slot in zip(scene, slots):
            out[slot] = self.object_mean(o) + noise[slot]
        return np.maximum(out, 0.0, out=out)


def write_precomp(root: Path, seed: int, size: SynthSize, image_size: int, name: str = "f30k") -> dict[str, Any]:
    """Write ``root/{name}_precomp/``; images come in near-duplicate pairs (a scene and a one-edit variant)."""
    del image_size  # features, no pixels
    folder = root / f"{name}_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    featurizer = RegionFeaturizer(seed, size.feature_dim)
    meta = _Meta("precomp", seed)
    meta.specs["precomp"] = PRECOMP_SPEC.to_dict()
    taken: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    split_scenes: dict[str, list] = {}
    split_types: dict[str, list[str]] = {}
    for split, n in zip(("train", "dev", "test"), size.precomp):
        rng = _rng(seed, "precomp", split)
        scenes: list[Scene] = []
        while len(scenes) < n:
            group = make_group(rng, PRECOMP_SPEC, GroupShape(edits=1, refs=1), taken)
            scenes += [group[0].ref, group[0].targets[0]][: n - len(scenes)]
        scenes = _shuffled(rng, scenes)
        with _owned.staged(folder / f"{split}_ims.npy") as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                              shape=(len(scenes), size.regions, size.feature_dim))
            captions = []
            for i, s in enumerate(scenes):
                array[i] = featurizer.features(s, size.regions, rng)
                captions += [sc.describe(s, style, rng) for style in range(len(sc.CAPTION_TYPES))]
            array.flush()
            del array  # closes the map before the rename
        write_text(folder / f"{split}_caps.txt", "".join(f"{c}\n" for c in captions))
        split_scenes[split] = [sc.scene_to_json(s) for s in scenes]
        split_types[split] = [t for _ in scenes for t in sc.CAPTION_TYPES]  # per caption, in file order
        counts[split] = {"images": len(scenes), "captions": len(captions)}
    _owned.write_release_json(root / META, {"format": FORMAT_VERSION, "generator": __name__, "layout": "precomp",
                                            "seed": seed, "name": name, "specs": meta.specs, "scenes": split_scenes,
                                            "caption_types": list(sc.CAPTION_TYPES), "caption_type": split_types})
    return counts


_WRITERS = {"fashioniq": write_fashioniq, "cirr": write_cirr, "shoes": write_shoes, "precomp": write_precomp}


# ----------------------------------------------------------------------------------------------------------------------
# public entry points


def preset_name(size: str | SynthSize) -> str | SynthSize:
    """The preset's name for a :class:`SynthSize` equal to one (``SIZES["tiny"]`` is "tiny"), else ``size``: the
    same counts then share the preset's folder and manifest, instead of a "custom" record that refused the preset's
    data as written with other settings."""
    if isinstance(size, SynthSize):
        return next((name for name, preset in SIZES.items() if preset == size), size)
    return size


def resolve_size(size: str | SynthSize) -> SynthSize:
    if isinstance(size, SynthSize):
        return size
    if size not in SIZES:
        from cirlab.core.config import did_you_mean
        from cirlab.core.errors import UnknownNameError

        raise UnknownNameError(f"unknown synthetic size {size!r}{did_you_mean(str(size), SIZES)}; known: "
                               f"{', '.join(SIZES)}", "size", str(size))
    return SIZES[size]


def generate(out_root: str | os.PathLike, *, seed: int = 0, size: str | SynthSize = "default",
             layouts: Sequence[str] | str = LAYOUTS, image_size: int = 64, overwrite: bool = True,
             force: bool = False) -> dict[str, Any]:
    """Write the synthetic datasets under ``out_root`` and return the manifest.

    Args:
        out_root: destination folder; one sub-folder per layout (see the module docstring).
        seed: every random choice derives from it; the same seed writes byte-identical files.
        size: "tiny" (tests, well under a second or two), "small", "default" (a CPU demo), or a :class:`SynthSize`.
        layouts: any of "fashioniq", "cirr", "shoes", "precomp" (a list, or one name).
        image_size: side of the rendered square images, in pixels.
        overwrite: remove an existing layout folder first (stale files from another seed never survive).
        force: also write into (and replace layout folders of) a folder this generator did not create, or one it
            wrote with other settings; without it such a folder is refused (:class:`~cirlab.data.generators._owned.
            NotOwnedError` naming what would go, :class:`OtherSettingsError` naming what it holds and what was asked).
            The same settings again rewrite identical files and need no ``force``.

    Returns:
        The manifest (also written to ``out_root/synthetic.json``): seed, size, image size and, per layout,
        ``root`` (absolute path to pass to the loader) and per-split counts.
    """
    layouts, size = name_list(layouts), preset_name(size)
    unknown = [name for name in layouts if name not in _WRITERS]
    if unknown:
        raise ConfigError(f"unknown layout(s) {unknown}; known: {', '.join(LAYOUTS)}")
    # whole numbers too, before the folder is touched: 1.5 failed inside numpy and 32.0 inside PIL, half-written
    if not is_whole(image_size) or not 16 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be a whole number from 16 to {MAX_IMAGE_SIZE} pixels, got {image_size!r}")
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    spec = resolve_size(size)
    out = Path(out_root).expanduser()
    settings = _settings_of(seed, size, image_size)
    _check_folder(out, "cirlab data synth")  # before the lock: one line naming --out, not the lock file's folder
    from cirlab.core.io import FolderLockedError, generated_folder_lock, generated_lock_file

    # the whole write under the folder's lock, refused at once when held: two writers deleted and rewrote each
    # other's files, leaving a tree of two seeds that still loaded and trained. ensure() holds it already (nested).
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(generated_folder_lock(out, wait=0))
        except FolderLockedError:  # the lock's own message names the folder above out, where its file lies
            try:
                holder = generated_lock_file(out).read_text(encoding="utf-8").strip()
            except OSError:
                holder = ""
            raise FolderLockedError(f"cirlab data synth: {out} is being written by another cirlab process "
                                    f"({holder or 'unknown process'}); wait for it to finish or choose another "
                                    "folder") from None
        try:
            return _generate_locked(out, seed, spec, layouts, image_size, overwrite, force, settings)
        except OSError as err:
            named = _naming_folder(err, out)
            if named is None:
                raise
            raise named from err


def _naming_folder(err: OSError, out: Path) -> OSError | None:
    """For a full, over-quota or read-only disk met by a write that names no file (PIL's ``save`` says only "No
    space left on device"), the same error naming ``out``: on a cluster with separate home, scratch and project
    quotas the user must know which one is full. None for any other error (kept as raised)."""
    from cirlab.core.io import NO_SPACE

    if err.errno not in NO_SPACE or err.filename:
        return None
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(out))


def _generate_locked(out: Path, seed: int, spec: SynthSize, layouts: Sequence[str], image_size: int, overwrite: bool,
                     force: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`generate` once ``out``'s lock is held."""
    _claim(out, layouts, force, overwrite, settings)
    kept = _other_layouts(out, settings, layouts)
    (out / MANIFEST).unlink(missing_ok=True)  # a partial write must never look complete
    _drop_staged(out)
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "generator": __name__, "seed": seed,
                                "size": settings["size"], "image_size": image_size, "layouts": kept}
    if settings["spec"] is not None:  # a custom size: its counts, which the name "custom" does not say
        manifest["spec"] = settings["spec"]
    for name in layouts:
        root = out / name
        if overwrite and root.exists():
            _owned.remove(root)
        _owned.mark(root, __name__)
        start = time.perf_counter()
        counts = _WRITERS[name](root, seed, spec, image_size)
        _owned.seal(root, __name__)
        logger.info("synthetic %s written to %s in %.1fs", name, root, time.perf_counter() - start)
        manifest["layouts"][name] = {"root": name, "splits": counts}
    # in one order however they were written (kept ones first, or asked for in another order): the same tree
    manifest["layouts"] = {name: manifest["layouts"][name] for name in LAYOUTS if name in manifest["layouts"]}
    _owned.write_release_json(out / MANIFEST, manifest)
    for entry in manifest["layouts"].values():
        entry["root"] = str(out / entry["root"])
    return manifest


def _other_layouts(out: Path, settings: dict[str, Any], layouts: Sequence[str]) -> dict[str, Any]:
    """The manifest entries of the layouts already in ``out`` with the same ``settings`` that this write leaves as
    they are (not in ``layouts``): the new manifest keeps listing them. A write of one layout dropped the others from
    the manifest, and the next ``ensure`` rewrote them all, under a process reading them."""
    if recorded_settings(out) != settings:
        return {}
    try:
        recorded = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("layouts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: entry for name, entry in recorded.items()
            if name in _WRITERS and name not in layouts and isinstance(entry, dict) and (out / name).is_dir()}


def _drop_staged(out: Path) -> None:
    """Remove the temporaries a killed build left beside its manifest and marker in ``out`` (the layout folders
    are replaced whole); only those files' staged names, which no one but this generator writes, under its lock."""
    from cirlab.core.io import remove_temporaries, staged_temporaries

    staged = [*staged_temporaries(out / MANIFEST), *staged_temporaries(out / _owned.MARKER)]
    for path, size in remove_temporaries(staged):
        logger.info("removed %s (%d bytes), left by a killed build", path, size)


def _claim(out: Path, layouts: Sequence[str], force: bool, overwrite: bool = True,
           settings: dict[str, Any] | None = None) -> None:
    """Check, before anything is deleted or written, that ``out`` and its layout folders are this generator's, that
    a layout folder to be replaced holds only what it wrote there, and that the data there was written with
    ``settings`` (:func:`_settings_of`)."""
    command = "cirlab data synth"
    foreign = [out / n for n in layouts
               if not _owned.is_empty(out / n) and not _owned.is_owned(out / n, __name__, (META,))]
    if not force:
        if not _owned.is_empty(out) and not _owned.is_owned(out, __name__, (MANIFEST,)):
            doomed = [out / n for n in layouts if (out / n).exists()]
            raise _owned.refuse(command, out, doomed, f"it is not empty and was not created by the synthetic "
                                f"generator (it has no {_owned.MARKER} or {MANIFEST})")
        if foreign:
            raise _owned.refuse(command, out, foreign, "its layout folder(s) were not written by the synthetic "
                                                       "generator")
    elif foreign:  # only what this generator did not write needs --force, and is worth a warning
        logger.warning("--force: replacing %s", ", ".join(_owned.describe(p) for p in foreign))
    if overwrite:
        for name in layouts:
            _owned.refuse_foreign(command, out / name, force, (META,))
    held = recorded_settings(out)
    if settings is not None and held is not None and held != settings:
        if not force:
            raise other_settings_error(command, out, held, settings, "Choose another --out, or pass --force (Python: "
                                       "force=True) to replace it")
        # no flag named: ensure() forces its own cache folder, where nobody passed --force
        logger.warning("replacing the synthetic data of %s in %s with data of %s: runs trained on it read other "
                       "data from now on", describe_settings(held, settings), out, describe_settings(settings, held))
    _owned.mark(out, __name__)


def _check_folder(out: Path, command: str) -> None:
    """``out`` is a folder (or can be one) that this process may write into; else one line naming it."""
    from cirlab.core.io import check_writable

    if os.path.lexists(out) and not os.path.isdir(out):  # os.path: Path.exists raises where one cannot enter
        raise _owned.refuse(command, out, [], "it is a file, not a folder", forcible=False)
    check_writable([out], command=command, hint="pass --out DIR, a folder you can write")  # before any look in it


def other_settings_error(command: str, out: Path, held: dict[str, Any], asked: dict[str, Any],
                         fix: str) -> OtherSettingsError:
    """The refusal to replace ``out``'s data of settings ``held`` with data of settings ``asked``, then ``fix``."""
    return OtherSettingsError(f"{command}: refusing to write into {out}: it holds synthetic data written with "
                              f"{describe_settings(held, asked)}, not {describe_settings(asked, held)} as asked, and "
                              f"runs trained on it would then read other data. {fix}")


def _settings_of(seed: int, size: str | SynthSize, image_size: int) -> dict[str, Any]:
    """The :data:`SETTINGS` of a write, as its manifest records them (JSON values: a custom size's tuples as lists,
    so a record read back compares equal)."""
    custom = not isinstance(size, str)
    spec = json.loads(json.dumps(asdict(size))) if custom else None
    return {"format": FORMAT_VERSION, "seed": seed, "size": "custom" if custom else size, "spec": spec,
            "image_size": image_size}


def recorded_settings(out_root: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`SETTINGS` the manifest in ``out_root`` records (a missing one as None), or None where there is no
    readable manifest of this generator (nothing written yet, an interrupted write, someone else's file: the
    ownership checks deal with those)."""
    try:
        manifest = json.loads((Path(out_root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != __name__:
        return None
    return {k: manifest.get(k) for k in SETTINGS}


def describe_settings(settings: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """``"seed 0, size tiny, 64-px images"``; the format and a custom size's counts only where they differ from
    ``other``'s (they say nothing new otherwise)."""
    other = other or {}
    parts = [f"seed {settings.get('seed')}", f"size {settings.get('size')}"]
    if settings.get("spec") is not None and settings.get("spec") != other.get("spec"):
        parts[-1] += f" ({', '.join(f'{k}={v}' for k, v in settings['spec'].items())})"
    parts.append(f"{settings.get('image_size')}-px images")
    if settings.get("format") != other.get("format", settings.get("format")):
        parts.append(f"file format {settings.get('format')}")
    return ", ".join(parts)


def folder_name(size: str, seed: int, image_size: int) -> str:
    """The cache folder of one setting of the set, ``<size>-seed<N>-<px>px`` (:func:`ensure`'s default)."""
    return f"{size}-seed{seed}-{image_size}px"


def settings_of_root(root: str | os.PathLike) -> tuple[tuple[str, int, int], tuple[str, ...]] | None:
    """((size, seed, image size), the parts below it) of a path inside a generated synthetic folder
    (``.../synthetic/<size>-seed<N>-<px>px/...``); None for any other path."""
    parts = Path(root).parts
    for i in range(1, len(parts)):
        settings = settings_of_folder(parts[i]) if parts[i - 1] == "synthetic" else None
        if settings is not None:
            return settings, parts[i + 1:]
    return None


def remade_root(root: str | os.PathLike, recorded_in: str | os.PathLike) -> Path | None:
    """A data root ``recorded_in`` names (a run's config.yaml) that is gone but was inside a generated synthetic set
    (``cirlab cache --remove`` removed it, or the run came from another machine's cache): that set generated again
    in this cache with the settings its folder names, said in the log; None for any other root (its data cannot be
    made again, and a stand-in would score the run on other data)."""
    found = settings_of_root(root)
    if found is None:
        return None
    (size, seed, image_size), inside = found
    logger.warning("%s: the data root it records, %s, is gone; it was the synthetic set (size %s, seed %d, %d-px "
                   "images): using that set generated again in the cache", recorded_in, root, size, seed, image_size)
    return ensure(None, seed=seed, size=size, image_size=image_size).resolve().joinpath(*inside)


def settings_of_folder(name: str) -> tuple[str, int, int] | None:
    """(size, seed, image size) a :func:`folder_name` names, None for any other name and for a custom size (its
    counts are not in the name: it cannot be made again from it)."""
    import re

    found = re.fullmatch(r"(\w+)-seed(\d+)-(\d+)px", name)
    if found is None or found.group(1) not in SIZES:
        return None
    return found.group(1), int(found.group(2)), int(found.group(3))


def ensure(out_root: str | os.PathLike | None = None, *, seed: int = 0, size: str | SynthSize = "default",
           layouts: Sequence[str] | str = LAYOUTS, image_size: int = 64) -> Path:
    """The synthetic data root, generated only when missing (or missing some of ``layouts``).

    An ``out_root`` that holds data written with other settings (seed, size, image size, file format) is refused
    (:class:`OtherSettingsError`): runs may have trained on it. The default folder is one per settings.

    ``out_root`` defaults to ``cirlab.core.paths.cache_dir() / "synthetic" / f"{size}-seed{seed}-{image_size}px"``
    (a :class:`SynthSize` as ``custom-<digest of its counts>``).
    """
    from cirlab.core.paths import cache_dir

    from cirlab.core.io import generated_folder_lock

    layouts = name_list(layouts)  # _written compares sets: a bare string was a set of letters, never written
    size = preset_name(size)
    # what the manifest records, so a SynthSize compares by its counts: the object never equalled the manifest's
    # "custom", and every call deleted and rewrote the folder (under a run reading it)
    wanted = _settings_of(seed, size, image_size)
    name = size if isinstance(size, str) else "custom-" + _digest(wanted["spec"])
    out = Path(out_root).expanduser() if out_root else cache_dir() / "synthetic" / folder_name(name, seed, image_size)
    if _written(out, wanted, layouts):
        return out
    with generated_folder_lock(out):  # a second process writing it too would break both trees
        held = recorded_settings(out)
        if out_root and held is not None and held != wanted:
            # a folder the caller named (dataset.synthetic.out) may hold the data earlier runs trained on; cirlab's
            # own cache folder is per settings, so there only another file format differs, and it is rebuilt
            command = (f"cirlab data synth --out {out} --seed {seed} --size {size} --image-size {image_size} --force"
                       if isinstance(size, str) else f"synthetic.generate({str(out)!r}, ..., force=True)")
            raise other_settings_error("synthetic data", out, held, wanted, f"Name another folder (dataset.synthetic."
                                       f"out), or replace it with `{command}`")
        if not _written(out, wanted, layouts):
            # only the layouts it lacks: those it holds may be read by a running process (a training on its
            # Fashion-IQ set while the report asks for the precomp one), and rewriting them deleted files under it.
            # The default folder is cirlab's own cache: a build from before the ownership markers is replaced
            have = _written_layouts(out, wanted, check=layouts)
            generate(out, seed=seed, size=size, layouts=[n for n in layouts if n not in have], image_size=image_size,
                     force=not out_root)
    return out


def _digest(spec: Any) -> str:
    """A short name-safe digest of a custom size's counts (its repr is no folder name)."""
    import hashlib

    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _written(out: Path, wanted: dict[str, Any], layouts: Sequence[str]) -> bool:
    """``out`` holds a complete write (its manifest, written last) with ``wanted``'s settings and ``layouts``."""
    return set(layouts) <= _written_layouts(out, wanted, check=layouts)


def _written_layouts(out: Path, wanted: dict[str, Any], check: Sequence[str] = ()) -> set[str]:
    """The layouts a complete write in ``out`` (its manifest, written last) holds with ``wanted``'s settings; of
    those named in ``check``, only the ones whose files are all still there (a stat each: a layout missing a file it
    wrote is written again). Only the layouts asked for are checked: a default-size set is 11,000 files."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(manifest, dict) and all(manifest.get(k) == v for k, v in wanted.items())):
        return set()
    layouts = set(manifest.get("layouts") or {})
    return {name for name in layouts if name not in check or not _lost_files(out / name)}


def _lost_files(root: Path) -> list[str]:
    """The files the generator recorded writing into the layout folder ``root`` that are gone now (a deleted
    caption file: "already holds ... left as it is" was said of it, and a run in the cache failed on it); the folder
    itself when it is gone. Said once per process and loss."""
    if not root.is_dir():
        lost = [f"{root.name}/"]
    else:
        try:
            recorded = _owned.recorded_files(root)
        except FileNotFoundError:
            recorded = None
        if recorded is None:
            return []  # a build from before the record: nothing to check against
        lost = [name for name in recorded if not (root / name).is_file()]
    said = (str(root), len(lost))
    if lost and said not in _SAID_LOST:
        _SAID_LOST.add(said)
        logger.warning("%s lacks %s: it is written again", root, "its folder" if not root.is_dir() else
                       f"{len(lost)} of the files cirlab's synthetic generator wrote there ({first_few(lost)})")
    return lost


_SAID_LOST: set[tuple[str, int]] = set()


# ----------------------------------------------------------------------------------------------------------------------
# ground truth and the learnability audit


@dataclass
class SynthMeta:
    """The ground truth of one written layout: image name -> scene, text -> edit, category -> spec."""

    layout: str
    scenes: dict[str, Scene]
    edits: dict[str, Edit]
    specs: dict[str, SceneSpec]
    categories: dict[str, str] = field(default_factory=dict)

    def spec_of(self, name: str) -> SceneSpec:
        return self.specs[self.categories.get(name, self.layout)]


def load_meta(root: str | os.PathLike) -> SynthMeta:
    """Read ``root/synthetic_meta.json`` (a CIR layout root written by :func:`generate`)."""
    path = Path(root) / META
    if not path.is_file():
        raise MissingPathError(f"{path}: not a synthetic dataset root (no {META})")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("layout") == "precomp":
        raise ValueError(f"{path}: precomp ground truth holds scenes per split; read it with json directly")
    return SynthMeta(raw["layout"], {k: sc.scene_from_json(v) for k, v in raw["scenes"].items()},
                     {k: Edit.from_dict(v) for k, v in raw["edits"].items()},
                     {k: SceneSpec.from_dict(v) for k, v in raw["specs"].items()}, raw.get("categories", {}))


def audit_split(split: Any, meta: SynthMeta, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Oracle vs single-modality bounds on a loaded :class:`~cirlab.data.base.CIRSplit` with targets.

    * ``oracle_R@1``: knows the reference's objects and the edit the text means, applies it and looks the result up
      in the gallery (percent of queries whose target is ranked first).
    * ``text_only_best_R@1``: the best any ranker that sees only the text can reach *even if fitted to this very
      split*: queries whose texts mean the same edit get the same ranking, so per edit at most one target scores.
    * ``image_only_best_R@1``: the same bound for rankers that see only the reference.
    * ``text_consistent_mean`` / ``image_consistent_mean``: mean number of gallery images the text alone (some
      scene becomes it under the edit) / the reference alone (one grammar edit away) leaves possible, and
      ``text_only_R@k`` / ``image_only_R@k``: the expected recall of picking among them uniformly.
    """
    gallery = split.gallery_names
    keys = {sc.scene_key(meta.scenes[n]): i for i, n in enumerate(gallery)}
    gallery_scenes = [meta.scenes[n] for n in gallery]
    text_cache: dict[Edit, int] = {}
    hits, by_edit, by_ref = 0, {}, {}
    text_sets, image_sets = [], []
    triplets = [t for t in split.triplets if t.target_name is not None]
    for t in triplets:
        spec = meta.spec_of(t.ref_name)
        edit = meta.edits[t.captions[0]]
        ref = meta.scenes[t.ref_name]
        target_idx = split.gallery_index[t.target_name]
        result = sc.apply_edit(edit, ref, spec)
        hits += result is not None and keys.get(sc.scene_key(result)) == target_idx
        by_edit.setdefault(edit, set()).add(target_idx)
        by_ref.setdefault(t.ref_name, set()).add(target_idx)
        if edit not in text_cache:
            text_cache[edit] = sum(sc.consistent_with_text(edit, g, spec) for g in gallery_scenes)
        text_sets.append(text_cache[edit])
        neighbours = sc.one_edit_neighbours(ref, spec)
        image_sets.append(sum(k in neighbours for k in keys))
    q = max(len(triplets), 1)
    out = {"queries": float(len(triplets)), "gallery": float(len(gallery)), "oracle_R@1": 100.0 * hits / q,
           "text_only_best_R@1": 100.0 * len(by_edit) / q, "image_only_best_R@1": 100.0 * len(by_ref) / q,
           "text_consistent_mean": float(np.mean(text_sets)) if text_sets else 0.0,
           "image_consistent_mean": float(np.mean(image_sets)) if image_sets else 0.0}
    for k in ks:
        out[f"text_only_R@{k}"] = 100.0 * float(np.mean([min(1.0, k / max(n, 1)) for n in text_sets] or [0]))
        out[f"image_only_R@{k}"] = 100.0 * float(np.mean([min(1.0, k / max(n, 1)) for n in image_sets] or [0]))
    return out


def audit(out_root: str | os.PathLike) -> dict[str, dict[str, float]]:
    """:func:`audit_split` for every written CIR split with targets, read back through the real-layout loaders."""
    from cirlab.data.base import load_cir

    out = Path(out_root)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    results: dict[str, dict[str, float]] = {}
    for layout, entry in manifest["layouts"].items():
        if layout == "precomp":
            continue
        root = out / entry["root"]
        meta = load_meta(root)
        for key in entry["splits"]:
            cat, _, split = key.rpartition("/")
            loaded = load_cir(layout, root, split, category=cat or None)
            if loaded.has_targets:
                results[f"{layout}/{key}"] = audit_split(loaded, meta)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synth`` to a ``cirlab data`` sub-command parser."""
    p = subparsers.add_parser(
        "synth", help="write the synthetic datasets (Fashion-IQ, CIRR, Shoes and precomp layouts)",
        description="Render shape scenes and write them in the real Fashion-IQ, CIRR, Shoes and Flickr30K precomp "
                    "layouts. No network; the same seed writes byte-identical files. An --out written before "
                    "with other settings (seed, size, image size) is refused without --force; one that already "
                    "holds the asked layouts with the same settings is left as it is.")
    p.add_argument("--out", default=None,
                   help="destination folder (default: the synthetic folder of the data root: $CIRLAB_DATA, else "
                        "a folder named data in the current folder)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="random seed (default: 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="how much to write: tiny (tests), small, default (CPU demo; the default)")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), metavar="LAYOUT",
                   help=f"layouts to write, any of {', '.join(LAYOUTS)} (default: all)")
    p.add_argument("--image-size", type=int_range(16, MAX_IMAGE_SIZE), default=64,
                   help=f"side of the rendered images in pixels, 16 to {MAX_IMAGE_SIZE} (default: 64)")
    p.add_argument("--audit", action="store_true",
                   help="afterwards, read the CIR splits back and print oracle vs text-only/image-only bounds")
    p.add_argument("--force", action="store_true",
                   help="write into --out even when it is a folder this command did not create, or one it wrote "
                        "with another seed, size or image size, replacing its fashioniq/ cirr/ shoes/ precomp/ "
                        "sub-folders, and with them files you added inside its own earlier output (without it each "
                        "is refused, naming what would go); also writes again a folder that already holds the asked "
                        "layouts with the same settings, which is otherwise left as it is")
    p.set_defaults(func=_run_cli)
    return p


def default_out() -> Path:
    """Where ``cirlab data synth`` writes without ``--out``: ``$CIRLAB_DATA/synthetic``."""
    from cirlab.core.paths import resolve_root

    return resolve_root(None, "synthetic")


def _run_cli(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser() if args.out else default_out()
    start = time.perf_counter()
    have = set() if args.force else _written_layouts(out, _settings_of(args.seed, args.size, args.image_size),
                                                     check=args.layouts)
    kept = [name for name in args.layouts if name in have]
    if kept:
        # rewriting a complete folder deleted it under any run reading it (which then failed on a missing image)
        # and renewed every file's time stamp, so a make or snakemake workflow rebuilt everything downstream
        print(f"{out} already holds {', '.join(kept)} written with these settings (seed {args.seed}, size "
              f"{args.size}, {args.image_size}-px images): left as it is (--force writes it again)")
    if len(kept) < len(args.layouts):  # missing, or missing files it wrote: only those layouts are written
        _write_cli(out, args, start, [name for name in args.layouts if name not in kept])
    if args.audit:
        for key, res in audit(out).items():
            print(f"{key}: oracle R@1 {res['oracle_R@1']:.1f}, text-only best R@1 {res['text_only_best_R@1']:.1f}, "
                  f"image-only best R@1 {res['image_only_best_R@1']:.1f}")
    return 0


def _write_cli(out: Path, args: argparse.Namespace, start: float, layouts: Sequence[str]) -> None:
    manifest = generate(out, seed=args.seed, size=args.size, layouts=layouts, image_size=args.image_size,
                        force=args.force)
    parts = []
    for layout, entry in manifest["layouts"].items():
        if layout not in layouts:
            continue
        n_q = sum(c.get("queries", c.get("captions", 0)) for c in entry["splits"].values())
        n_i = sum(c["images"] for c in entry["splits"].values())
        parts.append(f"{layout} {n_q} {'captions' if layout == 'precomp' else 'queries'}/{n_i} images")
    print(f"wrote {', '.join(parts)} to {out} (seed {args.seed}, {time.perf_counter() - start:.1f}s)")
