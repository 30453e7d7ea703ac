"""LAVIS users' path through the command line and run configs (no LAVIS installed here).

``cirlab convert --from lavis`` on the committed fixtures (``tests/fixtures/lavis/``, written by LAVIS 1.0.2 through
``tools/lavis_fixtures.py``): BLIP ``blip_retrieval`` -> a stage-I checkpoint that reproduces LAVIS's outputs,
BLIP-2 -> a CaLa checkpoint; ``init_from: lavis:PATH`` in a run config, the CaLa demo started from it through
``run_experiment``; one-line errors for files in another layout; the help text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cirlab.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "lavis"
ATOL = 1e-5
CIRLAB = Path(sys.executable).parent / "cirlab"


def _manifest() -> dict:
    return json.loads((FIXTURES / "lavis_fixtures.json").read_text())


def _files(name: str) -> tuple[Path, dict, dict]:
    from safetensors.torch import load_file

    info = _manifest()["models"][name]
    state_path = FIXTURES / info["files"]["state"]
    return state_path, load_file(str(state_path)), load_file(str(FIXTURES / info["files"]["io"]))


def _vocab_file(folder: Path) -> Path:
    """The fixtures' tokenizer vocabulary as a vocab.txt (their text embeddings have 32/33 rows, not BERT's)."""
    path = folder / "vocab.txt"
    path.write_text("\n".join(_manifest()["vocab"]) + "\n")
    return path


def _convert(argv: list[str], capsys) -> dict:
    assert main(["convert", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIRLAB_THREADS": "1"}
    return subprocess.run([str(CIRLAB), *args], capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------------------------------------ help


def test_convert_help_explains_lavis(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--from {auto,original,lavis}", "blip_retrieval -> blip_rerank_stage1", "pretrain_vitL",
                   "-> cala", "--itm-head", "momentum encoders and ITC queues are ignored", "--set vision_heads=N",
                   "init_from: lavis:PATH", "<OUT>.report.json", "one line naming the file"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------------------------ BLIP -> stage I


@pytest.fixture(scope="module")
def blip():
    return _files("blip_retrieval")


def test_convert_blip_retrieval_to_stage1_matches_lavis(blip, tmp_path, capsys):
    """The converted file rebuilds through ``model_from_checkpoint`` (what ``cirlab eval`` uses) and gives LAVIS's
    image features, text-only ITC features, similarities and ITM logits to 1e-5."""
    from cirlab.engine.runs import model_from_checkpoint

    path, state, io = blip
    out = tmp_path / "stage1.pt"
    summary = _convert(["--from", "lavis", str(path), str(out), "--preset", "tiny", "--itm-head"], capsys)
    assert summary["model"] == "blip_rerank_stage1" and summary["source_layout"] == "lavis blip_retrieval"
    assert summary["missing"] == [] and summary["unmatched"] == [] and summary["loaded"] == 93
    assert summary["model_overrides"]["itm_head"] is True and summary["model_overrides"]["vocab_size"] == 33
    assert any("vocab_file" in w for w in summary["warnings"])  # the fixture's 33-token vocabulary is not BERT's
    report = json.loads(Path(summary["report"]).read_text())
    assert report["reports"][0]["source"] == str(path)
    groups = report["reports"][0]["ignored_groups"]
    assert len(groups["momentum encoder"]) == 91 and len(groups["ITC queue"]) == 4
    model, meta = model_from_checkpoint(out)
    assert meta["converted_from"] == str(path) and meta["converted_layout"] == "lavis blip_retrieval"
    model.eval()
    ids, mask, enc_ids = io["inputs.input_ids"], io["inputs.attention_mask"], io["inputs.itm_input_ids"]
    with torch.no_grad():
        image_embeds = model.image_tokens(io["inputs.pixel_values"])
        image_feat = model.target_embedding(image_embeds)
        text_feat = model.text_embedding(ids, mask)
        n = len(ids)
        itm = torch.stack([model.itm_from_hidden(model.compose(image_embeds[i:i + 1].repeat(n, 1, 1), enc_ids, mask))
                           for i in range(n)])
    ours = {"image_embeds": image_embeds, "image_feat": image_feat, "text_feat": text_feat,
            "sims": image_feat @ text_feat.t(), "itm_logits": itm}
    for name, value in ours.items():
        torch.testing.assert_close(value, io[f"outputs.{name}"], atol=ATOL, rtol=0, msg=name)
    # --from auto recognises the LAVIS layout by its keys and writes the same weights
    auto = _convert([str(path), str(tmp_path / "auto.pt"), "--preset", "tiny", "--itm-head"], capsys)
    assert auto["source_layout"] == "lavis blip_retrieval"
    again, _ = model_from_checkpoint(tmp_path / "auto.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_stage1_init_from_lavis_prefix_and_converted_file(blip, tmp_path, capsys):
    """``init_from: lavis:PATH`` and ``init_from: <converted .pt>`` give the same stage I; init_from.json is written."""
    import cirlab

    path, state, _ = blip
    summary = _convert(["--from", "lavis", str(path), str(tmp_path / "s1.pt"), "--preset", "tiny"], capsys)
    overrides = summary["model_overrides"]
    assert "itm_head" not in overrides  # without --itm-head the head is left out (listed in the report)
    models = {}
    for name, init in (("lavis", f"lavis:{path}"), ("plain", str(path)), ("converted", str(tmp_path / "s1.pt"))):
        torch.manual_seed(1)
        model = cirlab.create_model("blip_rerank_stage1", "tiny", **overrides, init_from=init)
        reports = model.load_init(tmp_path / name)
        assert reports and json.loads((tmp_path / name / "init_from.json").read_text())["init_from"] == init
        models[name] = model
    assert torch.equal(models["lavis"].text_proj.weight, state["text_proj.weight"])
    for name in ("plain", "converted"):
        for (k, a), b in zip(models["lavis"].state_dict().items(), models[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)


# ------------------------------------------------------------------------------------------------ errors


def test_from_lavis_on_a_non_lavis_file_is_one_line(tmp_path):
    other = tmp_path / "not_lavis.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, other)
    result = _cli("convert", "--from", "lavis", str(other), str(tmp_path / "out.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(other) in lines[0] and "expected a LAVIS blip_retrieval checkpoint" in lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_convert_refuses_ignored_options_and_taken_outputs_before_reading(blip, tmp_path, caplog, monkeypatch):
    from cirlab.models import lavis_interop

    path, _, _ = blip
    monkeypatch.setattr(lavis_interop, "read_lavis_layout", lambda *a, **k: pytest.fail("the source was read"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "done.pt").write_bytes(b"mine")
    cases = [([str(tmp_path / "a.pt"), "--stage1-out", str(tmp_path / "s1.pt")], "--stage1-out does not apply to "
              "--to cirlab"),
             ([str(tmp_path / "b"), "--to", "original", "--itm-head", "--preset", "tiny"],
              "--preset, --itm-head do not apply to --to original"),
             ([str(tmp_path / "taken")], "taken is a folder; give the path of a file"),
             ([str(tmp_path / "done.pt")], "done.pt exists; pass --overwrite")]
    for argv, message in cases:
        caplog.clear()
        assert main(["convert", str(path), *argv]) == 2
        assert message in caplog.text
    assert (tmp_path / "done.pt").read_bytes() == b"mine" and not list((tmp_path / "taken").iterdir())


def test_wrong_lavis_layouts_name_the_file(blip, tmp_path, capsys):
    import argparse

    import cirlab
    from cirlab.core.errors import CheckpointError, CirlabError
    from cirlab.rerank_cli import _lavis_source

    path, _, _ = blip
    assert main(["convert", "--from", "lavis", str(path), str(tmp_path / "x.pt"), "--model", "cala"]) == 2
    with pytest.raises(CirlabError, match="expected a LAVIS BLIP-2 checkpoint"):
        _lavis_source(argparse.Namespace(source=str(path), source_layout="lavis", model="cala"))
    # auto: a LAVIS file asked to become another model says which one it converts to
    with pytest.raises(CirlabError, match="converts to blip_rerank_stage1, not cala"):
        _lavis_source(argparse.Namespace(source=str(path), source_layout="auto", model="cala"))
    with pytest.raises(CirlabError, match="converts to blip_rerank_stage1, not blip_rerank_stage2"):
        _lavis_source(argparse.Namespace(source=str(path), source_layout="auto", model="blip_rerank_stage2"))
    cala = cirlab.create_model("cala", "tiny", init_from=f"lavis:{path}")
    with pytest.raises(CheckpointError) as err:
        cala.load_init(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "LAVIS BLIP-2 checkpoint" in message
    blip2, _, _ = _files("blip2_pretrain_vitL")
    stage1 = cirlab.create_model("blip_rerank_stage1", "tiny", init_from=f"lavis:{blip2}")
    with pytest.raises(CheckpointError, match=r"expected a LAVIS blip_retrieval checkpoint .*; found a LAVIS blip2"):
        stage1.load_init(tmp_path)
    missing = cirlab.create_model("cala", "tiny", init_from=f"lavis:{tmp_path / 'absent.pth'}")
    with pytest.raises(CheckpointError, match="absent.pth: no such file"):
        missing.load_init(tmp_path)


# ------------------------------------------------------------------------------------------------ BLIP-2 -> CaLa


def _weights_after_load_init(monkeypatch) -> dict:
    """Filled with CaLa's state dict right after ``load_init`` (before any training step) of the next run."""
    from cirlab.models import cala as C

    seen: dict = {}
    load_init = C.CaLa.load_init

    def recording(self, report_dir=None):
        reports = load_init(self, report_dir)
        seen.update({k: v.detach().clone() for k, v in self.state_dict().items()})
        return reports

    monkeypatch.setattr(C.CaLa, "load_init", recording)
    return seen


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cirlab.data.generators import synthetic

    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(root, seed=0, size="tiny", image_size=32, layouts=("cirr",))
    return root


def test_cala_demo_starts_from_a_converted_lavis_checkpoint(synth, tmp_path, capsys, monkeypatch):
    """Convert the BLIP-2 (CLIP ViT-L layout, CaLa's) fixture with the CLI, then train CaLa tiny for two steps on
    synthetic CIRR with ``init_from: lavis:PATH`` and the sizes the converter printed: the weights loaded before
    training are LAVIS's, the loading report is in the run folder, and the converted file holds the same weights."""
    import cirlab
    from cirlab.engine import runs

    path, state, _ = _files("blip2_pretrain_vitL")
    converted = tmp_path / "cala_lavis.pt"
    summary = _convert(["--from", "lavis", str(path), str(converted), "--preset", "tiny",
                        "--set", "vision_heads=4", "--set", "qformer_heads=4"], capsys)
    assert summary["model"] == "cala" and summary["source_layout"] == "lavis blip2" and not summary["missing"]
    overrides = {**summary["model_overrides"], "vocab_file": str(_vocab_file(tmp_path))}

    seen = _weights_after_load_init(monkeypatch)
    config = runs.with_defaults({
        "name": "cala_lavis", "model": "cala", "preset": "tiny",
        "model_overrides": {**overrides, "init_from": f"lavis:{path}"},
        "dataset": {"name": "cirr", "root": str(synth / "cirr"), "test_split": "val"},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False,
                  "precision": "fp32", "selection": "last"},
        "eval": {"splits": ["val"], "k": 5, "batch_size": 16}})
    result = runs.run_experiment(config, output_dir=tmp_path / "run")
    assert result["steps"] == 2 and "R@1" in result["splits"]["val"]
    init = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert init["init_from"] == f"lavis:{path}" and init["reports"][0]["source"] == str(path)
    assert not init["reports"][0]["missing"] and not init["reports"][0]["mismatched"]
    for copy in ("textual", "multimodal", "visual"):
        assert torch.equal(seen[f"{copy}.query_tokens"], state["query_tokens"])
        assert torch.equal(seen[f"{copy}.vision_proj.weight"], state["vision_proj.weight"])
    assert torch.equal(seen["tower.ln_vision.weight"], state["ln_vision.weight"])
    # the converted checkpoint, as init_from, starts the same model
    model = cirlab.create_model("cala", "tiny", **overrides)
    model.load_pretrained(converted)
    for key in ("multimodal.query_tokens", "tower.ln_vision.bias", "textual.vision_proj.weight"):
        assert torch.equal(model.state_dict()[key], seen[key]), key


def test_cala_lite_starts_from_a_lavis_layout_checkpoint(synth, tmp_path, monkeypatch):
    """The CPU demo preset (`lite`: EfficientNet-Lite0 tower, MiniLM-sized Q-Formers) from a LAVIS ``Blip2Qformer``
    file of its sizes: a lite Q-Former with moved weights written in LAVIS's layout (no tower keys: LAVIS has no
    EfficientNet), then ``init_from: lavis:PATH`` in a two-step run. All three copies start from that file."""
    import cirlab
    from cirlab.engine import runs
    from cirlab.models import _hf_blip2 as hb

    source = cirlab.create_model("cala", "lite")
    with torch.no_grad():
        for p in source.multimodal.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lavis_state = hb.cirlab_to_lavis(None, source.multimodal)
    assert any(k.startswith("Qformer.bert.") for k in lavis_state) and "query_tokens" in lavis_state
    path = tmp_path / "blip2_lite_layout.pth"
    torch.save({"model": lavis_state}, path)

    seen = _weights_after_load_init(monkeypatch)
    config = runs.with_defaults({
        "name": "cala_lite_lavis", "model": "cala", "preset": "lite",
        "model_overrides": {"init_from": f"lavis:{path}"},
        "dataset": {"name": "cirr", "root": str(synth / "cirr"), "test_split": "val"},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": "none", "tensorboard": False,
                  "precision": "fp32", "selection": "last"},
        "eval": {"splits": ["val"], "k": 5, "batch_size": 16}})
    result = runs.run_experiment(config, output_dir=tmp_path / "run")
    assert result["steps"] == 2 and "R@1" in result["splits"]["val"]
    assert (tmp_path / "run" / "init_from.json").is_file()
    moved = {k: v for k, v in source.multimodal.state_dict().items() if not k.endswith("position_ids")}
    for copy in ("textual", "multimodal", "visual"):
        differ = [k for k, v in moved.items() if not torch.equal(seen[f"{copy}.{k}"], v)]
        assert not differ, (copy, differ[:5])
