"""Audio processing: file input/output, librosa-exact features, band splitting, loudness, DeepFilterNet3.

Imports mvjax.core only.
"""
