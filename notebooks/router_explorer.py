# ---
# jupyter:
#   kernelspec:
#     display_name: cirlab (.venv)
#     language: python
#     name: cirlab
# ---

# %% [markdown]
# # Router explorer
#
# Router models decide, per query, how much each expert (AMC: NIN, GTN, CRN in two layers) or each routing cell
# (DIME: RIC, GLGC, IMRC, CMRC in three densely connected layers) contributes. This notebook traces those
# decisions with `cirlab.trace_routes` and shows:
#
# * the gates (AMC) or path weights (DIME) of each query per layer, grouped by category;
# * their distributions per category and per modification type;
# * gate entropy (how decisive the router is) and expert utilisation (which experts do the work);
# * for DIME, the dense cell-to-cell routing as flows between layers;
# * a 2-D map of the queries in path space, coloured by category;
# * an explorer, live in JupyterLab: pick a query, see what it retrieves (the target framed in green, with its rank
#   when it is outside the top 5) and its gates beside those of a second checkpoint; edit its text and watch them
#   move. For DIME: pick a pair, edit the caption, choose another image, and its paths are recomputed.
#
# AMC's experts appear in the paper's order, α1 NIN, α2 GTN, α3 CRN (the code, the checkpoints and the trace's
# `code_index` use NIN, CRN, GTN). For DIME (an image-text matcher on precomp data) a "query" is one matching
# (image, caption) pair and its category is the caption's type (synthetic data: full, color, shape, layout,
# relation). Its routes are path matrices: layer0 and layer1 send every cell's output to the four cells of the
# next layer, layer2 to the output.
#
# Two models without a router get their own views here, chosen from the run's model:
#
# * **CaLa** (CIR on BLIP-2): which caption words bridge the reference and the target. HCA's hinge map (reference
#   queries -> words -> target queries) with each word's bridge value, TAC's twin attention, and the words that
#   bridge most over all traced queries (`CaLa.trace`).
# * **HREM** (ITM): the relation explorer. The instance-level graph of one batch (B images + B captions) as a
#   2B x 2B heatmap with its four blocks i2i / i2t / t2i / t2t labelled (connection, relevance, fusion
#   attention), and the word-region relevance of one caption, with its words (`cirlab.models.hrem.relation_frames`).
#
# With its defaults this notebook opens the AMC run `make demo` (`cirlab report`) trained (`reports/train`;
# `reports/train_dime` with `dataset="f30k"`), from whatever folder the kernel starts in, and writes
# `runs/router_explorer/`.

# %%
# %matplotlib inline
from IPython.display import display

from cirlab import analysis, viz, widgets, workbench

# %% tags=["parameters"]
run_dir: str = ""  # a trained run: AMC, DIME, CaLa or HREM ("": reports/train, reports/train_dime for f30k/coco)
dataset: str = "fashioniq"  # fashioniq | shoes | cirr (AMC, CaLa) | f30k | coco (DIME, HREM: data_root/precomp)
data_root: str = ""  # folder holding the dataset ("": $CIRLAB_DATA, else the data the run was trained on)
split: str = "val"  # split whose queries are traced ("val" is precomp "dev")
output_dir: str = ""  # metrics.json, config.json, figures/ ("": runs/router_explorer, in the checkout or here)
n_queries: int = 120  # queries (DIME: image-caption pairs; HREM: images of the traced batch, at most 12) to trace
query_id: str = ""  # the query shown alone ("": the first traced one; HREM: a batch position of a caption, "": 0)
compare: str = "untrained"  # second checkpoint drawn beside the run (AMC): untrained | a run folder | "" (none)
interactive: bool = True  # show the live explorer when a Jupyter frontend runs the kernel (never under papermill)
device: str = "cpu"  # cpu | cuda

# %%
run = str(workbench.find_run(run_dir, dataset=dataset))
data_dir = str(workbench.find_data(dataset, data_root, run))
out_dir = str(workbench.output_folder(output_dir, "router_explorer"))
print(workbench.describe_paths(run=run, data=data_dir, output=out_dir))
model = workbench.load_run(run, device=device)
kind = workbench.explorer_kind(model)  # router (AMC, DIME) | cala | hrem
if kind == "router":
    routes, texts = workbench.collect_routes(model, dataset, data_dir, split, n=n_queries, device=device)
elif kind == "cala":
    routes, texts = workbench.cala_trace(model, dataset, data_dir, split, n=min(n_queries, 24), device=device)
else:
    graph = workbench.hrem_relation(model, dataset, data_dir, split, n_images=min(n_queries, 12),
                                    caption=int(query_id or 0), device=device)
    routes, texts = graph["edges"], graph["texts"]
print(model.model_name, "|", kind, "view |", len(texts), "queries traced")
routes.head()

# %% [markdown]
# ## Gates per query and layer
# AMC: one row per query, one column per expert. DIME: per layer, the weight each source cell sends to each
# destination cell (one column per path). Rows are grouped by category (DIME: caption type). AMC's sigmoid gates
# share one colour scale; DIME's layers each have their own (pass `scale="shared"` to compare them on one).

# %%
if kind == "router":
    fig = viz.plot_expert_heatmaps(routes, max_queries=40)
    viz.save_figure(fig, f"{out_dir}/figures", "expert_heatmaps")
    display(fig)

# %% [markdown]
# ## Gate distributions per category and per modification type
# AMC: box plots per expert. DIME: the mean weight of each path per caption type; precomp data has no
# modification types.

# %%
if kind == "router":
    fig = viz.plot_gate_distributions(routes, by="category")
    viz.save_figure(fig, f"{out_dir}/figures", "gates_by_category")
    display(fig)

# %%
by_modification = kind == "router" and "modification" in routes.columns and (
    routes["modification"].astype(str).str.len().gt(0).any())
if by_modification:
    fig = viz.plot_gate_distributions(routes, by="modification")
    viz.save_figure(fig, f"{out_dir}/figures", "gates_by_modification")
    display(fig)

# %% [markdown]
# ## Gate entropy and expert utilisation
# Entropy is computed on each query's gates normalised to sum to one (AMC's sigmoid gates are not normalised)
# and divided by log(E): 1 means the router spreads evenly, 0 that one expert takes everything.

# %%
stats = analysis.route_statistics(routes) if kind == "router" else None
if kind == "router":
    fig = viz.plot_gate_entropy(routes)
    viz.save_figure(fig, f"{out_dir}/figures", "entropy_utilisation")
    display(fig)
stats

# %% [markdown]
# ## Dense routing flows (DIME) and the path space
# DIME: the mean path weight from each cell to each cell of the next layer, drawn as flows between layers (line
# width = weight), then the same means as one heatmap per layer, each on its own colour scale. Path space:
# every query's concatenated routing weights, each scaled to unit variance (DIME's raw output-layer weights would
# otherwise make the map one path's), projected to 2-D (PCA), coloured by category (DIME: caption type).

# %%
has_paths = kind == "router" and routes["source"].notna().any()
if has_paths:
    fig = viz.plot_dime_flows(routes)
    viz.save_figure(fig, f"{out_dir}/figures", "cell_flows")
    display(fig)
    fig = viz.plot_path_matrices(routes)
    viz.save_figure(fig, f"{out_dir}/figures", "path_matrices")
    display(fig)
if kind == "router":
    fig = viz.plot_path_space(routes, color_by="category")
    viz.save_figure(fig, f"{out_dir}/figures", "path_space")
    display(fig)

# %% [markdown]
# ## CaLa: which words bridge reference and target
# Drawn when the run is CaLa. HCA (hinge cross-attention) scores reference queries against the caption's words and
# the words against the target's queries; the hinge is the softmax of their product, and a word's *bridge value* is
# its share of reference query 0's expected hinge logit (blue: the word links the reference to the target tokens
# the hinge attends to). TAC's twin attention: reference queries attending to the target and the reverse, first and
# last of its shared-weight steps. Then the words with the largest mean bridge value over every traced query.

# %%
if kind == "cala":
    shown = query_id or str(routes["query_id"].iloc[0])
    fig = viz.plot_cala_bridges(routes, shown, texts.get(shown, ""))
    viz.save_figure(fig, f"{out_dir}/figures", "cala_bridges")
    display(fig)
    fig = viz.plot_bridge_words(routes)
    viz.save_figure(fig, f"{out_dir}/figures", "bridge_words")
    display(fig)

# %% [markdown]
# ## HREM: the relation explorer
# Drawn when the run is HREM. One batch of images (rows and columns first) and one caption of each (after the red
# lines): the connection relation (which pairs the fusion may attend to), the relevance relation (the weights it
# learned from the word-region scores) and the first fusion layer's attention (heads averaged). Then the chosen
# caption (`query_id`, a batch position) against the regions of its own image, and each of its words' best
# region score against every image of the batch. The table gives the mean relevance and attention per block;
# the connection's block means are left out: each row keeps its top `threshold` share in every block, so they are
# 0.5 by construction.

# %%
if kind == "hrem":
    fig = viz.plot_relation_graph(routes)
    viz.save_figure(fig, f"{out_dir}/figures", "relation_graph")
    display(fig)
    fig = viz.plot_word_region(graph["word_region"], text=texts[graph["caption_id"]])
    viz.save_figure(fig, f"{out_dir}/figures", "word_region")
    display(fig)
    block_means = analysis.relation_block_means(routes).drop(index=["connection", "mask"], errors="ignore")
    display(block_means)

# %% [markdown]
# ## One query, live
# The figure below is the explorer's view of one query. In JupyterLab the explorer under it is live: the
# dropdown picks a query, the text box re-runs the model on the query's reference image with your text (traced),
# and the gates, the top 5 and the target's rank follow, for this run and for the `compare` checkpoint.
# DIME: the caption box and the image dropdown re-score the edited caption against the chosen image.

# %%
earlier = globals().get("explorer")
if earlier is not None:  # this cell run again: the earlier explorer's widgets would stay open, with its models
    earlier.close()
explorer = None
if kind == "router":
    explorer = workbench.explorer_for(model, routes, texts, dataset, data_dir, split, run_dir=run, compare=compare,
                                      device=device)
    shown = explorer.pick(query_id)
    fig = explorer.view(shown)
    viz.save_figure(fig, f"{out_dir}/figures", "query_view")
    display(fig)
elif kind == "hrem":
    shown = str(graph["caption_id"])

# %%
if explorer is not None and interactive and widgets.live_frontend():
    display(explorer.build())
elif explorer is not None:
    print("The live explorer appears here when JupyterLab runs this notebook (interactive=True).")
else:
    print(f"{model.model_name} has no live explorer; the figures above are its views.")

# %%
if kind == "router":
    metrics = {"queries": int(routes["query_id"].nunique()),
               "layer_entropy": stats.groupby("layer")["layer_entropy"].first().to_dict(),
               "mean_share": {f"{r.layer}/{r.expert}": r.mean_share for r in stats.itertuples()}}
elif kind == "cala":
    metrics = {"queries": int(routes["query_id"].nunique()),
               "bridge_words": dict(analysis.bridge_words(routes, top=10)[["word", "bridge"]].values.tolist())}
else:
    metrics = {"queries": len(texts), "caption_id": int(graph["caption_id"]),
               "block_means": block_means.to_dict("index")}
config = {"run_dir": run, "dataset": dataset, "data_root": data_dir, "split": split, "output_dir": out_dir,
          "n_queries": n_queries, "query_id": query_id, "shown_query": str(shown), "compare": compare,
          "interactive": interactive, "device": device}
written = workbench.write_outputs(out_dir, metrics, config)
print("wrote metrics.json and config.json to", written)
