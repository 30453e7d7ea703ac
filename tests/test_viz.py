"""cirlab.workbench.viz plots and the cirlab.workbench.analysis numbers behind them, on small known inputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cirlab import analysis, viz
from cirlab.core.topk import TopK

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import PathPatch, Rectangle  # noqa: E402

CELLS = ["RIC", "GLGC", "IMRC", "CMRC"]


def amc_frame(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n):
        for layer in ("layer1", "layer2"):
            w = rng.random(3)
            for e, name in enumerate(("NIN", "CRN", "GTN")):
                rows.append({"query_id": f"q{q}", "layer": layer, "source": None, "destination": None,
                             "expert": name, "code_index": e, "paper_name": name, "weight": float(w[e]),
                             "category": ("dress", "shirt", "toptee")[q % 3],
                             "modification": ("color", "add")[q % 2]})
    return pd.DataFrame(rows)


def dime_frame(n: int = 6, seed: int = 1) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows, mats = [], {}
    for layer, dests in (("layer0", CELLS), ("layer1", CELLS), ("layer2", ["out"])):
        w = rng.random((n, len(dests), 4))
        mats[layer] = w
        for q in range(n):
            for d, dst in enumerate(dests):
                for s, src in enumerate(CELLS):
                    rows.append({"query_id": q, "layer": layer, "source": src, "destination": dst, "expert": dst,
                                 "code_index": d, "paper_name": dst, "weight": float(w[q, d, s]),
                                 "category": "ab"[q % 2]})
    return pd.DataFrame(rows), mats


# ------------------------------------------------------------------------------------------------ analysis
def test_rank_shift_table_matches_naive_loop():
    rng = np.random.default_rng(3)
    before = rng.integers(1, 60, 500)
    after = np.maximum(1, before - rng.integers(-10, 20, 500))
    k = 50
    table = analysis.rank_shift_table(before, after, k)  # one bin per rank
    assert list(table["bin_start"]) == list(range(1, k + 1))
    for i in range(1, k + 1):  # the original notebook's loop, 1-based
        m = before == i
        row = table.iloc[i - 1]
        assert row["count"] == m.sum()
        if m.sum():
            assert row["mean_rank_after"] == pytest.approx(after[m].mean())
            assert row["average_delta"] == pytest.approx(i - after[m].mean())
        else:
            assert row["average_delta"] == 0.0
    assert table["count"].sum() == (before <= k).sum()  # outside the pool is left out
    binned = analysis.rank_shift_table(before, after, k, bins=5)
    assert list(binned["bin_start"]) == [1, 11, 21, 31, 41] and list(binned["bin_end"]) == [10, 20, 30, 40, 50]
    m = (before >= 11) & (before <= 20)
    assert binned.iloc[1]["mean_rank_after"] == pytest.approx(after[m].mean())


def test_rank_shift_summary_and_ceiling():
    before = np.array([1, 5, 10, 300, 0])
    after = np.array([2, 1, 10, 3, 4])
    s = analysis.rank_shift_summary(before, after, k=100)  # in pool: (1,2), (5,1), (10,10)
    assert s["queries"] == 3
    assert s["improved_pct"] == pytest.approx(100 / 3) and s["worsened_pct"] == pytest.approx(100 / 3)
    assert s["moved_forward"] == pytest.approx(((1 - 2) + (5 - 1) + 0) / 3)
    assert analysis.ceiling_recall(before, 10) == pytest.approx(75.0)  # 3 of 4 known ranks are <= 10
    assert analysis.known_recall(after, [1]) == {"R@1": pytest.approx(20.0)}  # 1 of 5


def test_align_ranks_joins_by_query_and_rejects_disjoint_files():
    a = TopK(["x", "y", "z"], np.zeros((3, 2)), np.zeros((3, 2)), [3, 0, 7], ["c1", "c1", "c2"])
    b = TopK(["z", "x"], np.zeros((2, 2)), np.zeros((2, 2)), [1, 2])
    al = analysis.align_ranks(a, b)
    assert al.set_index("query_id")[["rank_before", "rank_after"]].to_dict("index") == {
        "x": {"rank_before": 3, "rank_after": 2}, "z": {"rank_before": 7, "rank_after": 1}}
    with pytest.raises(ValueError, match="share no query"):
        analysis.align_ranks(a, TopK(["w"], np.zeros((1, 1)), np.zeros((1, 1)), [1]))


def test_align_ranks_refuses_rankings_of_another_split():
    # precomp caption ids are 0..N-1 in every split: a dev and a test ranking aligned row for row, without a word
    def ranking(split, dataset="f30k"):
        return TopK(["0", "1"], np.zeros((2, 2)), np.zeros((2, 2)), [1, 2],
                    meta={"dataset": dataset, "split": split})

    assert len(analysis.align_ranks(ranking("dev"), ranking("dev"))) == 2
    assert len(analysis.align_ranks(ranking("dev"), TopK(["0"], np.zeros((1, 1)), np.zeros((1, 1)), [1]))) == 1
    for other, said in ((ranking("test"), "split 'dev' and after ranks split 'test'"),
                        (ranking("dev", "coco"), "dataset 'f30k' and after ranks dataset 'coco'")):
        with pytest.raises(ValueError, match=f"^align_ranks: before ranks {said}: the comparison needs two"):
            analysis.align_ranks(ranking("dev"), other)


def test_gate_entropy_and_utilisation():
    w = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.6, 0.2]])
    h = analysis.gate_entropy(w)
    assert h[0] == pytest.approx(0.0) and h[1] == pytest.approx(1.0)
    p = np.array([0.2, 0.6, 0.2])
    assert h[2] == pytest.approx(-(p * np.log(p)).sum() / np.log(3))
    util = analysis.expert_utilisation(w)
    assert util["top1_share"].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert util["mean_share"].sum() == pytest.approx(1.0)


def test_flow_matrices_are_mean_path_weights():
    frame, mats = dime_frame()
    flows = analysis.flow_matrices(frame)
    assert [f[0] for f in flows] == ["layer0", "layer1", "layer2"]
    for layer, sources, dests, mat in flows:
        assert sources == CELLS
        np.testing.assert_allclose(mat, mats[layer].mean(axis=0))
    with pytest.raises(ValueError, match="no path rows"):
        analysis.flow_matrices(amc_frame())


def test_pca_2d_recovers_the_dominant_direction():
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    x = np.outer(t, [3.0, 0.0, 4.0]) + 0.01 * rng.normal(size=(200, 3))
    coords, ratio = analysis.pca_2d(x)
    assert ratio[0] > 0.99
    assert abs(np.corrcoef(coords[:, 0], t)[0, 1]) > 0.999


def test_standardised_pca_is_not_one_large_feature():
    """DIME's path space was 99% one raw output-layer weight: the standardised map weighs every path alike."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=300)
    small = np.outer(signal, [0.01, 0.01, 0.01]) + 0.001 * rng.normal(size=(300, 3))  # correlated, small scale
    big = 0.5 * rng.normal(size=(300, 1))  # independent, large scale
    x = np.hstack([small, big, np.full((300, 1), 0.25)])  # and a constant column
    _, raw = analysis.pca_2d(x)
    assert raw[0] > 0.99  # the large feature alone
    coords, ratio = analysis.pca_2d(x, standardize=True)
    assert 0.6 < ratio[0] < 0.8  # the three correlated small features: 3 of 4 units of variance
    assert abs(np.corrcoef(coords[:, 0], signal)[0, 1]) > 0.99
    z = (x[:, :4] - x[:, :4].mean(0)) / x[:, :4].std(0)  # naive reference: the covariance of the z-scores
    top = np.linalg.eigvalsh(np.cov(z, rowvar=False, bias=True))[::-1]
    np.testing.assert_allclose(ratio, top[:2] / top.sum(), rtol=1e-9)
    assert "weights standardised" in viz.plot_path_space(amc_frame(n=15)).axes[0].get_xlabel()


def test_read_log_names_the_bad_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl:3"):
        analysis.read_log(path)
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{"step": 2, "loss": 1.5}\n')  # JSON, but not a record
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON record \(a JSON list"):
        analysis.read_log(path)
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert analysis.read_log(tmp_path)["loss"].tolist() == [2.0, 1.5]
    from cirlab.core.errors import MissingPathError  # cirlab's type, as for every other missing path

    with pytest.raises(MissingPathError, match="training log not found"):
        analysis.read_log(tmp_path / "absent")
    with pytest.raises(MissingPathError, match="metrics file not found"):
        analysis.read_metrics(tmp_path / "absent")


def test_pca_2d_refuses_nan_rows():
    x = np.random.default_rng(0).normal(size=(6, 3))
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or inf values \(rows \[4\]"):
        analysis.pca_2d(x)


@pytest.mark.parametrize("call", [
    lambda f: analysis.gate_matrix(f, "layer1"), analysis.route_statistics, analysis.path_vectors,
    analysis.flow_matrices, analysis.feature_columns])
def test_route_analysis_names_a_missing_column(call):
    good = dime_frame()[0]
    frame = good.rename(columns={"layer": "block"})  # a hand-built frame with its own names
    with pytest.raises(KeyError, match=r"the route frame lacks column\(s\) layer; its columns: query_id, block,") as e:
        call(frame)
    assert str(e.value).startswith("the route frame")  # the message itself, not KeyError's quoted repr
    assert call(good) is not None


# ------------------------------------------------------------------------------------------------ plots
def test_save_figure_writes_png_and_svg(tmp_path):
    fig = viz.plot_metrics_bars({"R@10": 10.0})
    paths = viz.save_figure(fig, tmp_path / "figs", "bars")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in paths[1].read_bytes()[:500]


def test_save_figure_lays_the_files_out_at_a_papers_column_width(tmp_path):
    """A paper writer had to resize every figure by hand for a 3.3-inch column (the reader's text then shrank)."""
    from PIL import Image

    fig = viz.plot_metrics_bars({"R@10": 10.0, "R@50": 40.0})
    before = tuple(fig.get_size_inches())
    png, _ = viz.save_figure(fig, tmp_path, "column", width=3.3)
    with Image.open(png) as image:
        assert image.size[0] == round(3.3 * 120)  # 120 dpi
        assert image.size[1] == pytest.approx(3.3 * 120 * before[1] / before[0], abs=2)
    assert tuple(fig.get_size_inches()) == before  # the notebook's figure unchanged
    with pytest.raises(ValueError, match="width is in inches, from 0.5 to 100"):
        viz.save_figure(fig, tmp_path, "bad", width=330)


def test_gallery_highlights_the_target():
    rng = np.random.default_rng(0)
    rows = [{"ref_image": rng.random((8, 8, 3)), "text": "make it red", "candidates": [rng.random((8, 8, 3))] * 4,
             "candidate_ids": list("abcd"), "target_position": t, "query_id": f"q{i}"}
            for i, t in enumerate([2, None])]
    fig = viz.plot_retrieval_gallery(rows, k=4)
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(2, 6)
    assert [ax.get_gid() for ax in axes[0, 2:]] == [None, None, "target", None]
    assert [viz.TARGET_MARK in ax.get_title() for ax in axes[0, 2:]] == [False, False, True, False]
    assert axes[0, 4].get_title() == f"#3 c {viz.TARGET_MARK}"
    assert all(ax.get_gid() != "target" for ax in axes[1])
    assert axes[0, 0].get_gid() == "query"
    assert axes[0, 4].spines["top"].get_edgecolor()[:3] == pytest.approx(matplotlib.colors.to_rgb(viz.TARGET_COLOR))
    with pytest.raises(ValueError):
        viz.plot_retrieval_gallery([])


def test_gallery_shows_a_target_ranked_below_k_with_its_rank():
    rng = np.random.default_rng(0)
    img = rng.random((8, 8, 3))
    rows = [{"ref_image": img, "text": "<BOS> make it red <AND> bigger <EOS>", "candidates": [img] * 3,
             "candidate_ids": list("abc"), "target_position": None, "target_rank": 17, "target_image": img},
            {"ref_image": img, "text": "x", "candidates": [img] * 3, "target_position": 0, "target_rank": 1,
             "target_image": img}]
    fig = viz.plot_retrieval_gallery(rows, k=3)
    axes = np.array(fig.axes).reshape(2, 6)
    assert axes[0, 5].get_gid() == "target_outside" and "rank 17" in axes[0, 5].get_title()
    assert not axes[1, 5].get_visible() or not axes[1, 5].axison  # the second row's target is in its top 3
    assert axes[0, 1].texts[0].get_text().startswith("make it red and")  # no <BOS>/<AND>/<EOS> markup
    rows[0]["target_position"] = -1  # the docstring's other "not shown": the extra column was lost
    axes = np.array(viz.plot_retrieval_gallery(rows, k=3).axes).reshape(2, 6)
    assert axes[0, 5].get_gid() == "target_outside" and "rank 17" in axes[0, 5].get_title()
    assert "target" not in [axes[0, j].get_gid() for j in range(2, 5)]  # -1 framed no candidate either


def test_metrics_bars_one_bar_per_metric_and_run():
    fig = viz.plot_metrics_bars({"R@10": 10.0, "R@50": 30.0, "dress": {"R@10": 5.0}})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [10.0, 30.0, 5.0]
    table = analysis.compare_runs({"a": {"R@1": 1.0, "R@5": 2.0}, "b": {"R@1": 3.0, "R@5": 4.0}})
    fig = viz.plot_metrics_bars(table)
    assert sorted(p.get_height() for p in fig.axes[0].patches) == [1.0, 2.0, 3.0, 4.0]
    fig = viz.plot_metrics_bars({"dress": 50.75, "avg": 41.75})  # "50.7" beside "41.8": the tables say 50.75, 41.75
    assert [t.get_text() for t in fig.axes[0].texts] == ["50.75", "41.75"]
    assert fig.axes[0].get_ylim() == (0.0, 108.0)  # recalls on the whole percent scale, not autoscaled to 50


def test_run_comparison_table(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "metrics.json").write_text('{"val": {"R@10": 12.5}}')
    fig = viz.plot_run_comparison({"r1": tmp_path / "r1", "r2": {"val": {"R@10": 20.0}}})
    bars = [p for p in fig.axes[1].patches if isinstance(p, Rectangle)]
    assert sorted(b.get_height() for b in bars) == [12.5, 20.0]
    with pytest.raises(KeyError):
        viz.plot_run_comparison({"r2": {"val": {"R@10": 2.0}}}, metrics=["val/R@50"])


def test_expert_heatmaps_show_the_gate_matrix():
    frame = amc_frame()
    fig = viz.plot_expert_heatmaps(frame, sort_by=None)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    data = images[0].get_array()
    assert data.shape == (12, 3)
    expected = frame[(frame.layer == "layer1") & (frame.query_id == "q0")].sort_values("code_index")["weight"]
    np.testing.assert_allclose(data[0], expected.to_numpy())
    dime, _ = dime_frame()
    fig = viz.plot_expert_heatmaps(dime)
    assert [ax.images[0].get_array().shape for ax in fig.axes if ax.images] == [(6, 16), (6, 16), (6, 4)]


def test_path_heatmaps_give_each_layer_its_own_colour_range_unless_shared():
    dime, _ = dime_frame()
    for fig in (viz.plot_expert_heatmaps(dime), viz.plot_gate_distributions(dime)):
        images = [ax.images[0] for ax in fig.axes if ax.images]
        for image in images:  # the hidden layers' near-1/4 weights span the whole colour map, not a sliver of it
            data = image.get_array()
            assert image.get_clim() == pytest.approx((float(data.min()), float(data.max())))
        assert len({image.get_clim() for image in images}) == 3
        assert sum(1 for ax in fig.axes if not ax.images) == 3  # a colour bar per panel
    for fig in (viz.plot_expert_heatmaps(dime, scale="shared"), viz.plot_gate_distributions(dime, scale="shared")):
        images = [ax.images[0] for ax in fig.axes if ax.images]
        top = max(float(image.get_array().max()) for image in images)
        assert [image.get_clim()[1] for image in images] == [pytest.approx(top)] * 3
        assert sum(1 for ax in fig.axes if not ax.images) == 1
    assert viz.plot_expert_heatmaps(dime, scale="shared").axes[0].images[0].get_clim()[0] == 0.0
    with pytest.raises(ValueError, match="scale='global'; expected one of auto, layer, shared"):
        viz.plot_expert_heatmaps(dime, scale="global")
    bars = [ax for ax in viz.plot_expert_heatmaps(dime).axes if not ax.images]
    assert [ax.get_ylabel() for ax in bars] == ["path weight"] * 3  # every colour bar says what it shows
    amc = viz.plot_expert_heatmaps(amc_frame())  # AMC's sigmoid gates: one range from 0, comparable across layers
    assert len({ax.images[0].get_clim() for ax in amc.axes if ax.images}) == 1
    assert sum(1 for ax in amc.axes if not ax.images) == 1


def test_gate_distributions_one_box_per_group_and_expert():
    frame = amc_frame()
    fig = viz.plot_gate_distributions(frame, by="category")
    boxes = [p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("box:")]
    assert len(boxes) == 2 * 3 * 3  # layers x experts x categories
    # each category has its own hatching (boxes and legend), not only its own colour
    hatch = {p.get_gid(): p.get_hatch() or "" for p in boxes}
    assert len(set(hatch.values())) == 3
    legend = fig.legends[0]
    assert {t.get_text(): (h.get_hatch() or "") for t, h in zip(legend.get_texts(), legend.legend_handles)} == {
        gid.removeprefix("box:"): h for gid, h in hatch.items()}
    fig = viz.plot_gate_distributions(frame, by="modification")
    assert len([p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("box:")]) == 2 * 3 * 2
    with pytest.raises(KeyError, match="no 'nope' column"):
        viz.plot_gate_distributions(frame, by="nope")


def test_gate_entropy_plot_bars_equal_statistics():
    frame = amc_frame()
    fig = viz.plot_gate_entropy(frame)
    stats = analysis.route_statistics(frame)
    for ax, layer in zip(fig.axes[1:], ("layer1", "layer2")):  # one horizontal-bar panel per layer
        names = [t.get_text() for t in ax.get_yticklabels()]
        s = stats[stats.layer == layer].set_index("expert").loc[names]  # bottom-up, as drawn
        widths = {gid: [p.get_width() for p in ax.patches if p.get_gid() == gid]
                  for gid in ("mean_share", "top1_share")}
        np.testing.assert_allclose(widths["mean_share"], s["mean_share"])
        np.testing.assert_allclose(widths["top1_share"], s["top1_share"])
    dime, _ = dime_frame()
    fig = viz.plot_gate_entropy(dime)
    assert [len(ax.get_yticklabels()) for ax in fig.axes[1:]] == [16, 16, 4]  # one readable row per path


def test_amc_experts_are_drawn_in_the_papers_order():
    frame = amc_frame()
    names = {"NIN": "α1 NIN", "CRN": "α3 CRN", "GTN": "α2 GTN"}  # what AMC's traces carry
    frame["paper_name"] = frame["expert"].map(names)
    assert viz.paper_order(["α1 NIN", "α3 CRN", "α2 GTN"]) == ["α1 NIN", "α2 GTN", "α3 CRN"]
    assert viz.paper_order(["RIC", "GLGC"]) == ["RIC", "GLGC"]  # no α numbers: code order kept
    figs = (viz.plot_expert_heatmaps(frame), viz.plot_gate_distributions(frame), viz.plot_query_gates(frame, ["q0"]))
    for fig in figs:
        ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ticks == ["α1 NIN", "α2 GTN", "α3 CRN"], ticks
    heat = viz.plot_expert_heatmaps(frame, sort_by=None)
    row = frame[(frame.layer == "layer1") & (frame.query_id == "q0")].set_index("expert")["weight"]
    np.testing.assert_allclose(heat.axes[0].images[0].get_array()[0], row[["NIN", "GTN", "CRN"]])  # data follows


def test_heatmap_rows_are_spread_over_and_labelled_by_category():
    frame = amc_frame(n=30)
    fig = viz.plot_expert_heatmaps(frame, max_queries=9)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (9, 3)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dress (3)", "shirt (3)", "toptee (3)"]
    assert ax.get_ylabel() == "query (9 shown, grouped by category)"


def test_plain_text_drops_the_fashioniq_markup():
    assert viz.plain_text("<BOS> is red <AND> has a star <EOS>") == "is red and has a star"
    assert viz.plain_text("make it blue") == "make it blue"


def test_every_gate_plot_labels_its_axes():
    frame = amc_frame()
    dime, _ = dime_frame()
    figs = [viz.plot_expert_heatmaps(frame), viz.plot_gate_distributions(frame), viz.plot_query_gates(frame, ["q1"]),
            viz.plot_gate_entropy(frame), viz.plot_expert_heatmaps(dime), viz.plot_gate_distributions(dime)]
    for fig in figs:
        assert fig.axes[0].get_ylabel() and fig.axes[0].get_xlabel(), fig._suptitle
    fig = viz.plot_gate_distributions(dime)  # 16 paths x groups: a heatmap of group means, not 80 boxes
    assert [ax.images[0].get_array().shape for ax in fig.axes if ax.images] == [(16, 2), (16, 2), (4, 2)]


def test_dime_flows_band_per_path_scaled_by_weight():
    frame, mats = dime_frame()
    fig = viz.plot_dime_flows(frame)
    bands = {p.get_gid(): p for p in fig.axes[0].patches if isinstance(p, PathPatch)}
    assert len(bands) == 16 + 16 + 4
    mean = mats["layer0"].mean(axis=0)
    d, s = np.unravel_index(mean.argmax(), mean.shape)
    d2, s2 = np.unravel_index(mean.argmin(), mean.shape)
    widest = bands[f"flow:layer0:{CELLS[s]}->{CELLS[d]}"].get_linewidth()
    thinnest = bands[f"flow:layer0:{CELLS[s2]}->{CELLS[d2]}"].get_linewidth()
    assert widest > thinnest
    # each layer spans the whole width range on its own scale: layer2's unnormalised gates (0.4-0.9 in DIME) no longer
    # set the scale for the hidden layers, whose weights near 1/4 all drew one width
    assert (thinnest, widest) == pytest.approx(viz._BAND_WIDTHS)
    last = [p.get_linewidth() for gid, p in bands.items() if gid.startswith("flow:layer2:")]
    assert (min(last), max(last)) == pytest.approx(viz._BAND_WIDTHS)
    keys = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "keyval:layer0"]  # the width key's weights
    assert keys == [f"{mean.min():.3f}", f"{(mean.min() + mean.max()) / 2:.3f}", f"{mean.max():.3f}"]
    key_widths = [l.get_linewidth() for l in fig.axes[0].lines if (l.get_gid() or "").startswith("key:layer0:")]
    assert key_widths == pytest.approx([viz._BAND_WIDTHS[0], sum(viz._BAND_WIDTHS) / 2, viz._BAND_WIDTHS[1]])
    # column 0 holds layer0's own cells (the sources of its paths), not the input: the labels were one column off
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer0 cells", "layer1 cells", "layer2 cells", "out"]
    layers = {t.get_gid(): t.get_position()[0] for t in ax.texts if (t.get_gid() or "").startswith("paths:")}
    assert layers == {"paths:layer0": 0.5, "paths:layer1": 1.5, "paths:layer2": 2.5}  # between their two columns
    kinds = {t.get_gid(): t.get_text() for t in ax.texts if (t.get_gid() or "").startswith("paths:")}
    assert all("not normalised" in text for text in kinds.values())  # random weights: no layer sums to 1
    x0 = bands[f"flow:layer0:{CELLS[s]}->{CELLS[d]}"].get_path().vertices[:, 0]
    assert x0.min() > 0 and x0.max() < 1  # a layer0 band runs from column 0 to column 1


def test_path_space_colours_by_category():
    fig = viz.plot_path_space(amc_frame(n=15))
    groups = {c.get_gid(): len(c.get_offsets()) for c in fig.axes[0].collections}
    assert groups == {"group:dress": 5, "group:shirt": 5, "group:toptee": 5}
    shapes = {c.get_gid(): c.get_paths()[0].vertices.round(3).tobytes() for c in fig.axes[0].collections}
    assert len(set(shapes.values())) == 3  # a marker shape per category, not only a colour


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_sit_beside_the_data_not_on_it():
    figs = {"path_space": (viz.plot_path_space(amc_frame(n=15)), [0]),
            "rank_shift": (viz.plot_rank_shift(_aligned(), k=200, bins=10), [2, 3])}
    for name, (fig, panels) in figs.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # the constrained layout places the axes and legends
        renderer = canvas.get_renderer()
        for i in panels:
            ax = fig.axes[i]
            legend = ax.get_legend()
            assert legend is not None, (name, i)
            assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer)), (name, i)


def test_boxplot_medians_are_not_drawn_in_a_group_colour():
    fig = viz.plot_gate_distributions(amc_frame(), by="category")
    medians = [line for ax in fig.axes for line in ax.lines if line.get_gid() is None and len(line.get_xdata()) == 2
               and line.get_ydata()[0] == line.get_ydata()[1]]  # caps and medians: the horizontal segments
    assert len(medians) >= 2 * 3 * 3
    palette = {to_hex(c) for c in viz.CVD_PALETTE[:3]}  # the three categories' colours
    assert not [m for m in medians if to_hex(m.get_color()) in palette]


def test_entropy_histograms_put_the_layers_side_by_side():
    frame = amc_frame(n=30)
    ax = viz.plot_gate_entropy(frame).axes[0]
    bars = {layer: [p for p in ax.patches if p.get_gid() == f"entropy:{layer}"] for layer in ("layer1", "layer2")}
    ents = {layer: analysis.gate_entropy(analysis.gate_matrix(frame, layer).to_numpy()) for layer in bars}
    low = min(e.min() for e in ents.values())
    start = max(0.0, np.floor(20 * low) / 20 - 0.05)  # the axis starts just below the lowest entropy, ends at 1
    assert start <= low and start > 0.0  # these random gates are far from 0: the bins are not spent on [0, 0.5]
    for layer, patches in bars.items():  # the counts are the layer's entropies, binned
        np.testing.assert_array_equal([p.get_height() for p in patches],
                                      np.histogram(ents[layer], np.linspace(start, 1, 21))[0])
    for one, two in zip(bars["layer1"], bars["layer2"]):  # same bin, no shared x range: neither hides the other
        assert one.get_x() + one.get_width() <= two.get_x() + 1e-12


def test_query_gates_bars_equal_gates():
    frame = amc_frame()
    fig = viz.plot_query_gates(frame, ["q1"])
    got = [p.get_height() for p in fig.axes[1].patches]
    expected = frame[(frame.layer == "layer2") & (frame.query_id == "q1")].sort_values("code_index")["weight"]
    np.testing.assert_allclose(got, expected.to_numpy())


def _aligned(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    before = rng.integers(1, 300, n)
    after = np.maximum(1, before - rng.integers(-5, 40, n))
    return pd.DataFrame({"query_id": [f"q{i}" for i in range(n)], "category": np.array(["a", "b"])[np.arange(n) % 2],
                         "rank_before": before, "rank_after": after})


def test_rank_shift_plot_leaves_a_target_removed_with_its_reference_off_the_axes():
    """A target that is its query's own reference has the never-a-hit rank in a top-K file (past every cut-off):
    as the top of the log bins and the scatter's axes it broke the full-ranking plot ("bins must be increasing")
    and stretched the axes to 1e19. It is left off the drawing and counted as a miss in the recalls."""
    from cirlab.workbench import analysis

    al = _aligned()
    al.loc[0, ["rank_before", "rank_after"]] = analysis.removed_rank()
    for reranked in (True, False):
        fig = viz.plot_rank_shift(al, k=200, bins=10, reranked=reranked)
        a = fig.axes[0]
        assert a.get_xlim()[1] < 1e4 and a.get_ylim()[1] < 1e4
        drawn = sum(len(c.get_offsets()) for c in a.collections)
        assert drawn == len(al) - 1
        fig.clf()


def test_rank_shift_plot_binned_means_and_shares():
    al = _aligned()
    k = 200
    fig = viz.plot_rank_shift(al, k=k, bins=10)
    a, b, c, d = fig.axes
    line = next(l for l in b.lines if l.get_gid() == "binned_means")
    xs, ys = line.get_data()
    in_pool = al[al.rank_before <= k]
    edges = np.linspace(1, k + 1, 11).round().astype(int)
    naive = [in_pool[(in_pool.rank_before >= lo) & (in_pool.rank_before < hi)]["rank_after"].mean()
             for lo, hi in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(ys, naive)
    improved = [p.get_width() for p in c.patches if p.get_gid() == "share:improved_pct"]
    assert improved[0] == pytest.approx(100 * (in_pool.rank_after < in_pool.rank_before).mean())
    ceiling = [p.get_height() for p in d.patches if p.get_gid() == f"recall:ceiling_R@{k}"]
    assert ceiling[0] == pytest.approx(100 * (al.rank_before <= k).mean())
    assert len(ceiling) == 3  # all, a, b
    assert sum(len(coll.get_offsets()) for coll in a.collections) == len(al)


def test_figure8_bars_are_average_deltas():
    al = _aligned()
    table = analysis.rank_shift_table(al.rank_before, al.rank_after, 200)
    fig = viz.plot_figure8(table)
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, table["average_delta"])
    assert fig.axes[1].get_yscale() == "symlog"
    with pytest.raises(ValueError, match="the rank-shift table has no rows"):
        viz.plot_figure8(table.iloc[:0])
    with pytest.raises(KeyError, match=r"the rank-shift table lacks column\(s\) average_delta"):
        viz.plot_figure8(table.drop(columns="average_delta"))


def test_training_curves_from_log(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [f'{{"kind": "train", "step": {s}, "loss": {1.0 / s}, "rank_loss": {0.5 / s}, "lr": 0.1}}'
             for s in range(1, 6)]
    lines.append('{"kind": "eval", "step": 5, "epoch": 1, "val/R@10": 42.0}')
    path.write_text("\n".join(lines) + "\n")
    fig = viz.plot_training_curves(path)
    curves = {l.get_gid(): l for ax in fig.axes for l in ax.lines}
    assert set(curves) == {"curve:loss", "curve:rank_loss", "curve:val/R@10"}  # lr is constant: no panel ...
    assert "lr = 0.1" in fig._supxlabel.get_text()  # ... but its value under the figure
    np.testing.assert_allclose(curves["curve:loss"].get_ydata(), [1.0 / s for s in range(1, 6)])
    assert list(curves["curve:val/R@10"].get_xdata()) == [5]
    assert all(ax.get_ylabel() for ax in fig.axes if ax.lines)
    fig = viz.plot_training_curves(path, keys="rank_loss")  # one name, not its letters
    assert [l.get_gid() for ax in fig.axes for l in ax.lines] == ["curve:rank_loss"]
    with pytest.raises(KeyError, match=r"the training log lacks column\(s\) rank-loss; its columns: kind, step,"):
        viz.plot_training_curves(path, keys=["loss", "rank-loss"])  # was: the misspelt panel dropped silently
    with pytest.raises(KeyError, match=r"lacks column\(s\) epochs"):
        viz.plot_training_curves(path, x="epochs")


def _x_span(patch) -> tuple[float, float]:
    """The data x range an ``axvspan`` covers (a Rectangle from matplotlib 3.9, a Polygon before it)."""
    xs = patch.get_path().vertices[:, 0] if hasattr(patch, "get_xy") and not hasattr(patch, "get_x") else None
    if xs is None:
        return patch.get_x(), patch.get_x() + patch.get_width()
    return float(xs.min()), float(xs.max())


def test_a_logged_phase_flag_is_marked_where_it_turns_on(tmp_path):
    """DIME's rank loss drops where its warm-up ends (sum of violations -> hardest negative): the curves say so."""
    path = tmp_path / "log.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 100.0 / s, "max_violation_on": float(s >= 30),
             "relation_on": 1.0} for s in (1, 10, 20, 30, 40)]  # relation_on never turns on: no line for it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = viz.plot_training_curves(path)
    bands = [p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("phase:")]
    assert len(bands) == 1 and bands[0].get_gid() == "phase:max_violation_on"  # one panel (loss), one band
    assert _x_span(bands[0]) == (30.0, 40.0)  # on from the first record with it on to the end of the run
    switch = [p for ax in fig.axes for p in ax.patches if p.get_gid() == "switch:max_violation_on"]
    assert len(switch) == 1 and switch[0].get_hatch()  # the switch: between the last record off and the first on
    assert _x_span(switch[0]) == (20.0, 30.0)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["max violation on (to the end)", "max violation switched on in here"]
    assert "curve:max_violation_on" not in {l.get_gid() for ax in fig.axes for l in ax.lines}  # no panel of its own


def test_no_pyplot_state_leaks():
    import sys

    viz.plot_metrics_bars({"a": 1.0})
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_plot_path_matrices_shows_each_layers_mean_matrix():
    frame, mats = dime_frame()
    fig = viz.plot_path_matrices(frame)
    panels = {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}
    assert list(panels) == [f"paths:{layer}" for layer in mats]
    for layer, raw in mats.items():
        shown = panels[f"paths:{layer}"].images[0].get_array()
        np.testing.assert_allclose(np.asarray(shown), raw.mean(axis=0), atol=1e-6)  # [destination x source]
        texts = [t.get_text() for t in panels[f"paths:{layer}"].texts]
        assert texts[0] == f"{raw.mean(axis=0)[0, 0]:.3f}" and len(texts) == raw[0].size
    with pytest.raises(ValueError, match="no path rows"):
        viz.plot_path_matrices(amc_frame())


# ------------------------------------------------------------------------------------------------ CaLa / HREM views
TOKENS = ["[CLS]", "make", "the", "star", "red", "[SEP]"]


def cala_frame(query_id: str = "q7", tokens=TOKENS, seed: int = 0) -> pd.DataFrame:
    """A CaLa.trace frame in its schema: HCA maps with token strings, the bridge row, TAC steps 1-4."""
    rng = np.random.default_rng(seed)
    rows = []
    refs, tgts = ["r0", "r1", "r2"], ["t0", "t1", "t2"]

    def add(layer, dests, sources, mat):
        for d, dst in enumerate(dests):
            for s_, src in enumerate(sources):
                rows.append({"query_id": query_id, "layer": layer, "source": src, "destination": dst,
                             "expert": dst, "code_index": d, "paper_name": dst, "weight": float(mat[d, s_]),
                             "sample": 0, "source_code_index": s_, "source_paper_name": src})

    add("hca.ref_to_text", refs, tokens, rng.normal(size=(3, len(tokens))))
    add("hca.text_to_target", tokens, tgts, rng.normal(size=(len(tokens), 3)))
    add("hca.hinge", refs, tgts, rng.dirichlet(np.ones(3), size=3))
    add("hca.bridge", ["r0"], tokens, np.arange(len(tokens), dtype=float)[None] - 2.0)
    for name, dests, srcs in (("ref", refs, tgts), ("target", tgts, refs)):
        for step in range(1, 5):
            add(f"tac.{name}_attention.step{step}", dests, srcs if step == 1 else ["prev0", "prev1", "prev2"],
                rng.dirichlet(np.ones(3), size=3))
    return pd.DataFrame(rows)


def test_cala_bridges_label_the_caption_words_and_tac_steps():
    frame = pd.concat([cala_frame("q7"), cala_frame("q8", ["[CLS]", "add", "a", "ring", "[SEP]"], seed=1)])
    mat, dests, sources = analysis.layer_matrix(frame, "hca.ref_to_text", "q8")
    assert sources == ["[CLS]", "add", "a", "ring", "[SEP]"] and dests == ["r0", "r1", "r2"] and mat.shape == (3, 5)
    fig = viz.plot_cala_bridges(frame, "q7", text="make the star red")
    assert isinstance(fig, Figure)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    rc = axes["HCA: reference query x word (S_rc)"]
    assert [t.get_text() for t in rc.get_xticklabels()] == TOKENS
    assert [t.get_text() for t in axes["HCA: word x target query (S_ct)"].get_yticklabels()] == TOKENS
    bridge = next(ax for ax in fig.axes if ax.get_gid() == "hca:bridge")
    assert [t.get_text() for t in bridge.get_yticklabels()] == TOKENS
    widths = [p.get_width() for p in bridge.patches]
    assert widths == pytest.approx([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])  # the bridge row, word by word
    for title in ("TAC reference -> target, step 1", "TAC reference -> target, step 4",
                  "TAC target -> reference, step 1", "TAC target -> reference, step 4"):
        assert title in axes
    assert "make the star red" in fig._suptitle.get_text() and "q7" in fig._suptitle.get_text()


def test_bridge_words_mean_over_queries_without_special_tokens():
    frame = pd.concat([cala_frame("q1"), cala_frame("q2", ["[CLS]", "star", "blue", "[SEP]"])])
    table = analysis.bridge_words(frame)
    assert "[CLS]" not in set(table["word"]) and "[SEP]" not in set(table["word"])
    star = table.set_index("word").loc["star"]
    assert star["count"] == 2 and star["bridge"] == pytest.approx((1.0 + -1.0) / 2)  # positions 3 and 1
    fig = viz.plot_bridge_words(frame)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    # largest |mean| first (red 2, make -1), ties by word; "star" is +1 in q1 and -1 in q2
    assert labels == ["red (1)", "make (1)", "blue (1)", "star (2)", "the (1)"]


def test_bridge_words_joins_wordpiece_pieces_into_their_words():
    # the demo's figure listed "##gon" and "##xa" as words; hexagon's contribution is the sum of its tokens'
    q1 = cala_frame("q1", ["[CLS]", "hexa", "##gon", "red", "##dish", "[SEP]"])  # bridge -2, -1, 0, 1, 2, 3
    q2 = cala_frame("q2", ["hexa", "##gon", "star"])  # bridge -2, -1, 0
    table = analysis.bridge_words(pd.concat([q2, q1])).set_index("word")
    assert set(table.index) == {"hexagon", "reddish", "star"}
    assert table.loc["hexagon", "count"] == 2 and table.loc["hexagon", "bridge"] == pytest.approx(((-1 + 0) + (-3)) / 2)
    assert table.loc["reddish", "bridge"] == pytest.approx(1 + 2)
    tokens = analysis.bridge_words(pd.concat([q2, q1]), whole_words=False)
    assert "##gon" in set(tokens["word"]) and "hexagon" not in set(tokens["word"])


def relation_edges(b: int = 3) -> pd.DataFrame:
    """relation_frames' "edges" schema for B images (ids 10, 11, ...) and one caption each (ids 50, 55, ...)."""
    rows = []
    kinds = ["image"] * b + ["caption"] * b
    ids = [10 + i for i in range(b)] + [50 + 5 * i for i in range(b)]
    for name in ("connection", "relevance", "mask", "attention"):
        for i in range(2 * b):
            for j in range(2 * b):
                w = float(i * 10 + j) if name != "mask" or (i + j) % 2 == 0 else float("-inf")
                rows.append((name, f"{kinds[i][0].replace('c', 't')}2{kinds[j][0].replace('c', 't')}", i, j,
                             kinds[i], ids[i], kinds[j], ids[j], ids[i % b], ids[j % b], w))
    return pd.DataFrame(rows, columns=["matrix", "edge_type", "row", "col", "row_kind", "row_id", "col_kind",
                                       "col_id", "row_image", "col_image", "weight"])


def test_relation_graph_shows_the_joint_matrix_with_its_four_blocks():
    edges = relation_edges(3)
    mat, labels, b = analysis.relation_matrix(edges, "mask")
    assert b == 3 and labels == ["img 10", "img 11", "img 12", "cap 50", "cap 55", "cap 60"]
    assert np.isnan(mat[0, 1]) and mat[1, 1] == 11.0  # -inf (not connected) is blank
    means = analysis.relation_block_means(edges)
    assert list(means.columns) == ["i2i", "i2t", "t2i", "t2t"]
    assert means.loc["relevance", "i2t"] == pytest.approx(np.mean([i * 10 + j for i in range(3) for j in range(3, 6)]))
    fig = viz.plot_relation_graph(edges)
    panels = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("relation:")]
    assert [ax.get_title() for ax in panels] == ["connection", "relevance", "attention"]
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert [t.get_text() for t in ax.get_yticklabels()] == labels
        blocks = {t.get_text().strip(): t.get_position() for t in ax.texts
                  if (t.get_gid() or "").startswith("block:")}
        # each block's tag at its top-left corner (x, y), not over the middle of its cells
        assert blocks == {"i2i": (-0.5, -0.5), "i2t": (2.5, -0.5), "t2i": (-0.5, 2.5), "t2t": (2.5, 2.5)}
        assert ax.images[0].get_array()[0, 4] == 4.0  # row 0 (img 10) x column 4 (cap 55)
        # block edges and tags readable on every cell colour: black with a white halo, black tags on white boxes
        edges_drawn = [line for line in ax.lines if line.get_gid() == "block_edge"]
        assert len(edges_drawn) == 2
        for line in edges_drawn:
            assert to_hex(line.get_color()) == "#000000" and line.get_path_effects()
        for tag in (t for t in ax.texts if (t.get_gid() or "").startswith("block:")):
            back = tag.get_bbox_patch().get_facecolor()
            assert _contrast(tag.get_color(), back) >= 4.5
    bars = [ax for ax in fig.axes if not ax.images and ax.get_gid() is None]
    # the 0/1 connection has a two-entry legend, not a grey scale; the other two a labelled bar under their panel
    assert [ax.get_xlabel() for ax in bars] == ["relevance", "fusion attention weight"]
    legend = panels[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["connected", "not connected"]
    assert [to_hex(h.get_facecolor()) for h in legend.legend_handles] == ["#000000", "#ffffff"]
    assert all(ax.get_ylabel() and ax.get_xlabel() for ax in panels)  # every panel labels its own axes
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for panel, bar in zip(panels[1:], bars):  # each bar and its label sit under their own panel
        box, label = panel.get_window_extent(renderer), bar.xaxis.label.get_window_extent(renderer)
        assert box.x0 <= label.x0 and label.x1 <= box.x1 and label.y1 < box.y0


def word_region_frame(words=("[CLS]", "a", "red", "star", "[SEP]"), images=(3, 4), regions: int = 4,
                      caption_id: int = 17) -> pd.DataFrame:
    rows = []
    for i in images:
        for w, word in enumerate((*words, "[PAD]")):
            for r in range(regions):
                rows.append((caption_id, i, w, word, word != "[PAD]", r, float(i + w / 10 + r / 100), 0.0, 0.0))
    return pd.DataFrame(rows, columns=["caption_id", "image_id", "word_pos", "word", "real_word", "region", "score",
                                       "t2i", "i2t"])


def test_word_region_view_labels_the_captions_words():
    frame = word_region_frame()
    mat, words = analysis.word_region_matrix(frame, 3)
    assert words == ["[CLS]", "a", "red", "star", "[SEP]"] and mat.shape == (5, 4)  # the padding word is left out
    assert mat[2, 1] == pytest.approx(3 + 0.2 + 0.01)
    best, words2, images = analysis.word_image_matrix(frame)
    assert images == [3, 4] and best[1, 1] == pytest.approx(4 + 0.1 + 0.03)
    fig = viz.plot_word_region(frame, text="a red star")  # caption 17 belongs to image 3 (17 // 5)
    left = next(ax for ax in fig.axes if ax.get_gid() == "word_region")
    right = next(ax for ax in fig.axes if ax.get_gid() == "word_image")
    assert [t.get_text() for t in left.get_yticklabels()] == ["[CLS]", "a", "red", "star", "[SEP]"]
    assert [t.get_text() for t in right.get_yticklabels()] == ["[CLS]", "a", "red", "star", "[SEP]"]
    assert left.get_title() == "words x regions of image 3"
    assert [t.get_text() for t in right.get_xticklabels()] == ["img 3", "img 4"]
    assert right.get_xticklabels()[0].get_fontweight() == "bold"
    assert "a red star" in fig._suptitle.get_text()
    wide = viz.plot_word_region(word_region_frame(regions=36))  # 36 regions: every fifth labelled, readable
    left36 = next(ax for ax in wide.axes if ax.get_gid() == "word_region")
    assert [t.get_text() for t in left36.get_xticklabels()] == [str(r) for r in range(0, 36, 5)]
    assert left36.get_xticklabels()[0].get_fontsize() >= 7
    # one colour range for both panels (the right one's own-image column is the left one's row maxima), labelled
    assert left.images[0].get_clim() == right.images[0].get_clim() == pytest.approx((3.0, 4.43))
    assert sorted(ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_gid() is None) == [
        "max over regions of the score", "word-region score"]


def test_a_uniform_attention_map_is_labelled_not_drawn_with_offsets():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cirlab.workbench.viz import _heat

    fig, ax = plt.subplots()
    _heat(fig, ax, np.full((3, 4), 0.25) + 1e-9 * np.arange(12).reshape(3, 4), ["a", "b", "c"], list("wxyz"), "step 4")
    assert ax.get_title() == "step 4 (uniform, 0.25)"
    assert fig.axes == [ax]  # no colour bar: a 0.20-0.30 scale for one value carried nothing
    note = next(t.get_text() for t in ax.texts if t.get_gid() == "uniform")
    assert "uniform" in note and "1/4 = 0.25" in note  # the panel says it: 1/n over its 4 keys
    plt.close(fig)


def test_cut_offs_bins_and_lengths_are_checked_by_name():
    """k=0 gave an empty table, R@0 a recall of 0, bins=[1, 5, 10] dropped every query ranked 10..50 without a
    word, top=-1 dropped the last bridge word, and unequal lengths were a numpy broadcast error."""
    before, after = np.array([1, 3, 12, 40]), np.array([2, 1, 5, 60])
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"k must be a whole number >= 1"):
            analysis.rank_shift_table(before, after, bad)
    with pytest.raises(ValueError, match=r"bins must be a whole number >= 1, got 0"):
        analysis.rank_shift_table(before, after, 50, bins=0)
    with pytest.raises(ValueError, match=r"bin edges must cover ranks 1\.\.50: start at 1 and end at 51"):
        analysis.rank_shift_table(before, after, 50, bins=[1, 5, 10])
    table = analysis.rank_shift_table(before, after, 50, bins=[1, 5, 51])
    assert table["count"].tolist() == [2, 2]  # every query inside the pool lands in a bin
    with pytest.raises(ValueError, match=r"rank_before \(4,\) and rank_after \(3,\) differ"):
        analysis.rank_shift_summary(before, after[:-1])
    with pytest.raises(ValueError, match=r"k must be a whole number >= 1, got 0"):
        analysis.known_recall(before, [1, 0])
    with pytest.raises(ValueError, match=r"pool must be a whole number >= 1, got 0"):
        analysis.ceiling_recall(before, 0)
    bridge = pd.DataFrame({"layer": ["hca.bridge"] * 3, "source": ["red", "blue", "tall"], "weight": [.3, -.2, .1]})
    assert analysis.bridge_words(bridge, top=2)["word"].tolist() == ["red", "blue"]
    with pytest.raises(ValueError, match=r"top must be a whole number >= 1, got -1"):
        analysis.bridge_words(bridge, top=-1)
    with pytest.raises(KeyError, match=r"no 'nope' records in the frame; its layers: hca.bridge"):
        analysis.layer_matrix(bridge, "nope")


def test_figure_arguments_are_checked_by_name(tmp_path):
    """A layer name as a string was split into characters; max_queries=0 drew empty heatmaps; a misspelt sort_by
    or color_by was ignored; save_figure's name could leave out_dir."""
    frame = amc_frame()
    fig = viz.plot_gate_entropy(frame, layers="layer2")
    assert len([ax for ax in fig.axes if ax.patches]) >= 1
    with pytest.raises(ValueError, match="max_queries must be a whole number >= 1, got 0"):
        viz.plot_expert_heatmaps(frame, max_queries=0)
    with pytest.raises(KeyError, match=r"sort_by='categroy' is not a column of the route frame"):
        viz.plot_expert_heatmaps(frame, sort_by="categroy")
    with pytest.raises(KeyError, match=r"color_by='catgory' is not a column"):
        viz.plot_path_space(frame, color_by="catgory")
    viz.plot_expert_heatmaps(frame.drop(columns="category"))  # the default grouping is optional
    with pytest.raises(ValueError, match="the route frame is empty"):
        viz.plot_expert_heatmaps(frame.iloc[:0])
    with pytest.raises(ValueError, match=r"save_figure: name '\.\./escape': it becomes part of a file name"):
        viz.save_figure(fig, tmp_path / "figs", "../escape")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=r"out_dir \S+afile is a file"):
        viz.save_figure(fig, tmp_path / "afile", "x")
    assert not (tmp_path / "escape.png").exists()


def test_empty_or_malformed_inputs_are_named(tmp_path):
    """A NaN gate won the argmax; a 1-D array, an empty comparison, a column-less table, k=-1 in the gallery and a
    metrics file holding a list ended deep in numpy, matplotlib or dict code."""
    with pytest.raises(ValueError, match=r"hold 1 NaN value\(s\) \(rows \[0\]"):
        analysis.expert_utilisation([[np.nan, 1.0], [0.5, 0.2]])
    with pytest.raises(ValueError, match=r"\[queries x experts\] with at least one expert, got shape \(3,\)"):
        analysis.gate_entropy(np.ones(3))
    with pytest.raises(ValueError, match="nothing to compare"):
        viz.plot_run_comparison({})
    with pytest.raises(ValueError, match="the table has no columns"):
        viz.plot_table(pd.DataFrame())
    with pytest.raises(ValueError, match="k must be a whole number >= 1, got -1"):
        viz.plot_retrieval_gallery([{"ref_image": None, "text": "", "candidates": []}], k=-1)
    (tmp_path / "metrics.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"metrics\.json: expected a JSON object of metrics, got a list"):
        analysis.read_metrics(tmp_path)


# ------------------------------------------------------------------------------------------------ user review
def test_one_name_given_as_a_string_is_that_name_not_its_letters(tmp_path):
    """A query id, metric, format or layer given as a string was iterated letter by letter ("query 'd' not in the
    route frame", "Format 'p' is not supported")."""
    frame = amc_frame()
    one, listed = viz.plot_query_gates(frame, "q3"), viz.plot_query_gates(frame, ["q3"])
    assert [ax.get_title() for ax in one.axes] == [ax.get_title() for ax in listed.axes] == ["q3 | layer1",
                                                                                           "q3 | layer2"]
    dime = dime_frame()[0]
    assert [ax.get_title() for ax in viz.plot_query_gates(dime, 2, layers="layer1").axes] == ["2 | layer1"]
    runs = {"w1": {"avg": 3.0, "R@1": 1.0}, "w2": {"avg": 4.0, "R@1": 2.0}}
    bars = [p for p in viz.plot_run_comparison(runs, metrics="avg").axes[1].patches if isinstance(p, Rectangle)]
    assert sorted(b.get_height() for b in bars) == [3.0, 4.0]
    fig = viz.plot_metrics_bars({"R@10": 10.0})
    assert viz.save_figure(fig, tmp_path / "figs", "g", formats="png") == [tmp_path / "figs" / "g.png"]
    assert analysis.name_list("layer1") == ["layer1"] and analysis.name_list(("a", "b")) == ["a", "b"]
    graph = viz.plot_relation_graph(relation_edges(), matrices="relevance")
    assert [ax.get_gid() for ax in graph.axes if ax.get_gid()] == ["relation:relevance"]
    with pytest.raises(ValueError, match=r"save_figure: formats is empty"):
        viz.save_figure(fig, tmp_path / "figs", "g", formats=[])


def test_save_figure_does_not_double_a_requested_extension(tmp_path):
    fig = viz.plot_metrics_bars({"R@10": 10.0})
    paths = viz.save_figure(fig, tmp_path, "g3.png")
    assert [p.name for p in paths] == ["g3.png", "g3.svg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g3.png", "g3.svg"]
    assert [p.name for p in viz.save_figure(fig, tmp_path, "g4.SVG", formats=["svg"])] == ["g4.svg"]
    assert [p.name for p in viz.save_figure(fig, tmp_path, "fig.v2", formats="png")] == ["fig.v2.png"]  # not a format
    with pytest.raises(ValueError, match=r"save_figure: name '\.png'"):
        viz.save_figure(fig, tmp_path, ".png")


def test_path_vectors_refuses_a_misspelt_meta_column():
    frame = amc_frame()
    with pytest.raises(KeyError, match=r"meta='categroy' is not a column of the route frame; columns: query_id,"):
        analysis.path_vectors(frame, meta="categroy")
    _, _, labels = analysis.path_vectors(frame.drop(columns="category"))  # the default stays optional
    assert set(labels) == {""}
    assert analysis.path_vectors(frame, meta="modification")[2][:2] == ["color", "add"]


def test_layer_matrix_names_a_gate_layer():
    with pytest.raises(ValueError, match=r"^layer 'layer1' has no source/destination rows \(a gate layer, e\.g\. "
                                         r"AMC's\)"):
        analysis.layer_matrix(amc_frame(), "layer1")
    path_rows = cala_frame().drop(columns="source_code_index")
    with pytest.raises(KeyError, match=r"the trace frame lacks column\(s\) source_code_index"):
        analysis.layer_matrix(path_rows, "hca.hinge")


def test_align_ranks_wants_loaded_topk_files():
    with pytest.raises(ValueError, match=r"align_ranks: before is a str \('topk_big'\), not a loaded top-K file; "
                                         r"load paths with cirlab\.core\.topk\.load_topk\(path\) or "
                                         r"cirlab\.workbench\.ranking_pair\(before, after\)"):
        analysis.align_ranks("topk_big", "topk_big")
    a = TopK(["x"], np.zeros((1, 1)), np.zeros((1, 1)), [1])
    with pytest.raises(ValueError, match=r"align_ranks: after is a PosixPath"):
        analysis.align_ranks(a, __import__("pathlib").Path("runs/after"))


def test_compare_runs_takes_a_list_of_run_folders(tmp_path):
    for name, r10 in (("w1", 12.5), ("w2", 20.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(f'{{"val": {{"R@10": {r10}}}}}')
    table = analysis.compare_runs([tmp_path / "w1", str(tmp_path / "w2" / "metrics.json")])
    assert list(table.columns) == ["w1", "w2"] and table.loc["val/R@10"].tolist() == [12.5, 20.0]
    assert list(analysis.compare_runs(str(tmp_path / "w1")).columns) == ["w1"]
    (tmp_path / "other" / "w1").mkdir(parents=True)
    (tmp_path / "other" / "w1" / "metrics.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match=r"compare_runs: two runs are named 'w1'"):
        analysis.compare_runs([tmp_path / "w1", tmp_path / "other" / "w1"])
    with pytest.raises(ValueError, match=r"compare_runs: a list holds run folders or metrics files; got a dict"):
        analysis.compare_runs([{"R@1": 1.0}])


def test_plot_table_draws_a_flat_dict_as_one_row():
    fig = viz.plot_table({"a": 1.0, "b": "x"})
    texts = [c.get_text().get_text() for c in fig.axes[0].tables[0].get_celld().values()]
    assert {"a", "b", "1.00", "x", "value"} <= set(texts)
    nested = viz.plot_table({"run": {"R@1": 1.0}})  # a dict of columns stays a table of columns
    assert "R@1" in [c.get_text().get_text() for c in nested.axes[0].tables[0].get_celld().values()]


def test_bridge_words_needs_a_cala_trace():
    with pytest.raises(ValueError, match=r"bridge_words needs a CaLa trace \(rows of layer 'hca\.bridge'\); the "
                                         r"frame's layers: layer1, layer2"):
        analysis.bridge_words(amc_frame())
    with pytest.raises(KeyError, match=r"the CaLa trace frame lacks column\(s\) source"):
        analysis.bridge_words(pd.DataFrame({"layer": ["hca.bridge"], "weight": [1.0]}))


def test_repeated_query_ids_are_refused_not_averaged():
    """Two id-less traces concatenated both number their queries from 0: the pivots averaged query 0 of one with
    query 0 of the other into one row without a word."""
    frame = amc_frame()
    doubled = pd.concat([frame, frame.assign(weight=0.0)])
    for call in (lambda f: analysis.gate_matrix(f, "layer1"), analysis.path_vectors, analysis.route_statistics):
        with pytest.raises(ValueError, match=r"query id 'q0' has .* repeated weight row\(s\).*set_batch\(ids=\.\.\.\)"):
            call(doubled)
    renamed = pd.concat([frame, frame.assign(query_id="b:" + frame.query_id)])
    assert len(analysis.gate_matrix(renamed, "layer1")) == 2 * frame.query_id.nunique()


# ------------------------------------------------------------------------------------------------ review: inputs named
def test_word_region_refuses_an_unknown_image_and_value():
    frame = word_region_frame()  # images 3 and 4
    with pytest.raises(KeyError, match=r"image_id 999 is not in the word-region frame; its images: 3, 4"):
        viz.plot_word_region(frame, image_id=999)
    with pytest.raises(KeyError, match=r"image_id '5' is not in the word-region frame; its images: 3, 4"):
        viz.plot_word_region(frame, image_id="5")
    left = next(ax for ax in viz.plot_word_region(frame, image_id="4").axes if ax.get_gid() == "word_region")
    assert left.get_title() == "words x regions of image 4"  # a string of a known id is that id
    with pytest.raises(KeyError, match=r"value='scor' is not a column of the word-region frame; columns: caption_id"):
        viz.plot_word_region(frame, value="scor")
    with pytest.raises(ValueError, match=r"pass hrem_relation\(\.\.\.\)\['word_region'\]"):
        viz.plot_word_region({"edges": relation_edges(), "word_region": frame})


def test_relation_graph_names_unknown_matrices_and_the_edges_frame():
    edges = relation_edges()
    for matrices in (["relevance", "atention"], "relevence"):
        with pytest.raises(KeyError, match=r"not in the relation frame; its matrices: connection, relevance, mask, "
                                           r"attention"):
            viz.plot_relation_graph(edges, matrices=matrices)
    with pytest.raises(ValueError, match=r"pass hrem_relation\(\.\.\.\)\['edges'\]"):
        viz.plot_relation_graph({"edges": edges, "word_region": word_region_frame(), "texts": {}})
    with pytest.raises(ValueError, match=r"pass its first element"):
        viz.plot_bridge_words((cala_frame(), {"q7": "make the star red"}))
    with pytest.raises(ValueError, match=r"pass its first element"):
        viz.plot_cala_bridges((cala_frame(), {"q7": "make the star red"}))


def test_empty_or_binned_rank_shift_inputs_are_refused():
    with pytest.raises(ValueError, match=r"every count of the rank-shift table is 0 \(no query had its target"):
        viz.plot_figure8(analysis.rank_shift_table([], [], 10))
    al = _aligned()
    with pytest.raises(ValueError, match=r"call rank_shift_table with bins=None"):
        viz.plot_figure8(analysis.rank_shift_table(al.rank_before, al.rank_after, 200, bins=10))
    with pytest.raises(ValueError, match=r"plot_rank_shift: aligned has no rows"):
        viz.plot_rank_shift(al.iloc[:0], 10)
    with pytest.raises(ValueError, match=r"plot_figure8: table must be a pandas DataFrame, got a dict"):
        viz.plot_figure8(analysis.rank_shift_table(al.rank_before, al.rank_after, 200).to_dict())


def test_rank_shift_wants_the_aligned_frame():
    a = TopK(["x", "y"], np.zeros((2, 1)), np.zeros((2, 1)), [1, 2])
    for bad in (a, (a, a), "runs/topk"):
        with pytest.raises(ValueError, match=r"pass analysis\.align_ranks\(before, after\)"):
            viz.plot_rank_shift(bad, 10)
        with pytest.raises(ValueError, match=r"pass analysis\.align_ranks\(before, after\)"):
            analysis.rank_shift_by_category(bad, 10)
    al = _aligned()
    with pytest.raises(KeyError, match=r"lacks column\(s\) rank_before; .*pass analysis\.align_ranks"):
        viz.plot_rank_shift(al.drop(columns="rank_before"), 10)
    plain = al.drop(columns="category")  # no category: one group, "all"
    assert list(analysis.rank_shift_by_category(plain, 200)["category"]) == ["all"]
    d = viz.plot_rank_shift(plain, 200).axes[3]
    assert len([p for p in d.patches if p.get_gid() == "recall:ceiling_R@200"]) == 1
    # two full rankings: no pool, so no ceiling bar (it drew the first model's recall as a ceiling below the second's)
    fig = viz.plot_rank_shift(plain, 200, reranked=False)
    assert fig.axes[2].get_xlabel() == "% of queries (all with a known target)"
    d = fig.axes[3]
    assert {p.get_gid() for p in d.patches} == {"recall:before_R@1", "recall:before_R@10", "recall:after_R@1",
                                                "recall:after_R@10"}
    assert d.get_title() == "(d) recall"


def test_two_full_rankings_are_compared_over_every_query_not_the_first_ones_top_k():
    """The second comparison counted only the queries the first (untrained) ranking had put in its top 50: a trained
    model looked worse ("worsened 47%", mean rank up) while panel (a) showed most queries improving."""
    rng = np.random.default_rng(3)
    before = rng.integers(1, 1000, 400)
    after = np.maximum(1, before // 10 + rng.integers(-3, 30, 400))  # most targets move far forward
    al = pd.DataFrame({"query_id": [f"q{i}" for i in range(400)], "category": "c", "rank_before": before,
                       "rank_after": after})
    table = analysis.rank_shift_by_category(al, None, ks=(10,))
    row = table[table.category == "all"].iloc[0]
    assert row["queries"] == 400 and "queries_in_pool" not in table.columns
    assert not any(c.startswith("ceiling_") for c in table.columns)
    assert row["improved_pct"] == pytest.approx(100 * np.mean(after < before))
    assert row["mean_rank_after"] == pytest.approx(after.mean())
    in_pool = analysis.rank_shift_by_category(al, 50, ks=(10,)).iloc[0]  # a re-ranking's pool: its own count
    assert in_pool["queries_in_pool"] == int((before <= 50).sum()) and "queries" not in in_pool.index
    fig = viz.plot_rank_shift(al, 50, bins=8, reranked=False)
    a, b, c, _ = fig.axes
    improved = [p.get_width() for p in c.patches if p.get_gid() == "share:improved_pct"]
    assert improved[0] == pytest.approx(100 * np.mean(after < before))
    xs, ys = next(line for line in b.lines if line.get_gid() == "binned_means").get_data()
    assert b.get_xscale() == "log" and max(xs) > 50  # binned over the whole first ranking, not its top 50
    edges = np.unique(np.geomspace(1, before.max() + 1, 9).round().astype(int))
    naive = [after[(before >= lo) & (before < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])
             if ((before >= lo) & (before < hi)).any()]
    np.testing.assert_allclose(ys, naive)
    assert not [line for line in a.lines if line.get_linestyle() == ":"]  # no pool edge drawn
    unknown = al.assign(rank_before=0, rank_after=0)  # CIRR test: no target known
    with pytest.raises(ValueError, match="no query has a known target rank in the first ranking"):
        viz.plot_rank_shift(unknown, 50, reranked=False)


def test_one_cut_off_is_a_list_of_one():
    r = np.array([1, 3, 7, 20])
    assert analysis.known_recall(r, 5) == analysis.known_recall(r, [5]) == {"R@5": pytest.approx(50.0)}
    al = _aligned()
    table = analysis.rank_shift_by_category(al, 10, ks=5)
    assert [c for c in table.columns if c.startswith("before_")] == ["before_R@5"]
    with pytest.raises(ValueError, match=r"k must be a whole number >= 1, got '10'"):
        analysis.rank_shift_by_category(al, 10, ks="10")


def test_rank_shift_table_refuses_float_edges_nan_and_2d_ranks():
    with pytest.raises(ValueError, match=r"bins must be whole-number rank edges, got \[1, 2\.7, 6\]"):
        analysis.rank_shift_table([1, 2, 3], [1, 2, 3], 5, bins=[1, 2.7, 6])
    assert list(analysis.rank_shift_table([1, 2, 3], [1, 2, 3], 5, bins=[1.0, 3.0, 6.0])["bin_start"]) == [1, 3]
    with pytest.raises(ValueError, match=r"rank_before holds 1 NaN rank\(s\)"):
        analysis.rank_shift_table([1, np.nan, 3], [1, 2, 3], 5)
    with pytest.raises(ValueError, match=r"rank_after must be a 1-D array of ranks .*got shape \(2, 2\)"):
        analysis.rank_shift_table([1, 2], [[1, 2], [3, 4]], 5)


def test_router_views_name_the_cala_views_for_a_cala_trace():
    frame = pd.concat([cala_frame("q1"), cala_frame("q2")]).assign(category="dress")
    for call in (viz.plot_expert_heatmaps, viz.plot_gate_entropy, analysis.route_statistics, viz.plot_path_matrices,
                 viz.plot_dime_flows):
        with pytest.raises(ValueError, match=r"is for router traces \(AMC gates, DIME paths\); this is a CaLa trace "
                                             r".*plot_cala_bridges or viz\.plot_bridge_words"):
            call(frame)


def test_cala_bridges_take_one_step_and_refuse_an_empty_frame():
    fig = viz.plot_cala_bridges(cala_frame(), steps=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert "TAC reference -> target, step 2" in titles and "TAC target -> reference, step 2" in titles
    assert not any("step 1" in t for t in titles)
    with pytest.raises(ValueError, match=r"^plot_cala_bridges: the trace frame is empty"):
        viz.plot_cala_bridges(cala_frame().iloc[:0])
    with pytest.raises(ValueError, match=r"plot_cala_bridges needs a CaLa trace"):
        viz.plot_cala_bridges(amc_frame())


def test_rank_shift_summary_and_known_recall_refuse_nan_ranks():
    # NaN failed the ``>= 1`` / ``> 0`` filters, so the query vanished from the counts and the recall's denominator
    with pytest.raises(ValueError, match=r"rank_after holds 1 NaN rank\(s\) \(positions \[1\]\)"):
        analysis.rank_shift_summary([1, 2, 3], [1, np.nan, 3])
    with pytest.raises(ValueError, match=r"ranks holds 1 NaN rank\(s\)"):
        analysis.known_recall([1, np.nan, 30], [10])
    assert analysis.known_recall([1, 0, 30], [10]) == {"R@10": pytest.approx(50.0)}  # 0 = unknown target, dropped


def test_rank_shift_plot_says_when_no_query_is_in_the_pool(caplog):
    al = pd.DataFrame({"query_id": [0, 1, 2], "rank_before": [40, 50, 60], "rank_after": [3, 70, 60]})
    with caplog.at_level("WARNING"):
        fig = viz.plot_rank_shift(al, k=10)
    b = fig.axes[1]
    assert [t.get_text() for t in b.texts if t.get_gid() == "no_in_pool"] == [
        "no query with its target\nin the top-10 pool before"]
    assert "no query has its target inside the top-10 pool" in caplog.text
    fig = viz.plot_rank_shift(al, k=50)
    assert not [t for t in fig.axes[1].texts if t.get_gid() == "no_in_pool"]


# ------------------------------------------------------------------------------------------------ figure review
GREEN_RED = {"#2ca02c", "#d62728"}  # matplotlib's green / red: one colour to deuteranopes


def _hexes(patches) -> set[str]:
    return {to_hex(p.get_facecolor()) for p in patches}


def test_rank_shift_gives_each_colour_one_meaning():
    fig = viz.plot_rank_shift(_aligned(), k=200, bins=10, label_before="stage I", label_after="stage II")
    a, b, c, d = fig.axes
    shares = {key: _hexes(p for p in c.patches if p.get_gid() == f"share:{key}")
              for key in ("improved_pct", "unchanged_pct", "worsened_pct")}
    improved, worsened = shares["improved_pct"], shares["worsened_pct"]
    assert improved == {to_hex(viz.BETTER_COLOR)} and worsened == {to_hex(viz.WORSE_COLOR)} and improved != worsened
    assert not (improved | worsened) & GREEN_RED
    assert all(p.get_hatch() for p in c.patches if p.get_gid() == "share:worsened_pct")  # also without colour
    categories = {to_hex(coll.get_facecolor()[0]) for coll in a.collections}
    assert len(categories) == 2 and not categories & (improved | worsened)  # a category is not "improved"
    recall = {key: _hexes(p for p in d.patches if p.get_gid() == f"recall:{key}")
              for key in ("before_R@1", "after_R@1", "before_R@10", "after_R@10")}
    bars = set().union(*recall.values())
    assert not bars & (improved | worsened | categories)  # stage II R@10 no longer wears "worsened"
    assert recall["before_R@1"] == recall["before_R@10"] != recall["after_R@1"] == recall["after_R@10"]  # light/dark
    hatches = {key: {p.get_hatch() for p in d.patches if p.get_gid() == f"recall:{key}"} for key in recall}
    assert hatches["before_R@1"] == hatches["after_R@1"] != hatches["before_R@10"]  # the metric: by hatching
    assert to_hex(b.get_lines()[0].get_color()) not in improved | worsened
    for ax in (a, b, c, d):  # every legend is readable when saved, and (a) explains its dotted line
        assert min(t.get_fontsize() for t in ax.get_legend().get_texts()) >= 8
    assert "pool edge: top-200 re-ranked" in [t.get_text() for t in a.get_legend().get_texts()]


def test_figure8_and_bridge_bars_use_the_blue_orange_pair():
    al = _aligned()
    fig = viz.plot_figure8(analysis.rank_shift_table(al.rank_before, al.rank_after, 200))
    bars = fig.axes[0].patches
    up = {to_hex(p.get_facecolor()) for p in bars if p.get_height() > 0}
    down = {to_hex(p.get_facecolor()) for p in bars if p.get_height() < 0}
    assert up == {to_hex(viz.BETTER_COLOR)} and down == {to_hex(viz.WORSE_COLOR)}
    assert all(p.get_hatch() for p in bars if p.get_height() < 0)
    frame = pd.concat([cala_frame("q1"), cala_frame("q2", ["[CLS]", "star", "blue", "[SEP]"])])
    for fig in (viz.plot_bridge_words(frame), viz.plot_cala_bridges(cala_frame())):
        ax = next(ax for ax in fig.axes if ax.get_legend() and "bridge" in ax.get_xlabel())
        pos = {to_hex(p.get_facecolor()) for p in ax.patches if p.get_width() > 0}
        neg = [p for p in ax.patches if p.get_width() < 0]
        assert pos == {to_hex(viz.BETTER_COLOR)} and {to_hex(p.get_facecolor()) for p in neg} == {
            to_hex(viz.WORSE_COLOR)}
        assert neg and all(p.get_hatch() for p in neg) and not (pos & GREEN_RED)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["> 0: bridges", "< 0: works against"]


def test_gate_entropy_colours_and_counts_say_what_they_are():
    dime, _ = dime_frame()
    for frame, rows in ((amc_frame(), "queries"), (dime, "image–caption pairs")):
        fig = viz.plot_gate_entropy(frame)
        hist, shares = fig.axes[0], fig.axes[1]
        assert hist.get_ylabel() == rows  # DIME's histogram counts image-caption pairs, not queries
        layers = {to_hex(p.get_facecolor()) for p in hist.patches}
        stats = {to_hex(p.get_facecolor()) for ax in fig.axes[1:] for p in ax.patches}
        assert len(stats) == 2 and not layers & stats  # no colour is a layer here and a statistic there
        assert min(t.get_fontsize() for t in shares.get_yticklabels()) >= 8
    assert viz.plot_path_space(dime).axes[0].get_title() == "Image–caption pairs in path space"
    assert viz.plot_path_space(amc_frame(n=15)).axes[0].get_title() == "Queries in path space"


def test_gate_boxes_get_a_y_range_per_layer_and_safe_category_colours():
    frame = amc_frame(n=30)
    frame.loc[frame.layer == "layer1", "weight"] = 0.7 + 0.01 * frame.loc[frame.layer == "layer1", "weight"]
    fig = viz.plot_gate_distributions(frame, by="modification")
    one, two = fig.axes[:2]
    assert one.get_ylim()[1] - one.get_ylim()[0] < 0.05 < two.get_ylim()[1] - two.get_ylim()[0]  # not flat lines
    colours = [to_hex(h.get_facecolor()) for h in fig.legends[0].legend_handles]
    assert colours == [to_hex(c) for c in viz.CVD_PALETTE[:2]] and not set(colours) & GREEN_RED


def test_one_name_for_the_routed_weight_and_readable_ticks():
    dime, _ = dime_frame()
    for frame, name in ((amc_frame(), "gate weight"), (dime, "path weight")):
        heat = viz.plot_expert_heatmaps(frame, scale="layer")
        bars = {ax.get_ylabel() for ax in heat.axes if not ax.images}
        gates = viz.plot_query_gates(frame, [frame["query_id"].iloc[0]])
        assert bars == {name} and gates.axes[0].get_ylabel() == name
        sizes = [t.get_fontsize() for fig in (heat, gates) for ax in fig.axes if ax.images or ax.patches
                 for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        assert min(sizes) >= 8  # expert and path names were 5-7 pt
    assert viz.plot_query_gates(dime, [0])._suptitle.get_text() == "Path weights per image–caption pair"


def test_cala_tac_panels_explain_prev_tokens_and_flag_uniform_maps():
    frame = cala_frame()
    uniform = frame["layer"].str.endswith("step4")
    frame.loc[uniform, "weight"] = 1 / 3
    fig = viz.plot_cala_bridges(frame)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    step4 = axes["TAC reference -> target, step 4 (uniform, 0.333)"]
    assert any(t.get_gid() == "uniform" and "1/3" in t.get_text() for t in step4.texts)
    assert "prev<j> = token j of step 3's output" in step4.get_xlabel()
    assert "target token" in axes["TAC reference -> target, step 1"].get_xlabel()
    bars = [ax for ax in fig.axes if not ax.images and not ax.patches]
    assert len(bars) == 3 + 2  # the HCA maps and the two step-1 maps: the uniform step-4 maps have no colour bar


def test_training_curves_take_a_non_numeric_x():
    """The phase shading's end was computed as a float for every figure: an x of strings raised ValueError."""
    import pandas as pd

    fig = viz.plot_training_curves(pd.DataFrame({"time": ["a", "b", "c"], "loss": [3.0, 2.0, 1.0]}), x="time")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["loss"]


def test_grouped_bars_differ_in_colour_blind_safe_colour_and_hatching(tmp_path):
    """Runs and categories were told apart by matplotlib's default colours only: orange and green are one colour
    to protanopes (CIEDE2000 1.3 in the report's per-category bars)."""
    import pandas as pd
    from matplotlib.axes import Axes

    frame = pd.DataFrame({"dress": [10.0, 20.0], "shirt": [12.0, 22.0], "toptee": [14.0, 24.0]}, index=["R@10", "R@50"])
    runs = {name: {"val": {"R@10": float(i), "R@50": 2.0 * i}} for i, name in enumerate(frame.columns, 1)}
    for fig in (viz.plot_metrics_bars(frame), viz.plot_run_comparison(runs)):
        bars = [p for ax in fig.findobj(Axes) for p in ax.patches if isinstance(p, Rectangle)]  # subfigures too
        styles = {(to_hex(p.get_facecolor()), p.get_hatch() or "") for p in bars}
        assert {c for c, _ in styles} == {c.lower() for c in viz.CVD_PALETTE[:3]}
        assert len({h for _, h in styles}) == 3


def test_svg_figures_keep_their_text_as_text(tmp_path):
    """matplotlib's SVGs drew every label as outlines: a screen reader read nothing, a search found nothing."""
    fig = viz.plot_metrics_bars({"R@10": 10.0, "R@50": 30.0}, title="recall per cut-off")
    svg = viz.save_figure(fig, tmp_path, "bars", formats=("svg",))[0].read_text(encoding="utf-8")
    assert "recall per cut-off" in svg and "R@50" in svg


def _contrast(a, b) -> float:
    """WCAG 2's contrast ratio of two matplotlib colours (1 to 21)."""
    def luminance(colour):
        c = np.asarray(matplotlib.colors.to_rgb(colour))
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(c @ [0.2126, 0.7152, 0.0722])

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_numbers_on_viridis_heatmaps_keep_wcag_contrast():
    """White text just below viridis' middle fell to 3.8:1 (WCAG AA asks 4.5:1 for small text)."""
    from matplotlib import colormaps

    for f in np.linspace(0, 1, 201):
        assert _contrast(colormaps["viridis"](f), viz.text_on_viridis(f)) >= 4.5, f


def test_a_saved_figure_is_the_same_bytes_however_often_it_is_drawn(tmp_path):
    """Constrained layout moved the axes a little on every draw and matplotlib named SVG clip paths by a hash of
    their bounds: a figure saved twice (or shown in a notebook, then saved) gave other bytes, and a paper's
    repository churned. PDFs carried Type 3 fonts, which venues' camera-ready checks refuse."""
    dime, _ = dime_frame()
    fig = viz.plot_expert_heatmaps(dime)
    first = viz.save_figure(fig, tmp_path / "a", "heat", formats=("svg", "pdf"))
    fig.draw_without_rendering()  # drawn once more (a notebook shows it), then saved again
    again = viz.save_figure(fig, tmp_path / "b", "heat", formats=("svg", "pdf"))
    for one, two in zip(first, again):
        assert one.read_bytes() == two.read_bytes(), one.name
    pdf = first[1].read_bytes()
    assert b"/Type3" not in pdf and b"/FontFile2" in pdf  # TrueType (Type 42) fonts embedded
    assert b'clip-path="url(#clip0)"' in first[0].read_bytes()
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"  # given back after the save


def test_square_images_with_colour_bars_and_postscript_save_the_same_bytes_twice(tmp_path):
    """Square imshow panels with colour bars were still moving after 5 draws (by 1e-4, a third less each draw), and
    PostScript wrote its save time whatever the metadata said."""
    fig = viz.new_figure(8.0, 3.0)
    for i, ax in enumerate(fig.subplots(1, 3)):
        image = ax.imshow(np.arange(16.0).reshape(4, 4) * (i + 1))
        for (r, c), value in np.ndenumerate(np.arange(16.0).reshape(4, 4)):
            ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    first = viz.save_figure(fig, tmp_path / "a", "squares", formats=("pdf", "svg", "png", "eps"))
    again = viz.save_figure(fig, tmp_path / "b", "squares", formats=("pdf", "svg", "png", "eps"))
    for one, two in zip(first, again):
        assert one.read_bytes() == two.read_bytes(), one.name
    assert b"%%CreationDate" not in first[-1].read_bytes()
