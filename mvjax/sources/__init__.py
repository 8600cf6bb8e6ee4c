"""Where a model comes from: a converted directory, released checkpoints (converted once through
convert_weights' one entry point, :func:`convert_weights.convert_released`) or a hub repo id; and the
random demo model (:mod:`mvjax.sources.demo`).

Imports mvjax.core, io and convert_weights' entry points.
"""
