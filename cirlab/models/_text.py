"""The BERT-family text backbone shared by the ITM models (DIME, HREM): building it, its vocabulary, tokenisation.

``cfg.bert`` names the backbone (every model config that uses this module has the fields ``bert``,
``bert_config`` and ``vocab_file``):

* a local directory: transformers layout (``config.json`` + weights + ``vocab.txt``) or the original Google/DIME
  layout (``bert_config.json`` + ``pytorch_model.bin`` + ``vocab.txt``, keys converted by
  :func:`convert_original_bert_state_dict`); without ``vocab.txt`` the WordPiece vocabulary of ``tokenizer.json``
  (transformers 5's ``save_pretrained`` writes only that), :func:`folder_vocab`. A vocabulary with more tokens
  than the BERT's word-embedding table has rows is refused when the model is built (:func:`refuse_vocab_beyond_table`);
* ``"minilm"``: the real all-MiniLM-L6-v2 (6 layers, 384-d) that installs from PyPI (``cirlab.models._lite``);
  its ``vocab.txt`` is the ``bert-base-uncased`` vocabulary;
* ``"random"``: a random-init BERT (tiny sizes unless ``bert_config`` says otherwise) with a character-level
  WordPiece vocabulary (:func:`tiny_vocab`), widened to whole words from the training captions by
  :meth:`BertVocabMixin.fit_vocab`;
* anything else: a model hub id (only outside tests; nothing here downloads at import).

:class:`BertVocabMixin` gives a model the tokenizer cache, ``fit_vocab`` and the state-dict handling that keeps a
fitted vocabulary with the weights; the model keeps its BERT at ``txt_enc.bert``.
"""
from __future__ import annotations

import logging
import os
import string
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from cirlab.core.errors import ConfigError, InputError, MissingPathError
from cirlab.core.streams import model_streams

logger = logging.getLogger(__name__)

# BERT-Base sizes, used to count parameters (and build a random BERT) without any weights.
BERT_BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
}
TINY_BERT_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 64, "type_vocab_size": 2,
}


def convert_original_bert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Google BERT / DIME key layout -> transformers ``BertModel`` keys.

    Strips a ``bert.`` prefix, drops pre-training heads (``cls.*``) and the ``position_ids`` buffer (present or
    not depending on the transformers version that saved it), renames LayerNorm ``gamma``/``beta`` (pre-2022
    layout) to ``weight``/``bias``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("bert."):
            key = key[len("bert."):]
        if key.startswith("cls.") or key.endswith("position_ids"):
            continue
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def tiny_vocab(words: Iterable[str] = ()) -> list[str]:
    """A small WordPiece vocabulary that can spell any lower-case ASCII text (characters + ``##`` pieces),
    plus whole ``words`` (e.g. the training captions' words) so that common words stay one token."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for w in words:
        w = w.lower()
        if w and w not in seen:
            seen.add(w)
            vocab.append(w)
    return vocab


def load_bert(cfg: Any, owner: str = "text encoder") -> tuple[nn.Module, Any]:
    """``(BertModel without pooler, vocab)`` for ``cfg.bert``; ``vocab`` is a vocab.txt path, a token list or a
    tokenizer. ``owner`` names the model in error messages. A vocabulary the word-embedding table has too few rows
    for is refused here, before any data meets the model (:func:`refuse_vocab_beyond_table`)."""
    bert, vocab = _bert_and_vocab(cfg, owner)
    refuse_vocab_beyond_table(bert, vocab, cfg, owner)
    return bert, vocab


def _bert_and_vocab(cfg: Any, owner: str) -> tuple[nn.Module, Any]:
    """:func:`load_bert`'s model and vocabulary, unchecked."""
    from transformers import BertConfig, BertModel

    name = cfg.bert
    if name == "random":
        if cfg.vocab_file and not Path(cfg.vocab_file).expanduser().is_file():
            raise MissingPathError(f"{owner}: model_overrides.vocab_file {cfg.vocab_file} does not exist (a vocab.txt, "
                                   "one token a line)")
        vocab: Any = cfg.vocab_file or tiny_vocab()
        sizes = {**TINY_BERT_CONFIG, **(cfg.bert_config or {})}
        if isinstance(vocab, list):
            sizes.setdefault("vocab_size", len(vocab))
            if sizes["vocab_size"] < len(vocab):
                raise InputError(f"{owner}: model_overrides.bert_config vocab_size {sizes['vocab_size']} < the tiny "
                                 f"vocabulary's {len(vocab)} tokens")
        else:
            sizes.setdefault("vocab_size", vocab_tokens(vocab))
        return BertModel(BertConfig(**sizes), add_pooling_layer=False), vocab
    if name == "minilm":
        from cirlab.models._lite import minilm_dir

        path = minilm_dir()
    else:
        path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            load = _from_pretrained_without_pooler
        elif (path / "bert_config.json").is_file():
            load = _load_original_layout
        else:
            raise MissingPathError(f"{owner}: {path} has neither config.json (transformers) nor bert_config.json "
                                    "(original Google/DIME layout)")
        vocab = cfg.vocab_file or folder_vocab(path, owner)  # before the weights: a missing vocabulary is quick
        return load(path, owner), vocab
    if path.exists():  # a file (a vocab.txt, a weights file) where the folder that holds them belongs
        raise InputError(f"{owner}: model_overrides.bert={name} is a file; a BERT folder is expected (config.json "
                         "+ weights + vocab.txt or tokenizer.json, or the original bert_config.json + "
                         "pytorch_model.bin + vocab.txt)")
    if name.startswith((".", "/", "~")):
        raise MissingPathError(f"{owner}: BERT directory {path} (model_overrides.bert) does not exist")
    offline = not hub_reachable()
    logger.info("%s: loading BERT %r from the model hub%s", owner, name, " cache (hub unreachable)" if offline else "")
    from transformers import BertTokenizer

    try:
        return (_from_pretrained_without_pooler(name, owner, local_files_only=offline),
                BertTokenizer.from_pretrained(name, local_files_only=offline))
    except OSError:  # no hub here and not in its cache: transformers' several-line message says only that
        raise MissingPathError(f"{owner}: bert {name!r} is not a local folder, and neither the model hub nor its "
                                "cache has it; set bert (--set model_overrides.bert=PATH; the original code's "
                                "--bert_path) to a local BERT folder (config.json + vocab.txt, or the original "
                                "bert_config.json layout)") from None


def folder_vocab(path: Path, owner: str = "text encoder") -> Any:
    """The vocabulary of the BERT folder ``path``: its ``vocab.txt`` (the path), else a tokenizer over the WordPiece
    vocabulary of its ``tokenizer.json`` (read by :func:`cirlab.models._lite.read_tokenizer_json`; transformers 5's
    ``save_pretrained`` writes no vocab.txt). Both tokenise alike (:func:`make_tokenizer`: lower case, BERT's
    basic splitting). A folder with neither, or a ``tokenizer.json`` of another kind (BPE, unigram), is one line
    naming ``model_overrides.bert``, when the model is built."""
    if (path / "vocab.txt").is_file():
        return str(path / "vocab.txt")
    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingPathError(f"{owner}: the BERT folder {path} (model_overrides.bert) has neither vocab.txt nor "
                               "tokenizer.json; copy the BERT's vocabulary there, or set model_overrides.vocab_file "
                               "to its vocab.txt")
    from tokenizers.models import WordPiece

    from cirlab.models._lite import read_tokenizer_json

    tokenizer = read_tokenizer_json(file)
    if not isinstance(tokenizer.model, WordPiece):
        raise InputError(f"{owner}: {file} (model_overrides.bert) holds a {type(tokenizer.model).__name__} "
                         "tokenizer, not BERT's WordPiece; set model_overrides.vocab_file to the BERT's vocab.txt")
    return make_tokenizer(dict(tokenizer.get_vocab(with_added_tokens=True)))


def vocab_tokens(vocab: Any) -> int:
    """How many token ids ``vocab`` (a vocab.txt path, a token list, a token -> id dict or a tokenizer) gives: one per
    line of a vocab.txt, as ``BertTokenizer`` numbers them."""
    if isinstance(vocab, (list, tuple)):
        return len(vocab)
    if isinstance(vocab, dict):
        return max(vocab.values(), default=-1) + 1
    if isinstance(vocab, (str, os.PathLike)):
        with open(vocab, encoding="utf-8", errors="replace") as fh:
            return sum(1 for _ in fh)
    return len(vocab)


def refuse_vocab_beyond_table(bert: nn.Module, vocab: Any, cfg: Any, owner: str = "text encoder") -> None:
    """A vocabulary with more tokens than ``bert``'s word-embedding table has rows (a ``vocab_file`` of another
    BERT: a cased or multilingual one) is one :class:`InputError` line naming the field to set, when the model is
    built: its first token past the table would stop training with ``IndexError: index out of range in self``,
    maybe hours in (the BLIP re-ranker checks its batches the same way, ``_hf_blip.refuse_unknown_tokens``)."""
    rows, tokens = bert.get_input_embeddings().num_embeddings, vocab_tokens(vocab)
    if tokens <= rows:
        return
    field = (f"model_overrides.vocab_file={cfg.vocab_file}" if cfg.vocab_file else
             f"model_overrides.bert={cfg.bert}")
    where = f" ({vocab})" if isinstance(vocab, (str, os.PathLike)) else ""
    raise InputError(f"{owner}: {field}: the vocabulary{where} has {tokens} tokens but the BERT's word-embedding "
                     f"table {rows} rows (its config's vocab_size); set model_overrides.vocab_file to the vocabulary "
                     "this BERT was trained with, or model_overrides.bert to the BERT of this vocabulary")


HUB_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub can be reached, decided in at most ``timeout`` seconds: False under ``HF_HUB_OFFLINE``
    or when its host does not resolve or accept a connection. Without this check a machine with no network spends
    about 30 s in huggingface_hub's five connection retries before the same answer. Behind a proxy the direct
    connection proves nothing, so a proxy setting counts as reachable (the download then decides)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in HUB_PROXY_VARIABLES):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


def _from_pretrained_without_pooler(source: str | Path, owner: str, local_files_only: bool = True) -> nn.Module:
    """A transformers BERT (a local folder, or a hub id) without its pooler. transformers prints a progress bar and
    a load report table for the pooler and pre-training head weights it drops, on every load; the drop is
    intended, so only a missing weight (an error) or another unread key is said (:func:`_lite.load_encoder`)."""
    from transformers import BertModel

    from cirlab.models._lite import load_encoder

    return load_encoder(BertModel, source, owner, local_files_only=local_files_only, add_pooling_layer=False)


def _load_original_layout(path: Path, owner: str) -> nn.Module:
    from transformers import BertConfig, BertModel

    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        raise MissingPathError(f"{owner}: {weights} missing (original layout needs bert_config.json + "
                                "pytorch_model.bin)")
    model = BertModel(BertConfig.from_json_file(str(path / "bert_config.json")), add_pooling_layer=False)
    from cirlab.core.checkpoint import load_checkpoint

    state = convert_original_bert_state_dict(load_checkpoint(weights, trust_hint="save the weights as a state dict"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}  # no pooler: never used
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"{owner}: {weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model


def make_tokenizer(vocab: Any) -> Any:
    """A lower-casing WordPiece tokenizer from a token list, a token -> id dict, a vocab.txt path (or a ready
    tokenizer)."""
    from transformers import BertTokenizer, PreTrainedTokenizerBase

    if isinstance(vocab, PreTrainedTokenizerBase):
        return vocab
    if isinstance(vocab, list):
        vocab = {t: i for i, t in enumerate(vocab)}
    if isinstance(vocab, dict):
        return BertTokenizer(vocab=vocab, do_lower_case=True)
    if not Path(vocab).is_file():
        raise MissingPathError(f"vocabulary file {vocab} does not exist")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def word_splitter(tokenizer: Any) -> Any:
    """The tokenizer's own split of a text into words before WordPiece (lower case, accents and punctuation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers (transformers >= 5: always)
    if backend is not None and backend.pre_tokenizer is not None:
        norm, pre = backend.normalizer, backend.pre_tokenizer
        return lambda text: [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text) if norm else text)]
    basic = tokenizer.basic_tokenizer  # slow BertTokenizer
    return lambda text: basic.tokenize(text, never_split=tokenizer.all_special_tokens)


_WORD_TABLE_STREAM = 0x7E1D  # offset of the word table's generator from the run's seed (a stream of its own)


class BertVocabMixin:
    """Vocabulary handling for a model whose BERT sits at ``txt_enc.bert`` and whose config has ``bert``,
    ``bert_config`` and ``vocab_file``. The model sets ``self._vocab`` (what :func:`load_bert` returned),
    ``self._built_vocab = self._vocab`` and ``self._tokenizer = None`` in its ``__init__``."""

    _BERT_KEY = "txt_enc.bert.embeddings.word_embeddings.weight"

    def _bert(self) -> nn.Module:
        return self.txt_enc.bert  # type: ignore[attr-defined]

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self._vocab)
        return self._tokenizer

    def fit_vocab(self, source: Any) -> int:
        """Whole-word vocabulary for the random BERT from the training captions; returns the vocabulary size.

        Only with ``bert="random"`` and no ``vocab_file`` (the ``tiny`` presets): the words of ``source`` (a
        training ``PrecompSplit``, i.e. its ``captions``, or an iterable of captions), split as the tokenizer
        splits them (lower case, punctuation apart), are added in sorted order to :func:`tiny_vocab`. The tokenizer
        and the random BERT's word-embedding table are rebuilt to match (fresh rows with BERT's N(0,
        initializer_range) init, drawn from a generator seeded with ``torch.initial_seed()``, the run's seed, so
        deterministic under it and independent of what was built before: HREM with and without its instance
        module starts from the same encoders, so paired runs differ only by the module); without this the
        character-spelling vocabulary cuts captions into characters. The vocabulary is saved in the state dict.
        A real BERT (or a given ``vocab_file``) keeps its vocabulary: a no-op.
        """
        owner = type(self).__name__
        if self.config.bert != "random" or self.config.vocab_file:  # type: ignore[attr-defined]
            return int(self._get_tokenizer().vocab_size)
        texts = getattr(source, "captions", source)
        if isinstance(texts, str) or not isinstance(texts, Iterable):
            raise TypeError(f"{owner}.fit_vocab expects the training captions (a PrecompSplit or a list of strings), "
                            f"got {type(source).__name__}")
        split_words = word_splitter(make_tokenizer(tiny_vocab()))
        words: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"{owner}.fit_vocab: captions must be strings, got {type(text).__name__}")
            words.update(split_words(text))
        if not words:
            raise ValueError(f"{owner}.fit_vocab: the training captions hold no words")
        vocab = tiny_vocab(sorted(words))
        rows = (self.config.bert_config or {}).get("vocab_size", len(vocab))  # type: ignore[attr-defined]
        with model_streams(self):  # create_model(seed=)'s model: its own seed, not the caller's state
            self._set_vocab(vocab, rows=rows, init=True)
        logger.info("%s: random BERT vocabulary of %d tokens (%d words from the training captions)",
                    owner, len(vocab), len(words))
        return len(vocab)

    def _set_vocab(self, vocab: list[str], rows: int, init: bool) -> None:
        """Use the token list ``vocab`` with a new ``rows``-row word-embedding table."""
        if rows < len(vocab):
            raise ConfigError(f"{type(self).__name__}: vocabulary of {len(vocab)} tokens but bert_config "
                             f"vocab_size {rows}")
        self._new_word_table(rows, init)
        self._vocab, self._tokenizer = list(vocab), None

    def _new_word_table(self, rows: int, init: bool) -> None:
        """A new word-embedding table for the BERT: drawn as BERT initialises it (N(0, initializer_range), zero
        padding row) when ``init``, else zeros for a state dict to fill (no RNG draw). It is trainable exactly
        when the old table was (DIME's BERT is frozen, HREM's fine-tuned)."""
        bert = self._bert()
        old = bert.get_input_embeddings()
        weight = torch.zeros(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        if init:  # its own generator: the global stream's position depends on which modules were built first
            gen = torch.Generator().manual_seed((torch.initial_seed() + _WORD_TABLE_STREAM) % 2**63)
            std = float(getattr(bert.config, "initializer_range", 0.02))
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * std)
            if old.padding_idx is not None:
                weight[old.padding_idx] = 0
        new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, _weight=weight)
        new.weight.requires_grad_(old.weight.requires_grad)
        bert.set_input_embeddings(new)
        bert.config.vocab_size = rows

    def get_extra_state(self) -> dict[str, Any]:
        """The vocabulary when it is a token list (random BERT), so a saved model tokenises the same way after
        loading; None when it comes from files (a real BERT's vocab.txt)."""
        return {"vocab": list(self._vocab) if isinstance(self._vocab, list) else None}

    def set_extra_state(self, state: Any) -> None:
        vocab = state.get("vocab") if isinstance(state, dict) else None
        if not isinstance(state, dict) or not (vocab is None or isinstance(vocab, (list, tuple))):
            raise ValueError(f"{type(self).__name__} checkpoint: bad saved vocabulary entry {type(state).__name__}")
        if vocab is not None:
            self._vocab, self._tokenizer = [str(t) for t in vocab], None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # runs before the children load: resize the random BERT's table to the saved vocabulary first
        table = self._bert().get_input_embeddings()
        saved = state_dict.get(prefix + self._BERT_KEY)
        if (self.config.bert == "random" and isinstance(saved, torch.Tensor)  # type: ignore[attr-defined]
                and saved.dim() == 2 and saved.shape[1] == table.embedding_dim
                and saved.shape[0] != table.num_embeddings):
            self._new_word_table(saved.shape[0], init=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict:  # saved before the model stored its vocabulary, or converted from original code
            if key in missing_keys:
                missing_keys.remove(key)
            self._vocab, self._tokenizer = self._built_vocab, None
        rows = self._bert().get_input_embeddings().num_embeddings
        if isinstance(self._vocab, list) and len(self._vocab) > rows:
            error_msgs.append(f"{type(self).__name__}: the vocabulary has {len(self._vocab)} tokens but the "
                              f"word-embedding table {rows} rows")
