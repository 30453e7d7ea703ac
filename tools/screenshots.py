"""Screenshots for the README: the report index and the router explorer live in JupyterLab (headless Chromium).

Run after `make demo`, from the checkout's root::

    .venv/bin/python tools/screenshots.py            # writes docs/images/report_index.png, router_explorer.png

The explorer is driven exactly as tests/test_browser.py drives it (JupyterLab on a free port, the notebook as it
is, Run All), on the runs `make demo` wrote; then a query is picked and its text edited, so the picture shows the
edited gates beside the traced ones and beside the untrained copy's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lab_browser import (WIDGET, JupyterLab, chromium, chromium_path, explorer_image, run_explorer,  # noqa: E402
                         wait_for_new_image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNG files")
    parser.add_argument("--reports", default=str(ROOT / "reports"), help="the report `make demo` wrote")
    parser.add_argument("--query", type=int, default=3, help="index of the query picked in the explorer")
    args = parser.parse_args(argv)
    executable = chromium_path()
    if executable is None:
        sys.exit("no Chromium: `make browser` installs Debian's chromium")
    index = Path(args.reports) / "index.html"
    if not index.is_file():
        sys.exit(f"no report at {index}: run `make demo` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with chromium(executable, width=1400, height=1000) as page:
        page.goto(index.resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(out / "report_index.png"))
        print("wrote", out / "report_index.png")
    with JupyterLab(ROOT) as lab, chromium(executable, width=1500, height=1100) as page:
        run_explorer(page, lab)
        before = explorer_image(page)
        page.select_option(f"{WIDGET} .widget-dropdown select", index=args.query)
        before = wait_for_new_image(page, before)
        box = page.locator(f"{WIDGET} .widget-text input")
        box.fill(box.input_value().replace(" and ", " and then ", 1) + " and make everything much larger")
        box.press("Enter")
        wait_for_new_image(page, before)
        page.locator(WIDGET).scroll_into_view_if_needed()
        page.locator(WIDGET).screenshot(path=str(out / "router_explorer.png"))
        print("wrote", out / "router_explorer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
