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
# Image-text matching runs (DIME, HREM; `dataset="f30k"` or `"coco"`, precomp region features) get their
# protocol metrics (i2t and t2i R@1/5/10, rsum), text-to-image recall per caption type, and a text-to-image top-K
# file per run (`topk/<run>/dev_t2i.topk.npz`: one row per caption, ranked images), which the rank-shift notebook
# compares query by query (e.g. DIME vs HREM). Precomp data has region features, not pictures: no galleries.
#
# With its defaults this notebook evaluates the AMC run `make demo` (`cirlab report`) trained (`reports/train`) on the
# data it was trained on, from whatever folder the kernel starts in, and writes `runs/evaluate/` in the checkout when
# the kernel runs inside it, else in the kernel's current folder.

# %%
# %matplotlib inline
from pathlib import Path

from IPython.display import display

from cirlab import analysis, metrics, viz, workbench
from cirlab.data.catalog import is_itm

# %% tags=["parameters"]
runs: list = []  # run folders to evaluate, each with config.yaml and checkpoints/ ([]: reports/train, from make demo)
dataset: str = "fashioniq"  # fashioniq | shoes | cirr (CIR runs) | f30k | coco (ITM runs, data_root/precomp)
data_root: str = ""  # folder holding the dataset ("": $CIRLAB_DATA, else the data the first run was trained on)
split: str = "val"  # split to evaluate
output_dir: str = ""  # metrics.json, config.json, figures/, topk/<run>/ ("": runs/evaluate, in the checkout or here)
k: int = 50  # length of the written top-K lists
include_untrained: bool = True  # also evaluate an untrained copy of the first run's model (a baseline)
n_show: int = 4  # queries per gallery figure
device: str = "cpu"  # cpu | cuda

# %%
runs = workbench.as_list(runs, "runs")  # `papermill -p runs PATH` passes one string
run_dirs = [str(workbench.find_run(r)) for r in runs] or [str(workbench.find_run("", dataset=dataset))]
data_dir = str(workbench.find_data(dataset, data_root, run_dirs[0]))
out_dir = str(workbench.output_folder(output_dir, "evaluate"))
print(workbench.describe_paths(runs=", ".join(run_dirs), data=data_dir, output=out_dir))
names = [Path(r).name for r in run_dirs]
itm = is_itm(dataset)
splits = {} if itm else workbench.cir_splits(dataset, data_dir, split)
print(workbench.itm_splits(dataset, data_dir, split) if itm else {cat: len(s) for cat, s in splits.items()})

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
recall_rows = [m for m in table.index if metrics.is_recall_key(m)]
fig = viz.plot_metrics_bars(table.loc[recall_rows], title="Runs side by side")
viz.save_figure(fig, f"{out_dir}/figures", "run_comparison")
fig

# %% [markdown]
# ## Retrieval galleries (first run)
# Each row: the reference image, the modification text, then the top-K gallery images; the target is framed
# in green and marked "✓ target", or drawn last with a dashed frame and its rank when it is ranked below K.

# %%
first = names[0]
# the categories the first run was evaluated on: a run trained on one Fashion-IQ category (AMC's paper protocol)
# is evaluated on that one
shown = {cat: sp for cat, sp in splits.items() if cat in topks[first]}
for cat, sp in shown.items():  # CIR only (precomp ITM data has no pictures)
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, n=n_show, k=5),
                                     title=f"{first}: {cat}")
    viz.save_figure(fig, f"{out_dir}/figures", f"gallery_{cat}")
    display(fig)  # one gallery per category

# %% [markdown]
# ## Worst failures: the queries whose target ranks lowest

# %%
for cat, sp in shown.items():  # CIR only
    worst = workbench.worst_queries(topks[first][cat], n=n_show)
    fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[first][cat], sp, worst, k=5),
                                     title=f"{first}: worst {cat} queries")
    viz.save_figure(fig, f"{out_dir}/figures", f"failures_{cat}")
    display(fig)

# %% [markdown]
# ## Per-category breakdown
# CIR: recall per category. ITM: text-to-image recall per caption type (synthetic data: full, color, shape,
# layout, relation; else the caption's slot).

# %%
if itm:
    per_category = analysis.recall_by_category(topks[first]["t2i"], [1, 5, 10])
else:
    per_category = {cat: analysis.known_recall(t.target_rank, [1, 10, 50]) for cat, t in topks[first].items()}
fig = viz.plot_metrics_bars(analysis.compare_runs(per_category), title=f"{first}: recall per category")
viz.save_figure(fig, f"{out_dir}/figures", "per_category")
fig

# %%
config = {"runs": runs, "run_dirs": run_dirs, "dataset": dataset, "data_root": data_dir, "split": split,
          "output_dir": out_dir, "k": k, "include_untrained": include_untrained, "n_show": n_show, "device": device}
written = workbench.write_outputs(out_dir, {"runs": results, "per_category": per_category}, config)
print("wrote metrics.json and config.json to", written)
