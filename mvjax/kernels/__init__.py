"""Hand-written compute kernels (the CPU int8 matmul) and the dispatch that picks them or plain XLA.

Imports mvjax.core only.
"""
