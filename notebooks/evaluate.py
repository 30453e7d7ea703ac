# ---
# jupyter:
#   kernelspec:
#     display_name: cirlab (.venv)
#     language: python
#     name: cirlab
# ---

# %% [markdown]
# # Evaluate runs
#
# Protocol metrics for one or several trained runs on the same split (Fashion-IQ: R@10/R@50 per category and
# their averages; CIRR: R@K and Recall_subset@K; Shoes: R@1/10/50), retrieval galleries (query image + text
# -> top-K, the target framed in green, or shown at the end of its row with its rank when it is not in the
# top-K), the worst failures, and the runs side by side. Top-K files are written to `output_dir/topk/<run>/` for
# the rank-shift notebook.
#
# With its defaults this notebook evaluates the AMC run `make demo` trained (`reports/train`) on the data it was
# trained on, from whatever folder the kernel starts in, and writes `runs/evaluate/` in the checkout.

# %%
# %matplotlib inline
from pathlib import Path

from cirlab import analysis, viz, workbench

# %% tags=["parameters"]
runs: list = []  # run folders to evaluate, each with config.yaml and checkpoints/ ([]: reports/train from make demo)
dataset: str = "fashioniq"  # fashioniq | shoes | cirr
data_root: str = ""  # folder holding the dataset ("": $CIRLAB_DATA, else the data the first run was trained on)
split: str = "val"  # split to evaluate
output_dir: str = ""  # metrics.json, config.json, figures/, topk/<run>/ ("": runs/evaluate in the checkout)
k: int = 50  # length of the written top-K lists
include_untrained: bool = True  # also evaluate an untrained copy of the first run's model (a baseline)
n_show: int = 4  # queries per gallery figure
device: str = "cpu"  # cpu | cuda

# %%
run_dirs = [str(workbench.find_run(r)) for r in runs] or [str(workbench.find_run("", dataset=dataset))]
data_dir = str(workbench.find_data(dataset, data_root, run_dirs[0]))
out_dir = str(workbench.output_folder(output_dir, "evaluate"))
print(workbench.describe_paths(runs=", ".join(run_dirs), data=data_dir, output=out_dir))
names = [Path(r).name for r in run_dirs]
splits = workbench.cir_splits(dataset, data_dir, split)
print({cat: len(s) for cat, s in splits.items()}, "queries")

# %% [markdown]
# ## Metrics per run

# %%
results, topks = {}, {}
for name, run_dir in zip(names, run_dirs):
    model = workbench.load_run(run_dir, device=device)
    results[name], topks[name] = workbench.evaluate_run(model, dataset, data_dir, split, k=k, device=device,
                                                        topk_dir=f"{out_dir}/topk/{name}", name=name)
if include_untrained:
    base = workbench.untrained_copy(run_dirs[0], dataset, data_dir, device=device)
    results["untrained"], topks["untrained"] = workbench.evaluate_run(
        base, dataset, data_dir, split, k=k, device=device, topk_dir=f"{out_dir}/topk/untrained", name="untrained")
table = analysis.compare_runs(results)
table

# %%
fig = viz.plot_table(table, title=f"{dataset} {split}: metrics per run")
viz.save_figure(fig, f"{out_dir}/figures", "metrics_table")
fig

# %%
recall_rows = [m for m in table.index if "R@" in m]
fig = viz.plot_metrics_bars(table.loc[recall_rows], title="Runs side by side")
viz.save_figure(fig, f"{out_dir}/figures", "run_comparison")
fig

# %% [markdown]
# ## Retrieval galleries (first run)
# Each row: the reference image, the modification text, then the top-K gallery images; the target is framed
# in green, or drawn last with a dashed frame and its rank when it is ranked below K.

# %%
first = names[0]
for cat, sp in splits.items():
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, n=n_show, k=5),
                                     title=f"{first}: {cat}")
    viz.save_figure(fig, f"{out_dir}/figures", f"gallery_{cat}")
fig

# %% [markdown]
# ## Worst failures: the queries whose target ranks lowest

# %%
for cat, sp in splits.items():
    worst = workbench.worst_queries(topks[first][cat], n=n_show)
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, worst, k=5),
                                     title=f"{first}: worst {cat} queries")
    viz.save_figure(fig, f"{out_dir}/figures", f"failures_{cat}")
fig

# %% [markdown]
# ## Per-category breakdown

# %%
per_category = {cat: analysis.known_recall(t.target_rank, [1, 10, 50]) for cat, t in topks[first].items()}
fig = viz.plot_metrics_bars(analysis.compare_runs(per_category), title=f"{first}: recall per category")
viz.save_figure(fig, f"{out_dir}/figures", "per_category")
fig

# %%
config = {"runs": runs, "run_dirs": run_dirs, "dataset": dataset, "data_root": data_dir, "split": split,
          "output_dir": out_dir, "k": k, "include_untrained": include_untrained, "n_show": n_show, "device": device}
workbench.write_outputs(out_dir, {"runs": results, "per_category": per_category}, config)
