"""Hand-written compute kernels (the CPU int8 matmul and cache attention in C++, their Pallas
counterparts for GPU and TPU) and the dispatch that picks them or plain XLA by platform
(:mod:`mvjax.kernels.platform`).

Imports mvjax.core only.
"""

from mvjax.kernels.platform import pallas_names

__all__ = ["pallas_names"]
