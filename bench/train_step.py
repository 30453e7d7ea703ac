"""Training-step speed and peak memory of any registered model at a given preset, batch size and precision.

Runs the real trainer (:func:`cirlab.fit`: autocast, GradScaler, clipping, EMA, the model's own paper optimiser)
for ``--warmup + --steps`` optimizer steps on random inputs of the preset's exact shapes, and times the last
``--steps`` through the trainer's per-step callback. Peak memory is the CUDA allocator's peak over the timed
steps (``torch.cuda.max_memory_allocated``), or the process's peak resident set size on CPU.

Inputs per model family (random, fixed shapes; the content does not change the cost):

* ``amc``: reference and target images ``[3, image_size, image_size]``, Fashion-IQ-like two-caption texts;
  the vocabulary is fitted on those texts first (about 3,000 words, like Fashion-IQ's).
* ``dime`` / ``hrem``: 36 x ``img_dim`` region features and 10-20 word captions. Paper presets name
  ``bert-base-uncased``, which needs the model hub; ``--bert-base-random`` (default for them here) builds a random BERT
  of the same size (frozen in DIME either way, so the cost is the same) with the real bert-base-uncased vocabulary.
* ``cala``: reference / target images at the preset's size and 8-16 word captions; the frozen image tower is
  random (``pretrained_vision=False``), of the preset's shape.
* ``blip_rerank_stage1`` / ``stage2``: 384 px images for stage I; stage II trains on cached frozen-ViT tokens
  ``[577, 768]`` as cirlab's default does (``--images`` feeds images through the frozen ViT instead).

Examples::

    .venv/bin/python bench/train_step.py --model amc --preset tiny --batch-size 32        # CPU, seconds
    .venv/bin/python bench/train_step.py --model amc --preset fashioniq --batch-size 32 --device cuda \\
        --precision bf16 --report reports/benchmarks/train_step_gpu.md

``--report FILE`` appends one table row (numbers) to FILE, and the command and machine to FILE with the suffix
``.commands.txt``, so several models can share it; a bare name is ``reports/benchmarks/NAME.md``, as ``--report``
reads in every bench script. Without ``--report`` the row is only printed.
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:  # annotations only: torch is imported after the arguments are parsed
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPORT_HELP, command_line, machine, nonneg_int, positive_int, report_arg,  # noqa: E402
                     report_path, torch_device)

WORDS = ("is more has longer shorter darker lighter red blue black white green floral striped sleeveless "
         "collar buttons pattern print logo graphic lace casual formal fitted loose cotton denim silk "
         "a the and with less brighter pink grey yellow orange dots stripes v-neck crew hood zip").split()

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def _caption(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


class RandomItems:
    """``n`` items of fixed tensor shapes; tensors are drawn per item from a seeded generator. A plain map-style
    dataset (``__len__``, ``__getitem__``: all the DataLoader reads), so that the module does not import torch: the
    script parses its arguments first (a bad one is rejected in 0.1 s, not after torch's 1.5 s)."""

    def __init__(self, n: int, make: Any) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        return self.make(i, torch.Generator().manual_seed(i), random.Random(i))


def build(args: argparse.Namespace) -> tuple[Any, RandomItems]:
    """The model (from the registry, preset + overrides) and a random dataset of its training items."""
    import torch

    import cirlab

    from cirlab.engine.runs import parse_set_flat

    overrides: dict[str, Any] = parse_set_flat(args.set)
    family = args.model.split("_")[0]
    if family == "amc":
        overrides.setdefault("pretrained", False)  # timing only: no weight files needed
        model = cirlab.create_model(args.model, args.preset, **overrides)
        size = model.config.image_size
        texts = [f"<BOS> {_caption(random.Random(i), 4, 9)} <AND> {_caption(random.Random(-i), 4, 9)} <EOS>"
                 for i in range(64)]
        model.fit_vocab(texts + [f"w{i}" for i in range(3000)])  # Fashion-IQ-sized table
        make = (lambda i, g, r: {"ref_image": torch.randn(3, size, size, generator=g), "text": texts[i % 64],
                                 "target_image": torch.randn(3, size, size, generator=g)})
    elif family in ("dime", "hrem"):
        if args.bert_base_random or (args.preset in {"f30k_i2t", "f30k_t2i", "coco_i2t", "coco_t2i", "f30k", "coco"}
                                     and "bert" not in overrides):
            from cirlab.models._lite import bert_vocab_path

            overrides.update(bert="random", bert_config=BERT_BASE, vocab_file=str(bert_vocab_path()))
        model = cirlab.create_model(args.model, args.preset, **overrides)
        dim = model.config.img_dim
        make = (lambda i, g, r: {"image_feats": torch.rand(36, dim, generator=g), "text": _caption(r, 10, 20),
                                 "image_idx": i})
    elif family == "cala":
        # timing only: a random tower of the paper's ViT-L/14 shape (no weight file), three Q-Formers
        overrides.setdefault("pretrained_vision", False)
        model = cirlab.create_model(args.model, args.preset, **overrides)
        s = model.config.image_size
        make = (lambda i, g, r: {"ref_image": torch.randn(3, s, s, generator=g), "text": _caption(r, 8, 16),
                                 "target_image": torch.randn(3, s, s, generator=g)})
    elif family == "blip":
        model = cirlab.create_model(args.model, args.preset, **overrides)
        cfg = model.config
        if args.model.endswith("stage2") and not args.images:
            shape = (cfg.num_image_tokens, cfg.vision_width)
            make = (lambda i, g, r: {"ref_tokens": torch.randn(*shape, generator=g), "text": _caption(r, 8, 16),
                                     "target_tokens": torch.randn(*shape, generator=g)})
        else:
            s = cfg.image_size
            make = (lambda i, g, r: {"ref_image": torch.randn(3, s, s, generator=g), "text": _caption(r, 8, 16),
                                     "target_image": torch.randn(3, s, s, generator=g)})
    else:
        raise SystemExit(f"train_step: no input recipe for model family {family!r} ({args.model})")
    steps = args.warmup + args.steps
    return model, RandomItems(steps * args.batch_size, make)


def _peak_memory(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocator peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model, --preset and --set name a model config, and the model-specific flags fit --model: a usage error
    before the model is built (an unknown preset or field was a traceback; --images on another model was ignored)."""
    from cirlab.core.config import did_you_mean
    from cirlab.core.errors import ConfigError
    from cirlab.engine.runs import parse_set_flat
    from cirlab.models.registry import build_config, list_models, list_presets

    models = list_models()
    if args.model not in models:
        parser.error(f"--model {args.model!r}: not a registered model{did_you_mean(args.model, models)}; "
                     f"known: {', '.join(models)}")
    presets = list_presets(args.model)
    if args.preset not in presets:
        parser.error(f"--preset {args.preset!r}: not a preset of {args.model}{did_you_mean(args.preset, presets)}; "
                     f"known: {', '.join(presets)}")
    try:
        build_config(args.model, args.preset, **parse_set_flat(args.set))
    except ConfigError as err:  # the message names --set itself when the entry is malformed
        parser.error(f"--set: {err}" if args.set and not str(err).startswith("--set") else str(err))
    if args.images and args.model != "blip_rerank_stage2":
        parser.error(f"--images feeds images to blip_rerank_stage2; --model {args.model} does not use it")
    if args.bert_base_random and args.model not in ("dime", "hrem"):
        parser.error(f"--bert-base-random builds DIME's / HREM's text encoder; --model {args.model} has none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="registered name (cirlab models)")
    parser.add_argument("--preset", default="tiny", help="a preset of --model (cirlab models; default tiny)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="training batch (default 32)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="trainer precision (auto: bf16 autocast on a CUDA card with bf16 in "
                             "hardware, fp32 elsewhere)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device (default cpu)")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=nonneg_int, default=2,
                        help="untimed steps first (allocator, kernels; default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override (YAML value), repeatable")
    parser.add_argument("--bert-base-random", action="store_true",
                        help="DIME / HREM: random BERT-base of the paper's size (default for the paper presets)")
    parser.add_argument("--images", action="store_true",
                        help="blip_rerank_stage2: feed images, not cached ViT tokens")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--report", type=report_arg, default="",
                        help=f"append a row to this Markdown file (and the command to FILE.commands.txt): "
                             f"{REPORT_HELP}; '' (default) = print only")
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    import torch  # after parsing: a bad argument is rejected before torch's import time

    if args.threads:
        torch.set_num_threads(args.threads)

    import cirlab
    from cirlab.engine.train import resolve_train_config

    device = torch.device(args.device)
    model, data = build(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stamps: list[float] = []

    def on_step(record: dict[str, Any]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if record["step"] == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stamps.append(time.perf_counter())

    cfg = resolve_train_config(model, {
        "batch_size": args.batch_size, "epochs": 1, "max_steps": args.warmup + args.steps, "device": args.device,
        "precision": args.precision, "eval_every": 0, "eval_every_steps": 0, "checkpoint_every": 0,
        "log_every": 1, "num_workers": 0, "shuffle": False, "tensorboard": False})
    with tempfile.TemporaryDirectory() as out:
        cirlab.fit(model, data, cfg, output_dir=out, callbacks=[on_step])
    timed = stamps[args.warmup:] if args.warmup else stamps
    start = stamps[args.warmup - 1] if args.warmup else timed[0]
    n = len(timed) - (0 if args.warmup else 1)
    per_step = (timed[-1] - start) / max(n, 1)
    peak = _peak_memory(device)
    from cirlab.core._search import cuda_native_bf16

    dtype = {"auto": "bf16" if cuda_native_bf16(device) else "fp32"}.get(args.precision, args.precision)
    line = (f"| {args.model} | {args.preset} | {args.batch_size} | {dtype} | {device.type} | {trainable / 1e6:.2f}M | "
            f"{per_step:.3f} | {args.batch_size / per_step:.1f} | {peak} |")
    print(f"{args.model}/{args.preset} batch {args.batch_size} {dtype} on {device}: {per_step:.3f} s/step, "
          f"{args.batch_size / per_step:.1f} samples/s, peak {peak}, trainable {trainable:,} parameters")
    if args.report:
        path = report_path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("# Training-step speed and peak memory (bench/train_step.py)\n\n"
                            "Each row: the mean of the timed optimizer steps of `cirlab.fit` (forward, backward, "
                            "optimiser, EMA) on random inputs of the preset's shapes, after the warm-up steps.\n\n"
                            "| model | preset | batch | precision | device | trainable | s/step | samples/s | peak "
                            "memory |\n|---|---|---|---|---|---|---|---|---|\n")
        with path.open("a") as fh:
            fh.write(line + "\n")
        notes = path.with_suffix(".commands.txt")
        with notes.open("a") as fh:
            fh.write(f"{command_line()}\n    machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M')}\n")
        print(f"appended to {path} (commands in {notes})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
