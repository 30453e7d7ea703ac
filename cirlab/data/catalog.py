"""The dataset table: everything cirlab knows about a dataset by name, in one place.

Adding a dataset means one :class:`DatasetSpec` row here plus its loader module (``load(root, split=...,
category=..., **options)`` and ``scan(root, sink)`` for CIR layouts; see ``docs/architecture.md``). The engine,
the checker, the CLI and the workbench read names, tasks, categories, protocols and folder layout from this
table and nowhere else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str  # "cir" (composed image retrieval) | "itm" (image-text matching, precomp region features)
    loader: str  # module with the layout's load/scan functions
    subdir: str  # folder of this dataset under a data root holding several layouts ($CIRLAB_DATA, the synthetic set)
    protocols: tuple[str, ...]  # evaluation protocols (cirlab.engine.evaluate) valid for this dataset
    default_protocol: str
    categories: tuple[str, ...] = ()  # the paper's categories, each evaluated on its own (Fashion-IQ)
    splits: tuple[str, ...] = ("train", "val", "test")  # the layout's names for training, validation, test
    aliases: tuple[str, ...] = ()
    # the dataset's folder under the base path of CLIP4Cir, the re-ranker and CaLa (their --data-path or base_path)
    release_dir: str = ""

    @property
    def is_itm(self) -> bool:
        return self.task == "itm"


# full: the whole split's image x caption matrix (Flickr30K 1K test, any dev split; "f30k" is its old name);
# coco1k: mean over 5 folds of 1,000 images (only the 5 diagonal blocks are scored); coco5k: full testall;
# coco: both COCO numbers from one full matrix (keys prefixed 1k_ / 5k_), as HREM's evaluation prints them
ITM_PROTOCOLS = ("full", "f30k", "coco1k", "coco5k", "coco")

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("fashioniq", "cir", "cirlab.data.fashioniq", "fashioniq", ("fashioniq",), "fashioniq",
                categories=("dress", "shirt", "toptee"), aliases=("fiq", "fashion_iq", "fashion-iq"),
                release_dir="fashionIQ_dataset"),
    DatasetSpec("shoes", "cir", "cirlab.data.shoes", "shoes", ("shoes",), "shoes"),
    DatasetSpec("cirr", "cir", "cirlab.data.cirr", "cirr", ("cirr",), "cirr", splits=("train", "val", "test1"),
                release_dir="cirr_dataset"),
    # COCO's protocol "coco" reports 1K (5 folds) and 5K from one matrix, on its test split only (testall)
    DatasetSpec("f30k", "itm", "cirlab.data.precomp", "precomp", ITM_PROTOCOLS, "full",
                splits=("train", "dev", "test"), aliases=("flickr30k",)),
    DatasetSpec("coco", "itm", "cirlab.data.precomp", "precomp", ITM_PROTOCOLS, "coco",
                splits=("train", "dev", "testall"), aliases=("mscoco",)),
)}
_ALIASES = {alias: spec.name for spec in DATASETS.values() for alias in spec.aliases}

CIR_DATASETS = tuple(n for n, s in DATASETS.items() if s.task == "cir")
ITM_DATASETS = tuple(n for n, s in DATASETS.items() if s.task == "itm")


def canonical_name(name: str) -> str:
    """The table's name for ``name`` (case and aliases folded); unknown names are returned lower-cased."""
    key = str(name).lower()
    return _ALIASES.get(key, key)


def get_dataset(name: str) -> DatasetSpec:
    """The dataset's row; a :class:`~cirlab.core.errors.ConfigError` (a ``ValueError``) with "did you mean" and the
    known names for an unknown one."""
    from cirlab.core.config import did_you_mean
    from cirlab.core.errors import ConfigError

    key = canonical_name(name)
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def is_itm(name: str) -> bool:
    """True for the ITM precomp datasets (f30k, coco); False for CIR datasets and unknown names."""
    key = canonical_name(name)
    return key in DATASETS and DATASETS[key].is_itm


def itm_protocol_of(name: str, split: str, test_split: str | None = None, protocol: str | None = None) -> str:
    """The protocol an ITM ``split`` of dataset ``name`` is scored with: ``protocol`` (default: the dataset's own,
    ``coco`` = 1K and 5K for COCO, else ``full``). The COCO protocols describe the 5,000-image test split only
    (``test_split``, default the dataset's: ``testall``); every other split (the 1,000-image ``dev`` that selects
    the checkpoint) is scored on its full matrix, as the original validation does. The one rule of the run configs
    and of :func:`cirlab.evaluate_itm` without a protocol."""
    if canonical_name(name) not in DATASETS:  # a precomp set of one's own (load_precomp reads any name)
        return protocol or "full"
    spec = get_dataset(name)
    protocol = protocol or spec.default_protocol
    if protocol.startswith("coco") and split != (test_split or spec.splits[2]):
        return "full"
    return protocol


def dataset_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder a dataset's loader reads, from a dataset root or a data root holding several layouts.

    ``root`` may be the dataset's own folder, or a folder with the dataset in its ``subdir`` (``<root>/fashioniq``,
    ``<root>/precomp``: the synthetic set looks like that) or in its ``release_dir`` (``<root>/fashionIQ_dataset``,
    ``<root>/cirr_dataset``: the base path of CLIP4Cir, the re-ranker and CaLa); the subfolder is taken when it
    exists. Without a root, ``$CIRLAB_DATA`` is read the same way, and a CIR dataset found in neither subfolder is
    ``$CIRLAB_DATA/<subdir>`` (so a missing one is named by that path). The one place this decision is taken (the
    loaders, ``cirlab data check`` and the workbench all ask here).
    """
    from cirlab.core.paths import data_root

    spec = get_dataset(name)
    given = root is not None and str(root) != ""
    base = Path(root).expanduser() if given else data_root()
    for sub in (base / spec.subdir, *([base / spec.release_dir] if spec.release_dir else [])):
        if sub.is_dir():
            return sub
    return base / spec.subdir if not given and not spec.is_itm else base


def categories(name: str, root: str | os.PathLike | None, split: str) -> list[str]:
    """The categories evaluated one by one: those found on disk for ``split`` (the emoji set has its own),
    else the paper's. Empty for datasets evaluated as one split."""
    spec = get_dataset(name)
    if not spec.categories:
        return []
    folder = dataset_root(name, root)  # the folder the loader reads: <root>/fashioniq, <root>/fashionIQ_dataset
    if folder.is_dir():
        from cirlab.data.fashioniq import find_categories

        found = find_categories(folder, split)
        if found:
            return found
    return list(spec.categories)  # none found: the loader names the missing file
