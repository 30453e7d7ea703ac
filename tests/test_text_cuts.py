"""A text longer than a model reads is cut, and the cut is said: one warning per model instance with the count and
the limit, later cuts at DEBUG level; a text that exactly fills the limit is not counted (every shipped model, on
its tiny preset, through its public text path)."""
from __future__ import annotations

import logging

import pytest
import torch

import cirlab
from cirlab.models._truncation import hf_cut_count

# (model, preset, the limit's config field, or None for AMC's fixed word budget)
CASES = [("amc", "tiny", None), ("dime", "tiny", "max_words"), ("hrem", "tiny", "max_words"),
         ("blip_rerank_stage1", "tiny", "max_text_len"), ("cala", "tiny", "max_text_len"),
         ("cala", "tiny_clip", "clip_context_length")]


def _encode_texts(model, texts: list[str]) -> None:
    """The model's public text path (ITM: encode_text; CIR: encode_query with blank reference images)."""
    with torch.no_grad():
        if hasattr(model, "encode_text"):
            model.encode_text(texts)
        else:
            side = int(model.config.image_size)
            model.encode_query(torch.zeros(len(texts), 3, side, side), texts)


def _cuts(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if " were cut to " in r.getMessage()]


@pytest.mark.parametrize("name,preset,field", CASES)
def test_a_cut_is_said_once_as_a_warning_then_at_debug_level(name, preset, field, caplog):
    model = cirlab.create_model(name, preset).eval()
    limit = 128 if field is None else int(getattr(model.config, field))
    long_text = " ".join(["red"] * (4 * limit))
    with caplog.at_level(logging.DEBUG, logger="cirlab"):
        _encode_texts(model, [long_text, "a red circle", long_text])
        _encode_texts(model, [long_text, "blue"])
    cuts = _cuts(caplog)
    assert [r.levelno for r in cuts] == [logging.WARNING, logging.DEBUG]
    first = cuts[0].getMessage()
    assert f"2 of the 3 text(s) in a batch were cut to {limit} " in first and "later cuts" in first
    assert f"1 of the 2 text(s) in a batch were cut to {limit} " in cuts[1].getMessage()
    other = cirlab.create_model(name, preset).eval()  # another instance warns on its own first cut
    with caplog.at_level(logging.DEBUG, logger="cirlab"):
        caplog.clear()
        _encode_texts(other, [long_text])
    assert [r.levelno for r in _cuts(caplog)] == [logging.WARNING]


@pytest.mark.parametrize("name,preset,field", [c for c in CASES if c[2] is not None])
def test_a_text_filling_the_limit_exactly_is_not_counted(name, preset, field, caplog):
    model = cirlab.create_model(name, preset).eval()
    limit = int(getattr(model.config, field))
    tokenizer = model._get_tokenizer() if hasattr(model, "_get_tokenizer") else model.tokenizer
    exact = _text_of_tokens(tokenizer, limit - 2)  # plus [CLS]/[SEP] or SOT/EOT: exactly the limit
    with caplog.at_level(logging.DEBUG, logger="cirlab"):
        _encode_texts(model, [exact])
        assert _cuts(caplog) == []
        _encode_texts(model, [exact + " a"])
    assert len(_cuts(caplog)) == 1


def _text_of_tokens(tokenizer, n: int) -> str:
    """A text the tokenizer reads as exactly ``n`` tokens without special ones (grown a word at a time)."""
    words: list[str] = []
    while _length(tokenizer, " ".join(words)) < n:
        words.append("a")  # one token in every vocabulary here (the tiny ones spell words by letters)
    text = " ".join(words)
    assert _length(tokenizer, text) == n, "the tiny vocabulary gives several tokens per word"
    return text


def _length(tokenizer, text: str) -> int:
    if hasattr(tokenizer, "_bpe"):  # CLIP's BPE
        return len(tokenizer._bpe.encode(text))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_hf_cut_count_matches_a_count_of_untruncated_lengths():
    model = cirlab.create_model("blip_rerank_stage1", "tiny")
    tokenizer, limit = model.tokenizer, 12
    texts = [" ".join(["red"] * n) for n in range(20)] + ["", "blue " * 300]
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    naive = sum(len(tokenizer(t)["input_ids"]) > limit for t in texts)  # with [CLS] and [SEP], no truncation
    # n + 2 > limit for n = limit - 1 .. 19 words, and the long one
    assert hf_cut_count(tokenizer, texts, tok["attention_mask"], limit) == naive == len(range(limit - 1, 20)) + 1


def test_clip_counts_a_cut_hidden_behind_words_its_cleaning_removes():
    """CLIP's cleaning turns ``&nbsp;`` into a space: counted on the first context_length words, a text of 20 of
    them and then 20 words was read as fitting, although encode had cut it."""
    from cirlab.models._clip_rn import clip_tokenizer

    tokenizer = clip_tokenizer(16)
    texts = ["&nbsp; " * 20 + "red " * 20, "&nbsp; " * 20 + "red " * 5]
    ids, _ = tokenizer.encode(texts)
    assert ids[0, -1] != 0 and ids[1, -1] == 0  # the first fills the row (cut), the second is padded (whole)
    assert tokenizer.cut_count(texts, ids) == 1


def test_dime_calls_its_cut_the_originals_protocol_only_at_the_originals_budget(caplog):
    """The tiny preset's 16-WordPiece cut was said to be "the original's protocol", which reads 32."""
    long_text = " ".join(["red"] * 80)
    for overrides, says in (({}, "model_overrides.max_words; the original reads 32"),
                            ({"max_words": 32}, "the original's protocol")):
        model = cirlab.create_model("dime", "tiny", **overrides).eval()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cirlab"):
            _encode_texts(model, [long_text])
        limit = model.config.max_words
        assert f"cut to {limit} WordPieces ([CLS] and [SEP] included; {says})" in _cuts(caplog)[0].getMessage()
