"""Build hook only (the project is declared in pyproject.toml): ship the notebooks and the run configs in the wheel.

``cirlab report`` runs the notebooks and ``cirlab train`` takes the configs; an installed wheel has no checkout
around it, so the build copies ``notebooks/*.ipynb`` and ``configs/*.yaml`` into ``cirlab/_resources/`` (found by
``cirlab.core.shipped.resource_dir``). Editable installs read them from the checkout instead.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = {"notebooks": "*.ipynb", "configs": "*.yaml"}


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for folder, pattern in RESOURCES.items():
            sources = sorted((here / folder).glob(pattern))
            built = Path(self.build_lib) / "cirlab" / "_resources" / folder
            # a build/ kept from an earlier build still holds the copy of a file since deleted from the checkout
            for stale in sorted(built.glob(pattern)) if built.is_dir() else []:
                if not (here / folder / stale.name).is_file():
                    stale.unlink()
            for source in sources:
                target = built / source.name
                self.mkpath(str(target.parent))
                self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithResources})
