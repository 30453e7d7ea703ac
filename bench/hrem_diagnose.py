"""HREM: where does the training update point, and how much of it is the base loss (CPU)?

HREM (Fu et al., CVPR 2023; github.com/CrossmodalGroup/HREM, lib/vse.py + graph_lib.py) adds to the base triplet
loss ``trip(v, t)`` the relation terms ``trip(v, t_hat) + trip(v_hat, t)`` (cross), ``trip(v_hat, t_hat)``
(enhanced) and ``10 * KL`` (reg), all summed, and clips the global gradient norm at 2. When the summed gradient is
far above the clip, every step has the same length and only its direction matters, so the relation terms take a share
of the step away from the base loss, the only term that trains the embeddings used at test time. This measures, on
``--batches`` training batches of each run (train mode, relation module on), for the encoders' parameters:

* the gradient norm of each term and of their sum, and the share of the clipped step along the base gradient;
* the cosine between the base gradient and the relation terms' gradient (cross + enhanced + reg).

Usage (run folders of ``bench/hrem_synthetic.py``; they keep ``checkpoints/``)::

    PYTHONPATH=. .venv/bin/python bench/hrem_diagnose.py /tmp/hrem_def/tiny_hrem_s0 --report hrem_diagnose

Prints one table per run; ``--report NAME`` also writes them to ``reports/benchmarks/NAME.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPORT_HELP, diagnosis_report, positive_int, report_arg, run_folder  # noqa: E402

TITLE = "HREM: gradient of each loss term, untrained and trained"
TERMS = ("base_loss", "cross_loss", "enhanced_loss", "reg_loss")


def encoder_parameters(model: Any) -> list[torch.Tensor]:
    """The parameters inference uses (image and text encoders); the relation module is training-only."""
    return [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("relation.")]


def term_gradients(model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Each loss term's gradient over the encoder parameters, flattened (zeros where a term does not reach)."""
    import torch

    params = encoder_parameters(model)
    terms = model.training_step(batch)
    out = {}
    for name in TERMS:
        grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return out


def measure(model: Any, batches: list[dict[str, Any]], clip: float) -> dict[str, float]:
    """Means over the batches: norms, the base share of the (clipped) step, cos(base, relation terms)."""
    import torch

    model.train()
    model.iteration.fill_(max(int(model.iteration), int(model.config.warmup_iters)))  # relation module on
    rows = []
    for batch in batches:
        g = term_gradients(model, batch)
        relation = g["cross_loss"] + g["enhanced_loss"] + g["reg_loss"]
        total = g["base_loss"] + relation
        base_dir = g["base_loss"] / g["base_loss"].norm().clamp_min(1e-12)
        step = total * min(1.0, clip / float(total.norm().clamp_min(1e-12)))  # what clip_grad_norm_ leaves
        row = {f"grad norm {k}": float(v.norm()) for k, v in g.items()}
        row.update({"grad norm total": float(total.norm()),
                    "cos(base, relation terms)": float(torch.nn.functional.cosine_similarity(g["base_loss"],
                                                                                             relation, dim=0)),
                    "clipped step along base": float(step @ base_dir),
                    "base-only clipped step": min(clip, float(g["base_loss"].norm()))})
        rows.append(row)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def training_batches(config: dict[str, Any], model: Any, count: int) -> list[dict[str, Any]]:
    import torch

    from cirlab.engine.runs import train_dataset

    data = train_dataset(config, model)
    size = int(config["train"]["batch_size"])
    loader = torch.utils.data.DataLoader(data, batch_size=size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def diagnose(run: Path, checkpoint: str, count: int) -> dict[str, dict[str, float]]:
    import torch

    from cirlab.engine.runs import build_seeded_model, fit_to_training_data
    from cirlab.workbench.recipes import load_run, stored_config

    config = stored_config(run)
    if config.get("model") != "hrem":
        raise SystemExit(f"hrem_diagnose: {run / 'config.yaml'} is not an HREM run (model: {config.get('model')!r})")
    clip = float(config["train"].get("grad_clip") or float("inf"))
    untrained = build_seeded_model(config)
    if untrained.relation is None:
        raise SystemExit(f"hrem_diagnose: {run} was trained without the instance module: no relation terms to measure")
    fit_to_training_data(untrained, config)
    batches = training_batches(config, untrained, count)
    out = {}
    trained = load_run(run, checkpoint=checkpoint)
    for state, model in (("untrained", untrained), (f"trained ({checkpoint}.pt)", trained)):
        torch.manual_seed(0)  # the same triplet negatives and augmentations for both
        out[state] = measure(model, batches, clip)
    return out


def intro(args: argparse.Namespace) -> str:
    return (f"Means over {args.batches} training batches (train mode: dropout, region drop and text augmentation "
            "on, as in training; the relation module on), gradients over the image and text encoders only (what "
            "inference uses). `clipped step along base` = the component along the base gradient of the summed "
            "gradient after clipping at the run's `grad_clip`; `base-only clipped step` = the same step without the "
            "relation terms.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=run_folder, help="HREM run folders (config.yaml + checkpoints/)")
    p.add_argument("--checkpoint", default="best", choices=["last", "best"])
    p.add_argument("--batches", type=positive_int, default=8, help="training batches averaged over")
    p.add_argument("--report", type=report_arg, default="",
                   help=f"also write the tables to this Markdown report: {REPORT_HELP}; '' (default) = print only")
    args = p.parse_args(argv)
    results = {run: diagnose(Path(run), args.checkpoint, args.batches) for run in args.runs}
    diagnosis_report(results, intro(args), args.report, TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
