"""``python -m mvjax.vocode``: Codec tokens -> audio (the command lives in :mod:`mvjax.cli.vocode`)."""

from mvjax.cli.common import exit_now
from mvjax.cli.vocode import main

if __name__ == "__main__":
    exit_now(main())
