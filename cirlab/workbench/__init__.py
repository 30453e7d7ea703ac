"""Workbench layer: what notebooks and reports call.

``recipes`` (train / load / evaluate / trace a run in one call each; re-exported here so that
``from cirlab import workbench; workbench.train_run(...)`` works), ``analysis`` (tidy frames from traces and
top-K files), ``viz`` (figures), ``widgets`` (the interactive explorers) and ``report`` (headless notebook runs).
"""
from cirlab.workbench.recipes import *  # noqa: F401,F403  (cheap: recipes import heavy modules lazily)
from cirlab.workbench.recipes import __all__  # noqa: F401
