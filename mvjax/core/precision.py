"""The matmul precision policy: one setting shared by the runtime, the CLIs, the tests and the parity tool.

XLA's default float32 matmul precision differs by backend: exact float32 on CPU, but on GPUs
(TF32 tensor cores) and TPUs (one bfloat16 pass) "default" keeps only ~10 or ~8 mantissa bits
of each operand. The reference (PyTorch, float32 weights) multiplies in full float32 on
CPU and, with torch's defaults (``allow_tf32`` off for matmuls), on CUDA too. So mvjax runs at
``"highest"`` unless told otherwise, and ``python -m mvjax.parity`` certifies exactly that
program: both call :func:`apply`, which reads the same default and the same override.

Override with ``--matmul-precision`` on every CLI, ``TTS.load(..., matmul_precision=...)``
or the ``MVJAX_MATMUL_PRECISION`` environment variable: ``"high"`` (TF32 / three bfloat16
passes) or ``"default"`` trade parity for speed on accelerators. On CPU all three are the same
program. Weights quantised to bf16, int8 or int4 are unaffected (their inputs are already narrower).
"""

from __future__ import annotations

import os
from typing import Optional

from mvjax.core.errors import MvjaxError

POLICIES = ("highest", "high", "default")
DEFAULT_POLICY = "highest"
ENV_VAR = "MVJAX_MATMUL_PRECISION"


class PrecisionError(MvjaxError, ValueError):
    """An unknown matmul precision policy."""


def resolve(policy: Optional[str] = None) -> str:
    """The policy to use: ``policy`` if given, else ``$MVJAX_MATMUL_PRECISION``, else ``"highest"``."""
    chosen = policy if policy is not None else os.environ.get(ENV_VAR) or DEFAULT_POLICY
    chosen = chosen.strip().lower()
    if chosen not in POLICIES:
        source = "matmul precision" if policy is not None else ENV_VAR
        raise PrecisionError(f"{source} must be one of {', '.join(POLICIES)} (got {chosen!r})")
    return chosen


def apply(policy: Optional[str] = None) -> str:
    """Set JAX's default matmul precision to the resolved policy (process-wide); returns it."""
    import jax  # heavy: the CLIs import this module at the top and check a policy before jax loads

    chosen = resolve(policy)
    jax.config.update("jax_default_matmul_precision", chosen)
    return chosen


def current() -> str:
    """The policy JAX runs with now ("default" when nothing set it)."""
    import jax  # heavy: see apply

    return str(jax.config.jax_default_matmul_precision or "default")
