"""Build hook only (the project is declared in pyproject.toml): ship the notebooks and the run configs in the wheel.

``cirlab report`` runs the notebooks and ``cirlab train`` takes the configs; an installed wheel has no checkout
around it, so the build copies ``notebooks/*.ipynb`` and ``configs/*.yaml`` into ``cirlab/_resources/`` (found by
``cirlab.core.shipped.resource_dir``). Editable installs read them from the checkout instead.

In a git checkout only the files git tracks are shipped, by the wheel and by the sdist (a notebook JupyterLab made,
``notebooks/Untitled.ipynb``, or a local config is left out, with a warning naming it); without ``.git`` (an
unpacked sdist) whatever the folders hold is shipped. A wheel build with no notebooks or no configs fails.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import FileError

HERE = Path(__file__).resolve().parent
RESOURCES = {"notebooks": "*.ipynb", "configs": "*.yaml"}


def git_tracked(here: Path = HERE) -> set[str] | None:
    """The paths (relative, posix) git tracks under ``notebooks/`` and ``configs/`` of ``here``, or None where ``here``
    is not the top of a git checkout (an unpacked sdist, also inside another repository) or git is missing."""
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != here.resolve():
            return None
        listed = subprocess.run(["git", "-C", str(here), "ls-files", "-z", "--", *RESOURCES], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if listed.returncode != 0:
        return None
    return {name for name in listed.stdout.split("\0") if name}


def warn_untracked(path: str, what: str) -> None:
    print(f"warning: cirlab build: {path} is not tracked by git: left out of the {what}", file=sys.stderr)


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        tracked = git_tracked()
        for folder, pattern in RESOURCES.items():
            sources = sorted((HERE / folder).glob(pattern))
            if tracked is not None:
                for source in sources:
                    if f"{folder}/{source.name}" not in tracked:
                        warn_untracked(f"{folder}/{source.name}", "wheel")
                sources = [s for s in sources if f"{folder}/{s.name}" in tracked]
            if not sources:
                raise FileError(f"cirlab build: {folder}/ is missing or holds no {pattern} (tracked by git) in {HERE}: "
                                f"the wheel must ship cirlab's {folder}")
            built = Path(self.build_lib) / "cirlab" / "_resources" / folder
            # a build/ kept from an earlier build still holds the copy of a file since deleted from the checkout (or
            # no longer shipped)
            shipped = {s.name for s in sources}
            for stale in sorted(built.glob(pattern)) if built.is_dir() else []:
                if stale.name not in shipped:
                    stale.unlink()
            for source in sources:
                target = built / source.name
                self.mkpath(str(target.parent))
                self.copy_file(str(source), str(target))


class SdistTrackedResources(sdist):
    """The sdist's ``notebooks/`` and ``configs/`` are what git tracks there, as in the wheel (MANIFEST.in globs the
    working tree)."""

    def make_distribution(self) -> None:
        tracked = git_tracked()
        if tracked is not None:
            kept, dropped = [], set()
            for name in self.filelist.files:
                path = Path(name).as_posix()
                if path.split("/", 1)[0] in RESOURCES and path not in tracked:
                    warn_untracked(path, "sdist")
                    dropped.add(path)
                    continue
                kept.append(name)
            self.filelist.files = kept
            # the egg-info's SOURCES.txt (shipped in the sdist) was written from the same list before
            listing = Path(self.get_finalized_command("egg_info").egg_info) / "SOURCES.txt"
            if dropped and listing.is_file():
                lines = listing.read_text(encoding="utf-8").splitlines()
                listing.write_text("".join(f"{line}\n" for line in lines if line not in dropped), encoding="utf-8")
        super().make_distribution()


setup(cmdclass={"build_py": BuildPyWithResources, "sdist": SdistTrackedResources})
