"""User-facing errors: the ones the command line reports as one line (exit code 2) instead of a traceback.

They live here, away from the modules that raise them, so that catching them imports nothing heavy (the
checkpoint module imports torch; ``cirlab --help`` and ``cirlab models`` must not).
"""
from __future__ import annotations


class CirlabError(Exception):
    """Base of every error caused by the user's input (a config, a file, a dataset, a flag)."""


class ConfigError(CirlabError, ValueError):
    """A run config is malformed; the message names the file and the key."""


class CheckpointError(CirlabError, RuntimeError):
    """A checkpoint file is missing, damaged, or needs ``trust_pickle=True``."""
