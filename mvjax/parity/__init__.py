"""The parity tool, ``python -m mvjax.parity``: mvjax checked against a reference fixture directory (arrays
the original PyTorch code produced from small random released-layout checkpoints).

:mod:`~mvjax.parity.fixture` reads a fixture and compares results, :mod:`~mvjax.parity.checks` holds the
checks of each component, :mod:`~mvjax.parity.finetune` the fine-tuning ones; :mod:`~mvjax.parity.__main__`
is the command. Beside mvjax.cli: may import every runtime layer and any of convert_weights (the command
may also import mvjax.cli.common).
"""

# The components the tool checks, in order (here, so that ``python -m mvjax.parity --help`` lists them
# without loading the checks).
COMPONENTS = (
    "tokenizer",
    "stage1-forward",
    "stage1-decode",
    "stage1-batch",
    "stage2",
    "speaker",
    "encodec",
    "mbd",
    "pipeline",
    "finetune",
)
