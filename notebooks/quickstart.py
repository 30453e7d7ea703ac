# ---
# jupyter:
#   kernelspec:
#     display_name: cirlab (.venv)
#     language: python
#     name: cirlab
# ---

# %% [markdown]
# # cirlab quickstart: composed image retrieval and expert routing in a few minutes on a CPU
#
# **Composed image retrieval (CIR)** searches a gallery with a *composed* query: a reference image plus a
# text that says how the wanted image differs ("make the red circle blue", "remove the triangle"). Neither
# half is enough alone: the image says what to keep, the text says what to change. A CIR model embeds the
# query (image + text) and every gallery image in one space and ranks the gallery by similarity; it is scored
# by **Recall@K**, the share of queries whose target is among the first K results.
#
# **Routing.** AMC (Zhu et al., TOMM 2023) fuses image and text with three *experts*: NIN, a plain
# non-linear fusion; CRN, a cross-modal relation (attention) block; GTN, a text-conditioned feature
# modulation. A small *router* looks at each query and gives every expert a gate in [0, 1]; two such layers
# are stacked. Different modifications ("change the colour" vs "add an object") can thus take different
# paths through the network, and cirlab lets you watch that.
#
# This notebook: generate the synthetic data, train a small AMC for a few minutes, look at what it
# retrieves, its metrics, and the gates its router chose. Open it first: it needs nothing but `make setup`
# (or `pip install 'cirlab[notebooks,lite]'`), whatever folder the kernel starts in, and writes `runs/quickstart/` in
# the checkout (outside one, in the notebook's folder).

# %%
# %matplotlib inline
import cirlab
from cirlab import analysis, metrics, viz, workbench

# %% tags=["parameters"]
data_root: str = ""  # the data ("": $CIRLAB_DATA, else the synthetic data in the cache, generated if missing)
output_dir: str = ""  # the run folder, metrics.json, config.json, figures/ ("": runs/quickstart, checkout or here)
preset: str = "tiny"  # AMC preset: tiny (a few minutes on CPU) | lite (real pretrained features, slower)
epochs: int = 2  # passes over the training data (75 optimizer steps each on the synthetic set, batch 32)
max_steps: int = 0  # stop after this many optimizer steps (0: no cap)
batch_size: int = 32  # training batch size
n_show: int = 4  # queries shown in the galleries and gate plots
device: str = "cpu"  # cpu | cuda
seed: int = 0  # seeds data generation, initialisation and data order
short_recipe: bool = True  # tiny preset: its short CPU recipe (workbench.CPU_RECIPES) first; False: the paper's
settings: list = []  # more run-config overrides, as cirlab train --set takes them (after the recipe: they win)

# %% [markdown]
# ## 1. The data
# Synthetic scenes of coloured shapes, written in the Fashion-IQ layout (three categories). Each query has
# a reference scene, a modification text and the one target scene it describes.

# %%
data_dir = str(workbench.find_data("fashioniq", data_root, seed=seed))
out_dir = str(workbench.output_folder(output_dir, "quickstart"))
print(workbench.describe_paths(data=data_dir, output=out_dir))
val = workbench.cir_splits("fashioniq", data_dir, "val")
print({cat: len(split) for cat, split in val.items()}, "validation queries")
example = next(iter(val.values())).triplets[0]
print("reference:", example.ref_name, "| text:", viz.plain_text(example.text), "| target:", example.target_name)

# %% [markdown]
# ## 2. Train a small AMC
# One training loop serves every cirlab model. The loss pulls each query towards its own target and away
# from the other targets in the batch. A progress bar shows the steps, the loss and the time left.

# %%
recipe = workbench.cpu_recipe("amc", preset) if short_recipe else []  # the paper's lr/EMA need far longer runs
print("short CPU recipe:", recipe or "none (the preset's own, the paper's recipe)")
run = workbench.train_run("amc", preset, "fashioniq", data_dir, f"{out_dir}/run", max_steps=max_steps,
                          epochs=epochs, batch_size=batch_size, device=device, seed=seed, settings=recipe + settings)
fig = viz.plot_training_curves(f"{out_dir}/run")
viz.save_figure(fig, f"{out_dir}/figures", "training_curves")
fig

# %% [markdown]
# ## 3. What does it retrieve?
# Each row: the reference image, the text, then the five best gallery images. The target has a green frame and
# the mark "✓ target"; when it ranked below five, it is drawn last with a dashed green frame and its rank.

# %%
model = workbench.load_run(f"{out_dir}/run", device=device)
val_metrics, topks = workbench.evaluate_run(model, "fashioniq", data_dir, "val", k=50, device=device)
category, split = next(iter(val.items()))
fig = viz.plot_retrieval_gallery(workbench.gallery_rows(topks[category], split, n=n_show, k=5),
                                 title=f"AMC ({preset}) on synthetic {category}")
viz.save_figure(fig, f"{out_dir}/figures", "gallery")
fig

# %% [markdown]
# ## 4. How good is it?
# Fashion-IQ reports Recall@10 and Recall@50 per category and their average. Compare with an untrained copy
# of the same network to see what training bought.

# %%
untrained, _ = workbench.evaluate_run(workbench.untrained_copy(f"{out_dir}/run", "fashioniq", data_dir),
                                      "fashioniq", data_dir, "val", k=50, device=device)
table = analysis.compare_runs({"trained": val_metrics, "untrained": untrained})
fig = viz.plot_metrics_bars(table.loc[[m for m in table.index if metrics.is_recall_key(m)]], title="Recall (%)")
viz.save_figure(fig, f"{out_dir}/figures", "metrics")
fig

# %% [markdown]
# ## 5. Which experts did the router choose?
# The gates of a few queries in both routing layers. The router_explorer notebook goes much further
# (heatmaps, distributions per modification type, entropy, an interactive widget).

# %%
routes, texts = workbench.collect_routes(model, "fashioniq", data_dir, "val", n=30, device=device)
shown = list(dict.fromkeys(routes["query_id"]))[:n_show]
for qid in shown:
    print(qid, "|", texts[qid])
fig = viz.plot_query_gates(routes, shown)
viz.save_figure(fig, f"{out_dir}/figures", "query_gates")
fig

# %%
config = {"data_root": data_dir, "output_dir": out_dir, "preset": preset, "epochs": epochs, "max_steps": max_steps,
          "batch_size": batch_size, "n_show": n_show, "device": device, "seed": seed, "short_recipe": short_recipe,
          "settings": recipe + settings}
written = workbench.write_outputs(out_dir, {"trained": val_metrics, "untrained": untrained}, config)
print("wrote metrics.json and config.json to", written)

# %% [markdown]
# ## 6. Coming from LAVIS?
# LAVIS checkpoints convert into cirlab without LAVIS: `cirlab convert --from lavis SRC OUT` turns a LAVIS BLIP
# retrieval model into the re-ranker's stage I (here with BLIP's ITM head) and a LAVIS BLIP-2 Q-Former into CaLa
# (`--model cala`), and `init_from: lavis:PATH` starts a run from one (README, "LAVIS users"). LAVIS itself lives in
# its own environment (`make lavis`: it pins an old transformers). This cell converts the tiny LAVIS model committed
# with the tests (a checkout only), loads it as `cirlab eval` would and shows what the converter did. That model
# was made with a 33-word vocabulary, so the converter warns that BERT's tokenizer (30,524 tokens) does not fit its
# embedding: the warning you would get for a real checkpoint trained with another vocabulary (set `vocab_file`).

# %%
import json
from pathlib import Path

from cirlab.cli import main as cirlab_cli
from cirlab.engine.runs import model_from_checkpoint

root = workbench.project_root()
lavis_file = root / "tests" / "fixtures" / "lavis" / "blip_retrieval.state.safetensors" if root else None
if lavis_file is None or not lavis_file.is_file():
    print("the LAVIS test fixture is not here (an installed wheel ships no tests): skipping this cell")
else:
    converted = f"{out_dir}/lavis/blip_stage1.pt"
    # --overwrite: this notebook's own file from an earlier run of the cell (convert refuses to replace one otherwise)
    assert cirlab_cli(["convert", "--from", "lavis", str(lavis_file), converted, "--preset", "tiny", "--itm-head",
                       "--overwrite"]) == 0
    lavis_stage1, lavis_meta = model_from_checkpoint(converted)
    lavis_report = json.loads(Path(f"{converted}.report.json").read_text(encoding="utf-8"))
    print("converted from", lavis_meta["converted_from"], "->", type(lavis_stage1).__name__,
          "| ITM head:", lavis_stage1.itm_head is not None)
    print("ignored:", {group: len(keys) for group, keys in lavis_report["reports"][0]["ignored_groups"].items()})
    print("run-config model_overrides for the same model:", lavis_report["model_overrides"])
    print("warnings:", lavis_report["warnings"])
