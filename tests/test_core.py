"""Core contracts: registry and presets, paths, route tracing, the top-K file, cheap import."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pytest
import torch

import cirlab
from cirlab import paths, registry
from cirlab.core.errors import CirlabError
from cirlab.core.config import PresetMixin
from cirlab.core.topk import TopK, load_topk, save_topk
from cirlab.core.tracing import emit, is_active, trace_routes
from cirlab.data.transforms import build_transform


@dataclass
class _ToyConfig(PresetMixin):
    dim: int = 8  # feature size
    depth: int = 1  # layers

    PRESETS = {"tiny": {"dim": 4}, "paper": {"dim": 16, "depth": 2}}


class _ToyRouter(torch.nn.Module):
    def __init__(self, cfg: _ToyConfig):
        super().__init__()
        self.config = cfg
        self.gate = torch.nn.Linear(cfg.dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        emit(self, "layer1", g, experts=["A", "B", "C"], paper_names={"A": "expert-2"})
        return g

    # the rest of the CIR model contract (cirlab.core.contracts), so that create_model accepts it
    def encode_query(self, ref_images, texts):
        return torch.nn.functional.normalize(self(ref_images), dim=-1)

    def encode_target(self, images):
        return torch.nn.functional.normalize(self(images), dim=-1)

    def training_step(self, batch):
        return {"toy_loss": self(batch["x"]).sum()}

    def default_train_config(self):
        return {}


class _Incomplete(torch.nn.Module):
    model_name, task = "incomplete", "cir"

    def __init__(self, cfg: _ToyConfig):
        super().__init__()
        self.config = cfg

    def encode_query(self, ref_images, texts):
        return ref_images


@pytest.fixture
def toy_registered():
    registry.register_model("toy_router", task="cir", config_cls=_ToyConfig)(_ToyRouter)
    yield "toy_router"
    registry._REGISTRY.pop("toy_router", None)


def test_create_model_applies_preset_and_overrides(toy_registered):
    model = registry.create_model(toy_registered, preset="paper", depth=5)
    assert (model.config.dim, model.config.depth) == (16, 5)
    assert model.task == "cir" and model.model_name == "toy_router"
    assert registry.list_presets(toy_registered) == ["paper", "tiny"]
    assert toy_registered in registry.list_models("toy_*")


def test_create_model_seed_gives_the_same_initial_weights_whatever_ran_before():
    import torch

    first = registry.create_model("amc", preset="tiny", seed=3)
    torch.rand(5)  # another draw from the global generator between the calls
    again = registry.create_model("amc", preset="tiny", seed=3)
    other = registry.create_model("amc", preset="tiny", seed=4)
    weights = [dict(m.named_parameters()) for m in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    for bad, problem in ((-1, "must be >= 0"), (2**40, "must be <= 4294967295"), (1.5, "expected an integer")):
        with pytest.raises(CirlabError, match=f"^create_model: seed: {problem}"):
            registry.create_model("amc", preset="tiny", seed=bad)


def test_create_model_seed_gives_the_callers_random_streams_back():
    """A seeded model drawn between two of the caller's draws did not change what the caller drew next (it reseeded
    Python, NumPy and torch for the rest of the process)."""
    import random

    import numpy as np
    import torch

    from cirlab.core.streams import seeded_streams

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = draws(), draws()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    first = draws()
    registry.create_model("amc", preset="tiny", seed=3)
    assert (first, draws()) == expected
    with pytest.raises(CirlabError):
        registry.create_model("amc", preset="tiny", seed=-1)  # refused before any reseeding
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    draws()
    with pytest.raises(RuntimeError):  # a build that fails halfway gives the streams back too
        with seeded_streams(5):
            raise RuntimeError
    assert draws() == expected[1]


@pytest.mark.parametrize("name", ["amc", "dime"])
def test_create_model_seed_then_fit_vocab_gives_the_weights_of_a_seeded_process(name):
    """Weights drawn from the training data (AMC's word embeddings, the tiny BERT's vocabulary rows) continue the
    model's seeded streams: what the caller draws between the calls changes nothing, and the weights are those of
    the whole process seeded, then the model built and fitted (what create_model(seed=) did before it gave the
    caller's streams back, and what runs trained before recorded)."""
    import torch

    from cirlab.engine.train import seed_everything

    captions = ["a red shirt with long sleeves", "the blue dress, shorter"]

    def fitted(seed, draw_between=False):
        model = registry.create_model(name, preset="tiny", seed=seed)
        if draw_between:
            torch.rand(7)
        model.fit_vocab(captions)
        return model.state_dict()

    seed_everything(3)
    reference = registry.create_model(name, preset="tiny")
    reference.fit_vocab(captions)
    expected = reference.state_dict()
    tensors = [k for k, v in expected.items() if torch.is_tensor(v)]
    for weights in (fitted(3), fitted(3, draw_between=True)):
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in tensors)
    other = fitted(4)
    assert not all(torch.equal(other[k], expected[k]) for k in tensors)


def test_a_users_model_module_named_in_cirlab_models_is_registered_everywhere(tmp_path):
    """A model defined outside the package reached `cirlab train`, `eval`, `models`, notebooks and report kernels only
    through a wrapper script: CIRLAB_MODELS names its module (their environment carries it to every process)."""
    import os
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "CIRLAB_MODELS": "stub_models", "PYTHONPATH": str(tests)}
    cli = [sys.executable, "-m", "cirlab"]
    listed = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and "stub_cir            cir     tiny, tiny_dropout" in listed.stdout
    env["CIRLAB_MODELS"] = "stub_models, no_such_module"
    broken = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert ("CIRLAB_MODELS='stub_models, no_such_module': cannot import 'no_such_module' (No module named "
            "'no_such_module'); its folder must be on PYTHONPATH") in broken.stderr
    # found, but one of its imports is not installed: that is what is said (PYTHONPATH was blamed)
    (tmp_path / "needs_more.py").write_text("import not_a_package_xyz\n")
    env["CIRLAB_MODELS"], env["PYTHONPATH"] = "needs_more", os.pathsep.join([str(tests), str(tmp_path)])
    broken = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert broken.returncode == 2 and ("cannot import 'needs_more': it imports 'not_a_package_xyz', which is not "
                                       "installed in this environment") in broken.stderr
    # the same through an installed package's entry point (a dist-info folder on the path is one)
    dist = tmp_path / "site" / "bow_models-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bow-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cirlab.models]\nstubs = stub_models\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(tests)])}
    env.pop("CIRLAB_MODELS", None)
    listed = subprocess.run([*cli, "models"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and "stub_itm            itm     tiny, tiny_dropout" in listed.stdout
    with pytest.raises(CirlabError, match=r"unknown model 'bowcir'; known models: .* \(a model of your own: name "
                                          r"its module in CIRLAB_MODELS"):
        registry.create_model("bowcir")


@pytest.mark.parametrize("module, files, said", [
    # a missing dependency whose name starts the module's name (no dot between): PYTHONPATH was blamed
    ("nodepq_model", {"nodepq_model.py": "import nodepq\n"},
     "cannot import 'nodepq_model': it imports 'nodepq', which is not installed in this environment"),
    # a module of the user's own package is missing: not an uninstalled dependency
    ("pkq_models", {"pkq_models/__init__.py": "import pkq_models.helperz\n"},
     "cannot import 'pkq_models': it imports 'pkq_models.helperz', which cannot be found"),
    ("pkr_models", {"pkr_models/__init__.py": "from . import helperz\n"},
     "cannot import 'pkr_models': cannot import name 'helperz' from partially initialized module 'pkr_models'"),
    # the module itself, or a package above it, not found: that one is a PYTHONPATH matter
    ("pks_models.bow", {"pks_models/__init__.py": ""},
     "cannot import 'pks_models.bow' (No module named 'pks_models.bow'); its folder must be on PYTHONPATH"),
    ("pkt_nowhere.bow", {}, "cannot import 'pkt_nowhere.bow' (No module named 'pkt_nowhere'); its folder must be"),
])
def test_a_users_module_that_fails_to_import_says_what_is_missing(tmp_path, monkeypatch, module, files, said):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CIRLAB_MODELS", module)
    monkeypatch.setattr(registry, "_entry_point_modules", lambda: ())
    with pytest.raises(CirlabError) as caught:
        registry._load_user_models()
    assert str(caught.value).startswith(f"CIRLAB_MODELS={module!r}: {said}")


def test_a_config_with_an_init_var_is_a_dataclass():
    @dataclasses.dataclass
    class WithInitVar(_ToyConfig):  # an __init__ argument that __post_init__ reads, never a field
        scale: dataclasses.InitVar[float] = 1.0

        def __post_init__(self, scale: float) -> None:
            self.scaled = scale

    assert registry._all_fields_are_dataclass_fields(WithInitVar)
    registry.register_model("init_var_toy", task="cir", config_cls=WithInitVar)(_ToyRouter)
    registry._REGISTRY.pop("init_var_toy", None)


def test_register_model_refuses_what_would_fail_later(toy_registered):
    from cirlab.core.errors import ModelContractError

    with pytest.raises(ModelContractError, match=r"register_model\('x'\): task='CIR'; expected one of cir, itm"):
        registry.register_model("x", task="CIR", config_cls=_ToyConfig)
    with pytest.raises(ModelContractError, match=r"config class dict lacks \['from_preset', 'from_dict', 'PRESETS'\]"):
        registry.register_model("x", task="cir", config_cls=dict)

    class Undecorated(_ToyConfig):  # a subclass without @dataclass: its new field was a class attribute
        extra_weight: float = 0.5
    with pytest.raises(ModelContractError, match=r"config class Undecorated is not a dataclass: decorate it"):
        registry.register_model("x", task="cir", config_cls=Undecorated)
    with pytest.raises(ModelContractError, match=r"register_model\('amc'\): the name is taken by cirlab.models."
                                                 r"amc.build_amc; test_core._ToyRouter needs another name"):
        registry.create_model("amc", "tiny")  # the built-ins are loaded: amc is held
        registry.register_model("amc", task="cir", config_cls=_ToyConfig)(_ToyRouter)
    # one class under two names: each model gets its own name (it was set on the class by the first)
    registry.register_model("toy_router_2", task="cir", config_cls=_ToyConfig)(_ToyRouter)
    try:
        names = {registry.create_model(n, "tiny").model_name for n in (toy_registered, "toy_router_2")}
        assert names == {toy_registered, "toy_router_2"}
    finally:
        registry._REGISTRY.pop("toy_router_2", None)


def test_a_shipped_name_is_refused_when_registered_before_the_registry_loaded(tmp_path):
    """cirlab's models load lazily: register_model("amc") in a fresh kernel was accepted, and every later
    list_models()/create_model() of the session failed, blaming cirlab's own build_amc."""
    code = textwrap.dedent("""
        import dataclasses, torch, cirlab
        from cirlab.core.config import PresetMixin
        from cirlab.core.errors import ModelContractError

        @dataclasses.dataclass
        class C(PresetMixin):
            PRESETS = {"tiny": {}}
            w: int = 4

        try:
            cirlab.register_model("amc", task="cir", config_cls=C)(lambda c: torch.nn.Linear(2, 2))
        except ModelContractError as err:
            print("refused:", err)
        import sys
        print("shipped models imported:", "cirlab.models.amc" in sys.modules)  # read from their source
        print(cirlab.list_models(), type(cirlab.create_model("amc", "tiny")).__name__)
    """)
    env = {**os.environ, "CIRLAB_CACHE": str(tmp_path / "cache")}
    env.pop("CIRLAB_MODELS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: register_model('amc'): the name is taken by cirlab.models.amc.build_amc" in done.stdout
    assert "shipped models imported: False" in done.stdout  # registering a user's model loaded them all (5 s)
    assert "['amc', 'blip_rerank_stage1', 'blip_rerank_stage2', 'cala', 'dime', 'hrem'] AMC" in done.stdout


@pytest.mark.parametrize("call, kind", [
    (lambda t: cirlab.create_model("dime", "tiny", bert=str(t / "no_bert")), FileNotFoundError),
    (lambda t: cirlab.create_model("hrem", "tiny", vocab_file=str(t / "no_vocab.txt")), FileNotFoundError),
    (lambda t: cirlab.create_model("amc", "tiny", pretrained=True, backbone_weights=str(t / "no.pth")),
     FileNotFoundError),
    (lambda t: cirlab.create_model("amc", "tiny", glove_path="glove.txt"), ValueError),
    (lambda t: cirlab.create_model("cala", "tiny", image_size=33), ValueError),
    (lambda t: build_transform("nosuch", 32), ValueError),
    (lambda t: build_transform("amc", 32, normalize="bogus"), ValueError),
])
def test_input_errors_are_cirlab_errors_of_their_builtin_kind(tmp_path, call, kind):
    """README: every error caused by one's input is a CirlabError and the builtin kind it is; these were bare
    builtins (a missing BERT folder, vocab_file or weights file; a setting nothing reads; an unknown transform), so
    ``except cirlab.CirlabError`` in a notebook missed them."""
    with pytest.raises(CirlabError) as caught:
        call(tmp_path)
    assert isinstance(caught.value, kind) and "\n" not in str(caught.value)
    if "no_vocab" in str(caught.value):  # named by its config entry (it was "[Errno 2] No such file")
        assert "model_overrides.vocab_file" in str(caught.value)


def test_a_model_missing_part_of_its_contract_is_refused():
    registry.register_model("incomplete", task="cir", config_cls=_ToyConfig)(_Incomplete)
    try:
        with pytest.raises(TypeError, match="Model contract: missing.*training_step"):
            registry.create_model("incomplete", preset="tiny")
    finally:
        registry._REGISTRY.pop("incomplete", None)


def test_unknown_names_give_clear_errors(toy_registered):
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        registry.create_model("nope")
    with pytest.raises(CirlabError, match=r"^unknown model 'AMC' \(did you mean 'amc'\?\); known models: amc,"):
        registry.create_model("AMC")  # one line in a notebook, unquoted, with the fix
    with pytest.raises(TypeError, match=r"a model name is a string .* got \['amc'\]"):
        registry.list_presets(["amc"])
    with pytest.raises(KeyError, match="unknown preset 'huge'.*paper, tiny"):
        registry.create_model(toy_registered, preset="huge")
    with pytest.raises(TypeError, match="unknown field.*'width'"):
        registry.create_model(toy_registered, preset="tiny", width=3)


@dataclasses.dataclass
class Typed:
    """Every kind of annotation the model configs use."""

    heads: int = 2
    lr: float = 1e-3
    flag: bool = False
    name: str = ""
    mode: Literal["sum", "artemis"] = "sum"
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (1, "a")
    maybe: Optional[int] = None
    either: int | str = 0
    table: dict[str, int] = dataclasses.field(default_factory=dict)


def test_config_values_must_fit_their_annotations(tmp_path):
    import re

    from cirlab.core.config import FieldTypeError, UnknownPresetError, check_field_types

    fine = {"heads": 4, "lr": 3, "flag": True, "name": tmp_path, "mode": "artemis", "sizes": [3, 4],
            "pair": [2, "b"], "maybe": None, "either": "x", "table": {"a": 1}}
    check_field_types(Typed, fine)  # ints for floats, lists for tuples, paths for strings
    wrong = {"heads": "abc", "lr": "fast", "flag": 1, "name": 3, "mode": "mean", "sizes": [1, "2"],
             "pair": [1, 2, 3], "maybe": 1.5, "either": 2.5, "table": [1]}
    for field, value in wrong.items():
        with pytest.raises(FieldTypeError, match=rf"^Typed\.{field}: expected .*, got {re.escape(repr(value))}"):
            check_field_types(Typed, {field: value})
    with pytest.raises(FieldTypeError, match=r"_ToyConfig\.\w+: expected int, got 'abc' \(str\)"):
        _ToyConfig.from_preset("tiny", dim="abc")
    with pytest.raises(UnknownPresetError) as err:
        _ToyConfig.from_preset("huge")
    assert str(err.value).startswith("_ToyConfig: unknown preset 'huge'")  # not quoted as a KeyError would be


def test_config_dict_round_trip():
    cfg = _ToyConfig.from_preset("paper")
    assert _ToyConfig.from_dict(cfg.to_dict()) == cfg


def test_paths_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("CIRLAB_RUNS", str(tmp_path / "r"))
    assert paths.data_root() == tmp_path / "d"
    assert paths.cache_dir() == tmp_path / "c"
    assert paths.runs_dir() == tmp_path / "r"
    assert paths.resolve_root("", "cirr") == tmp_path / "d" / "cirr"
    assert paths.resolve_root(tmp_path / "x", "cirr") == tmp_path / "x"


def test_trace_records_gates_with_ids_and_metadata(toy_registered):
    model = registry.create_model(toy_registered, preset="tiny")
    other = registry.create_model(toy_registered, preset="tiny")
    x = torch.randn(5, 4)
    with trace_routes(model) as trace:
        assert is_active()
        trace.set_batch(ids=[f"q{i}" for i in range(5)], category=["a", "b", "a", "b", "a"])
        expected = model(x).detach()
        other(x)  # a different model's emissions are not recorded
    assert not is_active()
    assert torch.allclose(trace.gates("layer1"), expected)
    frame = trace.to_frame()
    assert len(frame) == 5 * 3
    row = frame[(frame.query_id == "q2") & (frame.expert == "B")].iloc[0]
    assert row.weight == pytest.approx(float(expected[2, 1]))
    assert row.category == "a" and row.code_index == 1
    assert set(frame[frame.expert == "A"].paper_name) == {"expert-2"}


def test_path_records_expand_destination_by_source():
    module = torch.nn.Linear(1, 1)
    w = torch.rand(2, 2, 3)
    with trace_routes(module) as trace:
        emit(module, "layer1", w, kind="path", sources=["s0", "s1", "s2"], destinations=["d0", "d1"],
             paper_names={"s1": "cell 9 (s1)", "d1": "cell 4 (d1)"}, meta={"image_id": [7, 8]})
    frame = trace.to_frame()
    assert len(frame) == 2 * 2 * 3
    pick = frame[(frame.query_id == 1) & (frame.destination == "d1") & (frame.source == "s0")]
    assert pick.weight.item() == pytest.approx(float(w[1, 1, 0])) and pick.image_id.item() == 8
    # both axes carry their code index and paper name (a name without a paper name keeps its own)
    pick = frame[(frame.query_id == 0) & (frame.destination == "d1") & (frame.source == "s1")].iloc[0]
    assert (pick.code_index, pick.paper_name, pick.source_code_index, pick.source_paper_name) == (
        1, "cell 4 (d1)", 1, "cell 9 (s1)")
    assert set(frame[frame.source == "s2"].source_paper_name) == {"s2"}
    with pytest.raises(ValueError, match="do not match"):
        with trace_routes(module):
            emit(module, "bad", w, kind="path", sources=["s0"], destinations=["d0", "d1"])


def test_set_batch_refuses_names_that_would_shadow_or_lose_the_ids():
    """set_batch(id=...) used to become a metadata column "id" while query_id stayed empty."""
    with trace_routes(torch.nn.Linear(1, 1)) as trace:
        for bad in ("id", "query_ids", "layer", "weight"):
            with pytest.raises(TypeError, match=rf"set_batch\({bad}=\.\.\.\): '{bad}' is not a metadata column .* "
                                                r"pass the query ids as ids="):
                trace.set_batch(**{bad: ["a"]})
        with pytest.raises(TypeError, match=r"set_batch\(category=\.\.\.\): expected one value per query \(a list\), "
                                            "got 'dress'"):
            trace.set_batch(ids=["a"], category="dress")
        with pytest.raises(TypeError, match=r"set_batch\(ids=\.\.\.\): .* got 'dress:0'"):  # was: failed in forward
            trace.set_batch(ids="dress:0")
        with pytest.raises(TypeError, match=r"set_batch\(category=\.\.\.\): .* got 3"):
            trace.set_batch(ids=["a"], category=3)
        trace.set_batch(ids=["a"], category=["dress"])  # the intended call still works
        assert trace._pending_ids == ["a"] and trace._pending_meta == {"category": ["dress"]}
        trace.set_batch(ids=torch.tensor([4]), category=torch.tensor([1]))
        assert trace._pending_ids == [4] and trace._pending_meta == {"category": [1]}  # numbers, not tensor(4)


def test_trace_accessors_name_the_layers_recorded():
    module = torch.nn.Linear(1, 1)
    with trace_routes(module) as trace:
        emit(module, "layer1", torch.rand(2, 3), experts=["x", "y", "z"])
    for accessor in (trace.gates, trace.names):  # were bare KeyErrors ('layer 1')
        with pytest.raises(CirlabError, match=r"layer 'layer 1' \(did you mean 'layer1'\?\); recorded: layer1"):
            accessor("layer 1")


def test_set_batch_labels_one_batch_only():
    """Ids set once and two batches run: the second batch was labelled with the first batch's ids, and the analysis
    then averaged different queries into one row."""
    module = torch.nn.Linear(1, 1)
    with trace_routes(module) as trace:
        trace.set_batch(ids=["a", "b"])
        emit(module, "layer1", torch.rand(2, 3), experts=["x", "y", "z"])
        emit(module, "layer2", torch.rand(2, 3), experts=["x", "y", "z"])  # one forward pass: several layers
        with pytest.raises(ValueError, match=r"'layer1' emitted twice under one set_batch: call set_batch before each"):
            emit(module, "layer1", torch.rand(2, 3), experts=["x", "y", "z"])
        trace.set_batch(ids=["c", "d"])
        emit(module, "layer1", torch.rand(2, 3), experts=["x", "y", "z"])
    assert trace.to_frame().query_id.unique().tolist() == ["a", "b", "c", "d"]


def test_nested_traces_of_one_model_leave_in_order():
    module = torch.nn.Linear(1, 1)
    with trace_routes(module) as outer:
        with trace_routes(module) as inner:  # both still empty: equal by content, distinct by identity
            emit(module, "both", torch.rand(2, 3), experts=["x", "y", "z"])
        emit(module, "outer only", torch.rand(2, 3), experts=["x", "y", "z"])  # the inner trace has left
    assert not is_active()
    assert [r.layer for r in outer.records] == ["both", "outer only"] and [r.layer for r in inner.records] == ["both"]


def test_emit_is_a_no_op_without_trace():
    module = torch.nn.Linear(1, 1)
    emit(module, "layer1", torch.rand(2, 3), experts=["a"])  # wrong names, but nothing is checked or kept
    assert not is_active()


def test_topk_round_trip_and_bad_files(tmp_path):
    topk = TopK(query_ids=["1", "2"], gallery_ids=[["a", "b"], ["c", "d"]], scores=[[0.9, 0.5], [0.3, 0.1]],
                target_rank=[1, 7], category=["dress", "shirt"], target_ids=["a", "z"], meta={"k": 2})
    path = save_topk(tmp_path / "run" / "val.topk.npz", topk)
    back = load_topk(path)
    assert back.k == 2 and list(back.target_rank) == [1, 7] and back.meta == {"k": 2}
    assert back.gallery_ids[1, 0] == "c" and back.to_frame().top1.tolist() == ["a", "c"]
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="junk.npz"):
        load_topk(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="missing"):
        load_topk(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="differ"):
        TopK(["1"], [["a", "b"]], [[1.0]], [1])


def test_import_is_cheap():
    code = "import sys, time; t=time.perf_counter(); import cirlab; dt=time.perf_counter()-t; " \
           "print(dt, 'torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5
    assert out[1:] == ["False", "False"]


def test_quick_refusals_and_checks_do_not_wait_for_torch(tmp_path):
    """`cirlab eval /nowhere`, `cirlab train /nowhere.yaml` and `cirlab data check` on good data loaded torch (3-6 s
    on a loaded 2-core machine) before a one-line answer that needs no tensor: `data check` for the string "avg"."""
    from cirlab.data.generators import synthetic

    root = synthetic.generate(tmp_path / "data", size="tiny", layouts=["fashioniq"], image_size=16)
    fiq = root["layouts"]["fashioniq"]["root"]
    code = ("import sys\nfrom cirlab.cli import main\n"
            "rc = main(sys.argv[1:])\nprint(rc, 'torch' in sys.modules)")
    for argv, rc in ((["eval", str(tmp_path / "nowhere")], 2), (["train", str(tmp_path / "nowhere.yaml")], 2),
                     (["data", "check", "--dataset", "fashioniq", "--root", str(fiq)], 0)):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert out.stdout.split()[-2:] == [str(rc), "False"], (argv, out.stdout, out.stderr[-2000:])


def test_emitter_columns_join_the_callers_batch_columns():
    module = torch.nn.Linear(1, 1)
    with trace_routes(module) as trace:
        trace.set_batch(ids=["a", "b"], caption_idx=[3, 4])
        emit(module, "layer0", torch.rand(2, 1, 2), kind="path", sources=["s0", "s1"], destinations=["d0"],
             meta={"image_id": [0, 0]})
        emit(module, "layer0", torch.rand(6, 1, 2), kind="path", sources=["s0", "s1"], destinations=["d0"],
             ids=list(range(6)), meta={"image_id": [0, 1, 2, 0, 1, 2]})  # all pairs: batch columns do not align
    frame = trace.to_frame()
    first = frame[frame.query_id.isin(["a", "b"])]
    assert first.caption_idx.tolist() == [3, 3, 4, 4] and first.image_id.tolist() == [0, 0, 0, 0]
    assert frame[frame.query_id == 5].caption_idx.isna().all()


def test_flat_numbers_is_the_one_flattening_of_nested_metrics():
    from cirlab.core.io import flat_numbers
    from cirlab.workbench.analysis import flatten_metrics

    tree = {"val": {"R@1": np.float32(12.5), "n": 240, "ok": True, "name": "dress", "t": torch.tensor(3.0)},
            "table": [{"category": "shirt", "R@10": 40}, [7]]}
    assert flat_numbers(tree) == {"val/R@1": 12.5, "val/n": 240.0, "val/t": 3.0, "table/shirt/R@10": 40.0,
                                  "table/1/0": 7.0}
    kept = flat_numbers(tree, floats=False)
    assert type(kept["val/n"]) is int and type(kept["table/shirt/R@10"]) is int  # the index shows 240, not 240.0
    assert flatten_metrics(tree) == flat_numbers(tree)  # the workbench's public name reads through the same one


def test_json_and_yaml_files_keep_non_ascii_text_as_itself_and_escape_only_what_utf8_cannot_hold(tmp_path):
    import json

    import yaml

    from cirlab.core.io import write_json, write_yaml

    record = {"root": "/home/josé/données", "name": "写真-run", "n": 1}
    for write, read, name in ((write_json, json.loads, "a.json"), (write_yaml, yaml.safe_load, "a.yaml")):
        text = write(tmp_path / name, record).read_bytes().decode("utf-8")
        assert "josé/données" in text and "写真-run" in text, text  # was jos\u00e9 / "jos\xE9"
        assert read(text) == record
        breaks = {"root": "/data/a\x85b\u2028c"}  # Unicode line breaks: YAML read them back as spaces when raw
        assert read(write(tmp_path / ("breaks-" + name), breaks).read_text(encoding="utf-8")) == breaks
        odd = {"root": "/data/caf\udce9"}  # a file name that is not UTF-8, as os.listdir gives it
        text = write(tmp_path / ("odd-" + name), odd).read_bytes().decode("ascii")  # escaped, so still UTF-8
        assert read(text) == odd


def test_atomic_writers_take_any_name_the_file_system_takes_and_never_touch_the_umask(tmp_path, monkeypatch):
    """The staged file was named after the whole target plus 14 (write_text) or 39 (write_new_text) characters, so a
    name near the 255-byte limit wrote nothing ("File name too long") after the work was done; and atomic_path read
    the umask by setting it to 0 for a moment, so a file another thread created then was world-writable."""
    import os

    from cirlab.core.io import stale_temporaries, write_new_text, write_text

    def no_umask(mask):
        raise AssertionError("os.umask called")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        for write, name in ((write_text, "a" * 250 + ".json"), (write_new_text, "b" * 250 + ".json"),
                            (write_text, "é" * 125 + ".json")):  # 255 bytes each, "é" two of them
            assert len(name.encode()) == 255
            path = write(tmp_path / name, "{}\n")
            assert path.read_text(encoding="utf-8") == "{}\n" and oct(path.stat().st_mode & 0o777) == "0o640"
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stale_temporaries(tmp_path) == [] and len(list(tmp_path.iterdir())) == 3


def test_new_files_are_never_replaced_with_or_without_hard_links(tmp_path, monkeypatch):
    """write_new_text and atomic_path under new_files_only refuse a file that is there (a second process wrote it
    meanwhile), naming it; on a file system without hard links the fallback claims the name exclusively and leaves
    no file behind when the write fails (open(path, "x") did: a half file the next try refused as "exists")."""
    import os

    from cirlab.core.io import new_files_only, stale_temporaries, write_new_text, write_text

    for hard_links in (True, False):
        if not hard_links:
            monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(PermissionError(1, "no links")))
        folder = tmp_path / f"links-{hard_links}"
        assert write_new_text(folder / "a.json", "mine\n").read_text() == "mine\n"
        with pytest.raises(FileExistsError) as err:
            write_new_text(folder / "a.json", "theirs\n")
        assert err.value.filename == str(folder / "a.json")
        with new_files_only(folder):
            write_text(folder / "b.json", "new\n")
            with pytest.raises(FileExistsError):
                write_text(folder / "b.json", "again\n")
            write_text(tmp_path / f"elsewhere-{hard_links}.json", "x\n")  # outside the folder: replaced as usual
            write_text(tmp_path / f"elsewhere-{hard_links}.json", "y\n")
        write_text(folder / "b.json", "replaced\n")  # outside the block: replaced as usual
        assert [(folder / n).read_text() for n in ("a.json", "b.json")] == ["mine\n", "replaced\n"]
        with pytest.raises(UnicodeEncodeError):  # a failed write: no claimed name left behind
            write_new_text(folder / "half.json", "ok \udce9")
        assert not (folder / "half.json").exists() and stale_temporaries(folder) == []
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):  # no hard links, and the rename after the claim fails
        write_new_text(folder / "claimed.json", "x\n")
    assert not (folder / "claimed.json").exists() and stale_temporaries(folder) == []


def test_unknown_names_message_with_and_without_known_names():
    from cirlab.core.config import unknown_names_message

    assert unknown_names_message("Cfg", ["rooot"], ["root", "split"]) == \
        "Cfg: unknown field 'rooot' (did you mean 'root'?); known: root, split"
    # a config class without fields ended on an empty "known:"
    assert unknown_names_message("Empty", ["a", "b"], []) == "Empty: unknown fields 'a', 'b'; it has none"


def test_a_contract_method_that_is_not_callable_is_named():
    """A model whose default_train_config is a dict (not a method) was refused as "missing []"."""
    import stub_models  # noqa: F401 - registers stub_cir
    from cirlab.core.contracts import check_model
    from cirlab.core.errors import ModelContractError

    model = registry.create_model("stub_cir", "tiny")
    model.default_train_config = {"lr": 1e-3}
    with pytest.raises(ModelContractError, match=r"contract: not callable: \['default_train_config'\]$"):
        check_model(model)


def test_one_user_mistake_is_one_catchable_kind_wherever_it_is_met(tmp_path):
    """An unknown model was a KeyError from create_model and a ValueError from a config; a missing checkpoint a
    FileNotFoundError from load_run and a RuntimeError from model_from_checkpoint; the base was not public."""
    import cirlab
    from cirlab.engine.runs import model_from_checkpoint

    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "amc_synthetic_tiny.yaml"
    for call in (lambda: cirlab.create_model("amcc"), lambda: cirlab.load_config(config, ["model=amcc"])):
        with pytest.raises(cirlab.CirlabError) as err:
            call()
        assert isinstance(err.value, ValueError)  # from the registry and from a config alike
        assert "amcc" in str(err.value) and "did you mean 'amc'" in str(err.value)
    with pytest.raises(KeyError):  # and still a KeyError from the registry, as before
        cirlab.create_model("amcc")
    with pytest.raises(cirlab.CirlabError) as err:
        model_from_checkpoint(tmp_path / "nope.pt")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, cirlab.errors.CheckpointError)


def test_help_of_a_config_shows_each_field_with_the_comment_beside_it():
    """help(TrainConfig) documented none of its 40 fields, help(DIMEConfig)/help(HREMConfig) showed only the
    generated signature: the fields' meanings were comments in the source. They are read from there."""
    from cirlab.core.fielddocs import documented, field_notes
    from cirlab.engine.train import TrainConfig
    from cirlab.models.dime import DIMEConfig
    from cirlab.models.hrem import HREMConfig

    for cls in (TrainConfig, DIMEConfig, HREMConfig):
        notes = field_notes(cls)
        assert set(notes) == {f.name for f in dataclasses.fields(cls)}, cls  # every field has its note
        assert all(f"\n    {name} = " in cls.__doc__ for name in notes)
    notes = field_notes(TrainConfig)
    assert notes["epochs"] == "passes over the training data"  # the comment on the line
    assert notes["group_batches"].startswith("> 0: keep up to this many items") and "plain shuffle" in \
        notes["group_batches"]  # the block above it
    assert notes["ema_mode"].endswith("EMA weights replace the live ones at every epoch end")  # the continuation
    assert "---" not in TrainConfig.__doc__ and "--- length" not in notes["epochs"]  # section headers left out
    assert "cirlab.fit(model, data" in TrainConfig.__doc__  # cirlab.train is the trainer module
    assert "Presets: ``f30k_i2t``" in DIMEConfig.__doc__

    # a continuation followed at once by the next field is the first field's only (it was both fields')
    assert "code does; logged as a warning" in notes["selection"] and "code does" not in notes["selection_metric"]

    @dataclass
    class Typed:  # a class whose source is a test's: the nearest comment of each kind
        # the block above
        a: int = 1  # and beside
        #             and below
        b: str = "x"
        c: int = 2  # c's
    assert field_notes(Typed) == {"a": "the block above and beside and below", "c": "c's"}
    doc = documented(Typed).__doc__
    assert "    a = 1: the block above and beside" in doc and "    b = 'x'" in doc


def test_field_notes_of_a_class_whose_header_spans_lines(tmp_path, monkeypatch):
    """The class source was cut at the first line not indented past ``class`` (a header over two lines, a string
    continuing at column 0), and tokenize failed: importing a module with such a config class failed."""
    from cirlab.core.fielddocs import field_notes

    (tmp_path / "split_header.py").write_text('import dataclasses\n\n\n@dataclasses.dataclass\nclass Split(\n'
                                              '        object):\n    a: int = 1  # the a\n'
                                              '    b: str = """x\ny"""  # the b\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import split_header

    assert field_notes(split_header.Split) == {"a": "the a", "b": "the b"}
