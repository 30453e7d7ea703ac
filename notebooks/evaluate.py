# %% [markdown]
# # Evaluate runs
#
# Protocol metrics for one or several trained runs on the same split (Fashion-IQ: R@10/R@50 per category and
# their averages; CIRR: R@K and Recall_subset@K; Shoes: R@1/10/50), retrieval galleries (query image + text
# -> top-K, the target framed in green), the worst failures, and the runs side by side. Top-K files are written
# to `output_dir/topk/<run>/` for the rank-shift notebook.

# %%
# %matplotlib inline
from pathlib import Path

import cirlab
from cirlab import analysis, viz, workbench

# %% tags=["parameters"]
runs: list = ["runs/train"]  # run folders to evaluate (each has config.yaml and checkpoints/)
dataset: str = "fashioniq"  # fashioniq | shoes | cirr
data_root: str = ""  # folder holding the dataset ("" -> cirlab.core.paths.data_root())
split: str = "val"  # split to evaluate
output_dir: str = "runs/evaluate"  # metrics.json, config.json, figures/, topk/<run>/
k: int = 50  # length of the written top-K lists
include_untrained: bool = True  # also evaluate an untrained copy of the first run's model (a baseline)
n_show: int = 4  # queries per gallery figure
device: str = "cpu"  # cpu | cuda

# %%
data_dir = data_root or str(cirlab.data_root())
names = [Path(r).name for r in runs]
splits = workbench.cir_splits(dataset, data_dir, split)
print({cat: len(s) for cat, s in splits.items()}, "queries")

# %% [markdown]
# ## Metrics per run

# %%
results, topks = {}, {}
for name, run_dir in zip(names, runs):
    model = workbench.load_run(run_dir, device=device)
    results[name], topks[name] = workbench.evaluate_run(model, dataset, data_dir, split, k=k, device=device,
                                                        topk_dir=f"{output_dir}/topk/{name}", name=name)
if include_untrained:
    base = workbench.untrained_copy(runs[0], dataset, data_dir, device=device)
    results["untrained"], topks["untrained"] = workbench.evaluate_run(
        base, dataset, data_dir, split, k=k, device=device, topk_dir=f"{output_dir}/topk/untrained", name="untrained")
table = analysis.compare_runs(results)
table

# %%
fig = viz.plot_table(table, title=f"{dataset} {split}: metrics per run")
viz.save_figure(fig, f"{output_dir}/figures", "metrics_table")
fig

# %%
recall_rows = [m for m in table.index if "R@" in m]
fig = viz.plot_metrics_bars(table.loc[recall_rows], title="Runs side by side")
viz.save_figure(fig, f"{output_dir}/figures", "run_comparison")
fig

# %% [markdown]
# ## Retrieval galleries (first run)
# Each row: the reference image, the modification text, then the top-K gallery images; the target is framed
# in green (absent when it is ranked below K).

# %%
first = names[0]
for cat, sp in splits.items():
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, n=n_show, k=5),
                                     title=f"{first}: {cat}")
    viz.save_figure(fig, f"{output_dir}/figures", f"gallery_{cat}")
fig

# %% [markdown]
# ## Worst failures: the queries whose target ranks lowest

# %%
for cat, sp in splits.items():
    worst = workbench.worst_queries(topks[first][cat], n=n_show)
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, worst, k=5),
                                     title=f"{first}: worst {cat} queries")
    viz.save_figure(fig, f"{output_dir}/figures", f"failures_{cat}")
fig

# %% [markdown]
# ## Per-category breakdown

# %%
per_category = {cat: analysis.known_recall(t.target_rank, [1, 10, 50]) for cat, t in topks[first].items()}
fig = viz.plot_metrics_bars(analysis.compare_runs(per_category), title=f"{first}: recall per category")
viz.save_figure(fig, f"{output_dir}/figures", "per_category")
fig

# %%
config = {"runs": runs, "dataset": dataset, "data_root": data_dir, "split": split, "output_dir": output_dir,
          "k": k, "include_untrained": include_untrained, "n_show": n_show, "device": device}
workbench.write_outputs(output_dir, {"runs": results, "per_category": per_category}, config)
