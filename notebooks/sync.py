"""Keep the notebooks and their jupytext ``py:percent`` twins in sync (the ``.py`` files are the source).

    python notebooks/sync.py           # write every <name>.ipynb from <name>.py (no outputs, kernel "cirlab")
    python notebooks/sync.py --check   # exit 1 if an .ipynb differs from what its .py would generate
    python notebooks/sync.py --to-py   # the other way: regenerate the .py twins from edited .ipynb files

Generated notebooks carry no outputs and no execution counts, keep the ``parameters`` cell tag, and name the
``cirlab`` kernel that ``make setup`` installs (``cirlab report`` falls back to ``python3`` if it is absent).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("quickstart", "train", "evaluate", "router_explorer", "rank_shift")
KERNELSPEC = {"name": "cirlab", "display_name": "cirlab (.venv)", "language": "python"}


def notebook_from_py(py: Path) -> nbformat.NotebookNode:
    nb = jupytext.read(py, fmt="py:percent")
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"},
                   "jupytext": {"formats": "ipynb,py:percent"}}
    for i, cell in enumerate(nb.cells):
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        cell.id = f"cell-{i}"  # stable ids: regenerating gives byte-identical files
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is out of sync")
    parser.add_argument("--to-py", action="store_true", help="write the .py twins from the .ipynb files")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        py, ipynb = HERE / f"{name}.py", HERE / f"{name}.ipynb"
        if args.to_py:
            jupytext.write(jupytext.read(ipynb), py, fmt="py:percent")
            continue
        text = render(notebook_from_py(py))
        if args.check:
            if not ipynb.is_file() or ipynb.read_text() != text:
                stale.append(name)
        else:
            ipynb.write_text(text)
    if stale:
        print(f"out of sync with their .py twins: {', '.join(stale)} (run python notebooks/sync.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
