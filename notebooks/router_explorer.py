# %% [markdown]
# # Router explorer
#
# Router models decide, per query, how much each expert (AMC: NIN, CRN, GTN in two layers) or each
# routing cell (DIME: RIC, GLGC, IMRC, CMRC in three densely connected layers) contributes. This notebook
# traces those decisions with `cirlab.trace_routes` and shows:
#
# * expert-activation heatmaps per layer (query x expert);
# * gate distributions per category and per modification type;
# * gate entropy (how decisive the router is) and expert utilisation (which experts do the work);
# * for DIME, the dense cell-to-cell routing as flows between layers;
# * a 2-D map of the queries in path space, coloured by category;
# * with `interactive=True`, a widget: pick a query, see its gates and top-K, edit its text and watch the
#   gates move. Headless runs draw the same view as a static figure.
#
# AMC's code order is [NIN, CRN, GTN]; its paper figure orders them [NIN, GTN, CRN]. Plots use the code
# order with the names the trace reports.
#
# For DIME (an image-text matcher on precomp data) a "query" is one matching (image, caption) pair and its
# category is the caption's type (synthetic data: full, color, shape, layout, relation). Its routes are path
# matrices: layer0 and layer1 send every cell's output to the four cells of the next layer, layer2 to the
# output; the heatmaps show, per destination cell, the weight of each source. The interactive explorer
# (editing a text and re-scoring) is AMC-only for now: for DIME it shows the traced paths of a pair, without
# top-K.

# %%
# %matplotlib inline
import cirlab
from cirlab import analysis, viz, widgets, workbench

# %% tags=["parameters"]
run_dir: str = "runs/train"  # a trained router run (AMC on CIR data; DIME on precomp ITM data)
dataset: str = "fashioniq"  # fashioniq | shoes | cirr (AMC) | f30k | coco (DIME, data_root/precomp)
data_root: str = ""  # folder holding the dataset ("" -> cirlab.core.paths.data_root())
split: str = "val"  # split whose queries are traced ("val" is precomp "dev")
output_dir: str = "runs/router_explorer"  # metrics.json, config.json, figures/
n_queries: int = 120  # queries (DIME: image-caption pairs) to trace
query_id: str = ""  # the query shown in the single-query view ("": the first traced query)
interactive: bool = False  # build the ipywidgets explorer (needs a live Jupyter frontend)
device: str = "cpu"  # cpu | cuda

# %%
data_dir = data_root or str(cirlab.data_root())
model = workbench.load_run(run_dir, device=device)
routes, texts = workbench.collect_routes(model, dataset, data_dir, split, n=n_queries, device=device)
print(model.model_name, "|", routes["query_id"].nunique(), "queries | layers:", routes["layer"].unique().tolist())
routes.head()

# %% [markdown]
# ## Expert activations per layer
# AMC: one row per query, one column per expert. DIME: per layer and destination cell, the weight each source
# cell sends (rows: pairs).

# %%
fig = viz.plot_expert_heatmaps(routes, max_queries=40)
viz.save_figure(fig, f"{output_dir}/figures", "expert_heatmaps")
fig

# %% [markdown]
# ## Gate distributions per category and per modification type
# DIME's categories are the caption types; precomp data has no modification types.

# %%
fig = viz.plot_gate_distributions(routes, by="category")
viz.save_figure(fig, f"{output_dir}/figures", "gates_by_category")
fig

# %%
by_modification = "modification" in routes.columns and routes["modification"].astype(str).str.len().gt(0).any()
if by_modification:
    fig = viz.plot_gate_distributions(routes, by="modification")
    viz.save_figure(fig, f"{output_dir}/figures", "gates_by_modification")
fig

# %% [markdown]
# ## Gate entropy and expert utilisation
# Entropy is computed on each query's gates normalised to sum to one (AMC's sigmoid gates are not normalised)
# and divided by log(E): 1 means the router spreads evenly, 0 that one expert takes everything.

# %%
stats = analysis.route_statistics(routes)
fig = viz.plot_gate_entropy(routes)
viz.save_figure(fig, f"{output_dir}/figures", "entropy_utilisation")
stats

# %% [markdown]
# ## Dense routing flows (DIME) and the path space
# DIME: the mean path weight from each cell to each cell of the next layer, drawn as flows between layers (line
# width = weight), then the same means as one heatmap per layer, each on its own colour scale. Path space:
# every query's concatenated routing weights, projected to 2-D (PCA), coloured by category (DIME: caption type).

# %%
has_paths = routes["source"].notna().any()
if has_paths:
    fig = viz.plot_dime_flows(routes)
    viz.save_figure(fig, f"{output_dir}/figures", "cell_flows")
    display(fig)
    fig = viz.plot_path_matrices(routes)
    viz.save_figure(fig, f"{output_dir}/figures", "path_matrices")
    display(fig)
fig = viz.plot_path_space(routes, color_by="category")
viz.save_figure(fig, f"{output_dir}/figures", "path_space")
fig

# %% [markdown]
# ## One query: its gates and its top-K
# With `interactive=True` the explorer below is live: the text box re-runs the model on the query's
# reference image with your text (traced), so you can watch the gates move.

# %%
query_fn = workbench.query_fn_for(model, dataset, data_dir, split, device=device)
explorer = widgets.RouterExplorer(routes, texts=texts, query_fn=query_fn, k=5)
shown = query_id or explorer.query_ids[0]
fig = explorer.view(shown)
viz.save_figure(fig, f"{output_dir}/figures", "query_view")
fig

# %%
if interactive:
    display(explorer.build())

# %%
metrics = {"queries": int(routes["query_id"].nunique()),
           "layer_entropy": stats.groupby("layer")["layer_entropy"].first().to_dict(),
           "mean_share": {f"{r.layer}/{r.expert}": r.mean_share for r in stats.itertuples()}}
config = {"run_dir": run_dir, "dataset": dataset, "data_root": data_dir, "split": split, "output_dir": output_dir,
          "n_queries": n_queries, "query_id": query_id, "shown_query": shown, "interactive": interactive,
          "device": device}
workbench.write_outputs(output_dir, metrics, config)
