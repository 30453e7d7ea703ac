"""The router explorer's widgets, driven from Python: changing a widget value must redraw the figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cirlab.core.topk import TopK
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
    assert [t.get_text() for t in fig.axes[-1].texts if t.get_gid() == "target"] == ["#2 t  0.500"]
