"""MiniLM word vectors of the AMC ``lite`` preset (``cirlab.models._lite.minilm_word_vectors``): the word table read
straight from ``model.safetensors`` with the pieces from ``tokenizer.json``, side by side with the whole
``transformers`` model and tokenizer it replaced, for the same words; the vectors must be equal bit for bit.

    .venv/bin/python bench/lite_minilm_vectors.py                                   # prints the table
    .venv/bin/python bench/lite_minilm_vectors.py --report lite_minilm_vectors      # and writes the report

Two rows: a fresh process (what a run pays: one call in ``fit_vocab``, ``transformers``' lazy imports included),
each side in its own subprocess, and warm calls in this process. Pairs are timed interleaved (alternating which runs
first); the table gives medians of the times and of the per-repeat ratios. ``--report NAME`` writes
reports/benchmarks/NAME.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPORT_HELP, machine, paired, positive_int, report_arg, write_report  # noqa: E402

# AMC-like vocabulary: fashion words, multi-piece words ("sleeveless", "v-neck") and unknown ones ("\u2603")
WORDS = ("is more has longer shorter darker lighter red blue black white green floral striped sleeveless collar "
         "buttons pattern print logo graphic lace casual formal fitted loose cotton denim silk a the and with less "
         "brighter pink grey yellow orange dots stripes v-neck crew hood zip <BOS> <EOS> <AND> \u2603").split()

# one call in a fresh process, timed around the call only (the interpreter and torch start outside the timing)
CHILD = """
import json, sys, time
from cirlab.models import _lite
words, side = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if side == "transformers":
    _lite._word_vectors_via_transformers(words, _lite.minilm_dir())
else:
    _lite.minilm_word_vectors(words)
print(time.perf_counter() - t0)
"""


def vocabulary(n: int) -> list[str]:
    """``n`` words: the list above, then made-up ones (several pieces each), as a fitted vocabulary has."""
    return [WORDS[i] if i < len(WORDS) else f"w{i}" for i in range(n)]


def fresh_call(words: list[str], side: str) -> float:
    """Seconds of one call in a new process (``side``: ``transformers`` or ``direct``)."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(words), side], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| | transformers model (s) | direct read (s) | transformers / direct (median of ratios) "
             "| per-repeat ratios |", "| --- | ---: | ---: | ---: | --- |"]
    for name, res in rows:
        ratios = ", ".join(f"{r:.1f}" for r in res["ratios"])
        lines.append(f"| {name} | {res['anchor']:.3f} | {res['candidate']:.3f} | **{res['ratio']:.1f}x** | {ratios} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=positive_int, default=80, help="vocabulary size (default 80)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats per row (default 3)")
    parser.add_argument("--report", type=report_arg, default="",
                        help=f"also write the table to this Markdown report: {REPORT_HELP}; '' (default) = print only")
    args = parser.parse_args(argv)
    import torch  # after parsing: a bad argument is rejected before torch's import time

    from cirlab.models import _lite

    print(machine(), flush=True)
    words = vocabulary(args.words)
    directory = _lite.minilm_dir()
    fresh = paired(lambda: fresh_call(words, "transformers"), lambda: fresh_call(words, "direct"), args.repeats,
                   self_timed=True)
    warm = paired(lambda: _lite._word_vectors_via_transformers(words, directory),
                  lambda: _lite.minilm_word_vectors(words), args.repeats)
    equal = torch.equal(warm["anchor_out"], warm["candidate_out"])
    text = table([("fresh process (one call, as in a run)", fresh), ("warm (same process)", warm)])
    summary = (f"{len(words)} words, {warm['candidate_out'].shape[1]}-d; vectors equal bit for bit: "
               f"{'yes' if equal else 'NO'}; fresh-process medians over {args.repeats} repeats: "
               f"{fresh['anchor']:.2f} s -> {fresh['candidate']:.2f} s.")
    print(text + "\n\n" + summary)
    if args.report:
        body = (f"{text}\n\n{summary}\n\nBoth sides give `minilm_word_vectors` (the mean of a word's WordPiece "
                "input embeddings): the transformers side builds `AutoModel` + `AutoTokenizer` from the package's "
                "folder to read one table; the direct side reads `embeddings.word_embeddings.weight` from "
                "`model.safetensors` (`safetensors.safe_open`) and tokenises with `tokenizers` from "
                "`tokenizer.json` (padding and truncation off, as transformers calls it). The fresh-process row "
                "times the call only, in a new Python process per side and repeat.\n")
        print("wrote", write_report(args.report, "MiniLM word vectors: direct read vs the transformers model", body))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
