"""Foundations every layer may use: errors, the cache root, atomic writes, matmul precision, device meshes.

Imports nothing from mvjax.
"""
