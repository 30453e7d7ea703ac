"""Every command in the README runs as written, after `make demo`, from the checkout's root.

The test builds that state in a copy of the checkout (notebooks, configs, pyproject, the .venv linked in) with a
smoke report in place of `make demo`'s (`cirlab report --smoke`, the same entries on tiny data), then runs each
line of every ```bash block and every ```python block there. Commands that cannot run inside a test say why in
:data:`SKIP_COMMANDS` / :data:`SKIP_SECTIONS`; anything else that fails, fails the test with its output.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# command prefix -> why the test does not run it
SKIP_COMMANDS = {
    "make demo": "the state every other command runs in (built here with `cirlab report --smoke`)",
    "make test": "the test runner itself",
    ".venv/bin/jupyter lab": "a server: tests/test_browser.py starts JupyterLab and drives it in Chromium",
    "make lavis": "builds the separate LAVIS environment (.venv-lavis, 6.8 GB, downloads); its fixtures are committed",
    "pip install": "installs cirlab from PyPI: tests/test_wheel.py builds the wheel and installs it in a clean venv",
    "cirlab report --smoke --out my-report": "every notebook again (minutes): tests/test_wheel.py runs the smoke "
                                             "report from an installed wheel",
}
# README section -> why its blocks are not run
SKIP_SECTIONS = {
    "Two-stage re-ranking from the command line": "needs the real CIRR / Fashion-IQ data under /data and BLIP's "
                                                  "model_base.pth, which no test machine has",
    "CaLa and HREM on the papers' data": "needs CIRR and Flickr30K under /data, LAVIS's BLIP-2 weights and the "
                                         "released checkpoints, which no test machine has (tests/test_cala.py, "
                                         "test_hrem.py and test_dime.py run the same commands on small files)",
}


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """``(section, language, code)`` of every fenced block."""
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w+)\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1):
            section = match.group(1).strip()
        else:
            blocks.append((section, match.group(2), match.group(3)))
    return blocks


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_blocks_are_found_and_skips_are_explained():
    blocks = readme_blocks(README.read_text())
    bash = [c for s, lang, code in blocks if lang == "bash" and s not in SKIP_SECTIONS for c in commands(code)]
    assert any(c.startswith("cirlab train") for c in bash) and any("papermill" in c for c in bash)
    assert any(lang == "python" for _, lang, _ in blocks)
    assert set(SKIP_SECTIONS) <= {s for s, _, _ in blocks}, "a skipped section no longer exists"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A checkout after `make demo`: the repository's notebooks, configs and pyproject, its .venv, and a report."""
    project = tmp_path_factory.mktemp("readme") / "checkout"
    project.mkdir()
    for name in ("notebooks", "configs"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "tests" / "fixtures" / "lavis", project / "tests" / "fixtures" / "lavis")  # LAVIS users
    venv = Path(sys.prefix)
    (project / ".venv").symlink_to(venv, target_is_directory=True)
    env = _env(project)
    result = subprocess.run([str(venv / "bin" / "cirlab"), "report", "--smoke", "--only", "router_explorer"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CIRLAB_DATA", "CIRLAB_RUNS", "CIRLAB_REPORTS")}
    env["PATH"] = f"{project / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_every_readme_command_runs_as_written_after_make_demo(checkout):
    ran, skipped = [], []
    for section, lang, code in readme_blocks(README.read_text()):
        if section in SKIP_SECTIONS:
            skipped.append((section, SKIP_SECTIONS[section]))
            continue
        if lang == "python":
            result = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=_env(checkout),
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"README python block in {section!r} failed:\n{result.stderr[-3000:]}"
            ran.append(f"python block ({section})")
            continue
        if lang != "bash":
            continue
        for command in commands(code):
            reason = next((why for prefix, why in SKIP_COMMANDS.items() if command.startswith(prefix)), None)
            if reason:
                skipped.append((command, reason))
                continue
            result = subprocess.run(["bash", "-c", command], cwd=checkout, env=_env(checkout), capture_output=True,
                                    text=True, timeout=900)
            assert result.returncode == 0, (f"README command failed ({section}): {command}\n"
                                            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
            ran.append(command)
    assert len(ran) >= 8, ran
    # what the commands promise: notebooks write runs/<notebook>/ in the checkout, not next to the kernel
    assert (checkout / "runs" / "router_explorer" / "metrics.json").is_file()
    assert (checkout / "runs" / "train" / "checkpoints").is_dir()
    assert not (checkout / "notebooks" / "runs").exists()
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")


def test_the_tables_options_exist_with_the_defaults_it_states():
    """The README's table of released-code behaviour cirlab changes by default: each `NAME: DEFAULT → RELEASED`
    names a field of the row's model config (or a `train.` field) whose default is DEFAULT and which takes RELEASED."""
    import dataclasses

    from cirlab.engine.train import TrainConfig
    from cirlab.models.registry import get_entry

    text = README.read_text(encoding="utf-8")
    table = text[text.index("Behaviour of the released code that cirlab changes by default"):]
    table = table[:table.index("\n\n", table.index("| model |"))]
    checked = []
    for row in [line for line in table.splitlines() if line.startswith("| `") or line.startswith("| all ")]:
        model = row.split("|")[1].strip().split()[0].strip("`")
        for name, default, released in re.findall(r"`([\w.]+): ([\w.]+) → ([\w.]+)`", row.split("|")[2]):
            if name.startswith("dataset."):
                continue  # a loader option: tests/test_data_loaders.py reads the Shoes pairs both ways
            if name.startswith("train."):
                cls, field = TrainConfig, name.removeprefix("train.")
            else:
                cls, field = get_entry("dime" if model == "all" else model).config_cls, name
            fields = {f.name: f for f in dataclasses.fields(cls)}
            assert field in fields, (row, name)
            shipped = fields[field].default
            scope = re.search(r"\((\w+)\)", row.split("|")[1])  # "(Shoes)": the value its shipped config sets
            if scope and name.startswith("train."):
                config = yaml.safe_load((ROOT / "configs" / f"{model}_{scope.group(1).lower()}.yaml").read_text())
                shipped = config["train"][field]
            assert str(shipped).lower() == default.lower(), (row, name, shipped)
            value = {"true": True, "false": False}.get(released, released)
            given = dict(re.findall(r"`(\w+): (\w+)`", row.split("|")[3]))  # what the row says it goes with
            assert _takes(cls, {**given, field: value}), (row, name)
            checked.append(name)
    assert len(checked) >= 12 and {"train.ema_mode", "frozen_vit_drop_path", "mask_padding"} <= set(checked)


def _takes(cls, fields: dict) -> bool:
    """Whether ``cls`` (a config dataclass) takes ``fields`` on its defaults or on one of its presets (CaLa's CLIP
    options need a CLIP preset)."""
    from cirlab.core.errors import CirlabError

    builds = [lambda: cls(**fields)]
    builds += [lambda p=p: cls.from_preset(p, **fields) for p in getattr(cls, "PRESETS", {})]
    for build in builds:
        try:
            build()
            return True
        except (CirlabError, ValueError, TypeError):
            continue
    return False
