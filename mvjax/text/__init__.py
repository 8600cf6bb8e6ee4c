"""Text: normalisation, the checkpoints' BPE tokenizer, and how text and audio codes share a token stream.

Imports mvjax.core only.
"""
