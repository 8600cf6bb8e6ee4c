"""``python -m mvjax.batch``: a resumable dataset job, locally or on Ray (the command lives in :mod:`mvjax.cli.batch`)."""

from mvjax.cli.batch import main
from mvjax.cli.common import exit_now

if __name__ == "__main__":
    exit_now(main())
