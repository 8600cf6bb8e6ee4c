"""Running the model: sampling, the stage-1 decode loop, stage-2 sampling, diffusion, speaker embeddings,
long-form planning, batching, and the TTS object that wires the stages.

Imports every layer below it and mvjax.sources; never convert_weights.
"""
