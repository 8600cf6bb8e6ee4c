"""``python -m mvjax.finetune``: fine-tune the first stage (the command lives in :mod:`mvjax.cli.finetune`)."""

from mvjax.cli.common import exit_now
from mvjax.cli.finetune import main

if __name__ == "__main__":
    exit_now(main())
