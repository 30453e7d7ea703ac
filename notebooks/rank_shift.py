# ---
# jupyter:
#   kernelspec:
#     display_name: cirlab (.venv)
#     language: python
#     name: cirlab
# ---

# %% [markdown]
# # Rank shift of a two-stage re-ranker (Figure 8)
#
# The re-ranking paper's Figure 8 (Liu et al., "Candidate Set Re-ranking for Composed Image Retrieval with Dual
# Multi-modal Encoder", TMLR 2024, appendix) asks: when stage II re-orders stage I's top-K candidates, where do the
# targets go? This notebook trains a tiny two-stage BLIP re-ranker (`blip_rerank_stage1` -> top-K ->
# `blip_rerank_stage2`) on the data in `data_root`, exactly as `cirlab train` does with the two stage configs, and
# compares the two rankings of the same validation queries:
#
# * per-query target rank before vs after (points below the diagonal improved);
# * the mean rank after per bin of the rank before, and the paper's Average-Delta bars per initial rank;
# * the share of queries improved / unchanged / worsened;
# * the candidate-pool ceiling: a re-ranker of the top-`pool_k` list cannot recover a target outside it, so stage
#   I's Recall@`pool_k` bounds stage II's recall;
#
# overall and per category (Fashion-IQ: dress / shirt / toptee; CIRR: one group). Ranks are 1-based here; the
# original notebook's deltas are 0-based, which changes nothing in a difference. With the demo's random-init tiny
# model and a one-minute CPU recipe the shift is small; it says nothing about the size of the paper's gain.
#
# A second, optional comparison (`before` / `after`, e.g. an untrained and a trained AMC from the `evaluate`
# notebook) is drawn with the same panels under its own title: two full rankings, not a re-ranking. Top-K files of
# image-text matching runs work too: the `evaluate` notebook writes each ITM run's text-to-image ranking
# (`topk/<run>/dev_t2i.topk.npz`, one row per caption, its own image the target), so `before` = a DIME run's and
# `after` = an HREM run's compare the two models' t2i ranks caption by caption, per caption type. With
# `rerank=False` the notebook draws only that comparison and trains nothing.

# %%
# %matplotlib inline
from pathlib import Path

from IPython.display import display

from cirlab import analysis, viz, workbench
from cirlab.engine import rerank as two_stage

# %% tags=["parameters"]
data_root: str = ""  # the dataset folder, or one holding it ("" -> $CIRLAB_DATA, else the embedded synthetic set)
dataset: str = "fashioniq"  # fashioniq | cirr: the layout the re-ranker trains and is evaluated on
preset: str = "tiny"  # blip_rerank preset (tiny: random init, a minute on a CPU)
pool_k: int = 50  # stage I's top-K, all of which stage II re-ranks (the paper's Figure 8 uses 200)
epochs: int = 3  # stage I epochs
stage2_epochs: int = 2  # stage II epochs
max_steps: int = 0  # cap on each stage's optimizer steps (0: no cap)
batch_size: int = 32  # stage I batch (stage II's is in stage2_settings: it scores B x B pairs per step)
short_recipe: bool = True  # tiny preset: the short CPU recipes (workbench.CPU_RECIPES) first; False: the paper's
settings: list = []  # more cirlab train --set overrides of stage I (after the recipe: they win)
stage2_settings: list = []  # more cirlab train --set overrides of stage II
bins: int = 10  # bins of the rank before in panel (b)
device: str = "cpu"  # cpu | cuda | cuda:N | auto
output_dir: str = ""  # metrics.json, config.json, figures/, runs/ ("": runs/rank_shift, in the checkout or here)
before: str = ""  # optional second comparison: top-K file or folder of a first ranking ("" skips it)
after: str = ""  # the second ranking of the same queries
label_before: str = "untrained AMC"  # legend name of `before`
label_after: str = "trained AMC"  # legend name of `after`
rerank: bool = True  # train and compare the two-stage re-ranker (False: only the before/after comparison)

# %%
data_dir = str(workbench.find_data(dataset, data_root))
out_dir = str(workbench.output_folder(output_dir, "rank_shift"))
pair = workbench.ranking_pair(before, after, rerank)  # read now: a wrong path fails before any training
shown = {"before": before, "after": after} if pair else {}
print(workbench.describe_paths(data=data_dir, output=out_dir,
                               **{name: Path(path).expanduser().resolve() for name, path in shown.items()}))
caps = [f"train.max_steps={max_steps}"] if max_steps else []
recipes = {stage: workbench.cpu_recipe(f"blip_rerank_{stage}", preset) if short_recipe else []
           for stage in ("stage1", "stage2")}  # the paper's lr 2e-5 needs far longer runs than a CPU notebook
print("short CPU recipes:", recipes if any(recipes.values()) else "none (the preset's own, the paper's recipe)")
stage1_set = [f"train.epochs={epochs}", f"train.batch_size={batch_size}", *recipes["stage1"], *caps, *settings]
stage2_set = [f"train.epochs={stage2_epochs}", *recipes["stage2"], *caps, *stage2_settings]

# %% [markdown]
# ## Train stage I, write its top-K, train stage II, re-rank
# `cirlab.engine.rerank.run_pipeline` runs the two configs of `rerank.pipeline_configs` through
# `cirlab.run_experiment`: stage I writes `runs/stage1/topk/` (top-`pool_k`); stage II freezes that stage I, starts
# both streams from its text encoder and re-ranks all `pool_k` candidates of every validation query.

# %%
runs = None
if rerank:
    runs = two_stage.run_pipeline(dataset, data_dir, f"{out_dir}/runs", preset=preset, k=pool_k,
                                  stage1=stage1_set, stage2=stage2_set, device=device)
    display({stage: runs[stage]["splits"]["val"] for stage in ("stage1", "stage2")})

# %%
aligned = summary = None
if rerank:
    aligned = analysis.align_ranks(workbench.load_topk_files(runs["stage1_topk"], split="val"),
                                   workbench.load_topk_files(runs["stage2_topk"], split="val"))
    summary = analysis.rank_shift_by_category(aligned, pool_k, ks=(1, 5, 10, 50))
summary

# %%
if rerank:
    fig = viz.plot_rank_shift(aligned, k=pool_k, bins=bins, label_before="stage I", label_after="stage II",
                              title=f"Two-stage re-ranker ({preset}): stage I -> stage II, top {pool_k} re-ranked")
    viz.save_figure(fig, f"{out_dir}/figures", "rank_shift")
    display(fig)

# %% [markdown]
# ## Figure 8, one panel per category
# Bars: average of (stage-I rank - stage-II rank) of the targets that stage I put at each initial rank (positive =
# moved forward); line: how many queries had their target at that rank.

# %%
for category, group in aligned.groupby("category") if rerank else ():
    table = analysis.rank_shift_table(group["rank_before"], group["rank_after"], pool_k)
    fig = viz.plot_figure8(table, title=f"Figure 8, {category or dataset}: stage I -> stage II (K={pool_k})")
    viz.save_figure(fig, f"{out_dir}/figures", f"figure8_{category or 'all'}")
    display(fig)

# %% [markdown]
# ## Second comparison: two full rankings (not a re-ranking)
# Drawn only when `before` and `after` are set (the report passes the `evaluate` notebook's untrained and trained
# AMC). Both models rank the whole gallery, so there is no candidate pool and no ceiling: panel (b) bins every query
# by its first rank on a log scale, and the shares of panel (c) count every query (a top-`pool_k` filter would keep
# only the queries the first model already ranked well, and make the second look worse).

# %%
other = analysis.align_ranks(*pair) if pair else None
if other is not None:
    fig = viz.plot_rank_shift(other, k=pool_k, bins=bins, label_before=label_before, label_after=label_after,
                              title=f"{label_before} vs {label_after}: two full rankings, not a re-ranker",
                              reranked=False)
    viz.save_figure(fig, f"{out_dir}/figures", "second_comparison")
    display(fig)

# %%
metrics = {}
if rerank:
    metrics = {row["category"]: {k: v for k, v in row.items() if k != "category"}
               for row in summary.to_dict("records")}
    metrics["runs"] = {stage: runs[stage]["splits"]["val"] for stage in ("stage1", "stage2")}
if other is not None:
    metrics["second_comparison"] = analysis.rank_shift_by_category(other, None, ks=(1, 10)).to_dict("records")
config = {"data_root": data_dir, "dataset": dataset, "preset": preset, "pool_k": pool_k, "epochs": epochs,
          "stage2_epochs": stage2_epochs, "max_steps": max_steps, "batch_size": batch_size,
          "short_recipe": short_recipe, "settings": settings, "stage2_settings": stage2_settings, "bins": bins,
          "device": device, "output_dir": out_dir,
          "before": before, "after": after, "label_before": label_before, "label_after": label_after,
          "rerank": rerank}
written = workbench.write_outputs(out_dir, metrics, config)
print("wrote metrics.json and config.json to", written)
