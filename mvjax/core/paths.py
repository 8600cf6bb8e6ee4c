"""Where mvjax keeps what it makes: one cache root for everything.

``$MVJAX_CACHE`` if set, else ``$XDG_CACHE_HOME/mvjax``, else ``~/.cache/mvjax``. Beneath it:
``converted/`` (released checkpoints converted once, keyed by content), ``demo/`` (the random
demo model), ``speaker_embeddings/``, ``xla/`` (compiled programs) and ``kernels/`` (the CPU
int8 kernel). Deleting any of them is safe: it is rebuilt when needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_root(root: Optional[str | os.PathLike] = None) -> Path:
    """``root`` if given, else the cache root described above."""
    if root is not None:
        return Path(root)
    if os.environ.get("MVJAX_CACHE"):
        return Path(os.environ["MVJAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mvjax"
