"""CaLa: how large are the TAC / HCA outputs and their logits, at initialisation and after training (CPU)?

The released loss (Jiang et al., SIGIR 2024; github.com/Chiangsonw/CaLa, src/blip_fine_tune.py after commit 213ef3c)
mixes CTR into the query-target logits, ``0.45 * 10 * text_feats @ gap.T + 0.55 * QTM``. TAC
(src/twin_attention_compositor_blip2.py) has no residual or normalisation and feeds each attention its own output
four times, so the size of ``gap`` decides whether CTR moves the logits at all. This prints, for each run folder and
for an untrained model of the same config (same seed), on the first ``--batch`` training triplets in eval mode:

* the mean L2 norm of ``text_feats`` (F_c[:, 0]), ``reference_feats`` (F_r[:, 0]), the target's first query token and
  TAC's output ``visual_gap_feats``;
* for each logit matrix (``qtm``, ``ctr``, ``tbia``): its standard deviation, its cross-entropy against the
  diagonal (chance = ln B) and its top-1 accuracy.

Usage (run folders of ``bench/cala_synthetic.py``; they keep ``checkpoints/last.pt``)::

    .venv/bin/python bench/cala_diagnose.py /tmp/exp/cos_emoji_s2/runs/cala --report cala_diagnose

Prints one table per run; ``--report NAME`` also writes them to ``reports/benchmarks/NAME.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPORT_HELP, diagnosis_report, positive_int, report_arg, run_folder  # noqa: E402

TITLE = "CaLa: size of the TAC / HCA outputs and of their logits"


def first_batch(config: dict[str, Any], model: Any, size: int) -> dict[str, Any]:
    """The run's first ``size`` training triplets (file order, no augmentation beyond the training transform)."""
    from torch.utils.data import default_collate

    from cirlab.engine.runs import train_dataset

    data = train_dataset(config, model)
    if len(data) < size:
        raise SystemExit(f"cala_diagnose: the training split has {len(data)} triplets, fewer than --batch {size}")
    return default_collate([data[i] for i in range(size)])


def measure(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """Norms of the four vectors and the size / cross-entropy / top-1 of each logit matrix (eval mode)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():  # a decorator would need torch when the module loads; it loads before parsing
        model.eval()
        feats = model.features(batch["ref_image"], list(batch["text"]), batch["target_image"])
        gap = model.tac(feats["F_r_visual"], feats["F_t"])
        vectors = {"text_feats": feats["F_c"][:, 0], "reference_feats": feats["F_r"][:, 0],
                   "target_feats": feats["F_t"][:, 0], "tac_gap": gap}
        out = {f"norm {k}": float(v.float().norm(dim=-1).mean()) for k, v in vectors.items()}
        logits = model.logits(feats, trace={})  # a trace asks for every head, whatever the loss weights
        labels = torch.arange(len(batch["text"]))
        for key, value in logits.items():
            value = value.float()
            out[f"{key} sd"] = float(value.std())
            out[f"{key} CE"] = float(F.cross_entropy(value, labels))
            out[f"{key} top-1"] = float((value.argmax(1) == labels).float().mean())
        return out


def diagnose(run: Path, checkpoint: str, size: int) -> dict[str, dict[str, float]]:
    from cirlab.engine.runs import build_seeded_model, fit_to_training_data
    from cirlab.workbench.recipes import load_run, stored_config

    config = stored_config(run)
    if config.get("model") != "cala":
        raise SystemExit(f"cala_diagnose: {run / 'config.yaml'} is not a CaLa run (model: {config.get('model')!r})")
    untrained = build_seeded_model(config)
    fit_to_training_data(untrained, config)
    batch = first_batch(config, untrained, size)
    trained = load_run(run, checkpoint=checkpoint)
    return {"untrained": measure(untrained, batch), f"trained ({checkpoint}.pt)": measure(trained, batch)}


def intro(args: argparse.Namespace) -> str:
    return (f"First {args.batch} training triplets of each run, eval mode; chance cross-entropy ln {args.batch} = "
            f"{math.log(args.batch):.2f}. `ctr` = 10 · text_feats @ tac_gap.T, `tbia` = 10 · "
            "HCA(F_r, F_c, F_t)[:, 0] @ reference_feats.T, `qtm` = the query-target logits at scale 100 (the "
            "released code).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=run_folder, help="CaLa run folders (config.yaml + checkpoints/)")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"])
    p.add_argument("--batch", type=positive_int, default=32, help="training triplets measured (the bench's batch size)")
    p.add_argument("--report", type=report_arg, default="",
                   help=f"also write the tables to this Markdown report: {REPORT_HELP}; '' (default) = print only")
    args = p.parse_args(argv)
    import torch  # after parsing: a bad argument is rejected before torch's import time

    torch.manual_seed(0)
    results = {run: diagnose(Path(run), args.checkpoint, args.batch) for run in args.runs}
    diagnosis_report(results, intro(args), args.report, TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
