"""The router explorer's widgets, driven from Python: changing a widget value must redraw the figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cirlab.core.topk import TopK
from cirlab.workbench import viz
from cirlab.workbench.widgets import RouterExplorer, plot_query_view

pytest.importorskip("ipywidgets")

EXPERTS = ("NIN", "CRN", "GTN")


def routes_for(qid: str, gates: dict[str, list[float]], category: str = "dress") -> pd.DataFrame:
    rows = [{"query_id": qid, "layer": layer, "source": None, "destination": None, "expert": name, "code_index": e,
             "paper_name": name, "weight": w[e], "category": category}
            for layer, w in gates.items() for e, name in enumerate(EXPERTS)]
    return pd.DataFrame(rows)


def text_gates(text: str) -> dict[str, list[float]]:
    """A fake router: the gates depend on the text, so an edit must move them."""
    n = len(text)
    return {"layer1": [(n % 7) / 7, (n % 5) / 5, (n % 3) / 3], "layer2": [0.1, 0.2, min(1.0, n / 50)]}


@pytest.fixture()
def explorer():
    texts = {"q0": "make it red", "q1": "add a small green square", "q2": "remove the star"}
    routes = pd.concat([routes_for(q, text_gates(t)) for q, t in texts.items()], ignore_index=True)
    calls = []

    def query_fn(qid, text):
        calls.append((qid, text))
        return {"routes": routes_for(qid, text_gates(text)), "candidate_ids": ["g1", "g2", "g3"],
                "scores": [0.9, 0.5, 0.1]}

    topk = TopK(list(texts), [["g3", "g1", "g2"]] * 3, [[0.3, 0.2, 0.1]] * 3, [1, 2, 3],
                target_ids=["g3", "g1", "g9"])
    exp = RouterExplorer(routes, texts=texts, query_fn=query_fn, topk=topk, k=3)
    exp.calls = calls
    return exp


def bars(fig, gid: str, layer_axis: int = 0) -> list[float]:
    return [p.get_height() for p in fig.axes[layer_axis].patches if p.get_gid() == gid]


def test_build_renders_the_first_query(explorer):
    box = explorer.build()
    assert explorer.renders == 1
    assert explorer.query.options == ("q0", "q1", "q2")
    assert explorer.text.value == "make it red"
    assert bars(explorer.figure, "gates:traced") == pytest.approx(text_gates("make it red")["layer1"])
    assert bars(explorer.figure, "gates:edited") == []  # unedited text: no second set of bars
    assert box.children[-1] is explorer.output


def test_picking_a_query_redraws_its_gates_and_topk(explorer):
    explorer.build()
    explorer.query.value = "q1"
    assert explorer.renders == 2  # one render, although the text box was reset too
    assert explorer.text.value == "add a small green square"
    fig = explorer.figure
    assert "q1" in fig._suptitle.get_text()
    assert bars(fig, "gates:traced", 1) == pytest.approx(text_gates("add a small green square")["layer2"])
    target = [t for t in fig.axes[-1].texts if t.get_gid() == "target"]
    assert len(target) == 1 and "g1" in target[0].get_text()  # q1's target is g1 (rank 2 in its top-K)
    assert explorer.calls == []  # no re-run of the model for an unedited text


def test_editing_the_text_moves_the_gates(explorer):
    explorer.build()
    explorer.query.value = "q2"
    explorer.text.value = "remove the star and make everything a lot bigger please"
    assert explorer.calls == [("q2", "remove the star and make everything a lot bigger please")]
    fig = explorer.figure
    assert bars(fig, "gates:traced") == pytest.approx(text_gates("remove the star")["layer1"])
    assert bars(fig, "gates:edited") == pytest.approx(text_gates(explorer.text.value)["layer1"])
    assert bars(fig, "gates:edited") != bars(fig, "gates:traced")
    listed = [t.get_text() for t in fig.axes[-1].texts]
    assert listed[0].startswith("#1 g1")  # the edited query's own top-K replaces the traced one


def test_view_is_the_static_headless_path(explorer):
    fig = explorer.view("q0")
    assert bars(fig, "gates:traced") == pytest.approx(text_gates("make it red")["layer1"])
    with pytest.raises(KeyError, match="not among the traced"):
        explorer.view("nope")


def test_thumbnails_frame_the_target():
    routes = routes_for("q0", text_gates("x"))
    fig = plot_query_view(routes, candidate_ids=["a", "b", "c"], scores=[3, 2, 1], target_id="b",
                          image_fn=lambda name: np.full((4, 4, 3), 0.5))
    thumbs = fig.axes[2:]
    assert [ax.get_gid() for ax in thumbs] == [None, "target", None]
    # the target is told by text too, not only by its green frame
    assert [viz.TARGET_MARK in ax.get_title() for ax in thumbs] == [False, True, False]


def test_explorer_without_model_disables_text():
    exp = RouterExplorer(routes_for("q0", text_gates("abc")), texts={"q0": "abc"})
    exp.build()
    assert exp.text.disabled
    with pytest.raises(ValueError):
        RouterExplorer(pd.DataFrame())


def test_static_view_searches_when_no_topk_is_given():
    calls = []

    def query_fn(qid, text):
        calls.append(text)
        return {"routes": routes_for(qid, text_gates(text)), "candidate_ids": ["a", "t"], "scores": [1.0, 0.5],
                "target_id": "t"}

    exp = RouterExplorer(routes_for("q0", text_gates("abc")), texts={"q0": "abc"}, query_fn=query_fn)
    fig = exp.view("q0")
    assert calls == ["abc"]  # the original text, only to get the top-K
    assert bars(fig, "gates:edited") == []
    assert [t.get_text() for t in fig.axes[-1].texts if t.get_gid() == "target"] == [f"#2 t  0.500  {viz.TARGET_MARK}"]


# --------------------------------------------------------------------------------------------- what users see
def test_target_outside_the_top_k_is_shown_with_its_rank_and_thumbnails_have_the_reference():
    routes = routes_for("q0", text_gates("x"))
    image = lambda name: np.full((4, 4, 3), 0.5)  # noqa: E731
    fig = plot_query_view(routes, candidate_ids=["a", "b"], scores=[2, 1], target_id="t", image_fn=image,
                          target_rank=37, gallery_size=400, reference_id="r", text="<BOS> x <AND> y <EOS>")
    gids = [ax.get_gid() for ax in fig.axes]
    assert gids.count("target_outside") == 1 and "query" in gids and "target" not in gids
    outside = fig.axes[gids.index("target_outside")]
    assert "rank 37" in outside.get_title()
    text = next(t for ax in fig.axes for t in ax.texts if t.get_gid() == "query_text").get_text()
    assert text.startswith("x and y") and "37 of 400" in text  # plain text, and the rank in the whole gallery
    assert fig.axes[0].get_ylabel() == "gate weight"


def test_two_checkpoints_side_by_side_follow_the_text():
    texts = {"q0": "make it red"}
    routes = routes_for("q0", text_gates("make it red"))

    def answer(scale):
        def query_fn(qid, text):
            gates = {layer: [w * scale for w in ws] for layer, ws in text_gates(text).items()}
            return {"routes": routes_for(qid, gates), "candidate_ids": ["g1"], "scores": [0.5], "target_id": "g9",
                    "target_rank": int(10 * scale)}
        return query_fn

    exp = RouterExplorer(routes, texts=texts, query_fn=answer(1.0), compare_fn=answer(0.5),
                         labels=("trained", "untrained"))
    exp.build()
    first = bars(exp.figure, "gates:compare")
    assert first == pytest.approx([w * 0.5 for w in text_gates("make it red")["layer1"]])
    exp.text.value = "make it a lot redder than before"
    assert bars(exp.figure, "gates:compare") == pytest.approx(
        [w * 0.5 for w in text_gates(exp.text.value)["layer1"]])
    rank_text = [t.get_text() for t in exp.figure.axes[-1].texts if t.get_gid() == "target_rank"]
    assert rank_text and "10" in rank_text[0] and "5 (untrained)" in rank_text[0]


def test_explorer_texts_are_plain_and_a_failing_model_call_shows_an_error():
    calls = []

    def query_fn(qid, text):
        calls.append(text)
        raise RuntimeError("model exploded")

    exp = RouterExplorer(routes_for("q0", text_gates("abc")), texts={"q0": "<BOS> a <AND> b <EOS>"},
                         query_fn=query_fn, topk=TopK(["q0"], [["g"]], [[1.0]], [1], target_ids=["g"]), k=1)
    exp.build()
    assert exp.text.value == "a and b" and exp.renders == 1  # the top-K is given: no model call for the trace
    exp.text.value = "c and d"
    assert calls == ["c and d"] and "model exploded" in exp.status.value and exp.renders == 1
    assert exp.pick("") == "q0" and exp.pick("q0") == "q0"


def test_the_error_line_shows_markup_in_a_message_as_text():
    """The status line is an ipywidgets.HTML: an image name such as ``<img src=x onerror=...>.png`` in an error
    message ran as markup in the notebook."""
    evil = "<img src=x onerror=alert(1)>.png"

    def query_fn(qid, text):
        raise RuntimeError(f"cannot read image {evil}: 'truncated' & \"bad\"")

    exp = RouterExplorer(routes_for("q0", text_gates("abc")), texts={"q0": "abc"}, query_fn=query_fn,
                         topk=TopK(["q0"], [["g"]], [[1.0]], [1], target_ids=["g"]), k=1)
    exp.build()
    exp.text.value = "edited"
    assert exp.status.value == ("<span style='color:#b00'>error: RuntimeError: cannot read image "
                                "&lt;img src=x onerror=alert(1)&gt;.png: &#x27;truncated&#x27; &amp; "
                                "&quot;bad&quot;</span>")


def dime_pair_routes(qid, image, weights):
    cells = ["RIC", "GLGC", "IMRC", "CMRC"]
    rows = []
    for layer, dests in (("layer0", cells), ("layer1", cells), ("layer2", ["output"])):
        for d, dst in enumerate(dests):
            for s, src in enumerate(cells):
                rows.append({"query_id": qid, "layer": layer, "source": src, "destination": dst, "expert": dst,
                             "code_index": d, "paper_name": dst, "weight": weights, "image_id": image,
                             "category": "color"})
    return pd.DataFrame(rows)


def test_path_explorer_rescores_an_edited_caption_against_a_chosen_image():
    routes = pd.concat([dime_pair_routes(0, 0, 0.25), dime_pair_routes(5, 1, 0.25)], ignore_index=True)
    calls = []

    def pair_fn(image, text):
        calls.append((image, text))
        return {"routes": dime_pair_routes("edit", image, min(1.0, len(text) / 100)), "score": 0.5,
                "image_rank": 3, "n_images": 50}

    from cirlab.workbench.widgets import PathExplorer

    exp = PathExplorer(routes, texts={0: "a red star", 5: "a blue ring"}, pair_fn=pair_fn, n_images=4)
    exp.build()
    assert exp.image.options == (0, 1, 2, 3) and exp.image.value == 0
    edited = [im for ax in exp.figure.axes for im in ax.images if "edited" in (im.get_gid() or "")]
    assert edited == [] and calls == [(0, "a red star")]  # the traced pair's own score and rank only
    exp.image.value = 2
    exp.text.value = "a large red star on the left and a small ring"
    assert calls[-1] == (2, "a large red star on the left and a small ring")
    edited = {im.get_gid(): im.get_array() for ax in exp.figure.axes for im in ax.images
              if "edited" in (im.get_gid() or "")}
    assert set(edited) == {"paths:edited:layer0", "paths:edited:layer1", "paths:edited:layer2"}
    assert float(edited["paths:edited:layer0"][0, 0]) == pytest.approx(len(exp.text.value) / 100)
    assert "image rank 3 of 50" in exp.figure._suptitle.get_text()
    assert exp.status.value == ("traced: image 0, score 0.500, image rank 3 of 50 for the caption; edited: image 2, "
                                "score 0.500, image rank 3 of 50 for the caption")  # as text too
    exp.query.value = 5  # picking another pair resets caption and image without a second render
    assert exp.text.value == "a blue ring" and exp.image.value == 1 and exp.pick("5") == 5


def test_live_frontend_is_false_outside_a_kernel_and_under_papermill(monkeypatch):
    import sys
    import types

    from cirlab.workbench.widgets import live_frontend

    assert live_frontend() is False  # pytest: no kernel

    class Kernel:
        def __init__(self, allow):
            self.allow = allow

        def get_parent(self):
            return {"content": {"allow_stdin": self.allow}}

    for allow, expected in ((True, True), (False, False)):  # JupyterLab asks with allow_stdin, nbclient never does
        shell = types.SimpleNamespace(kernel=Kernel(allow))
        monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
        assert live_frontend() is expected


def test_amc_adds_the_markup_to_a_plain_text_on_its_own_text_path():
    import types

    import torch

    import cirlab

    model = cirlab.create_model("amc", preset="tiny").eval()
    trip = types.SimpleNamespace(captions=["is red", "has a star"], text="<BOS> is red <AND> has a star <EOS>")
    model.fit_vocab(types.SimpleNamespace(triplets=[trip]))
    assert model.text_encoder.markup
    image = torch.rand(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        marked = model.encode_query(image, [trip.text])
        plain = model.encode_query(image, ["is red and has a star"])  # what the explorer shows and sends
    torch.testing.assert_close(plain, marked)
    other = cirlab.create_model("amc", preset="tiny")
    other.load_state_dict(model.state_dict())
    assert other.text_encoder.markup  # saved with the checkpoint


def test_a_rebuilt_or_closed_explorer_leaves_no_widget_open(explorer):
    """ipywidgets keeps every open widget for the kernel's life, and through their callbacks the explorer with its
    models and data: each build() kept the previous one's widgets alive (about 5 MB per build with tiny models)."""
    open_before = _open_widgets()
    explorer.build()
    made = _open_widgets() - open_before
    assert made >= 6  # dropdown, text, status, output and the two boxes
    explorer.build()  # a notebook cell run again on the same explorer
    assert _open_widgets() - open_before == made
    explorer.close()
    assert _open_widgets() == open_before
    with explorer as same:  # a with block closes it at its end
        same.build()
        assert _open_widgets() - open_before == made
    assert _open_widgets() == open_before


def _open_widgets() -> int:
    """How many widgets the kernel keeps open: ipywidgets 8.0.3+ keeps them in ``widget._instances`` (8.0.0-8.0.2 in
    ``Widget._active_widgets``; ``Widget.widgets``, 7.x's spelling, warns that it is deprecated)."""
    from ipywidgets.widgets import widget

    if getattr(widget, "_instances", None) is not None:  # asked first: the older names warn where this exists
        return len(widget._instances)
    if "_active_widgets" in vars(widget.Widget):
        return len(widget.Widget._active_widgets)
    return len(widget.Widget.widgets)


def test_the_status_line_says_in_text_what_the_figure_shows(explorer):
    """The target's rank, the top-K and their scores were only drawn in the figure: a screen reader read nothing."""
    explorer.build()
    explorer.query.value = "q1"
    assert explorer.status.value == "target g1: rank 2; top 3: g3 (0.300), g1 (0.200), g2 (0.100)"
    explorer.text.value = "a <b>bold</b> edit"  # re-routed: query_fn's candidates, no rank for them
    assert explorer.status.value.startswith("target g1: rank 2; top 3: g1 (0.900)")


def test_pair_fn_ranks_a_duplicated_image_as_the_t2i_metrics_do(tmp_path):
    """The DIME explorer counted only higher scores: an image whose features duplicate a lower-indexed one showed a
    rank one better than the run's t2i metrics give it (ties go to the lower image index there)."""
    import cirlab
    from cirlab.data import load_precomp
    from cirlab.workbench.widgets import make_pair_fn
    from fixtures_data import write_precomp

    folder = write_precomp(tmp_path, splits=("test",), regions=6, dim=64)["dir"]
    feats = np.load(folder / "test_ims.npy")
    feats[2] = feats[1]
    np.save(folder / "test_ims.npy", feats)
    split = load_precomp(tmp_path, "f30k", "test", regions=6, dim=64)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    pair_fn = make_pair_fn(cirlab.create_model("dime", "tiny"), split)
    first, second = (pair_fn(i, "image 1 caption 0 .") for i in (1, 2))
    assert first["score"] == pytest.approx(second["score"])
    assert second["image_rank"] == first["image_rank"] + 1
