"""Two-stage BLIP re-ranker (cirlab.models.blip_rerank): tiny-preset behaviour, full-size parameter counts."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cirlab
from cirlab.models import blip_rerank as br

B = 4
TEXTS = ["is red", "has two dogs and a cat on the left", "make it blue", "remove the ring"]


def tiny(stage: str, **overrides):
    torch.manual_seed(0)
    return cirlab.create_model(f"blip_rerank_{stage}", preset="tiny", **overrides)


def image_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ref_image": torch.randn(B, 3, 32, 32, generator=g), "target_image": torch.randn(B, 3, 32, 32, generator=g),
            "text": list(TEXTS)}


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    from cirlab.data.generators import synthetic

    out = tmp_path_factory.mktemp("syn")
    return synthetic.generate(out, size="tiny", layouts=["cirr"], image_size=32)["layouts"]["cirr"]["root"]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_bert_uncased_plus_dec_enc():
    m = tiny("stage1")
    tok = m.tokenizer
    assert len(tok) == 30524 and tok.convert_tokens_to_ids("[DEC]") == 30522 and tok.enc_token_id == 30523
    ids, mask = m.tokenize(["A Red Dress.", "hi"])
    assert ids[:, 0].tolist() == [30523, 30523]  # [CLS] replaced by [ENC]
    assert ids[0, 1:].tolist()[:4] == [1037, 2417, 4377, 1012]  # real bert-base-uncased ids: a red dress .
    assert mask.sum(1).tolist() == [6, 3]  # padding to the longest, [SEP] kept


# ------------------------------------------------------------------------------------------------ stage I


def test_stage1_forward_backward_and_frozen_parts():
    m = tiny("stage1")
    out = m.training_step(image_batch())
    assert torch.isfinite(out["itc_loss"]) and out["itc_loss"] > 0
    out["itc_loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(not p.requires_grad for p in m.visual_encoder.parameters())
    assert grads["temp"] is not None and grads["text_proj.weight"].abs().sum() > 0
    assert grads["text_encoder.encoder.layer.0.crossattention.self.query.weight"].abs().sum() > 0
    assert grads["vision_proj.weight"] is None  # targets are computed without gradient, as in the original
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_stage1_encoders_normalised_and_tokens_equal_images():
    m = tiny("stage1").eval()
    batch = image_batch()
    q = m.encode_query(batch["ref_image"], batch["text"])
    t = m.encode_target(batch["target_image"])
    assert q.shape == t.shape == (B, 16)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(B))
    tokens = m.image_tokens(batch["ref_image"])
    assert tokens.shape == (B, m.config.num_image_tokens, 32)
    torch.testing.assert_close(m.encode_query(tokens, batch["text"]), q)  # cached tokens == images
    # the query depends on the reference image (cross-attention is used), the target on the image
    assert (m.encode_query(batch["target_image"], batch["text"]) - q).abs().max() > 1e-4


def test_stage1_learns_on_a_fixed_batch():
    m = tiny("stage1")
    images = image_batch()  # cached-token batches (what CachedTripletDataset yields)
    batch = {"ref_tokens": m.image_tokens(images["ref_image"]), "target_tokens": m.image_tokens(images["target_image"]),
             "text": images["text"]}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    first = m.training_step(batch)["itc_loss"].item()
    for _ in range(8):
        opt.zero_grad()
        m.training_step(batch)["itc_loss"].backward()
        opt.step()
    assert m.training_step(batch)["itc_loss"].item() < 0.7 * first


def test_train_config_is_the_periodic_cosine_recipe():
    from cirlab.engine.train import learning_rate, resolve_train_config

    cfg = resolve_train_config(tiny("stage1"))  # tiny preset = CIRR recipe
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("adamw", 2e-5, 0.05, 512)
    assert (cfg.epochs, cfg.cosine_epochs, cfg.schedule) == (40, 10, "periodic_cosine")
    lrs = [learning_rate(cfg, cfg.lr, e, 0) for e in (0, 10, 20, 30)]
    np.testing.assert_allclose(lrs, [2e-5, 0.0, 2e-5, 0.0], atol=1e-12)  # unclamped: back up at epoch 20
    cfg2 = resolve_train_config(cirlab.create_model("blip_rerank_stage2", preset="tiny", dataset="fashioniq"))
    assert (cfg2.epochs, cfg2.cosine_epochs, cfg2.batch_size) == (50, 50, 16)


# ------------------------------------------------------------------------------------------------ stage II


def test_stage2_forward_backward_reaches_both_streams_and_merges():
    m = tiny("stage2")
    assert m.text_encoder.layers[0].merge is None and m.text_encoder.layers[1].merge is not None  # mean, then Linear
    out = m.training_step(image_batch())
    assert torch.isfinite(out["rerank_loss"])
    out["rerank_loss"].backward()
    g = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for p in m.stage1.parameters())  # stage I frozen
    for name in ["text_encoder.embeddings.word_embeddings.weight", "cls_head.0.weight", "cls_head.2.weight",
                 "text_encoder.layers.1.merge.weight", "text_encoder.layers.0.intermediate.dense.weight"]:
        assert g[name] is not None and g[name].abs().sum() > 0, name
    for layer in (0, 1):
        for s in (0, 1):
            for block in ("attention", "crossattention"):
                for part in ("self.query.weight", "output.dense.weight", "output.LayerNorm.weight"):
                    grad = g[f"text_encoder.layers.{layer}.{block}.{s}.{part}"]
                    assert grad is not None and grad.abs().sum() > 0, (layer, block, s, part)
    assert all(torch.isfinite(x).all() for x in g.values() if x is not None)


def test_stage2_uses_both_streams():
    """Scores change when only z_t (stream 0) changes, and when only the text (stream 1) changes."""
    m = tiny("stage2").eval()
    ids, mask = m.stage1.tokenize(TEXTS)
    cand = m.stage1.image_tokens(image_batch()["target_image"])
    z = torch.randn(B, ids.shape[1], 32)
    base = m.pair_scores(z, ids, mask, cand)
    assert (m.pair_scores(z + 0.5 * torch.randn_like(z), ids, mask, cand) - base).abs().max() > 1e-5
    ids2 = ids.clone()
    ids2[:, 1] = 2000
    assert (m.pair_scores(z, ids2, mask, cand) - base).abs().max() > 1e-5


def test_score_candidates_matches_in_batch_matrix():
    m = tiny("stage2").eval()
    batch = image_batch()
    ref = m.stage1.image_tokens(batch["ref_image"])
    tgt = m.stage1.image_tokens(batch["target_image"])
    ids, mask = m.stage1.tokenize(batch["text"])
    with torch.no_grad():
        full = m.batch_scores(m.z_t(ref, ids, mask), ids, mask, tgt)  # [B, B]
    m.attach_gallery(br.TokenStore([f"g{i}" for i in range(B)], tgt.numpy()))
    cand = torch.tensor([[3, 1, 0], [0, 2, 1], [1, 1, 3], [2, 0, 3]])
    # one query alone must score exactly as inside a padded batch (padding is masked)
    s = m.score_candidates({"ref_tokens": ref, "text": batch["text"]}, cand)
    assert s.shape == (B, 3)
    torch.testing.assert_close(s, full.gather(1, cand), atol=1e-5, rtol=1e-5)
    single = m.score_candidates({"ref_tokens": ref[1:2], "text": batch["text"][1:2]}, cand[1:2])
    torch.testing.assert_close(single, s[1:2], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients():
    batch = image_batch()
    grads = []
    for ckpt in (False, True):
        m = tiny("stage2", gradient_checkpointing=ckpt, dropout=0.0, stage1_dropout_in_train=False)
        m.training_step(batch)["rerank_loss"].backward()
        grads.append(m.text_encoder.layers[0].crossattention[1].self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_stage1_dropout_switch_and_vit_drop_path_quirk():
    batch = image_batch()
    m = tiny("stage2").train()
    ref = m.stage1.image_tokens(batch["ref_image"])
    ids, mask = m.stage1.tokenize(TEXTS)
    assert (m.z_t(ref, ids, mask) - m.z_t(ref, ids, mask)).abs().max() > 0  # original: dropout noise on z_t
    m.config.stage1_dropout_in_train = False
    torch.testing.assert_close(m.z_t(ref, ids, mask), m.z_t(ref, ids, mask))
    q = tiny("stage2", frozen_vit_drop_path=0.5).train()
    a, b = q._candidate_tokens(batch["ref_image"]), q._candidate_tokens(batch["ref_image"])
    assert (a - b).abs().max() > 0  # stochastic depth on the frozen ViT in train mode
    q.eval()
    torch.testing.assert_close(q._candidate_tokens(batch["ref_image"]), q._candidate_tokens(batch["ref_image"]))
    with pytest.raises(ValueError, match="cached tokens"):
        q.train().training_step({"ref_tokens": a, "target_tokens": a, "text": TEXTS})


# ------------------------------------------------------------------------------------------------ cache + eval


def test_token_cache_atomic_reuse_and_values(cirr_root, tmp_path):
    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    m = tiny("stage1")
    store = br.cache_image_tokens(m, split, tmp_path / "val", batch_size=16)
    assert len(store) == len(split.gallery_names) and store.tokens.shape[1:] == (17, 32)
    assert not list(tmp_path.glob("*.tmp*"))
    img = m.image_transform()(cirlab.data.base.load_image(split.image_path(split.gallery_names[3])))
    torch.testing.assert_close(store.by_name([split.gallery_names[3]]), m.image_tokens(img[None]))
    mtime = (tmp_path / "val.npy").stat().st_mtime_ns
    br.cache_image_tokens(m, split, tmp_path / "val")
    assert (tmp_path / "val.npy").stat().st_mtime_ns == mtime  # reused
    meta = json.loads((tmp_path / "val.json").read_text())
    del meta["image_read"]  # a cache written before the decoding was recorded (with convert("RGB")): stale
    (tmp_path / "val.json").write_text(json.dumps(meta))
    br.cache_image_tokens(m, split, tmp_path / "val")
    assert json.loads((tmp_path / "val.json").read_text())["image_read"] == "viewer"
    mtime = (tmp_path / "val.npy").stat().st_mtime_ns
    br.cache_image_tokens(m, split, tmp_path / "val")
    assert (tmp_path / "val.npy").stat().st_mtime_ns == mtime  # reused again
    with torch.no_grad():
        m.visual_encoder.post_layernorm.bias.add_(1.0)  # another encoder -> stale cache rewritten
    store2 = br.cache_image_tokens(m, split, tmp_path / "val")
    assert json.loads((tmp_path / "val.json").read_text())["fingerprint"] == br.vision_fingerprint(m)
    assert (store2.take([0]) - store.take([0])).abs().max() > 0.5



def test_token_cache_of_another_dtype_is_not_reused(cirr_root, tmp_path, monkeypatch):
    """A float16 cache was read when float32 ("exact") was asked for; the default path now names a non-float32
    dtype, so the two live side by side."""
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    m = tiny("stage1")
    half = br.cache_image_tokens(m, split, tmp_path / "val", dtype="float16")
    full = br.cache_image_tokens(m, split, tmp_path / "val")
    assert half.tokens.dtype == np.float16 and full.tokens.dtype == np.float32
    assert json.loads((tmp_path / "val.json").read_text())["dtype"] == "float32"
    fingerprint = br.vision_fingerprint(m)
    assert br.default_cache_path(split, fingerprint, "float16") != br.default_cache_path(split, fingerprint)
    assert br.default_cache_path(split, fingerprint, "float16").name.endswith("_float16")


def _count_reads(monkeypatch, split) -> list[str]:
    """Record the images ``split`` reads (a ViT pass reads each of its images once)."""
    reads, real = [], split.read_image

    def counted(name, *args, **kwargs):
        reads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(split, "read_image", counted)
    return reads


def test_token_cache_written_once_while_a_second_process_waits_for_it(cirr_root, tmp_path, monkeypatch, caplog):
    """Job-array tasks evaluating one split each ran the ViT pass and wrote their own full-size temporary file. The
    entry's lock meets another thread as it would another process: this thread holds it as the first writer."""
    import threading

    from cirlab.core import io

    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    m = tiny("stage1")
    reads = _count_reads(monkeypatch, split)
    stem, waiter_got = tmp_path / "val", []
    waiter = threading.Thread(target=lambda: waiter_got.append(br.cache_image_tokens(m, split, stem)))
    with caplog.at_level(logging.INFO, logger="cirlab"):
        with io.generated_folder_lock(stem):
            waiter.start()
            for _ in range(600):  # until the second one says it waits, naming the holder
                if "is held by another cirlab process (pid " in caplog.text:
                    break
                time.sleep(0.05)
            assert "is held by another cirlab process (pid " in caplog.text
            assert not reads  # it waits, not computes
            first = br.cache_image_tokens(m, split, stem)  # the holder writes the cache
        waiter.join(timeout=60)
    assert len(reads) == len(br._split_image_names(split))  # one ViT pass
    assert "written by another process meanwhile" in caplog.text
    torch.testing.assert_close(waiter_got[0].take([0, 1]), first.take([0, 1]))
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.lock"))


def test_a_complete_token_cache_is_read_without_a_lock(cirr_root, tmp_path, monkeypatch):
    """A cache folder the user can only read (a shared, pre-computed cache) works as before the lock: reading takes
    no lock, and a stale entry there takes its lock under <CIRLAB_CACHE>/locks instead of beside it."""
    from cirlab.core import io

    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    m = tiny("stage1")
    shared = tmp_path / "shared"
    br.cache_image_tokens(m, split, shared / "val")

    def no_lock(*args, **kwargs):
        raise AssertionError("a complete cache was locked")

    with monkeypatch.context() as patch:
        patch.setattr(io, "file_lock", no_lock)
        assert len(br.cache_image_tokens(m, split, shared / "val")) == len(split.gallery_names)

    (shared / "val.json").unlink()  # stale (incomplete): rewritten, its lock not beside it in a read-only folder
    real_access, real_read, held = os.access, split.read_image, set()

    def access(p, mode, **kw):  # the shared folder as a user without write permission sees it
        return False if Path(p) == shared else real_access(p, mode, **kw)

    def read_image(*args, **kwargs):  # during the ViT pass: the locks held
        held.update([*(tmp_path / "cache" / "locks").glob("*.lock"), *shared.glob(".*.lock")])
        return real_read(*args, **kwargs)

    monkeypatch.setattr(io.os, "access", access)
    monkeypatch.setattr(split, "read_image", read_image)
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    br.cache_image_tokens(m, split, shared / "val")
    assert [p.parent for p in held] == [tmp_path / "cache" / "locks"]


def test_a_cache_miss_removes_what_killed_writers_of_that_entry_left(cirr_root, tmp_path, caplog):
    """A writer killed mid-pass (a time limit, scancel) left .<name>.npy.<hex>.tmp, as large as the cache, in
    CIRLAB_CACHE for good. Other entries' temporaries (their writers may be alive) stay."""
    from cirlab.core import io

    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    stem = tmp_path / "val"
    killed = {}
    for target in (stem.with_suffix(".npy"), stem.with_suffix(".json"), stem.with_suffix(".npy")):
        fd, staged = io._create_staged(target)  # what atomic_path had staged when its process was killed
        os.write(fd, b"\0" * 250_000)
        os.close(fd)
        killed[staged] = target
    others = []
    for target in (tmp_path / "test1.npy", tmp_path / "va.npy", tmp_path / "val.npy.bak"):
        fd, staged = io._create_staged(target)
        os.close(fd)
        others.append(staged)
    with caplog.at_level(logging.INFO, logger="cirlab"):
        br.cache_image_tokens(tiny("stage1"), split, stem)
    assert not any(p.exists() for p in killed)
    assert all(p.exists() for p in others)
    said = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("removed "))
    assert said == sorted(f"removed {p} (0.2 MB), left by a writer of the ViT token cache {target} that was killed"
                          for p, target in killed.items())


def test_topk_files_rerank_and_submission(cirr_root, tmp_path):
    from cirlab import metrics
    from cirlab.core import retrieval
    from cirlab.engine import rerank

    split = cirlab.data.load_cir("cirr", cirr_root, "val")
    m2 = tiny("stage2").eval()
    s = rerank.score_matrix(m2.stage1, split)
    rerank.evaluate_stage1(m2.stage1, [split], eval_config={"k": 20}, device="cpu", topk_dir=tmp_path / "s1")
    top1 = rerank.load_stage1_topk(tmp_path / "s1", split, k=10)
    assert top1.k == 20 and top1.meta["stage"] == "stage1"
    # reference removed before truncation, ranks = protocol metric ranks
    refs = split.ref_indices()
    assert all(split.gallery_names[r] not in row for r, row in zip(refs, top1.gallery_ids))
    target = torch.tensor(split.target_indices())
    np.testing.assert_array_equal(top1.target_rank, metrics.target_ranks(s, target, torch.tensor(refs)).numpy())
    hit = top1.target_rank <= 10
    for i in np.flatnonzero(hit):
        assert top1.gallery_ids[i, top1.target_rank[i] - 1] == top1.target_ids[i]
    score = m2.candidate_scorer(split, cache=tmp_path / "val")
    top2 = rerank.rerank_topk(score, split, top1, 10)
    assert top2.k == 10 and top2.meta["stage"] == "stage2" and top2.meta["reranked_queries"] == hit.sum()
    # same candidate set, re-ordered; misses keep their stage-I rank (> K) and stage-I order
    for i in range(len(split.triplets)):
        assert sorted(top2.gallery_ids[i]) == sorted(top1.gallery_ids[i, :10])
        if hit[i]:
            assert top2.gallery_ids[i, top2.target_rank[i] - 1] == top2.target_ids[i]
            assert np.all(np.diff(top2.scores[i]) <= 0)
        else:
            assert top2.target_rank[i] == top1.target_rank[i] > 10
            assert list(top2.gallery_ids[i]) == list(top1.gallery_ids[i, :10])
    assert metrics.recall_from_ranks(top2.target_rank, [10])["R@10"] == metrics.recall_from_ranks(
        top1.target_rank, [10])["R@10"]  # R@K is unchanged by re-ranking
    # scoring every query (skip_misses=False) re-orders the misses too, with the same ranks
    full = rerank.rerank_topk(score, split, top1, 10, skip_misses=False)
    np.testing.assert_array_equal(full.target_rank, top2.target_rank)
    # subset scores: only members scored, the reference excluded from the top-3
    sub = rerank.subset_scores(score, split)
    members, reference = torch.tensor(split.member_indices()), torch.tensor(refs)
    top3 = retrieval.subset_topk(sub, reference, members, 3)
    assert all(len(t) == 3 and refs[i] not in t.tolist() for i, t in enumerate(top3))
    ranks = rerank.subset_ranks(sub, split)
    assert ranks.min() >= 1 and ranks.max() <= 5
    test = cirlab.data.load_cir("cirr", cirr_root, "test1")
    assert len(test.gallery_names) <= 50  # tiny synthetic gallery: the server's top-50 cannot be filled
    with pytest.raises(ValueError, match="k=50 but only 43 gallery items can be ranked per query"):  # before stage I
        rerank.cirr_submission(m2, test, eval_config={})


def test_stage1_topk_of_every_evaluated_split_is_checked_without_evaluating(cirr_root, tmp_path):
    """What stage II's evaluation refused only after an epoch of training (a top-K shorter than the re-ranked K, a
    split without its file, a file of another split) is refused by check_stage1_topk, which runs before the first
    step, with the evaluation's own messages."""
    from dataclasses import replace

    from cirlab.core.errors import ConfigError
    from cirlab.core.topk import load_topk, save_topk
    from cirlab.engine import rerank

    val, test = (cirlab.data.load_cir("cirr", cirr_root, s) for s in ("val", "test1"))
    first = tmp_path / "s1"
    rerank.evaluate_stage1(tiny("stage1").eval(), [val], eval_config={"k": 10}, device="cpu", topk_dir=first)
    m2 = tiny("stage2", rerank_k=20)
    source = {"stage1_topk": str(first)}
    with pytest.raises(ConfigError, match=rf"^eval\.stage1_topk: {first}/val\.topk\.npz holds the top 10, stage II "
                                          r"re-ranks 20: write stage I's top-K with eval\.k >= 20$"):
        rerank.check_stage1_topk(m2, source, {"val": [val]})
    short = tiny("stage2", rerank_k=10)
    assert rerank.check_stage1_topk(short, source, {"val": [val]}) is None  # long enough: nothing said
    with pytest.raises(ConfigError, match=rf"no stage-I top-K file {first}/test1\.topk\.npz"):
        rerank.check_stage1_topk(short, source, {"val": [val], "test1": [test]})  # a final split without its file
    (first / "test1.topk.npz").write_bytes((first / "val.topk.npz").read_bytes())
    with pytest.raises(ConfigError, match=r"has no list for 40 of the 40 queries of cirr test1"):
        rerank.check_stage1_topk(short, source, {"test1": [test]})
    top = load_topk(first / "val.topk.npz")
    names = top.gallery_ids.astype(object)
    names[0, 3] = "not-in-the-gallery"
    save_topk(first / "val.topk.npz", replace(top, gallery_ids=names.astype(str)))
    with pytest.raises(ConfigError, match=r"names 'not-in-the-gallery', which is not in that split's gallery"):
        rerank.check_stage1_topk(short, source, {"val": [val]})
    # nothing to read: no eval.stage1_topk (the frozen stage I ranks at evaluation), or not a re-ranker
    assert rerank.check_stage1_topk(m2, {"stage1_topk": ""}, {"val": [val], "test1": [test]}) is None
    assert rerank.check_stage1_topk(tiny("stage1"), source, {"val": [val]}) is None



# ------------------------------------------------------------------------------------------------ full size


def _linear(i: int, o: int) -> int:
    return i * o + o


def _ln(d: int) -> int:
    return 2 * d


def expected_vit(d=768, depth=12, mlp=3072, image=384, patch=16) -> int:
    tokens = (image // patch) ** 2 + 1
    block = _ln(d) + _linear(d, 3 * d) + _linear(d, d) + _ln(d) + _linear(d, mlp) + _linear(mlp, d)
    return 3 * patch * patch * d + d + d + tokens * d + depth * block + _ln(d)


def expected_med_bert(d=768, depth=12, ff=3072, vocab=30524, positions=512, enc=768) -> int:
    self_att = 3 * _linear(d, d) + _linear(d, d) + _ln(d)
    cross_att = _linear(d, d) + 2 * _linear(enc, d) + _linear(d, d) + _ln(d)
    ffn = _linear(d, ff) + _linear(ff, d) + _ln(d)
    return vocab * d + positions * d + _ln(d) + depth * (self_att + cross_att + ffn)


def expected_dual(d=768, depth=12, ff=3072, vocab=30524, positions=512, enc=768, merge_from=6) -> int:
    self_att = 3 * _linear(d, d) + _linear(d, d) + _ln(d)
    cross_att = _linear(d, d) + 2 * _linear(enc, d) + _linear(d, d) + _ln(d)
    ffn = _linear(d, ff) + _linear(ff, d) + _ln(d)
    merges = (depth - merge_from) * _linear(2 * d, d)
    return vocab * d + positions * d + _ln(d) + depth * (2 * self_att + 2 * cross_att + ffn) + merges


@pytest.mark.parametrize("preset", ["fashioniq", "cirr"])
def test_full_size_parameter_counts(preset):
    with torch.device("meta"):
        m2 = cirlab.create_model("blip_rerank_stage2", preset=preset)
    s1 = m2.stage1
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    vit, med, dual = count(s1.visual_encoder), count(s1.text_encoder), count(m2.text_encoder)
    head = count(m2.cls_head)
    stage1 = count(s1)
    print(f"\n[{preset}] ViT-B/16@384 {vit:,} | MED BERT {med:,} | stage I {stage1:,} | stage II dual encoder "
          f"{dual:,} + head {head:,} = {dual + head:,} trainable (+ frozen stage I)")
    assert vit == expected_vit() and 86.0e6 < vit < 86.2e6  # ViT-B/16 at 384 (577 position embeddings)
    assert med == expected_med_bert() and 137.0e6 < med < 137.5e6  # BERT-base + 12 cross-attention blocks
    assert stage1 == vit + med + 2 * _linear(768, 256) + 1  # + vision_proj, text_proj, temp
    assert dual == expected_dual()
    # duplicated attention: the dual encoder has exactly one extra copy of every self- and cross-attention block,
    # plus the six Linear(1536 -> 768) merges, on top of a MED BERT
    per_layer_attention = (4 * _linear(768, 768) + _ln(768)) * 2
    assert dual - med == 12 * per_layer_attention + 6 * _linear(1536, 768)
    assert head == _linear(1536, 768) + _linear(768, 2)
    assert sum(p.numel() for p in m2.parameters() if p.requires_grad) == dual + head


def test_init_from_stage1_copies_both_streams():
    m = tiny("stage2")
    report = m.init_from_stage1()
    assert not report.unmatched and all("merge" in k or k.startswith(("cls_head", "stage1")) for k in report.missing)
    src = m.stage1.text_encoder.encoder.layer[1].crossattention.self.value.weight
    for stream in m.text_encoder.layers[1].crossattention:
        torch.testing.assert_close(stream.self.value.weight, src)
    torch.testing.assert_close(m.text_encoder.layers[0].output.dense.weight,
                               m.stage1.text_encoder.encoder.layer[0].output.dense.weight)


def test_fashioniq_per_category_topk_and_rerank(tmp_path):
    """Fashion-IQ under the re-ranking protocol (CLIP4Cir gallery = the split file, reference kept): stage-I ranks
    equal the metric's ranks per category, and stage II only re-orders each query's candidates."""
    from cirlab import metrics
    from cirlab.data.generators import synthetic
    from cirlab.engine import rerank

    root = synthetic.generate(tmp_path / "syn", size="tiny", layouts=["fashioniq"], image_size=32)
    root = root["layouts"]["fashioniq"]["root"]
    m2 = tiny("stage2").eval()
    splits = [cirlab.data.load_cir("fashioniq", root, "val", category=c, protocol="rerank")
              for c in ("dress", "toptee")]
    rerank.evaluate_stage1(m2.stage1, splits, eval_config={"k": 20}, device="cpu", topk_dir=tmp_path / "s1")
    for split in splits:
        category = split.category
        assert not split.exclude_reference
        s = rerank.score_matrix(m2.stage1, split)
        top1 = rerank.load_stage1_topk(tmp_path / "s1", split)
        target = torch.tensor(split.target_indices())
        np.testing.assert_array_equal(top1.target_rank, metrics.target_ranks(s, target).numpy())
        assert set(top1.category) == {category} and top1.meta["category"] == category
        top2 = rerank.rerank_topk(m2.candidate_scorer(split, cache=tmp_path / category), split, top1, 10)
        for i in range(len(split.triplets)):
            assert sorted(top2.gallery_ids[i]) == sorted(top1.gallery_ids[i, :10])
            if top1.target_rank[i] > 10:
                assert top2.target_rank[i] == top1.target_rank[i]
            else:
                assert top2.gallery_ids[i, top2.target_rank[i] - 1] == split.triplets[i].target_name


def test_a_text_embedding_smaller_than_the_tokenizer_is_one_line_not_an_index_error():
    from cirlab.core.errors import InputError

    model = cirlab.create_model("blip_rerank_stage1", "tiny")
    model.text_encoder.resize_token_embeddings(33, mean_resizing=False)  # a checkpoint of another vocabulary
    for encode in (model.tokenize, model.tokenize_text):
        with pytest.raises(InputError, match=r"the tokenizer has \d+ tokens and the model's text embedding 33 rows: "
                                             r"set vocab_file"):
            encode(["a red dress"])


def test_a_vocab_file_that_is_not_a_wordpiece_vocabulary_is_refused_when_the_model_is_built(tmp_path):
    """A config.json as vocab_file failed at the first training step with a 66-line tokenizer traceback
    (``WordPiece error: Missing [UNK] token``)."""
    from cirlab.core.errors import CirlabError

    wrong = tmp_path / "config.json"
    wrong.write_text('{"model_type": "bert", "vocab_size": 30522}')
    for stage in ("stage1", "stage2"):
        with pytest.raises(CirlabError) as err:
            cirlab.create_model(f"blip_rerank_{stage}", "tiny", vocab_file=str(wrong))
        assert str(err.value) == (f"model_overrides.vocab_file: {wrong} is not a WordPiece vocabulary (a BERT "
                                  "vocab.txt: one token per line, [UNK] among them)")
    good = tmp_path / "vocab.txt"
    good.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "dress"]) + "\n")
    model = cirlab.create_model("blip_rerank_stage1", "tiny", vocab_file=str(good))
    assert model.tokenize(["a red dress"])[0].shape == (1, 5)


def test_stage2_started_from_stage1_says_its_new_layers_are_expected_missing(caplog):
    import logging

    model = cirlab.create_model("blip_rerank_stage2", "tiny")
    with caplog.at_level(logging.INFO, logger="cirlab.models.blip_interop"):
        report = model.init_from_stage1().log()
    assert report.missing and all(".merge." in k or k.startswith("cls_head.") for k in report.missing)
    # said with why (new in stage II, random as the original starts them), not warned about as weights left untouched
    assert "merge layers and cls_head: new" in report.summary()
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_inference_precision_is_recorded_as_it_runs():
    from cirlab.core.contracts import HasEvalPrecision

    for stage in ("stage1", "stage2"):
        for bf16, name in ((False, "float32"), (True, "bfloat16")):
            model = tiny(stage, bf16=bf16)
            assert isinstance(model, HasEvalPrecision) and model.eval_precision("cpu") == name
