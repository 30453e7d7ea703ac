# %% [markdown]
# # Rank shift between two rankings (Figure 8)
#
# The re-ranking paper's Figure 8 asks: when stage II re-orders stage I's top-K candidates, where do the
# targets go? This notebook answers it for **any two top-K files** of the same queries (stage I vs stage
# II, or model A vs model B):
#
# * per-query target rank before vs after (points below the diagonal improved);
# * the mean rank after per bin of the rank before, and the paper's Average-Delta bars per initial rank;
# * the share of queries improved / unchanged / worsened;
# * the candidate-pool ceiling: a re-ranker of the top-`pool_k` list cannot recover a target outside it,
#   so the first file's Recall@`pool_k` bounds the second's recall;
#
# overall and per category (Fashion-IQ: dress / shirt / toptee; CIRR: one group). Ranks are 1-based here;
# the original notebook's deltas are 0-based, which changes nothing in a difference.

# %%
# %matplotlib inline
from cirlab import analysis, viz, workbench

# %% tags=["parameters"]
before: str = "runs/evaluate/topk/untrained"  # top-K file, or a folder of them (e.g. one per category)
after: str = "runs/evaluate/topk/train"  # the second ranking of the same queries
output_dir: str = "runs/rank_shift"  # metrics.json, config.json, figures/
pool_k: int = 50  # candidate pool size (stage I's K; the paper uses 200)
bins: int = 10  # bins of the rank before in panel (b)
label_before: str = "stage I"  # legend name of the first ranking
label_after: str = "stage II"  # legend name of the second ranking

# %%
aligned = analysis.align_ranks(workbench.load_topk_files(before), workbench.load_topk_files(after))
summary = analysis.rank_shift_by_category(aligned, pool_k, ks=(1, 5, 10, 50))
summary

# %%
fig = viz.plot_rank_shift(aligned, k=pool_k, bins=bins, label_before=label_before, label_after=label_after,
                          title=f"{label_before} -> {label_after}")
viz.save_figure(fig, f"{output_dir}/figures", "rank_shift")
fig

# %% [markdown]
# ## Figure 8, one panel per category

# %%
for category, group in aligned.groupby("category"):
    table = analysis.rank_shift_table(group["rank_before"], group["rank_after"], pool_k)
    fig = viz.plot_figure8(table, title=f"{category}: initial rank vs average delta")
    viz.save_figure(fig, f"{output_dir}/figures", f"figure8_{category or 'all'}")
fig

# %%
metrics = {row["category"]: {k: v for k, v in row.items() if k != "category"} for row in summary.to_dict("records")}
config = {"before": before, "after": after, "output_dir": output_dir, "pool_k": pool_k, "bins": bins,
          "label_before": label_before, "label_after": label_after}
workbench.write_outputs(output_dir, metrics, config)
