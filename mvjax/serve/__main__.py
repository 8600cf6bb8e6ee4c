"""``python -m mvjax.serve``: the speech server (the command lives in :mod:`mvjax.cli.serve`)."""

from mvjax.cli.common import exit_now
from mvjax.cli.serve import main

if __name__ == "__main__":
    exit_now(main())
