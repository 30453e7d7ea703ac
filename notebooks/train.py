# ---
# jupyter:
#   kernelspec:
#     display_name: cirlab (.venv)
#     language: python
#     name: cirlab
# ---

# %% [markdown]
# # Train a model
#
# Trains any registered model (`cirlab.list_models()`) with any preset and writes the run folder:
# `config.yaml`, `checkpoints/{last,best}.pt`, `log.jsonl`, `tb/`, `metrics.json`, `topk/` (CIR), plus this
# notebook's `config.json` and `figures/`. CIR models (AMC) train on a dataset in the Fashion-IQ, Shoes or CIRR
# layout; image-text matching models (DIME) on precomp region features (`dataset="f30k"` or `"coco"`: a
# `f30k_precomp/` folder in `data_root`, or in its `precomp/` as the synthetic data has it). The synthetic data
# holds both. Re-running with `resume="auto"` continues an
# interrupted run exactly (papermill itself cannot resume a notebook). A re-run replaces the run this notebook
# finished in `output_dir`; any other run there (from `cirlab train`, or interrupted) is refused unless
# `overwrite=True` or `resume="auto"`.
#
# With its defaults this notebook reads the synthetic data `make demo` (`cirlab report`) generated and writes
# `runs/train/` in the checkout when the kernel runs inside it (from `notebooks/` or the repository root), else in
# the kernel's current folder. A progress bar (steps, loss, ETA) follows the training.
#
# Tracking keys (TensorBoard needs none; Comet/W&B) are read from environment variables only, never from
# parameters: papermill writes every parameter into the executed notebook.

# %%
# %matplotlib inline
import cirlab
from cirlab import analysis, metrics, viz, workbench

# %% tags=["parameters"]
model: str = "amc"  # any name from cirlab.list_models(): amc (CIR) | dime (ITM) | ...
preset: str = "tiny"  # tiny (seconds) | lite (real pretrained weights, minutes) | a paper preset
dataset: str = "fashioniq"  # fashioniq | shoes | cirr (CIR) | f30k | coco (ITM precomp, under data_root/precomp)
data_root: str = ""  # folder holding the dataset ("": $CIRLAB_DATA, else the synthetic data make demo generated)
output_dir: str = ""  # the run folder ("": $CIRLAB_RUNS/train, else runs/train in the checkout or here)
epochs: int = 1  # passes over the training data
max_steps: int = 200  # stop after this many optimizer steps (0: no cap)
batch_size: int = 32  # global batch size (0: the paper default of the model)
device: str = "cpu"  # cpu | cuda | cuda:N | auto
seed: int = 0  # seeds Python, NumPy, torch and the data order
resume: str = ""  # "" fresh run | "auto" continue from output_dir/checkpoints/last.pt | a checkpoint path
overwrite: bool = False  # replace a run in output_dir this notebook did not finish (a re-run replaces its own)
short_recipe: bool = True  # tiny preset: the model's short CPU recipe (workbench.CPU_RECIPES) first; False: the paper's
settings: list = []  # more run-config overrides, as cirlab train --set takes them (after the recipe: they win)

# %%
data_dir = str(workbench.find_data(dataset, data_root))
run_dir = str(workbench.output_folder(output_dir, "train"))
print(workbench.describe_paths(data=data_dir, run=run_dir))
print("models:", cirlab.list_models(), "| presets of", model, ":", cirlab.list_presets(model))

# %% [markdown]
# ## Training
# One loop for every model (`cirlab.engine.train`); validation recall selects `checkpoints/best.pt`.

# %%
recipe = workbench.cpu_recipe(model, preset) if short_recipe else []  # the papers' recipes need far longer runs
print("short CPU recipe:", recipe or "none (the preset's own, the paper's recipe)")
run = workbench.train_run(model, preset, dataset, data_dir, run_dir, epochs=epochs, max_steps=max_steps,
                          batch_size=batch_size, device=device, seed=seed, resume=resume, overwrite=overwrite,
                          settings=recipe + settings)
chosen = run["selection"]  # which metric on which split picked checkpoints/best.pt
print(f"{run['steps']} steps, {run['epochs']} epochs; best.pt: {chosen['metric']} on {chosen['split']} = "
      f"{run['best_score']} at epoch {run['best_epoch']} (counted from 1)" if chosen["split"] else
      f"{run['steps']} steps, {run['epochs']} epochs; best.pt: the last weights (no selection)")

# %%
fig = viz.plot_training_curves(run_dir)
viz.save_figure(fig, f"{run_dir}/figures", "training_curves")
fig

# %% [markdown]
# ## Validation metrics of the selected checkpoint
# CIR: recall@K per category (Fashion-IQ) or subset recall (CIRR). ITM: image-to-text and text-to-image
# recall@1/5/10 and their sum (rsum) on the precomp `dev` split.

# %%
best = workbench.load_run(run_dir, device=device)
val_metrics, topks = workbench.evaluate_run(best, dataset, data_dir, "val", k=50, device=device,
                                            topk_dir=f"{run_dir}/topk")
recalls = {k: v for k, v in val_metrics.items() if metrics.is_recall_key(k)}
fig = viz.plot_metrics_bars(recalls, title=f"{model} ({preset}) val")
viz.save_figure(fig, f"{run_dir}/figures", "val_metrics")
fig

# %%
config = {"model": model, "preset": preset, "dataset": dataset, "data_root": data_dir, "output_dir": run_dir,
          "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "device": device, "seed": seed,
          "resume": resume, "overwrite": overwrite, "short_recipe": short_recipe, "settings": recipe + settings,
          "model_config": run["run_config"]["model_config"]}
written = workbench.write_outputs(run_dir, {"val": val_metrics, "steps": run["steps"], "epochs": run["epochs"]}, config)
print("wrote metrics.json and config.json to", written)
