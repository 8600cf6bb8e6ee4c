"""Command-line entry points (python -m mvjax.synthesize / vocode / finetune / serve).

May import anything.
"""
