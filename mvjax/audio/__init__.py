"""Audio processing: file input/output, librosa-exact features, band splitting, loudness, DeepFilterNet3,
finishing chunked speech (crossfades, loudness, enhancement; whole or streamed).

Imports mvjax.core only.
"""
