"""Model code: frozen configs built from checkpoints and pure Flax/JAX modules (GPT, speaker encoder, EnCodec,
diffusion U-Net), plus the GPT's KV-cache decoding layout.

Imports mvjax.core and mvjax.kernels.
"""
