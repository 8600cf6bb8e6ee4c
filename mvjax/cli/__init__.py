"""Command-line entry points (python -m mvjax.synthesize / vocode / parity) and the demo model.

May import anything.
"""
