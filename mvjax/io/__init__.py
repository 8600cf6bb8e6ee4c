"""Checkpoint and model input/output: the converted-model format (Orbax trees, manifest, configs) and
parameter quantisation at load time.

Imports mvjax.core, kernels, text, nn.
"""
