"""Core layer: pure functions and file formats every other layer builds on.

``metrics`` (protocol-exact recall), ``retrieval`` (exact chunked top-K, re-ranking, corpus encoding and its
feature cache), ``topk`` (the top-K file format), ``tracing`` (router/attention traces), ``checkpoint`` (safe
checkpoint files), ``config`` (preset dataclasses), ``paths`` (data, cache and run folders), ``io`` (atomic
writes) and ``contracts`` (the model protocols). Nothing here imports from ``engine``, ``models`` or
``workbench``.
"""
