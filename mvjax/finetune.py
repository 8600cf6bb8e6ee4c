"""``python -m mvjax.finetune``: fine-tune the first stage (the command lives in :mod:`mvjax.cli.finetune`)."""

import sys

from mvjax.cli.common import exit_now
from mvjax.cli.finetune import main

if __name__ == "__main__":
    from mvjax.train.job import supervise  # a process of a multi-process training job runs it in a child

    supervised = supervise(sys.argv[1:])
    exit_now(main() if supervised is None else supervised)
