"""Foundations every layer may use: errors, the cache root, atomic writes, matmul precision, device meshes,
the compilation cache.

Imports nothing from mvjax.
"""
