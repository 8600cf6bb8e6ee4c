"""Fine-tuning the first stage: data preparation, the training step, checkpoints, export.

``python -m mvjax.finetune prepare|train|export`` (:mod:`mvjax.cli.finetune`) drives it. The
layer sits above :mod:`mvjax.inference` (data preparation embeds speakers and encodes audio with
the inference components) and below :mod:`mvjax.cli`.
"""
