"""JAX's persistent compilation cache, kept under the cache root (``<cache root>/xla``)."""

from __future__ import annotations

import os

import jax

from mvjax.core.paths import cache_root


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (``$MVJAX_CACHE/xla``) so later runs skip most compilation;
    ``MVJAX_COMPILATION_CACHE=0`` turns it off."""
    if os.environ.get("MVJAX_COMPILATION_CACHE", "1") == "0":
        return
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
