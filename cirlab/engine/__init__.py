"""Engine layer: the one training loop (``train``), the config-driven experiment runner (``runs``) and the
evaluation pipelines (``evaluate``). Builds on ``cirlab.core``, ``cirlab.data`` and ``cirlab.models``."""
