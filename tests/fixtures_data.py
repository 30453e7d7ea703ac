"""Writers of tiny, format-exact dataset trees for tests (import with ``from fixtures_data import write_cirr``).

Each writer lays out a tree exactly as the public release ships it (see docs/datasets.md) with 8x8 images, and
returns a dict describing what it wrote so that tests can assert against it. Every writer is deterministic.

* :func:`write_fashioniq`: ``captions/``, ``image_splits/``, ``images/`` (or ``img/{cat}/``)
* :func:`write_shoes`: ``relative_captions_shoes.json``, ``{train,eval}_im_names.txt``, ``attributedata/``
* :func:`write_cirr`: ``cirr/captions/``, ``cirr/image_splits/``, ``train/``, ``dev/``, ``test1/``
* :func:`write_precomp`: ``{name}_precomp/{split}_ims.npy`` + ``{split}_caps.txt``
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
MODIFICATIONS = ("color", "shape", "size")


def _color(key: str) -> tuple[int, int, int]:
    """A deterministic colour per image name (so decoded pixels identify the image)."""
    h = sum((i + 1) * ord(c) for i, c in enumerate(key))
    return (h * 37) % 256, (h * 91) % 256, (h * 53) % 256


def write_image(path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] | None = None) -> Path:
    """An RGB image of one colour (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color or _color(path.stem)).save(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def write_fashioniq(root: Path, categories: tuple[str, ...] = FIQ_CATEGORIES,
                    splits: tuple[str, ...] = ("train", "val", "test"), n_queries: int = 4, n_extra: int = 2,
                    layout: str = "images", ext: str = "png", modification: bool = False) -> dict[str, Any]:
    """A Fashion-IQ tree.

    Per category and split there are ``n_queries + n_extra`` images ``{cat}_{split}_{k}`` listed in the split file; the
    caption file has ``n_queries`` entries, entry j: candidate image j, target image (j+1) % n_queries, two captions.
    The ``n_extra`` images appear only in the split file (so the "split" gallery is larger than the "amc" one).
    Test caption files have no "target". ``modification=True`` adds a per-entry "modification" key.

    Returns:
        {"root", "categories", "names": {(cat, split): [names]}, "entries": {(cat, split): [caption entries]}}
    """
    root = Path(root)
    names: dict[tuple[str, str], list[str]] = {}
    entries: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cat in categories:
        for split in splits:
            listed = [f"{cat}_{split}_{k}" for k in range(n_queries + n_extra)]
            folder = root / "img" / cat if layout == "img" else root / layout  # images/, image_data/ (CaLa)
            for name in listed:
                write_image(folder / f"{name}.{ext}")
            caps = []
            for j in range(n_queries):
                entry: dict[str, Any] = {"candidate": listed[j], "target": listed[(j + 1) % n_queries],
                                         "captions": [f"is more {cat} {j}.", f" has {split} sleeves {j} "]}
                if split == "test":
                    del entry["target"]
                if modification:
                    entry["modification"] = MODIFICATIONS[j % len(MODIFICATIONS)]
                caps.append(entry)
            write_json(root / "image_splits" / f"split.{cat}.{split}.json", listed)
            write_json(root / "captions" / f"cap.{cat}.{split}.json", caps)
            names[cat, split], entries[cat, split] = listed, caps
    return {"root": root, "categories": list(categories), "names": names, "entries": entries}


def write_shoes(root: Path, n_train: int = 6, n_test: int = 5) -> dict[str, Any]:
    """A Shoes tree.

    Train images ``img_womens_boots_{k}.jpg`` (under ``attributedata/womens_boots/0/``), test images
    ``img_womens_flats_{k}.jpg`` (under ``attributedata/womens_flats/1/``), plus a ``mens_shoes`` folder that must be
    ignored. Captions: within each split, entry for image k has reference k and target k+1 (train: n_train - 1 entries,
    test: n_test - 1 entries), train entries first.

    Returns:
        {"root", "train": [names], "test": [names], "entries": [caption entries], "paths": {name: path}}
    """
    root = Path(root)
    train = [f"img_womens_boots_{k}.jpg" for k in range(n_train)]
    test = [f"img_womens_flats_{k}.jpg" for k in range(n_test)]
    paths = {}
    for name in train:
        paths[name] = write_image(root / "attributedata" / "womens_boots" / "0" / name)
    for name in test:
        paths[name] = write_image(root / "attributedata" / "womens_flats" / "1" / name)
    write_image(root / "attributedata" / "mens_shoes" / "0" / "img_mens_shoes_0.jpg")
    entries = []
    for names in (train, test):
        for k in range(len(names) - 1):
            entries.append({"ImageName": names[k + 1], "ReferenceImageName": names[k],
                            "RelativeCaption": f" is taller {k} "})
    write_json(root / "relative_captions_shoes.json", entries)
    (root / "train_im_names.txt").write_text("".join(f"{n}\n" for n in train))
    (root / "eval_im_names.txt").write_text("".join(f"{n}\n" for n in test))
    return {"root": root, "train": train, "test": test, "entries": entries, "paths": paths}


def write_cirr(root: Path, groups: dict[str, int] | None = None, modification: bool = False) -> dict[str, Any]:
    """A CIRR rc2 tree (``root`` = the ``cirr_dataset`` folder).

    ``groups`` gives the number of img_set groups of 6 images per split (default train 2, val 2, test1 1). Image
    files: ``train/<g>/train-{g}-{m}-img0.png``, ``dev/dev-{g}-{m}-img0.png``, ``test1/test1-{g}-{m}-img0.png``.
    Queries: per group 2 queries (reference member 0 -> target member 2, reference member 1 -> target member 5);
    pairids count up from 100 per split; test1 entries have no target_hard / target_soft.

    Returns:
        {"root", "names": {split: [names in gallery order]}, "entries": {split: [caption entries]}}
    """
    root = Path(root)
    groups = groups or {"train": 2, "val": 2, "test1": 1}
    folders = {"train": "train", "val": "dev", "test1": "test1"}
    out: dict[str, Any] = {"root": root, "names": {}, "entries": {}}
    for split, n_groups in groups.items():
        prefix = folders[split]
        image_split: dict[str, str] = {}
        entries = []
        for g in range(n_groups):
            members = [f"{prefix}-{g}-{m}-img0" for m in range(6)]
            for m in members:
                rel = f"./train/{g}/{m}.png" if split == "train" else f"./{prefix}/{m}.png"
                image_split[m] = rel
                write_image(root / rel)
            for q, (r, t) in enumerate(((0, 2), (1, 5))):
                entry: dict[str, Any] = {
                    "pairid": 100 + 2 * g + q, "reference": members[r], "target_hard": members[t],
                    "target_soft": {members[t]: 1.0}, "caption": f"make it look like {t} not {r}",
                    "img_set": {"id": g, "members": members, "reference_rank": r, "target_rank": t}}
                if split == "test1":
                    del entry["target_hard"], entry["target_soft"], entry["img_set"]["target_rank"]
                if modification:
                    entry["modification"] = MODIFICATIONS[q]
                entries.append(entry)
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", image_split)
        write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", entries)
        out["names"][split], out["entries"][split] = list(image_split), entries
    return out


def write_precomp(root: Path, name: str = "f30k", splits: tuple[str, ...] = ("train", "dev", "test"),
                  n_images: int = 4, captions_per_image: int = 5, regions: int = 36, dim: int = 2048,
                  dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """A precomp tree: ``{name}_precomp/{split}_ims.npy`` [n_images, regions, dim] and ``{split}_caps.txt``.

    Image i's features are ``i + noise`` so tests can check which image a caption maps to (``round(mean)``); caption
    line ``5i + j`` reads ``"image {i} caption {j} ."``.

    Returns:
        {"root", "dir", "features": {split: array}, "captions": {split: [str]}}
    """
    root = Path(root)
    folder = root / f"{name}_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"root": root, "dir": folder, "features": {}, "captions": {}}
    for split in splits:
        feats = (np.arange(n_images, dtype=np.float64)[:, None, None]
                 + 0.01 * rng.standard_normal((n_images, regions, dim))).astype(dtype)
        np.save(folder / f"{split}_ims.npy", feats)
        caps = [f"image {i} caption {j} ." for i in range(n_images) for j in range(captions_per_image)]
        (folder / f"{split}_caps.txt").write_text("".join(f"{c}\n" for c in caps))
        out["features"][split], out["captions"][split] = feats, caps
    return out


def precomp_run_config(path: Path, root: Path, *, model: str = "hrem", regions: int = 36, dim: int = 2048,
                       overrides: dict[str, Any] | None = None, splits: tuple[str, ...] = ("dev",),
                       **train: Any) -> Path:
    """A ``cirlab train`` YAML config at ``path``: ``model``'s tiny preset on the f30k precomp tree under ``root``
    (features ``regions`` x ``dim``), one step of batch 4 unless ``train`` says otherwise."""
    import yaml

    config = {"model": model, "preset": "tiny", "model_overrides": dict(overrides or {}),
              "dataset": {"name": "f30k", "root": str(root), "options": {"dim": dim, "regions": regions}},
              "train": {"max_steps": 1, "batch_size": 4, "progress": "none", "tensorboard": False, **train},
              "eval": {"splits": list(splits)}}
    path.write_text(yaml.safe_dump(config))
    return path
